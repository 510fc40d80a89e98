"""What slow and huge clients cost everyone else on the HTTP server (WORKER_MODE=http).

    .venv/bin/python -m bench.http_limits [--worker-repo PATH] [--label NAME]

Starts `WORKER_MODE=http python handler.py` as a dry run (SKIP_MODEL_LOAD=1: no model, so only
the HTTP layer is measured) from --worker-repo (this checkout by default: give another checkout
to measure it the same way), MAX_CONCURRENT_JOBS=4, and runs three attacks from this process
on 127.0.0.1, each beside a normal client:

    flood    4 connections stream one endless header as fast as they can (10 s)
    slow     16 uploads send their head, then one body byte every 0.5 s (12 s)
    silent   16 connections send a header byte every 0.5 s (up to 15 s)

and records /ping's latency (p50, max) during each, how many bytes each flood connection sent
before the server stopped it (what the kernel's socket buffers took counts too: a few MiB on
loopback), the server's peak memory (RSS) during the flood, what the normal client got (status,
seconds), and how long the slow connections were held (the whole run: never cut off). Writes bench/out/http_limits-<label>.json. The cores are shared
with whatever else runs: latencies are noisy.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import requests

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(repo: Path, port: int, tmp: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(WORKER_MODE="http", HOST="127.0.0.1", PORT=str(port), SKIP_MODEL_LOAD="1", MAX_CONCURRENT_JOBS="4",
               WORKER_TMP_DIR=str(tmp), LOG_LEVEL="WARNING", NO_PROXY="127.0.0.1")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "handler.py"], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                return proc
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the worker did not start")


def ping_latencies(port: int, seconds: float) -> dict[str, float]:
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        try:
            requests.get(f"http://127.0.0.1:{port}/ping", timeout=30)
            times.append(time.monotonic() - t0)
        except requests.RequestException:
            times.append(float("inf"))
        time.sleep(0.1)
    return {"p50_s": round(statistics.median(times), 4), "max_s": round(max(times), 4), "n": len(times)}


def normal_request(port: int) -> dict[str, Any]:
    t0 = time.monotonic()
    wav = (REPO / "samples" / "digits.wav").read_bytes()
    try:
        answer = requests.post(f"http://127.0.0.1:{port}/v1/audio/transcriptions", files={"file": ("a.wav", wav)},
                               data={"model": "whisper-1"}, timeout=60)  # fmt: skip
        return {"status": answer.status_code, "seconds": round(time.monotonic() - t0, 3)}
    except requests.RequestException as exc:
        return {"status": f"error: {type(exc).__name__}", "seconds": round(time.monotonic() - t0, 3)}


def flood(port: int, seconds: float, stop: threading.Event) -> int:
    """One endless header, as fast as possible: the bytes sent before the server stopped it."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        block = b"X-Pad: " + b"a" * 65536 + b"\r\n"
        end = time.monotonic() + seconds
        with contextlib.suppress(OSError):
            sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n")
            while time.monotonic() < end and not stop.is_set():
                sock.sendall(block)
                sent += len(block)
    return sent


def trickle(port: int, head: bytes, every: float, seconds: float) -> float:
    """Send `head` (if any) then a byte every `every` s; the seconds until the server ended it
    (`seconds`: it never did)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        try:
            sock.sendall(head)
            while time.monotonic() - t0 < seconds:
                time.sleep(every)
                sock.sendall(b"a")
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    if sock.recv(65536) == b"":
                        break
                sock.setblocking(True)
        except OSError:
            pass
    return round(time.monotonic() - t0, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker-repo", type=Path, default=REPO)
    parser.add_argument("--label", default="this")
    args = parser.parse_args()
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="pw-bench-http-"))
    proc = start(args.worker_repo, port, tmp)
    out: dict[str, Any] = {"label": args.label, "worker_repo": str(args.worker_repo), "cpus": os.cpu_count(),
                           "note": "dry run (SKIP_MODEL_LOAD=1); shared CPU cores: latencies are noisy"}  # fmt: skip
    try:
        out["idle_ping"] = ping_latencies(port, 2)
        stop = threading.Event()
        server = psutil.Process(proc.pid)
        rss = [server.memory_info().rss]
        with cf.ThreadPoolExecutor(8) as pool:
            floods = [pool.submit(flood, port, 10, stop) for _ in range(4)]
            sampler = pool.submit(lambda: [rss.append(server.memory_info().rss) or time.sleep(0.2) for _ in range(50)])
            time.sleep(0.5)
            out["flood"] = {"ping": ping_latencies(port, 5), "normal": normal_request(port)}
            stop.set()
            out["flood"]["bytes_sent_before_cut_mib"] = [round(f.result() / 2**20, 2) for f in floods]
            sampler.result()
            out["flood"]["server_rss_mib"] = {"before": round(rss[0] / 2**20), "peak": round(max(rss) / 2**20)}
        head = (b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 100000\r\n\r\n--b\r\n")  # fmt: skip
        with cf.ThreadPoolExecutor(16) as pool:
            slow = [pool.submit(trickle, port, head, 0.5, 12) for _ in range(16)]
            time.sleep(1.5)
            out["slow_uploads"] = {"normal": normal_request(port), "ping": ping_latencies(port, 2)}
            out["slow_uploads"]["held_s"] = sorted(f.result() for f in slow)
        with cf.ThreadPoolExecutor(16) as pool:
            silent = [pool.submit(trickle, port, b"GET /ping HTTP/1.1\r\n", 0.5, 15) for _ in range(16)]
            time.sleep(1)
            out["slow_heads"] = {"normal": normal_request(port), "ping": ping_latencies(port, 2)}
            out["slow_heads"]["held_s"] = sorted(f.result() for f in silent)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out["exit_code"] = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out["exit_code"] = "killed"
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"http_limits-{args.label}.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
