"""OpenAI requests over HTTP against one native job: the worker's own server
(`WORKER_MODE=http python handler.py`, as a load-balancing endpoint runs it) on 127.0.0.1.

    make bench                          # runs this after bench.concurrency
    python -m bench.openai_http         # alone

1. the 32 clips as one native job (POST /transcribe): its wall time and batches;
2. the same 32 clips as 32 one-clip requests from the official `openai` client, all at once
   (32 threads): wall, requests/s, median and p95 latency, and the model batches they formed
   (the server process records each batch's size in a file; the OpenAI answer carries none).
Each phase runs once after a warm-up request. Prints a table and writes bench/out/openai_http.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests

from bench import common
from bench.common import OUT
from bench.concurrency import make_clips
from tools.testkit import stop_worker

CLIPS = 32
TARGETS = {"requests_vs_one_job": 2.0, "mean_batch_size": 4.0}
# Run in the server process before main(): every batch's size, one line each, to PW_BATCHES.
RECORD_BATCHES = """
import os
_plan = handler._plan_next
def _recorded(ready, local_mode):
    batch = _plan(ready, local_mode)
    with open(os.environ["PW_BATCHES"], "a") as f:
        f.write(f"{len(batch)}\\n")
    return batch
handler._plan_next = _recorded
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, batches: Path, log: Path) -> subprocess.Popen:
    env = common.worker_env(WORKER_MODE="http", HOST="127.0.0.1", PORT=str(port), PW_BATCHES=str(batches),
                            PYTHONUNBUFFERED="1")  # fmt: skip
    code = f"import sys, handler\n{RECORD_BATCHES}\nhandler.main(sys.argv[1:])\n"
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-c", code], cwd=common.REPO, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=5).status_code == 200:
                return time.perf_counter() - started
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def batch_sizes(path: Path, skip: int) -> list[int]:
    lines = path.read_text().split() if path.exists() else []
    return [int(n) for n in lines[skip:]]


def measure(clips: list[tuple[Path, str]]) -> dict[str, Any]:
    import openai

    port, batches, log = free_port(), OUT / "openai_http-batches.txt", OUT / "openai_http-server.log"
    batches.unlink(missing_ok=True)
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port, batches, log)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)

    def one(path: Path) -> tuple[str, float, float]:
        start = time.perf_counter()
        with open(path, "rb") as f:
            text = client.audio.transcriptions.create(model="whisper-1", file=f).text
        return text, start, time.perf_counter()

    try:
        result: dict[str, Any] = {"ready_sec": round(wait_ready(url, proc, log), 2)}
        one(clips[0][0])  # warm-up: first-request costs out of both phases
        native_job = {"input": {"inputs": [{"source": str(p)} for p, _ in clips]}}
        start = time.perf_counter()
        native = requests.post(f"{url}/transcribe", json=native_job, timeout=600).json()
        one_job_wall = time.perf_counter() - start
        native_errors = sum(
            common.wer(text.split(), r["text"].lower().split()) > 0 for (_, text), r in zip(clips, native["results"], strict=True)
        )
        skip = len(batch_sizes(batches, 0))
        start = time.perf_counter()
        with cf.ThreadPoolExecutor(len(clips)) as pool:
            outs = list(pool.map(one, [p for p, _ in clips]))
        wall = time.perf_counter() - start
        sizes = batch_sizes(batches, skip)
        latencies = sorted(end - begin for _, begin, end in outs)
        wrong = sum(common.wer(text.split(), out.lower().split()) > 0 for (_, text), (out, _, _) in zip(clips, outs, strict=True))
        result.update(
            one_job={"wall_sec": round(one_job_wall, 3), "batch_sizes": native["stats"]["batch_sizes"],
                     "clips_with_word_errors": native_errors},
            requests={"count": len(clips), "wall_sec": round(wall, 3), "per_sec": round(len(clips) / wall, 2),
                      "p50_sec": round(statistics.median(latencies), 3),
                      "p95_sec": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
                      "batch_sizes": sizes, "mean_batch_size": round(statistics.mean(sizes), 2) if sizes else None,
                      "clips_with_word_errors": wrong},
            requests_vs_one_job=round(wall / one_job_wall, 2),
        )  # fmt: skip
        return result
    finally:
        result_code = stop_worker(proc)
        print(f"server exit code after SIGTERM: {result_code}")


def table_rows(r: dict[str, Any]) -> list[list[Any]]:
    reqs = r["requests"]
    return [
        ["one native job of 32 clips: wall s", r["one_job"]["wall_sec"], "", ""],
        ["32 OpenAI requests at once: wall s", reqs["wall_sec"], "", ""],
        ["requests wall / one-job wall", r["requests_vs_one_job"], f"<= {TARGETS['requests_vs_one_job']}",
         r["requests_vs_one_job"] <= TARGETS["requests_vs_one_job"]],
        ["requests/s", reqs["per_sec"], "", ""],
        ["latency p50 / p95 s", f"{reqs['p50_sec']} / {reqs['p95_sec']}", "", ""],
        ["mean batch size (requests)", reqs["mean_batch_size"], f">= {TARGETS['mean_batch_size']}",
         (reqs["mean_batch_size"] or 0) >= TARGETS["mean_batch_size"]],
        ["batches (requests / one job)", f"{len(reqs['batch_sizes'])} / {len(r['one_job']['batch_sizes'])}", "", ""],
        ["clips with word errors (requests / one job)",
         f"{reqs['clips_with_word_errors']} / {r['one_job']['clips_with_word_errors']}", "", ""],
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    args = p.parse_args(argv)
    common.configure_env(**({"PARAKEET_MODEL": args.model} if args.model else {}))
    result: dict[str, Any] = {"args": vars(args), "machine": common.machine_info(os.environ["PARAKEET_MODEL"])}
    if args.wait_quiet:
        result["wait_quiet"] = common.wait_until_quiet(args.wait_quiet)
    clips = make_clips(CLIPS)
    with common.ForeignLoad() as load:
        result.update(measure(clips))
    result["other_processes"] = load.summary()
    print(common.markdown_table(("metric", "value", "target", "ok?"), table_rows(result)))
    print(f"raw numbers in {common.write_json('openai_http.json', result)}")
    return result


if __name__ == "__main__":
    main()
