"""Every change the worker makes to another library's code or to process-wide settings, in one place.

Each patch names what it replaces upstream and the versions it was written against, is applied
by main() or the model loader (never at import), is idempotent, and is guarded: where the
upstream code no longer has the shape it replaces, the patch does nothing (tests/test_patches.py
fails then, so an upgrade is noticed).

| patch | upstream | versions |
|---|---|---|
| fix_tdt_durations | NeMo GreedyBatchedTDTLabelLoopingComputer.torch_impl (NVIDIA-NeMo issue 16097, PR 16098) | nemo_toolkit 3.0.0 |
| redact_sdk_log | runpod.serverless.modules.rp_logger.RunPodLogger.log | runpod 1.12.0 |
| limit_job_takes | runpod.serverless.modules.rp_scale.get_job | runpod 1.12.0 |
| finish_taken_jobs | runpod.serverless.modules.rp_scale.JobScaler.get_jobs / run_jobs | runpod 1.12.0 |
| configure_logging | the root logger's level and handlers (LOG_LEVEL), every record redacted | - |
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from parakeet_worker import config, logsafe

log = logging.getLogger("parakeet-worker")

# What each patch replaces or wraps, as it stands upstream in the versions above: (module,
# qualified name, the first 16 hex digits of the SHA-256 of its source as written there).
# tests/test_patches.py reads the installed source and fails when it changed shape.
UPSTREAM: dict[str, tuple[str, str, str]] = {
    "fix_tdt_durations": ("nemo.collections.asr.parts.submodules.transducer_decoding.tdt_label_looping",
                          "GreedyBatchedTDTLabelLoopingComputer.torch_impl", "60003bb8f2ceb042"),
    "redact_sdk_log": ("runpod.serverless.modules.rp_logger", "RunPodLogger.log", "e1072ebd0277b331"),
    "limit_job_takes": ("runpod.serverless.modules.rp_job", "get_job", "3aa76b8f60ddd378"),
    "finish_taken_jobs (get_jobs)": ("runpod.serverless.modules.rp_scale", "JobScaler.get_jobs", "a480b9b83e48cb03"),
    "finish_taken_jobs (run_jobs)": ("runpod.serverless.modules.rp_scale", "JobScaler.run_jobs", "b488c45fca19298c"),
}  # fmt: skip


def fix_tdt_durations() -> bool:
    """Apply NeMo's fix for stale TDT token durations to NeMo 3.0, once; True when it is in place.

    NeMo 3.0's pure-PyTorch greedy TDT loop (GreedyBatchedTDTLabelLoopingComputer.torch_impl,
    used on the CPU, and on a GPU without CUDA graphs) overwrites, while it looks for the next
    token of some rows, the recorded duration of every row in the batch. A word's end time then
    depends on which other items share its batch (a clip alone and the same clip batched end
    words at different frames), and with boosting, on whether a neighbour is boosted. NeMo's CUDA
    graph loop writes the durations of the searching rows only; upstream fixed torch_impl the same
    way after 3.0 (NVIDIA-NeMo issue 16097, PR 16098). This recompiles torch_impl from NeMo's own
    source with that one line changed. It is guarded: if the line is not exactly where 3.0 has it
    (a NeMo that is already fixed, or changed), nothing is patched and False is returned."""
    import inspect
    import textwrap

    from nemo.collections.asr.parts.submodules.transducer_decoding import tdt_label_looping as module

    cls = module.GreedyBatchedTDTLabelLoopingComputer
    if getattr(cls.torch_impl, "_durations_fixed", False):
        return True
    try:
        source = textwrap.dedent(inspect.getsource(cls.torch_impl))
    except (OSError, TypeError):
        return False
    stale = "            durations = model_durations[jump_durations_indices]\n\n            if self.record_all_steps:"
    fixed = (
        "            durations = torch.where(advance_mask, model_durations[jump_durations_indices], durations)\n\n"
        "            if self.record_all_steps:"
    )  # 12 spaces: the inner loop; the outer loop's assignment (8 spaces) is right as it is
    if source.count(stale) != 1 or "super()" in source:
        return False
    namespace: dict[str, Any] = {}
    exec(compile(source.replace(stale, fixed), inspect.getsourcefile(cls.torch_impl) or "<nemo>", "exec"),
         module.__dict__, namespace)  # fmt: skip
    patched = namespace["torch_impl"]
    patched._durations_fixed = True
    cls.torch_impl = patched
    log.info("NeMo 3.0: patched TDT greedy decoding's stale token durations (upstream PR 16098)")
    return True


def redact_sdk_log() -> None:
    """The runpod SDK logs through RunPodLogger.log(), which prints: wrap it once so that each
    message is made safe (safe_lines) before the SDK formats and prints it."""
    from runpod.serverless.modules.rp_logger import RunPodLogger

    printing = RunPodLogger.log
    if getattr(printing, "redacts", False):
        return

    def safe_log(self: Any, message: Any, message_level: str = "INFO", job_id: str | None = None) -> None:
        printing(self, logsafe.safe_lines(str(message)), message_level, job_id)

    safe_log.redacts = True  # type: ignore[attr-defined]
    RunPodLogger.log = safe_log  # type: ignore[method-assign]


def limit_job_takes() -> None:
    """Ask Runpod for at most JOB_TAKE_MAX jobs per take. The SDK asks for as many jobs as it
    has free slots (MAX_CONCURRENT_JOBS at first) in one request and parses the answer whole:
    its bytes, their text and the parsed jobs are all in memory at once, three copies of every
    request, so 64 jobs of 15 MB of base64 took 2.8 GB for a moment. Smaller takes, one after
    the other, bring the same jobs in with a fraction of that peak. Off (0) or on an SDK
    without this function, takes are left as they are."""
    from runpod.serverless.modules import rp_scale

    real = getattr(rp_scale, "get_job", None)
    if config.CFG.job_take_max <= 0 or real is None or getattr(real, "_take_max", None):
        return

    async def take(session: Any, num_jobs: int = 1) -> Any:
        return await real(session, max(1, min(num_jobs, config.CFG.job_take_max)))

    take._take_max = True  # type: ignore[attr-defined]
    rp_scale.get_job = take


def finish_taken_jobs() -> None:
    """No job the worker has taken is lost at SIGTERM. runpod 1.12 (rp_scale.JobScaler) stops
    asking for jobs at SIGTERM, but its run loop also ends as soon as its queue is empty, while
    a take request may still be open: the jobs that request hands out afterwards were queued,
    never run, never answered (3 tries of 3 lost 10 jobs). Here the run loop goes on until the
    take loop has ended, and runs every job it queued; jobs already running finish as before."""
    from runpod.serverless.modules import rp_scale

    scaler = rp_scale.JobScaler
    if getattr(scaler.run_jobs, "drains", False):
        return
    take_loop, run_loop = scaler.get_jobs, scaler.run_jobs

    async def get_jobs(self: Any, session: Any) -> None:
        try:
            await take_loop(self, session)
        finally:
            self.taking_ended = True

    async def run_jobs(self: Any, session: Any) -> None:
        await run_loop(self, session)  # returns once shut down with an empty queue
        while not getattr(self, "taking_ended", False) or not self.jobs_queue.empty():
            if self.jobs_queue.empty():
                await asyncio.sleep(0.05)
                continue
            log.info("running %d job(s) taken as the worker shut down", self.jobs_queue.qsize())
            await run_loop(self, session)

    run_jobs.drains = True  # type: ignore[attr-defined]
    scaler.get_jobs, scaler.run_jobs = get_jobs, run_jobs  # type: ignore[method-assign]


def configure_logging() -> None:
    """LOG_LEVEL sets the root logger's level (importing runpod has already given the root a
    handler, so basicConfig alone would change nothing), and no line that reaches the log can
    carry a URL's secrets or forge another line, whoever wrote it: this worker's records are
    made safe as they are made, every root handler's records as they are written (urllib3 logs
    request paths with their query strings at DEBUG), and the SDK's own logger, which prints
    ("Handler output: {...}" quotes every source at its default level, DEBUG), prints them safe."""
    level = config.CFG.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    for own in (log, logging.getLogger("parakeet-worker.http")):  # a logger's filters see only its own records
        if not any(isinstance(f, logsafe.SafeLogRecords) for f in own.filters):
            own.addFilter(logsafe.SafeLogRecords())
    for handler_ in logging.getLogger().handlers:
        if not any(isinstance(f, logsafe.SafeLogRecords) for f in handler_.filters):
            handler_.addFilter(logsafe.SafeLogRecords())
    redact_sdk_log()
