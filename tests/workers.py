"""Worker processes the tests start, as real code (no code in strings): each is one subcommand,

    python tests/workers.py serve HOOK [handler.main's args]   # `python handler.py` with a fault hook first
    python tests/workers.py dry JOBS.json REPORT.json           # jobs in-process; what got imported
    python tests/workers.py progress JOBS.json RESULT.json      # jobs one by one, config changes between
    python tests/workers.py vad-threads REPORT.json             # torch threads after VAD's model loads
    python tests/workers.py import-all REPORT.json              # what importing every module does
    python tests/workers.py calibrate REPORT.json               # the memory model's probes, a fit, checks

A hook patches a name where it lives (model.forward_decode), as a test in-process would; the
environment (PW_*) tells it what to do. Each writes its report to a file: a log line of another
thread cannot glue onto it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _wait(condition: Callable[[], bool], seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def hold_and_fail() -> None:
    """test_fairness: jobs whose id starts with "hold-N-" are held: their first batch (of their
    units alone) waits until units of N other jobs are ready, and every later batch of their
    units alone waits for the file <PW_FLAGS>/<id>.release. The model runs out of memory on
    batches of jobs whose id starts with "oom" as soon as a row is over 12 s."""
    import handler
    from parakeet_worker import model as asr

    real, started = asr.forward_decode, set()
    flags = pathlib.Path(os.environ["PW_FLAGS"])

    def scripted(model: Any, audio: Any, lengths: list[int], *rest: Any) -> Any:
        if threading.current_thread().name == "model":
            ids = {u.job.id for u in handler.model_thread().running if u.job is not None}
            if len(ids) == 1 and next(iter(ids)).startswith("hold-"):
                job = next(iter(ids))
                if job not in started:
                    started.add(job)
                    (flags / f"{job}.running").touch()
                    want = int(job.split("-")[1])
                    _wait(lambda: len({u.job.id for u in list(handler.model_thread().ready)} - {job}) >= want)
                else:
                    _wait(lambda: (flags / f"{job}.release").exists())
            if any(i.startswith("oom") for i in ids) and max(lengths) > 12 * 16000:
                raise RuntimeError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return real(model, audio, lengths, *rest)

    asr.forward_decode = scripted


def poisoned_batch() -> None:
    """test_concurrency: the first batch the model thread runs says so (the file PW_HELD) and
    waits until PW_HOLD units are ready, so that the next batch holds all of them (jobs sharing
    a batch for certain); rows of the lengths in PW_POISON fail with the given error."""
    import handler
    from parakeet_worker import model as asr

    real, held = asr.forward_decode, [False]
    poison = {int(k): v for k, v in json.loads(os.environ["PW_POISON"]).items()}

    def faulty(model: Any, audio: Any, lengths: list[int], *rest: Any) -> Any:
        if threading.current_thread().name == "model" and not held[0]:
            held[0] = True
            pathlib.Path(os.environ["PW_HELD"]).touch()
            _wait(lambda: len(handler.model_thread().ready) >= int(os.environ["PW_HOLD"]), 120)
        for n in lengths:
            if n in poison:
                raise RuntimeError(poison[n])
        return real(model, audio, lengths, *rest)

    asr.forward_decode = faulty


def hold_first_batch() -> None:
    """test_openai's dry HTTP server: the first batch writes which of torch and NeMo are
    imported to PW_HELD, then waits for the file PW_RELEASE."""
    from parakeet_worker import engine

    real = engine.run_resilient

    def held(*args: Any, **kwargs: Any) -> Any:
        marker = pathlib.Path(os.environ["PW_HELD"])
        if not marker.exists():
            marker.write_text(repr(sorted(m for m in ("torch", "nemo") if m in sys.modules)))
            _wait(lambda: pathlib.Path(os.environ["PW_RELEASE"]).exists(), 120)
        return real(*args, **kwargs)

    engine.run_resilient = held


AUDITED = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
           "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg")  # fmt: skip


def outbound_audit() -> None:
    """test_privacy: every connect, send to an address and name look-up this process makes from
    Python, from before `import handler` on, one JSON line each in the file PW_AUDIT (written as
    it happens: a worker stopped by SIGTERM loses none)."""
    out = open(os.environ["PW_AUDIT"], "a", buffering=1)  # open for the process's life
    lock = threading.Lock()

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event in AUDITED:
            where = args[1] if event in ("socket.connect", "socket.sendto", "socket.sendmsg") else args[:2]
            with lock:
                out.write(json.dumps({"event": event, "where": repr(where)}) + "\n")

    sys.addaudithook(hook)


HOOKS: dict[str, Callable[[], None]] = {"hold-and-fail": hold_and_fail, "poisoned-batch": poisoned_batch,
                                        "hold-first-batch": hold_first_batch, "outbound-audit": outbound_audit}  # fmt: skip


def serve(hook: str, argv: list[str]) -> None:
    if hook != "-":
        HOOKS[hook]()  # before handler is imported: an audit hook sees the imports too
    import handler

    handler.main(argv)


def dry(jobs_file: str, report: str) -> None:
    """Jobs through handler() in this process (SKIP_MODEL_LOAD=1 in the environment): their
    outputs, the heavy modules imported meanwhile, and what importing handler took."""
    t0 = time.perf_counter()
    import handler

    import_sec = time.perf_counter() - t0
    outs = [asyncio.run(handler.handler({"id": "dry", "input": job})) for job in json.loads(pathlib.Path(jobs_file).read_text())]
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in
                   ("torch", "nemo", "lightning", "librosa", "silero_vad", "onnxruntime", "kaldi_native_fbank"))  # fmt: skip
    pathlib.Path(report).write_text(json.dumps({"outs": outs, "heavy": heavy, "import_sec": import_sec}))


def progress(jobs_file: str, result: str) -> None:
    """(inputs, config changes) pairs, run one after the other through handler()."""
    import handler
    from parakeet_worker import config

    outs = []
    for n, (inputs, changes) in enumerate(json.loads(pathlib.Path(jobs_file).read_text())):
        config.CFG = dataclasses.replace(config.CFG, **changes)
        outs.append(asyncio.run(handler.handler({"id": f"progress-{n}", "input": {"inputs": inputs}})))
    pathlib.Path(result).write_text(json.dumps(outs))


def vad_threads(report: str) -> None:
    """torch's thread count set to 3, then VAD's model loaded: the count the worker keeps."""
    import torch

    torch.set_num_threads(3)
    from parakeet_worker.analysis import vad

    loaded = vad.ensure_vad() is not None
    pathlib.Path(report).write_text(json.dumps([torch.get_num_threads(), loaded]))


def import_all(report: str) -> None:
    """Import handler and every module of the package, recording the environment variables our
    own code reads meanwhile, the threads started and the audit hooks added (none may be)."""
    import importlib

    own = (str(REPO / "parakeet_worker"), str(REPO / "handler.py"))
    read: list[str] = []

    environ_class = type(os.environ)
    real_getitem = environ_class.__getitem__

    def recording_getitem(self: Any, key: str) -> Any:  # every read: [], get(), os.getenv
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.endswith(("os.py", "<frozen os>", "_collections_abc.py", "<frozen _collections_abc>")):
            frame = frame.f_back
        if frame is not None and frame.f_code.co_filename.startswith(own):
            read.append(key)
        return real_getitem(self, key)

    environ_class.__getitem__ = recording_getitem  # type: ignore[method-assign]
    threads = threading.active_count()
    hooks: list[Any] = []
    real_hook = sys.addaudithook
    sys.addaudithook = hooks.append  # type: ignore[assignment]
    import handler  # noqa: F401

    names = sorted(".".join(p.relative_to(REPO).with_suffix("").parts) for p in (REPO / "parakeet_worker").rglob("*.py"))
    for name in names:
        importlib.import_module(name.removesuffix(".__init__"))
    sys.addaudithook = real_hook
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "nemo", "onnxruntime", "silero_vad", "fastapi"))
    pathlib.Path(report).write_text(json.dumps({"modules": len(names), "env_read": read, "heavy": heavy,
                                                "threads_started": threading.active_count() - threads,
                                                "audit_hooks": len(hooks)}))  # fmt: skip


def calibrate(report: str) -> None:
    """test_memory_plans: the memory model's probes measured in this process (run with the
    image's malloc settings, as the worker runs), a fit, and passes measured against it."""
    from parakeet_worker import memory
    from parakeet_worker import model as asr
    from tools.testkit import load_worker

    load_worker()
    model = asr.loaded_model()
    runner = memory.encoder_pass(model, "cpu", lambda mode: asr.set_attention(model, mode == memory.LOCAL))
    cost, measured = memory.calibrate(runner, "cpu", memory.DEFAULT_PROBES, margin=0.25)  # the worker's own probes
    checks = [{"seconds": s, "mode": m, "what": "encoder on noise",
               "used": memory.measure(lambda s=s, m=m: runner(s, 1, m), "cpu")}
              for s, m in ((60.0, "full"), (180.0, "full"), (90.0, "local"), (300.0, "local"))]  # fmt: skip
    import numpy as np

    from tools.testkit import conversation

    audio = conversation([0, 1] * 25, seed=5)[0][None, :].astype(np.float32)
    for mode in ("full", "local"):  # whole passes of speech, as the scheduler runs them
        asr.set_attention(model, mode == memory.LOCAL)
        used = memory.measure(lambda: asr.run_model(model, audio, [audio.shape[1]], False), "cpu")
        checks.append({"seconds": audio.shape[1] / 16000, "mode": mode, "what": "speech, encoder and decoder", "used": used})
    pathlib.Path(report).write_text(json.dumps({"cost": cost.to_dict(), "checks": checks,
                                                "probes": [dataclasses.asdict(p) for p in measured]}))  # fmt: skip


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "serve":
        serve(args[0], args[1:])
    elif command == "dry":
        dry(*args)
    elif command == "progress":
        progress(*args)
    elif command == "vad-threads":
        vad_threads(*args)
    elif command == "import-all":
        import_all(*args)
    elif command == "calibrate":
        calibrate(*args)
    else:
        sys.exit(f"unknown command {command!r}")
