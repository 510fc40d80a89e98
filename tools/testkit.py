"""What tests/, bench/ and tools/ share, written once: word error counting, the ffmpeg encode
helper, a local HTTP server on 127.0.0.1, and a fake Runpod job queue for the SDK's real worker
loop. Nothing here talks to any address but 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# A fake Runpod job queue on 127.0.0.1, for the runpod SDK's real worker loop (runpod 1.12:
# serverless/modules/rp_job.py, rp_scale.py, rp_http.py). The worker finds it through the
# variables Runpod sets on a real worker (env()):
#   GET  /job-take/<worker>?gpu=test&job_in_progress=0|1           one job, or 204
#   GET  /job-take-batch/<worker>?gpu=test&batch_size=N&job_in_...  up to N jobs, or 204
#   GET  /job-stop/<worker>?gpu=test                                {"jobsToStop": [...]}, or 204
#   POST /job-done/<worker>/<job>?gpu=test&isStream=false           progress or the final result
# Takes are long polls (held up to 0.5 s while the queue is empty), as Runpod's are, so an idle
# worker does not spin. No ping URL is given: the SDK then sends no heartbeat.
# ---------------------------------------------------------------------------------------------


class FakeRunpodQueue:
    """Jobs in, results out, with the time each job was queued, taken and answered."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.waiting: deque[dict[str, Any]] = deque()
        self.queued_at: dict[str, float] = {}
        self.taken_at: dict[str, float] = {}
        self.done_at: dict[str, float] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.progress: dict[str, list[Any]] = {}
        self.to_stop: list[str] = []
        self.batch_sizes_asked: list[int] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="fake-runpod", daemon=True).start()

    def env(self) -> dict[str, str]:
        """What Runpod sets on a worker, pointing here; the SDK's start-up fitness checks
        (which connect to an outside address) are skipped."""
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.url}/job-take/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.url}/job-done/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_POD_ID": "fake-worker",
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SERVERLESS": "1",
        }

    def add(self, job_input: dict[str, Any], job_id: str | None = None) -> str:
        job_id = job_id or uuid.uuid4().hex[:12]
        with self.cond:
            self.waiting.append({"id": job_id, "input": job_input})
            self.queued_at[job_id] = time.monotonic()
            self.cond.notify_all()
        return job_id

    def stop(self, job_id: str) -> None:
        with self.cond:
            self.to_stop.append(job_id)
            self.cond.notify_all()

    def wait_taken(self, job_ids: list[str], timeout: float = 120) -> None:
        self._wait(lambda: all(j in self.taken_at for j in job_ids), timeout, "jobs taken")

    def wait_done(self, job_ids: list[str], timeout: float = 300) -> list[dict[str, Any]]:
        """The final posts of these jobs, in the order given."""
        self._wait(lambda: all(j in self.results for j in job_ids), timeout, "results")
        return [self.results[j] for j in job_ids]

    def _wait(self, condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"fake Runpod queue: no {what} within {timeout} s")
                self.cond.wait(min(left, 0.5))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- the HTTP side ------------------------------------------------------------------------

    def _take(self, count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 0.5
        with self.cond:
            while not self.waiting and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            jobs = [self.waiting.popleft() for _ in range(min(count, len(self.waiting)))]
            now = time.monotonic()
            for job in jobs:
                self.taken_at[job["id"]] = now
            self.cond.notify_all()
            return jobs

    def _stops(self) -> list[str]:
        deadline = time.monotonic() + 0.5
        with self.cond:
            while not self.to_stop and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            stops, self.to_stop = self.to_stop, []
            return stops

    def _posted(self, job_id: str, body: dict[str, Any]) -> None:
        with self.cond:
            if body.get("status") == "IN_PROGRESS":
                self.progress.setdefault(job_id, []).append(body.get("output"))
            else:
                self.results[job_id] = body
                self.done_at[job_id] = time.monotonic()
            self.cond.notify_all()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        queue = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, status: int, payload: Any = None) -> None:
                body = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                if url.path.startswith("/job-take-batch/"):
                    size = int(query.get("batch_size", ["1"])[0])
                    queue.batch_sizes_asked.append(size)
                    jobs = queue._take(size)
                    self._json(200, jobs) if jobs else self._json(204)
                elif url.path.startswith("/job-take/"):
                    jobs = queue._take(1)
                    self._json(200, jobs[0]) if jobs else self._json(204)
                elif url.path.startswith("/job-stop/"):
                    stops = queue._stops()
                    self._json(200, {"jobsToStop": stops}) if stops else self._json(204)
                else:
                    self._json(404, {"error": "unknown route"})

            def do_POST(self) -> None:
                url = urlparse(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if url.path.startswith("/job-done/"):
                    queue._posted(url.path.rsplit("/", 1)[-1], json.loads(body))
                    self._json(200, {})
                else:
                    self._json(404, {"error": "unknown route"})

        return Handler


def start_worker(queue: FakeRunpodQueue, env: dict[str, str], log_path: Path, script: str | None = None) -> subprocess.Popen:
    """`python handler.py` as the image runs it (RUNPOD_SERVERLESS=1), polling `queue`; with
    `script`, that Python code runs first in the same process (to inject a fault), then main().
    Its output goes to `log_path`, never parsed for results."""
    code = f"import sys, handler\n{script or ''}\nhandler.main(sys.argv[1:])\n"
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, env={**env, **queue.env(), "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def stop_worker(proc: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM, as Runpod stops a worker; SIGKILL if it does not exit in `timeout` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def loopback_only_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """No proxies: every address a test uses is on 127.0.0.1."""
    env = dict(os.environ if env is None else env)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(var, None)
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return env
