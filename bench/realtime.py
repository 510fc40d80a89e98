"""Live transcription at real-time pace: sessions on the worker's own server
(`WORKER_MODE=http python handler.py`, 127.0.0.1), each streaming espeak-ng speech at real-time
pace over GET /v1/realtime (server_vad, 24 kHz PCM16, 40 ms frames), 1, 4 and 16 at once, then
more until the worker no longer keeps up.

    python -m bench.realtime                      # 1, 4, 16, then 24, 32, 48 until one falls behind
    python -m bench.realtime --sessions 1,4 --no-search

Each session speaks three utterances of 3 to 5 words with a second of silence after each. The
speech's start and end in the stream are known (the synthesized audio, trimmed), so that:

- latency: from the moment the frame holding an utterance's last sample was sent to its
  `completed` event; the same less the VAD's silence window (500 ms: the turn cannot end sooner);
- first delta: from the moment the frame holding its first sample was sent to its first delta;
- model batches per second and their mean size (the server process records each batch it plans),
  and the server process's CPU per session (its CPU seconds over the run, per session, per second);
- "kept at real time": every utterance came back with the right words, p95 latency after the
  silence window under 1 s, and the clients sent on time.

The clients run in this process, on the same (shared) cores as the server: numbers are noisy.
Prints a table and writes bench/out/realtime.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench import common
from bench.common import OUT
from bench.openai_http import free_port, wait_ready
from tools import synth
from tools.live_client import LiveClient, encode_input, session_update
from tools.testkit import stop_worker

FRAME_MS = 40
SILENCE_MS = 500  # server_vad's silence_duration_ms (OpenAI's default)
TARGETS = {"completed_p95_after_silence_sec_4": 0.5, "first_delta_p95_sec": 1.0, "sessions_kept": 16}
# Run in the server process before main(): every planned batch, one line each: time, size, live units.
RECORD_BATCHES = """
import os, time
_plan = handler._plan_next
def _recorded(ready, local_mode, served=None):
    batch = _plan(ready, local_mode, served)
    with open(os.environ["PW_BATCHES"], "a") as f:
        f.write(f"{time.time():.3f} {len(batch)} {sum(u.stream is not None for u in batch)}\\n")
    return batch
handler._plan_next = _recorded
"""


def script(seed: int) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
    """One session's audio (16 kHz) and its utterances: (first sample, last sample, words)."""
    rng = np.random.default_rng(seed)
    parts, spans, at = [np.zeros(int(0.6 * 16_000), np.float32)], [], int(0.6 * 16_000)
    for _ in range(3):
        words = " ".join(rng.choice(synth.VOCAB, int(rng.integers(3, 6))))
        speech = synth.trim(synth.speak(words))
        spans.append((at, at + len(speech), words))
        gap = np.zeros(16_000, np.float32)
        parts += [speech, gap]
        at += len(speech) + len(gap)
    return np.concatenate(parts), spans


