"""Many small jobs at once: the worker as Runpod runs it (`python handler.py`, the SDK's real
worker loop) against a fake Runpod job queue on 127.0.0.1 (tools/testkit.py).

    make bench                                   # runs this after bench.throughput
    python -m bench.concurrency                  # alone
    python -m bench.concurrency --concurrency 1 16 32 64    # sweep MAX_CONCURRENT_JOBS

For each MAX_CONCURRENT_JOBS given (the first is the worker's default unless set), one worker:
1. a lone one-clip job sent to the idle worker, five times: its answer time against the
   handler's own wall time for it (what the SDK and the queue add);
2. the 48 clips as one job;
3. the same 48 clips as 48 one-clip jobs, all queued at once: wall, jobs/s, median and p95
   latency, model batches formed and their mean size (from each job's stats.batch_sizes), peak
   temp disk (the worker's temp dir, sampled every 20 ms).
Then the disk bound: one job of nine base64 FLACs of 3 h 53 min of silence (690 KB of request,
4 GB of WAV), on a worker that fetches and decodes for real but whose model takes 3 s per unit
(SKIP_MODEL_LOAD plus a pause: the model is slower than intake, so WAVs pile up until the bound
holds them), with the default bound and with 1 GiB.

Prints a table and writes every raw number to bench/out/concurrency.json.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import common
from bench.common import OUT
from parakeet_worker import config
from tools import synth
from tools.testkit import FakeRunpodQueue, start_worker, stop_worker

CLIPS = 48
TARGETS = {"jobs_vs_one_job": 3.0, "mean_batch_size": 4.0, "lone_overhead_sec": 0.2}
SLOW_MODEL = """
import time
from parakeet_worker import config
from parakeet_worker import model as asr
_real_run_model = asr.run_model
def _slow(model, audio, lengths, timestamps, *rest):
    time.sleep(3.0)  # the model is slower than intake: decoded WAVs wait on disk
    return _real_run_model(model, audio, lengths, timestamps, *rest)
asr.run_model = _slow
"""


def make_clips(count: int) -> list[tuple[Path, str]]:
    """`count` clips of 1-3 s, each saying different words (cached under bench/out)."""
    folder = OUT / "concurrency"
    folder.mkdir(parents=True, exist_ok=True)
    clips = []
    for n in range(count):
        words = [synth.VOCAB[(n * 7 + k * 3) % len(synth.VOCAB)] for k in range(1 + n % 3)]
        text = " ".join(words)
        path = folder / f"clip-{n:02d}-{'-'.join(words)}.wav"
        if not path.exists():
            synth.write(path, synth.speak(text, synth.VOICES[n % len(synth.VOICES)], 150 + (n % 5) * 10))
        clips.append((path, text))
    return clips


def make_silence_flacs(count: int, seconds: float) -> list[str]:
    """`count` base64 FLACs of `seconds` of digital silence (they compress to almost nothing)."""
    path = OUT / "concurrency" / f"silence-{seconds:.0f}s.flac"
    if not path.exists():  # the largest FLAC frames: 57 KB for 3 h 53 min
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                        f"anullsrc=r=16000:cl=mono:d={seconds}", "-c:a", "flac", "-compression_level", "12",
                        "-frame_size", "65535", str(path)], check=True)  # fmt: skip
    payload = base64.b64encode(path.read_bytes()).decode()
    return [payload] * count


class DiskSampler:
    """The bytes under a folder, sampled every 20 ms in a thread; keeps the peak."""

    def __init__(self, folder: Path):
        self.folder, self.peak, self.done = folder, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DiskSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, _bytes_under(self.folder))


def _bytes_under(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass  # deleted while we looked
    return total


class QueueWorker:
    """`python handler.py` on the SDK's worker loop, polling its own fake queue."""

    def __init__(self, name: str, script: str | None = None, **env: str):
        self.tmp = OUT / f"worker-tmp-{name}"
        self.queue = FakeRunpodQueue()
        self.log = OUT / f"worker-{name}.log"
        env = {**common.worker_env(), "WORKER_TMP_DIR": str(self.tmp), **env}
        self.proc = start_worker(self.queue, env, self.log, script=script)

    def run(self, jobs: Sequence[dict[str, Any]], timeout: float = 1800) -> tuple[list[str], list[dict[str, Any]]]:
        ids = [self.queue.add(job) for job in jobs]
        outs = self.queue.wait_done(ids, timeout)
        for out in outs:
            if "error" in out:
                raise RuntimeError(f"job failed: {out['error']}; see {self.log}")
        return ids, outs

    def close(self) -> None:
        stop_worker(self.proc)
        self.queue.close()


