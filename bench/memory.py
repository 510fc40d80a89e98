"""Memory that does not grow: the worker as Runpod runs it (`python handler.py`, the SDK's real
worker loop) against a fake Runpod job queue on 127.0.0.1, its resident memory read from
/proc/<pid>/status while it works.

    make bench                     # runs this after bench.concurrency
    python -m bench.memory         # alone; --bursts 5 --soak 500 are the defaults

1. Bursts: 64 jobs at once, each one ~15 MB base64 WAV (29 s of 48 kHz stereo float speech),
   `--bursts` times. For each: the worker's RSS once it is idle again, and the burst's peak
   (VmHWM, reset before each burst through /proc/<pid>/clear_refs, so it is exact).
2. Soak: `--soak` mixed jobs in waves of 25: one-clip and multi-clip jobs, timestamps on and
   off (and SRT), boosting (a job list, item lists, 40 different lists over the run), bad items
   (invalid base64, a missing file) and stopped jobs (a download that trickles, stopped through
   /job-stop). RSS after each wave.

Targets: RSS after the last burst within 10% of after the first; the soak's RSS over its second
half within 10% of where the half began; a burst's peak under 3.5 GB. Prints a table and writes
the raw numbers (every sample too) to bench/out/memory.json.
"""

from __future__ import annotations

import argparse
import base64
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import common
from bench.common import OUT
from tools.testkit import FakeRunpodQueue, LocalServer, start_worker, stop_worker

BURST_JOBS = 64
WAVE = 25
TARGETS = {"burst_growth": 0.10, "soak_growth": 0.10, "burst_peak_mb": 3500}
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
         "yes", "no", "up", "down", "left", "right", "stop", "go", "hello", "world"]  # fmt: skip


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class RssSampler:
    """The worker's RSS every 0.1 s (MB), with the phase each sample was taken in."""

    def __init__(self, pid: int):
        self.pid, self.samples, self.phase = pid, [], "idle"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> float:
        return _status_kb(self.pid, "VmRSS") / 1024

    def reset_peak(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def peak(self) -> float:
        return _status_kb(self.pid, "VmHWM") / 1024

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(0.1):
            try:
                self.samples.append((round(time.monotonic() - started, 2), self.phase, round(self.rss(), 1)))
            except (OSError, KeyError):
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def settled_rss(sampler: RssSampler, seconds: float = 3.0) -> float:
    """RSS once the worker has been idle a moment (the SDK's last posts done)."""
    time.sleep(seconds)
    return round(sampler.rss(), 1)


def make_burst_clip(folder: Path) -> str:
    """29 s of speech as a 48 kHz stereo 32-bit float WAV, base64-encoded (~15 MB)."""
    mono, wav = folder / "burst-16k.wav", folder / "burst-48k-f32.wav"
    if not wav.is_file():
        common.write_speech(mono, 29.0, seed=21, bank=common.utterance_bank(21, 12))
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(mono), "-ar", "48000", "-ac", "2",
                        "-c:a", "pcm_f32le", str(wav)], check=True)  # fmt: skip
    return base64.b64encode(wav.read_bytes()).decode()


def make_soak_clips(folder: Path, count: int = 8) -> list[Path]:
    """Short speech clips (2-4 s) for the soak: its job count matters, not its audio length."""
    bank = common.utterance_bank(22, 12)
    clips = []
    for n in range(count):
        path = folder / f"soak-{n}.wav"
        if not path.is_file():
            common.write_speech(path, 2.0 + n % 3, seed=100 + n, bank=bank)
        clips.append(path)
    return clips


