"""What tests/, bench/ and tools/ share, written once: word error counting, the ffmpeg encode
helper, synthesized conversations with known speakers and their scoring, a local HTTP server on 127.0.0.1, a guard that keeps a process's name look-ups and
connections on loopback, and a fake Runpod job queue for the SDK's real worker loop. Nothing here
talks to any address but 127.0.0.1."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse, urlsplit

import numpy as np

from parakeet_worker import config
from parakeet_worker import model as asr

# ---------------------------------------------------------------------------------------------
# The worker in this process: loaded once, jobs answered as the SDK would await them.
# ---------------------------------------------------------------------------------------------


def load_worker() -> Any:
    """`import handler` and load its model, as the worker's main() does (the model is never
    loaded at import); raises RuntimeError with the cause when it cannot load."""
    import handler

    handler.ensure_model()
    if asr.loaded_model() is None and not config.CFG.skip_model_load:
        raise RuntimeError(f"the model did not load: {asr.MODEL.error}")
    return handler


def answer(worker: Any, job: dict[str, Any]) -> dict[str, Any]:
    """One job through worker.handler(), awaited as the SDK awaits it (when it is a coroutine)."""
    import asyncio
    import inspect

    out = worker.handler(job)
    return asyncio.run(out) if inspect.iscoroutine(out) else out


async def until(condition: Any, what: str, timeout: float = 120) -> None:
    """Await `condition()` (polled), failing after `timeout` seconds."""
    import asyncio

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def wait_for(condition: Any, timeout: float, what: str) -> None:
    """Block until `condition()` (polled), failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Speakers: synthesized conversations with known turns, and how much of their speech a
# diarization gives to the right speaker.
# ---------------------------------------------------------------------------------------------

# Clearly different espeak-ng voices, (voice, pitch): a low male, a high female (both voices the
# demo model was trained on) and the "grandma" variant. CAM++ centroids of these are 0.47-0.52
# cosine apart; en-us and en-gb-scotland+m3, for example, are 0.87 alike: one speaker to it.
CONVERSATION_VOICES = (("en-us", 30), ("en-us+f3", 80), ("en-us+grandma", 60))


def conversation(
    speakers: Sequence[int], seed: int = 0, words: tuple[int, int] = (4, 9), gap: tuple[float, float] = (0.3, 0.8)
) -> tuple[np.ndarray, list[tuple[int, float, float]], list[list[str]]]:
    """One turn per entry of `speakers` (an index into CONVERSATION_VOICES): a sentence of the
    demo vocabulary, then a pause. Returns the 16 kHz audio, the true turns (speaker, start, end)
    and each turn's words."""
    from tools import synth

    rng = np.random.default_rng(seed)
    rate = synth.SAMPLE_RATE
    parts = [np.zeros(int(0.3 * rate), np.float32)]
    at, truth, said = 0.3, [], []
    for who in speakers:
        voice, pitch = CONVERSATION_VOICES[who]
        sentence = [str(w) for w in rng.choice(synth.VOCAB, size=int(rng.integers(*words)))]
        audio = synth.trim(synth.speak(" ".join(sentence), voice, 160, pitch))
        silence = np.zeros(int(rng.uniform(*gap) * rate), np.float32)
        parts += [audio, silence]
        truth.append((who, at, at + len(audio) / rate))
        said.append(sentence)
        at += (len(audio) + len(silence)) / rate
    return np.concatenate(parts), truth, said


def attribution(truth: Sequence[tuple[int, float, float]], turns: Sequence[dict[str, Any]]) -> float:
    """The share of the true speech time that `turns` ([{"speaker", "start", "end"}]) give to the
    right speaker, under the best one-to-one mapping of labels to true speakers (10 ms grid)."""
    import itertools

    end = max([t[2] for t in truth] + [t["end"] for t in turns] + [0.0])
    n = int(end * 100) + 1
    ref = np.full(n, -1)
    for who, a, b in truth:
        ref[int(a * 100) : int(b * 100)] = who
    labels = sorted({t["speaker"] for t in turns})
    hyp = np.full(n, -1)
    for t in turns:
        hyp[int(t["start"] * 100) : int(t["end"] * 100)] = labels.index(t["speaker"])
    people = sorted(set(ref[ref >= 0]))
    speech = ref >= 0
    best = 0
    slots = list(range(len(labels))) + [-2] * len(people)  # -2: this person got no label
    for mapping in itertools.permutations(slots, len(people)):
        right = sum(np.sum((ref == p) & (hyp == m)) for p, m in zip(people, mapping, strict=True) if m >= 0)
        best = max(best, right)
    return float(best / max(1, speech.sum()))