def one_clip(path: Path) -> dict[str, Any]:
    return {"inputs": [{"source": str(path)}]}


def batches_formed(outs: Sequence[dict[str, Any]]) -> float:
    """Model batches that carried these one-clip jobs: a batch of s items holds s of them."""
    return sum(1 / out["output"]["stats"]["batch_sizes"][0] for out in outs)


def measure_concurrency(limit: int, clips: list[tuple[Path, str]]) -> dict[str, Any]:
    worker = QueueWorker(f"c{limit}", MAX_CONCURRENT_JOBS=str(limit))
    q = worker.queue
    try:
        worker.run([one_clip(clips[0][0])])  # waits for the model load; warms everything
        lone = []
        for n in range(5):
            time.sleep(1.0)  # idle: nothing in flight, the SDK waiting on its job take
            (job_id,), (out,) = worker.run([one_clip(clips[n][0])])
            answer = q.done_at[job_id] - q.queued_at[job_id]
            lone.append({"answer_sec": answer, "handler_sec": out["output"]["stats"]["wall_sec"]})
        time.sleep(1.0)
        (one_id,), (one_out,) = worker.run([{"inputs": [{"source": str(p)} for p, _ in clips]}])
        one_job_sec = q.done_at[one_id] - q.queued_at[one_id]
        time.sleep(1.0)
        with DiskSampler(worker.tmp) as disk:
            ids, outs = worker.run([one_clip(p) for p, _ in clips])
        latencies = sorted(q.done_at[i] - q.queued_at[i] for i in ids)
        wall = max(q.done_at[i] for i in ids) - min(q.queued_at[i] for i in ids)
        texts = [out["output"]["results"][0]["text"] for out in outs]
        one_texts = [r["text"] for r in one_out["output"]["results"]]
        wrong = [(said, got) for got, (_, said) in zip(texts, clips, strict=True) if got.split() != said.split()]
        formed = batches_formed(outs)
    finally:
        worker.close()
    overheads = [r["answer_sec"] - r["handler_sec"] for r in lone]
    return {
        "max_concurrent_jobs": limit,
        "lone_job": lone,
        "lone_overhead_sec_median": statistics.median(overheads),
        "one_job_sec": one_job_sec,
        "one_job_batch_sizes": one_out["output"]["stats"]["batch_sizes"],
        "jobs_wall_sec": wall,
        "jobs_per_sec": len(ids) / wall,
        "latency_median_sec": statistics.median(latencies),
        "latency_p95_sec": latencies[int(0.95 * (len(latencies) - 1))],
        "batches_formed": round(formed, 2),
        "mean_batch_size": len(ids) / formed,
        "differ_from_one_job": sum(a != b for a, b in zip(texts, one_texts, strict=True)),
        "model_errors": wrong,  # what the demo model misheard, the same way in both runs
        "peak_temp_disk_bytes": disk.peak,
        "sdk_batch_sizes_asked_max": max(q.batch_sizes_asked, default=1),
        "jobs_vs_one_job": wall / one_job_sec,
    }


def measure_disk_bound(bound: int | None) -> dict[str, Any]:
    payloads = make_silence_flacs(9, 3 * 3600 + 53 * 60)
    env = {"SKIP_MODEL_LOAD": "1"}
    if bound:
        env["WORKER_TMP_MAX_BYTES"] = str(bound)
    worker = QueueWorker(f"disk-{bound or 0}", script=SLOW_MODEL, **env)
    try:
        with DiskSampler(worker.tmp) as disk:
            started = time.monotonic()
            (_,), (out,) = worker.run([{"inputs": [{"audio_base64": p} for p in payloads]}])
            wall = time.monotonic() - started
    finally:
        worker.close()
    results = out["output"]["results"]
    return {
        "request_bytes": sum(len(p) for p in payloads),
        "items": len(results),
        "audio_sec": sum(r.get("duration", 0) for r in results),
        "failed": [r.get("code") for r in results if "error" in r],
        "peak_temp_disk_bytes": disk.peak,
        "bound_bytes": bound or 4 * 1024**3,
        "wall_sec": wall,
    }