def soak_job(n: int, clips: Sequence[Path], trickle: str) -> tuple[dict[str, Any], bool]:
    """The n-th soak job, and whether it is to be stopped. A mix over every 10 jobs."""
    clip = str(clips[n % len(clips)])
    other = str(clips[(n + 3) % len(clips)])
    phrases = [f"{WORDS[n % 20]} {WORDS[(n * 7 + 1) % 20]}", WORDS[(n * 3) % 20]]
    kind = n % 10
    if kind in (0, 5):  # one clip, timestamps alternating
        return {"inputs": [{"source": clip}], "timestamps": kind == 5}, False
    if kind == 1:  # several clips, SRT
        return {"inputs": [{"source": clip}, {"source": other}, {"source": clip}], "output_format": "srt"}, False
    if kind == 2:  # the job's list (one of 40 over the run: the tree cache sees hits and misses)
        return {"inputs": [{"source": clip}, {"source": other}], "boost_phrases": phrases, "timestamps": n % 4 == 2}, False
    if kind == 3:  # an item's own list beside one without boosting
        return {"inputs": [{"source": clip, "boost_phrases": phrases[:1]}, {"source": other, "boost_phrases": []}]}, False
    if kind == 4:  # bad items beside a good one
        return {"inputs": [{"audio_base64": "not base64 at all!"}, {"source": clip}, {"source": "/nope/missing.wav"}]}, False
    if kind == 6:  # stopped while its download trickles
        return {"inputs": [{"source": clip}, {"source": trickle}]}, True
    if kind == 7:  # inline audio
        return {"inputs": [{"audio_base64": base64.b64encode(Path(clip).read_bytes()).decode()}], "timestamps": True}, False
    return {"inputs": [{"source": c} for c in (clip, other)], "output_format": "text" if kind == 8 else "vtt"}, False


def run_bursts(queue: FakeRunpodQueue, sampler: RssSampler, payload: str, count: int) -> list[dict[str, Any]]:
    out = []
    for b in range(count):
        sampler.phase = f"burst{b + 1}"
        sampler.reset_peak()
        started = time.monotonic()
        ids = [queue.add({"inputs": [{"audio_base64": payload}]}) for _ in range(BURST_JOBS)]
        results = queue.wait_done(ids, timeout=1800)
        wall = time.monotonic() - started
        bad = [r for r in results if "error" in r or "error" in r["output"]["results"][0]]
        if bad:
            raise RuntimeError(f"burst job failed: {str(bad[0])[:300]}")
        peak = round(sampler.peak(), 1)
        sampler.phase = f"after-burst{b + 1}"
        out.append({"burst": b + 1, "wall_sec": round(wall, 1), "peak_mb": peak, "rss_after_mb": settled_rss(sampler)})
        print(f"  burst {b + 1}: {wall:.1f} s, peak {peak:.0f} MB, after {out[-1]['rss_after_mb']:.0f} MB", flush=True)
    return out