# ---------------------------------------------------------------------------------------------
# Accuracy: word error counting.
# ---------------------------------------------------------------------------------------------


def word_errors(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Word-level edit distance (substitutions + deletions + insertions) between word lists.

    One numpy row per reference word: insertions within a row are a running minimum of
    (cost - j) + j, so the row needs no Python loop, and a 3-hour script of ~20k words aligns in
    seconds instead of the hour a pure-Python double loop would take."""
    ids: dict[str, int] = {}
    r = np.array([ids.setdefault(w, len(ids)) for w in ref], np.int32)
    h = np.array([ids.setdefault(w, len(ids)) for w in hyp], np.int32)
    if not len(r) or not len(h):
        return len(r) + len(h)
    j = np.arange(len(h) + 1, dtype=np.int32)
    row = j.copy()
    for i, word in enumerate(r, start=1):
        new = np.empty_like(row)
        new[0] = i
        np.minimum(row[:-1] + (h != word), row[1:] + 1, out=new[1:])
        row = np.minimum.accumulate(new - j) + j
    return int(row[-1])


# ---------------------------------------------------------------------------------------------
# Real ffmpeg: encode a file to another container/codec.
# ---------------------------------------------------------------------------------------------

# The codec each container gets when encode() is given none.
ENCODERS: dict[str, tuple[str, ...]] = {
    "mp3": ("-c:a", "libmp3lame", "-b:a", "64k"),
    "flac": ("-c:a", "flac"),
    "ogg": ("-c:a", "libopus", "-b:a", "48k"),
    "opus": ("-c:a", "libopus", "-b:a", "48k"),
    "m4a": ("-c:a", "aac", "-b:a", "96k"),
    "webm": ("-c:a", "libopus"),
    "wav": ("-c:a", "pcm_s16le"),
}


def encode(
    src: Path,
    dest: Path,
    *extra: str,
    codec: Sequence[str] | None = None,
    rate: int | None = None,
    channels: int | None = None,
) -> Path:
    """Real ffmpeg: `src` to `dest`, the container from `dest`'s suffix. `codec` defaults to the
    suffix's entry in ENCODERS; `rate` and `channels` resample and remix; `extra` arguments go
    last, before the output."""
    if codec is None:
        codec = ENCODERS.get(Path(dest).suffix.lstrip("."), ())
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(src)]
    if rate is not None:
        cmd += ["-ar", str(rate)]
    if channels is not None:
        cmd += ["-ac", str(channels)]
    subprocess.run([*cmd, *codec, *extra, str(dest)], check=True)
    return Path(dest)


# ---------------------------------------------------------------------------------------------
# A real HTTP server on 127.0.0.1, in a thread of this process, with the misbehaviours a worker
# meets in the wild.
# ---------------------------------------------------------------------------------------------


class AudioRoutes(BaseHTTPRequestHandler):
    """GET routes (`name` is a file added with LocalServer.add, or a path under its root):

    /files/<name>          the file                     /flaky/<name>       500 first, then the file
    /redirect/<name>       301 to /files/<name>         /always500/...      503 every time
    /stall/...             promises 1 MB, sends 1 KB, sleeps 8 s
    /trickle/...           a byte every 0.2 s for 30 s (never a read timeout, never done)
    /trickle-headers/...   the status line, then a header's bytes one every 0.3 s for 30 s
    /trickle-forever/...   a byte every 0.2 s until the client hangs up (10 min at most)
    /big/...               an honest Content-Length of 50 MiB, then 64 KiB
    /big-nolength/...      no Content-Length, 12.5 MiB of zeros
    /loop                  302 to itself                /html/...           an HTML page
    /goto?to=<location>    302 to exactly `location`, however malformed
    anything else          404
    """

    server_version = "TestHTTP/1.0"
    server: LocalServer._Server

    def log_message(self, *args: Any) -> None:  # keep test and benchmark output clean
        pass

    def _count(self) -> int:
        hits = self.server.hits
        with self.server.lock:
            hits[self.path] = hits.get(self.path, 0) + 1
            return hits[self.path]

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/octet-stream") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, status: int, location: str) -> None:
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _file(self, name: str) -> Path | None:
        found = self.server.files.get(name)
        root = self.server.root
        if found is None and root is not None:
            candidate = (root / unquote(name)).resolve()
            if candidate.is_file() and root.resolve() in candidate.parents:
                found = candidate
        return found

    def _send_file(self, path: Path) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        with open(path, "rb") as f, contextlib.suppress(OSError):  # the client may hang up
            shutil.copyfileobj(f, self.wfile, 1 << 20)

    def do_GET(self) -> None:
        n = self._count()
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/", 1)
        name = parts[1] if len(parts) > 1 else ""
        route = parts[0]
        file = self._file(name) if name else None
        if route == "files" and file:
            self._send_file(file)
        elif route == "flaky" and file:
            self._send(500, b"try again") if n == 1 else self._send_file(file)
        elif route == "redirect" and file:
            self._redirect(301, f"/files/{name}")
        elif route == "always500":
            self._send(503, b"down")
        elif route == "stall":
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.write(b"\0" * 1000)
            self.wfile.flush()
            time.sleep(8)
        elif route == "trickle":
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(150):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
        elif route == "trickle-forever":
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(3000):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
        elif route == "trickle-headers":
            with contextlib.suppress(OSError):
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(100):
                    self.wfile.write(b"a")
                    self.wfile.flush()
                    time.sleep(0.3)
            self.close_connection = True
        elif route == "big":
            self.send_response(200)
            self.send_header("Content-Length", str(50 * 1024 * 1024))
            self.end_headers()
            self.wfile.write(b"\0" * 65536)
        elif route == "big-nolength":
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(200):
                    self.wfile.write(b"\0" * 65536)
        elif route == "loop":
            self._redirect(302, "/loop")
        elif route == "goto":
            self._redirect(302, parse_qs(url.query).get("to", ["/"])[0])
        elif route == "html":
            self._send(200, b"<!doctype html><html><body><h1>Not audio</h1></body></html>", "text/html")
        else:
            self._send(404, b"not found", "text/plain")


class LocalServer:
    """A ThreadingHTTPServer on 127.0.0.1 (a free port) serving `handler` in a daemon thread.

        with LocalServer(root=some_dir) as server:
            url = server.add(path)            # -> f"{server.url}/files/{path.name}"

    `hits` counts requests by path (query included); `files` maps names to added files."""

    class _Server(ThreadingHTTPServer):
        daemon_threads = True
        files: dict[str, Path]
        hits: dict[str, int]
        lock: threading.Lock
        root: Path | None

    def __init__(self, handler: type[BaseHTTPRequestHandler] = AudioRoutes, root: Path | None = None):
        self.httpd = self._Server(("127.0.0.1", 0), handler)
        self.httpd.files, self.httpd.hits, self.httpd.lock = {}, {}, threading.Lock()
        self.httpd.root = Path(root) if root is not None else None
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.files, self.hits = self.httpd.files, self.httpd.hits
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def add(self, path: Path, name: str | None = None) -> str:
        """Serve `path` as /files/<name> (its file name by default); return its URL."""
        name = name or Path(path).name
        self.files[name] = Path(path)
        return f"{self.url}/files/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Loopback only: no name look-up leaves the process, no connection goes past 127.0.0.1.
# ---------------------------------------------------------------------------------------------

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class LoopbackOnly:
    """While active (a context manager), socket.getaddrinfo answers only for 127.0.0.1, ::1 and
    localhost, and any other name or address fails as an unknown host does (EAI_NONAME) without
    asking a resolver; a connect() to an address outside 127.0.0.0/8 and ::1 is refused. Names
    that were asked for are kept in `refused`, in order.

    Everything that resolves through the socket module (the Runpod SDK's SSRF guard, requests,
    urllib3) is covered in this process; subprocesses are not."""

    def __init__(self) -> None:
        self.refused: list[str] = []
        self._saved: tuple[Any, Any, Any] | None = None

    def _getaddrinfo(self, host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode("ascii", "replace") if isinstance(host, bytes) else host
        if name is None or name in LOOPBACK_NAMES:
            assert self._saved is not None
            return self._saved[0](host, *args, **kwargs)
        self.refused.append(str(name))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (a test may resolve no name)")

    @staticmethod
    def _check(address: Any) -> None:
        if isinstance(address, tuple) and isinstance(address[0], str):
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(address[0].split("%")[0]).is_loopback:
                    return
            raise ConnectionRefusedError(f"a test may connect only to 127.0.0.1, not {address[0]}")

    def __enter__(self) -> LoopbackOnly:
        real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
        self._saved = (socket.getaddrinfo, real_connect, real_connect_ex)

        def connect(sock: socket.socket, address: Any) -> None:
            self._check(address)
            real_connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> int:
            self._check(address)
            return real_connect_ex(sock, address)

        socket.getaddrinfo = self._getaddrinfo  # type: ignore[assignment]
        socket.socket.connect = connect  # type: ignore[method-assign]
        socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._saved is not None
        socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = self._saved  # type: ignore[method-assign]
        self._saved = None


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
        self.open_takes = 0  # take requests the queue holds open right now
        self.hold_takes = False  # True: a take waits for jobs as long as it takes (not 0.5 s)
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

    def wait_open_take(self, timeout: float = 120) -> None:
        """Until the worker has a take request open here."""
        self._wait(lambda: self.open_takes > 0, timeout, "open take request")

    def _take(self, count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 0.5
        with self.cond:
            self.open_takes += 1
            self.cond.notify_all()
            while not self.waiting and (self.hold_takes or time.monotonic() < deadline):
                self.cond.wait(max(0.05, deadline - time.monotonic()))
            self.open_takes -= 1
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


def start_worker(queue: FakeRunpodQueue, env: dict[str, str], log_path: Path, hook: str | None = None,
                 script: str | None = None) -> subprocess.Popen:  # fmt: skip
    """`python handler.py` as the image runs it (RUNPOD_SERVERLESS=1), polling `queue`. With
    `hook`, tests/workers.py's fault hook of that name is installed first (then main()); with
    `script` (benchmarks), that Python code runs first. Output goes to `log_path`, never parsed
    for results."""
    if script is not None:
        argv = ["-c", f"import sys, handler\n{script}\nhandler.main(sys.argv[1:])\n"]
    else:
        argv = [str(REPO / "tests" / "workers.py"), "serve", hook or "-"]
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, *argv], cwd=REPO, env={**env, **queue.env(), "PYTHONUNBUFFERED": "1"},
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


# ---------------------------------------------------------------------------------------------
# The worker's own HTTP server (parakeet_worker/http_server.py) in a thread of this process, on 127.0.0.1.
# ---------------------------------------------------------------------------------------------


class UvicornThread:
    """An ASGI app served by uvicorn on 127.0.0.1 (a free port) in a daemon thread, with its
    lifespan (handler.http_app() starts its model load there):

        with UvicornThread(handler.http_app()) as api:
            OpenAI(base_url=f"{api.url}/v1", api_key="x")"""

    def __init__(self, app: Any, timeout: float = 60):
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> UvicornThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def multipart(fields: dict[str, Any], file: Path, field: str = "file") -> tuple[bytes, str]:
    """A multipart/form-data body as an HTTP client sends it: `fields` (a list value: one part
    each) and `file`; returns (body, content type)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        for one in value if isinstance(value, list) else [value]:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{one}\r\n'.encode())
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{Path(file).name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip
    body = b"".join([*parts, head, Path(file).read_bytes(), f"\r\n--{boundary}--\r\n".encode()])
    return body, f"multipart/form-data; boundary={boundary}"


def cgroup_tree(root: Path, files: dict[str, str], self_cgroup: str = "0::/\n") -> tuple[Path, Path]:
    """A cgroup mount at root/fs with `files` (paths relative to it), and a /proc/self/cgroup:
    what the worker's CPU and memory limits are read from, for tests of that reading."""
    for rel, text in files.items():
        path = root / "fs" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "fs").mkdir(exist_ok=True)
    (root / "self-cgroup").write_text(self_cgroup)
    return root / "fs", root / "self-cgroup"