def table_rows(r: dict[str, Any]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for c in r["concurrency"]:
        tag = f"MAX_CONCURRENT_JOBS={c['max_concurrent_jobs']}"
        rows += [
            (f"{tag}: 48 one-clip jobs, wall s", round(c["jobs_wall_sec"], 2), "", ""),
            (f"{tag}: the same 48 clips as one job, wall s", round(c["one_job_sec"], 2), "", ""),
            (f"{tag}: 48 jobs / one job", round(c["jobs_vs_one_job"], 2), f"<= {TARGETS['jobs_vs_one_job']}",
             c["jobs_vs_one_job"] <= TARGETS["jobs_vs_one_job"]),
            (f"{tag}: jobs/s", round(c["jobs_per_sec"], 1), "", ""),
            (f"{tag}: latency median / p95 s", f"{c['latency_median_sec']:.2f} / {c['latency_p95_sec']:.2f}", "", ""),
            (f"{tag}: batches formed, mean size", f"{c['batches_formed']:.1f}, {c['mean_batch_size']:.1f}",
             f">= {TARGETS['mean_batch_size']}", c["mean_batch_size"] >= TARGETS["mean_batch_size"]),
            (f"{tag}: lone job answer - handler time, median s", round(c["lone_overhead_sec_median"], 3),
             f"<= {TARGETS['lone_overhead_sec']}", c["lone_overhead_sec_median"] <= TARGETS["lone_overhead_sec"]),
            (f"{tag}: peak temp disk MB (48 jobs)", round(c["peak_temp_disk_bytes"] / 1e6, 1), "", ""),
            (f"{tag}: texts that differ from the one-job run", c["differ_from_one_job"], "0",
             c["differ_from_one_job"] == 0),
            (f"{tag}: clips the demo model mishears (either run)", len(c["model_errors"]), "", ""),
        ]  # fmt: skip
    for d in r.get("disk_bound", []):
        rows.append((f"nine 3 h 53 min FLACs ({d['request_bytes'] / 1e3:.0f} KB request), bound "
                     f"{d['bound_bytes'] / 1e6:.0f} MB: peak temp disk MB, items failed",
                     f"{d['peak_temp_disk_bytes'] / 1e6:.0f}, {len(d['failed'])}", f"<= {d['bound_bytes'] / 1e6:.0f}, 0",
                     d["peak_temp_disk_bytes"] <= d["bound_bytes"] and not d["failed"]))  # fmt: skip
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="*", default=[0, 1],
                   help="MAX_CONCURRENT_JOBS values to measure (0: the worker's default)")  # fmt: skip
    p.add_argument("--skip-disk", action="store_true", help="skip the nine-FLAC disk-bound phase")
    p.add_argument("--disk-bounds", type=int, nargs="+", default=[0, 1 << 30],
                   help="WORKER_TMP_MAX_BYTES values for that phase (0: the default)")  # fmt: skip
    common.add_model_args(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.configure_env(**({"PARAKEET_MODEL": args.model} if args.model else {}))

    result: dict[str, Any] = {"args": vars(args), "machine": common.machine_info(os.environ["PARAKEET_MODEL"])}
    if args.wait_quiet:
        result["wait_quiet"] = common.wait_until_quiet(args.wait_quiet)
    clips = make_clips(CLIPS)
    started = time.perf_counter()
    with common.ForeignLoad() as load:
        result["concurrency"] = []
        for limit in args.concurrency:
            limit = limit or config.CFG.max_concurrent_jobs
            print(f"MAX_CONCURRENT_JOBS={limit} ...", flush=True)
            result["concurrency"].append(measure_concurrency(limit, clips))
        if not args.skip_disk:
            print("disk bound: nine 3 h 53 min FLACs ...", flush=True)
            result["disk_bound"] = [measure_disk_bound(bound or None) for bound in args.disk_bounds]
    result["other_processes"] = load.summary()
    result["total_sec"] = time.perf_counter() - started
    print(common.markdown_table(("metric", "value", "target", "ok?"), table_rows(result)))
    print(f"\n{result['total_sec']:.0f} s in all; raw numbers in {common.write_json('concurrency.json', result)}")
    return result


if __name__ == "__main__":
    main()