def run_soak(queue: FakeRunpodQueue, sampler: RssSampler, clips: Sequence[Path], trickle: str, jobs: int) -> dict[str, Any]:
    waves, started, stopped = [], time.monotonic(), []
    for first in range(0, jobs, WAVE):
        sampler.phase = f"soak{first // WAVE + 1}"
        wave = [soak_job(n, clips, trickle) for n in range(first, min(first + WAVE, jobs))]
        ids = [queue.add(job) for job, _ in wave]
        to_stop = [i for i, (_, stop) in zip(ids, wave, strict=True) if stop]
        queue.wait_taken(to_stop)
        for job_id in to_stop:
            queue.stop(job_id)
        stopped += to_stop
        done = queue.wait_done([i for i in ids if i not in to_stop], timeout=900)
        failed = [r for r in done if "error" in r]
        if failed:
            raise RuntimeError(f"soak job failed: {str(failed[0])[:300]}")
        waves.append({"jobs": first + len(wave), "rss_mb": round(sampler.rss(), 1)})
    sampler.phase = "after-soak"
    time.sleep(3)  # the stopped jobs' cancellations land
    half = waves[len(waves) // 2 - 1]["rss_mb"]
    second = [w["rss_mb"] for w in waves[len(waves) // 2:]]
    return {
        "jobs": jobs, "stopped": len(stopped), "wall_sec": round(time.monotonic() - started, 1), "waves": waves,
        "rss_at_half_mb": half, "rss_end_mb": waves[-1]["rss_mb"], "second_half_max_mb": max(second),
        "second_half_growth": round(max(second) / half - 1, 4),
        "stopped_answered": sum(1 for j in stopped if j in queue.results),
    }  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bursts", type=int, default=5)
    p.add_argument("--soak", type=int, default=500, help="soak jobs (at least 2 waves of 25)")
    p.add_argument("--env", nargs="*", default=[], metavar="VAR=VALUE", help="extra worker environment")
    p.add_argument("--out", default="memory.json", help="bench/out/<out>")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    folder = OUT / "memory-audio"
    folder.mkdir(exist_ok=True)
    payload, clips = make_burst_clip(folder), make_soak_clips(folder)
    extra = dict(kv.split("=", 1) for kv in args.env)
    print(f"burst job: {len(payload) / 1e6:.1f} MB of base64; worker env {extra or 'as is'}", flush=True)
    queue = FakeRunpodQueue()
    name = args.out.removesuffix(".json")
    env = {**common.worker_env(), "WORKER_TMP_DIR": str(OUT / f"worker-tmp-{name}"), **extra}
    proc = start_worker(queue, env, OUT / f"worker-{name}.log")
    server = LocalServer()
    try:
        sampler = RssSampler(proc.pid)
        queue.wait_done([queue.add({"inputs": [{"source": str(clips[0])}]})], timeout=600)
        idle = settled_rss(sampler, 2.0)
        print(f"idle after one job: {idle:.0f} MB", flush=True)
        bursts = run_bursts(queue, sampler, payload, args.bursts)
        soak = run_soak(queue, sampler, clips, f"{server.url}/trickle/stopped.wav", args.soak)
        deadline = time.monotonic() + 30  # the last stopped jobs' temp dirs go once their downloads stop
        while (left := sorted(p.name for p in (OUT / f"worker-tmp-{name}").rglob("job-*"))) and time.monotonic() < deadline:
            time.sleep(0.5)
        print(f"  soak: {soak['jobs']} jobs in {soak['wall_sec']} s, RSS {soak['rss_at_half_mb']:.0f} MB at half, "
              f"{soak['rss_end_mb']:.0f} MB at end, max of 2nd half {soak['second_half_max_mb']:.0f} MB", flush=True)  # fmt: skip
        sampler.close()
    finally:
        stop_worker(proc)
        server.close()
        queue.close()
    first, last = bursts[0]["rss_after_mb"], bursts[-1]["rss_after_mb"]
    result = {
        "machine": common.machine_info(env.get("PARAKEET_MODEL", "")), "env": extra, "malloc_arena_max": env.get("MALLOC_ARENA_MAX"),
        "malloc_mmap_threshold": env.get("MALLOC_MMAP_THRESHOLD_"),
        "job_take_max": env.get("JOB_TAKE_MAX", "default"), "idle_mb": idle,
        "burst_b64_mb": round(len(payload) / 1e6, 2), "bursts": bursts, "soak": soak, "job_dirs_left": left,
        "burst_growth": round(last / first - 1, 4), "max_burst_peak_mb": max(b["peak_mb"] for b in bursts),
        "targets": TARGETS, "samples": sampler.samples,
    }  # fmt: skip
    result["met"] = {
        "burst_growth": result["burst_growth"] <= TARGETS["burst_growth"],
        "soak_growth": soak["second_half_growth"] <= TARGETS["soak_growth"],
        "burst_peak_mb": result["max_burst_peak_mb"] < TARGETS["burst_peak_mb"],
    }
    rows = [(b["burst"], b["wall_sec"], b["peak_mb"], b["rss_after_mb"]) for b in bursts]
    print(common.markdown_table(("burst", "wall s", "peak MB", "RSS after MB"), rows))
    print(f"idle {idle:.0f} MB; burst growth {result['burst_growth']:+.1%} (target <= 10%); soak 2nd-half growth "
          f"{soak['second_half_growth']:+.1%} (target <= 10%); max burst peak {result['max_burst_peak_mb']:.0f} MB "
          f"(target < 3500); met: {result['met']}; job dirs left: {len(left)}")  # fmt: skip
    print("wrote", common.write_json(args.out, result))
    return result


if __name__ == "__main__":
    main()