async def one_session(url: str, seed: int, start_at: float) -> dict[str, Any]:
    audio, spans = script(seed)
    data = encode_input(audio, "pcm24")
    step = 24_000 * FRAME_MS // 1000 * 2
    await asyncio.sleep(max(0.0, start_at - time.time()))
    sent_at: list[float] = []
    lag = 0.0
    async with LiveClient(url, compression=None) as c:
        await c.send(session_update("pcm24"))
        t0 = time.time()
        for k, i in enumerate(range(0, len(data), step)):
            due = t0 + k * FRAME_MS / 1000
            await asyncio.sleep(max(0.0, due - time.time()))
            lag = max(lag, time.time() - due)
            await c.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(data[i : i + step]).decode()})
            sent_at.append(time.time())
        await c.wait_for("conversation.item.input_audio_transcription.completed", len(spans), timeout=120)
        events, times = c.events, c.times
    frame = 16_000 * FRAME_MS // 1000

    def sent(sample: int) -> float:
        return sent_at[min(sample // frame, len(sent_at) - 1)]

    items = [e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed"]
    out, arrivals = [], []
    for n, (lo, hi, words) in enumerate(spans):
        if n >= len(items):
            break
        item = items[n]
        completed = next(k for k, e in enumerate(events) if e["type"].endswith("completed") and e["item_id"] == item)
        delta = next((k for k, e in enumerate(events) if e["type"].endswith("delta") and e["item_id"] == item), None)
        arrivals.append(times[completed])
        out.append({"words": words, "heard": events[completed]["transcript"],
                    "latency": times[completed] - sent(hi - 1),
                    "first_delta": times[delta] - sent(lo) if delta is not None else None})  # fmt: skip
    return {"utterances": out, "items": len(items), "send_lag_max": lag, "start": t0, "end": max(arrivals, default=t0)}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 3)


async def run_sessions(url: str, n: int, seed: int) -> list[dict[str, Any]]:
    start = time.time() + 0.5
    return list(await asyncio.gather(*(one_session(url, seed + k, start + k / max(n, 1)) for k in range(n))))


def measure(url: str, proc: subprocess.Popen, batches: Path, n: int, seed: int) -> dict[str, Any]:
    server = psutil.Process(proc.pid)
    cpu0, skip = sum(server.cpu_times()[:2]), len(batches.read_text().splitlines()) if batches.exists() else 0
    wall0 = time.time()
    sessions = asyncio.run(run_sessions(url, n, seed))
    wall = time.time() - wall0
    cpu = sum(server.cpu_times()[:2]) - cpu0
    lines = [line.split() for line in batches.read_text().splitlines()[skip:]] if batches.exists() else []
    utts = [u for s in sessions for u in s["utterances"]]
    wrong = sum(u["heard"].lower().split() != u["words"].split() for u in utts) + sum(3 - len(s["utterances"]) for s in sessions)
    latency = [u["latency"] for u in utts]
    after = [x - SILENCE_MS / 1000 for x in latency]
    first = [u["first_delta"] for u in utts if u["first_delta"] is not None]
    span = max(s["end"] for s in sessions) - min(s["start"] for s in sessions)
    result = {
        "sessions": n,
        "utterances": len(utts),
        "wrong_or_missing": wrong,
        "completed_p50_sec": pct(latency, 0.5), "completed_p95_sec": pct(latency, 0.95),
        "after_silence_p50_sec": pct(after, 0.5), "after_silence_p95_sec": pct(after, 0.95),
        "first_delta_p50_sec": pct(first, 0.5), "first_delta_p95_sec": pct(first, 0.95),
        "utterances_without_delta": len(utts) - len(first),
        "batches_per_sec": round(len(lines) / span, 2) if span > 0 else None,
        "mean_batch_size": round(statistics.mean(int(b[1]) for b in lines), 2) if lines else None,
        "server_cpu_sec": round(cpu, 2), "wall_sec": round(wall, 2),
        "server_cpu_per_session_pct": round(100 * cpu / wall / n, 1),
        "client_send_lag_max_sec": round(max(s["send_lag_max"] for s in sessions), 3),
    }  # fmt: skip
    result["kept_real_time"] = bool(wrong == 0 and (result["after_silence_p95_sec"] or 0) < 1.0
                                    and result["client_send_lag_max_sec"] < 0.2)  # fmt: skip
    return result


def start_server(port: int, batches: Path, log: Path, threads: int) -> subprocess.Popen:
    env = common.worker_env(WORKER_MODE="http", HOST="127.0.0.1", PORT=str(port), PW_BATCHES=str(batches),
                            REALTIME_MAX_SESSIONS="256", PYTHONUNBUFFERED="1")  # fmt: skip
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    code = f"import sys, handler\n{RECORD_BATCHES}\nhandler.main(sys.argv[1:])\n"
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-c", code], cwd=common.REPO, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", default="1,4,16")
    p.add_argument("--search", default="24,32,48", help="more sessions, tried in turn until one run falls behind")
    p.add_argument("--no-search", action="store_true")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--torch-threads", type=int, default=1,
                   help="the server's OMP_NUM_THREADS (0: torch's default). On a 2-core machine that other "
                        "processes share, 2 threads made the demo model's calls 5-50x slower than 1 (spinning "
                        "OpenMP threads descheduled): 1 by default")  # fmt: skip
    args = p.parse_args()
    common.configure_env()
    port, batches, log = free_port(), OUT / "realtime-batches.txt", OUT / "realtime-server.log"
    batches.unlink(missing_ok=True)
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port, batches, log, args.torch_threads)
    results: list[dict[str, Any]] = []
    try:
        ready = wait_ready(url, proc, log)
        asyncio.run(run_sessions(url, 1, 999))  # warm-up
        for n in [int(x) for x in args.sessions.split(",")]:
            results.append(measure(url, proc, batches, n, args.seed))
            print(json.dumps(results[-1]), flush=True)
        if not args.no_search:
            for n in [int(x) for x in args.search.split(",")]:
                results.append(measure(url, proc, batches, n, args.seed))
                print(json.dumps(results[-1]), flush=True)
                if not results[-1]["kept_real_time"]:
                    break
    finally:
        print(f"server exit code after SIGTERM: {stop_worker(proc)}")
    kept = max((r["sessions"] for r in results if r["kept_real_time"]), default=0)
    four = next((r for r in results if r["sessions"] == 4), None)
    first = [r["first_delta_p95_sec"] for r in results if r["sessions"] <= 4 and r["first_delta_p95_sec"] is not None]
    summary = {
        "sessions_kept_real_time": kept,
        "targets": TARGETS,
        "met": {
            "completed_p95_after_silence_sec_4": bool(four and four["after_silence_p95_sec"] is not None
                                                      and four["after_silence_p95_sec"] <= TARGETS["completed_p95_after_silence_sec_4"]),
            "first_delta_p95_sec": bool(first and max(first) <= TARGETS["first_delta_p95_sec"]),
            "sessions_kept": kept >= TARGETS["sessions_kept"],
        },
    }  # fmt: skip
    rows = [[r["sessions"], r["wrong_or_missing"], r["completed_p50_sec"], r["completed_p95_sec"], r["after_silence_p95_sec"],
             r["first_delta_p50_sec"], r["first_delta_p95_sec"], r["batches_per_sec"], r["mean_batch_size"],
             r["server_cpu_per_session_pct"], r["kept_real_time"]] for r in results]  # fmt: skip
    print(common.markdown_table(["sessions", "wrong", "completed p50 s", "p95 s", "p95 after silence s", "first delta p50 s",
                                 "p95 s", "batches/s", "mean batch", "server CPU %/session", "real time"], rows))  # fmt: skip
    print(json.dumps(summary, indent=2))
    path = common.write_json("realtime.json", {"ready_sec": round(ready, 2), "frame_ms": FRAME_MS,
                                               "torch_threads": args.torch_threads or "default", "runs": results,
                                               **summary, "machine": common.machine_info(common.DEFAULT_MODEL),
                                               "note": "clients and server share this machine's cores"})  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
