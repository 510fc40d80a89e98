"""Fair under mixed load: the small one-clip jobs most clients send, alone and beside each kind
of heavy work, through the worker as Runpod runs it (`python handler.py`, the SDK's real worker
loop) polling a fake Runpod job queue on 127.0.0.1 (tools/testkit.py).

    make bench                       # runs this after bench.concurrency
    python -m bench.fairness         # alone

One worker (the default config but MAX_SINGLE_PASS_SEC, see LONG_*). For each workload the heavy
jobs are queued first, and once they are under way (the model, a download or ffmpeg busy with
them) CLIP_JOBS one-clip jobs follow; their median latency (queued -> answered) is set against
the same clip jobs on the idle worker:
  long file    one job of a LONG_MIN-minute file, in pieces of LONG_PIECE_SEC (the issue's file is
               45 minutes; scaled down to keep this phase short on a 2-core machine)
  backlog      one job of 500 short clips, taken 1 s before them
  trickling    20 jobs whose URLs trickle a byte every 0.2 s (stopped afterwards); the clips are
               URLs on the same server
  slow decodes 8 jobs of a 90-s 8-channel 48 kHz Vorbis file (the issue's: 16 of 3 minutes)
  stopped      8 jobs of 8 such files each, stopped while they wait for ffmpeg; then the clips
               are jobs of one missing file each (an answer that needs no model)
Then the burst of bench.concurrency: 48 one-clip jobs at once against one 48-clip job.

Prints a table and writes every raw number to bench/out/fairness.json.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import common, concurrency
from bench.common import OUT
from bench.concurrency import QueueWorker, make_clips
from tools.testkit import LocalServer

CLIP_JOBS = 8
LONG_MIN, LONG_PIECE_SEC = 20.0, 300.0
TARGETS = {"backlog": 2.0, "trickling": 2.0}  # small jobs' median latency / alone


def long_file(minutes: float) -> Path:
    """Speech with pauses, as bench.long_audio makes it (cached by spec)."""
    from bench import long_audio

    spec = {"version": long_audio.SPEC_VERSION, "minutes": minutes, "seed": 7, "format": "wav", "bank": 600}
    return long_audio.build_audio(spec)[0]


def vorbis_8ch(seconds: float) -> Path:
    """A file that is slow to decode: 8 channels at 48 kHz, Vorbis (speech-free noise)."""
    path = OUT / "fairness" / f"noise-8ch-{seconds:.0f}s.ogg"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                        f"anoisesrc=r=48000:a=0.05:d={seconds}", "-af", "pan=7.1|c0=c0|c1=c0|c2=c0|c3=c0|c4=c0|c5=c0|c6=c0|c7=c0",
                        "-c:a", "libvorbis", "-q:a", "3", str(path)], check=True)  # fmt: skip
    return path


class Phase:
    """One workload on the shared worker: heavy jobs first, then the clip jobs."""

    def __init__(self, worker: QueueWorker):
        self.w, self.q = worker, worker.queue

    def clip_latencies(self, jobs: Sequence[dict[str, Any]]) -> tuple[list[float], list[dict[str, Any]]]:
        ids = [self.q.add(job) for job in jobs]
        outs = self.q.wait_done(ids, 1800)
        return [self.q.done_at[i] - self.q.queued_at[i] for i in ids], outs


def clip_jobs(clips: list[tuple[Path, str]], server: LocalServer | None = None) -> list[dict[str, Any]]:
    picked = clips[:CLIP_JOBS]
    if server is None:
        return [{"inputs": [{"source": str(p)}]} for p, _ in picked]
    return [{"inputs": [{"source": server.add(p)}]} for p, _ in picked]


def wait_for(condition: Any, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout} s")
        time.sleep(0.05)


def summary(latencies: list[float], alone: float) -> dict[str, Any]:
    median = statistics.median(latencies)
    return {"latencies_sec": latencies, "median_sec": median, "vs_alone": median / alone}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    clips = make_clips(48)
    long_path, slow_file = long_file(args.long_min), vorbis_8ch(90)
    worker = QueueWorker("fairness", MAX_SINGLE_PASS_SEC=f"{args.piece_sec:g}")
    q, phase, r = worker.queue, Phase(worker), {}
    try:
        with LocalServer() as server:
            worker.run([clip_jobs(clips)[0]])  # waits for the model load; warms everything
            lat, _ = phase.clip_latencies(clip_jobs(clips))
            r["alone"] = {"latencies_sec": lat, "median_sec": statistics.median(lat)}
            lat, _ = phase.clip_latencies(clip_jobs(clips, server))
            r["alone_url"] = {"latencies_sec": lat, "median_sec": statistics.median(lat)}
            alone, alone_url = r["alone"]["median_sec"], r["alone_url"]["median_sec"]

            print("long file ...", flush=True)
            long_id = q.add({"inputs": [{"source": str(long_path)}]})
            wait_for(lambda: long_id in q.taken_at, "long job taken")
            time.sleep(args.settle)  # decoded, its first piece in the model
            lat, _ = phase.clip_latencies(clip_jobs(clips))
            (long_out,) = q.wait_done([long_id], 1800)
            stats = long_out["output"]["stats"]
            r["long_file"] = {**summary(lat, alone), "minutes": args.long_min, "piece_sec": args.piece_sec,
                              "pieces": stats["batches"], "long_job_sec": q.done_at[long_id] - q.queued_at[long_id],
                              "piece_model_sec": (q.done_at[long_id] - q.taken_at[long_id]) / max(1, stats["batches"])}  # fmt: skip

            print("backlog ...", flush=True)
            big_id = q.add({"inputs": [{"source": str(clips[n % 48][0])} for n in range(500)]})
            time.sleep(1.0)
            lat, _ = phase.clip_latencies(clip_jobs(clips))
            q.wait_done([big_id], 1800)
            r["backlog"] = {**summary(lat, alone), "big_job_sec": q.done_at[big_id] - q.queued_at[big_id]}

            print("trickling downloads ...", flush=True)
            slow = [q.add({"inputs": [{"source": f"{server.url}/trickle-forever/t{n}.wav"}]}) for n in range(20)]
            wait_for(lambda: sum(server.hits.get(f"/trickle-forever/t{n}.wav", 0) for n in range(20)) >= 16, "trickles")
            lat, outs = phase.clip_latencies(clip_jobs(clips, server))
            r["trickling"] = {**summary(lat, alone_url), "still_trickling": sum(j not in q.results for j in slow)}
            for job in slow:
                q.stop(job)

            print("slow decodes ...", flush=True)
            heavy = [q.add({"inputs": [{"source": str(slow_file)}]}) for _ in range(8)]
            wait_for(lambda: all(j in q.taken_at for j in heavy), "slow-decode jobs taken")
            time.sleep(args.settle)
            lat, _ = phase.clip_latencies(clip_jobs(clips))
            q.wait_done(heavy, 1800)
            r["slow_decodes"] = summary(lat, alone)

            print("stopped jobs ...", flush=True)
            missing_alone = []
            for n in range(3):
                missing_alone += phase.clip_latencies([{"inputs": [{"source": str(OUT / f"absent-{n}.wav")}]}])[0]
            waiting = [q.add({"inputs": [{"source": str(slow_file)}] * 8}) for _ in range(8)]
            wait_for(lambda: all(j in q.taken_at for j in waiting), "to-be-stopped jobs taken")
            time.sleep(args.settle)
            for job in waiting:
                q.stop(job)
            lat, outs = phase.clip_latencies([{"inputs": [{"source": str(OUT / f"absent-{n}.wav")}]} for n in range(10)])
            r["stopped"] = {**summary(lat, statistics.median(missing_alone)), "alone_sec": missing_alone,
                            "codes": [o["output"]["results"][0].get("code") for o in outs]}  # fmt: skip
            wait_for(lambda: not list(worker.tmp.glob("job-*")), "stopped jobs' temp dirs to go", 300)
    finally:
        worker.close()
    print("burst: 48 one-clip jobs ...", flush=True)
    r["burst"] = concurrency.measure_concurrency(64, clips)
    return r


def table_rows(r: dict[str, Any]) -> list[tuple[Any, ...]]:
    def row(name: str, key: str, target: str, ok: Any, alone_key: str = "alone") -> tuple[Any, ...]:
        alone = (r[key].get("alone_sec") and statistics.median(r[key]["alone_sec"])) or r[alone_key]["median_sec"]
        return (name, f"{r[key]['median_sec']:.2f} s", f"{alone:.2f} s", f"{r[key]['vs_alone']:.1f}x", target, ok)

    long = r["long_file"]
    b = r["burst"]
    return [
        row(f"one job of a {long['minutes']:g}-min file, pieces of {long['piece_sec']:g} s ({long['pieces']} batches, "
            f"~{long['piece_model_sec']:.1f} s each)", "long_file",
            f"<= alone + one piece ({r['alone']['median_sec'] + long['piece_model_sec']:.1f} s)",
            long["median_sec"] <= r["alone"]["median_sec"] + long["piece_model_sec"]),
        row("one job of 500 short inputs, taken 1 s before them", "backlog", "<= 2x", r["backlog"]["vs_alone"] <= 2),
        row("20 jobs whose URLs trickle (clips are URLs too)", "trickling", "<= 2x", r["trickling"]["vs_alone"] <= 2,
            "alone_url"),
        row("8 jobs of a 90-s 8-channel 48 kHz Vorbis file", "slow_decodes", "", ""),
        row("8 stopped jobs waiting for ffmpeg, then 10 jobs of one missing file", "stopped", "", ""),
        ("48 one-clip jobs at once vs one 48-clip job (wall)", f"{b['jobs_wall_sec']:.2f} s", f"{b['one_job_sec']:.2f} s",
         f"{b['jobs_vs_one_job']:.2f}x", "<= 3x", b["jobs_vs_one_job"] <= 3),
        ("48 one-clip jobs: mean batch", f"{b['mean_batch_size']:.1f}", "", "", ">= 4", b["mean_batch_size"] >= 4),
    ]  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--long-min", type=float, default=LONG_MIN, help="minutes of the long file")
    p.add_argument("--piece-sec", type=float, default=LONG_PIECE_SEC, help="MAX_SINGLE_PASS_SEC for this phase")
    p.add_argument("--settle", type=float, default=3.0, help="seconds the heavy work runs before the clips come")
    common.add_model_args(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.configure_env(**({"PARAKEET_MODEL": args.model} if args.model else {}))
    started = time.perf_counter()
    with common.ForeignLoad() as load:
        result = {"args": vars(args), **measure(args)}
    result["other_processes"] = load.summary()
    result["total_sec"] = time.perf_counter() - started
    header = ("beside the clip jobs", "their median latency", "alone", "ratio", "target", "ok?")
    print(common.markdown_table(header, table_rows(result)))
    print(f"\n{result['total_sec']:.0f} s in all; raw numbers in {common.write_json('fairness.json', result)}")
    return result


if __name__ == "__main__":
    main()
