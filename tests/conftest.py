"""Shared test set-up: the worker with the bundled demo model, real speech, a real HTTP server.

The environment is fixed here, before any test imports handler (which reads its config and
loads the model once, at import).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = Path(os.environ.get("PW_TEST_MODEL", REPO / "models" / "demo-tdt.nemo"))
DATA_ROOT = Path(tempfile.mkdtemp(prefix="pw-test-data-"))  # an allowed local root
TMP_ROOT = Path(tempfile.mkdtemp(prefix="pw-test-tmp-"))  # the worker's temp root

os.environ.update(
    PARAKEET_MODEL=str(DEMO_MODEL),
    WORKER_TMP_DIR=str(TMP_ROOT),
    ALLOWED_LOCAL_ROOTS=f"{DATA_ROOT}:{REPO / 'samples'}",
    RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS="1",
    NO_PROXY="127.0.0.1,localhost",
    no_proxy="127.0.0.1,localhost",
    LOG_LEVEL="WARNING",
)
for var in ("SKIP_MODEL_LOAD", "RUNPOD_SERVERLESS", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
    os.environ.pop(var, None)
sys.path.insert(0, str(REPO))

from tools import synth  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(DATA_ROOT, ignore_errors=True)
    shutil.rmtree(TMP_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def worker():
    """The handler module with the demo model loaded (once per session)."""
    import handler

    getattr(handler, "ensure_model", lambda: None)()
    assert handler._MODEL is not None, handler._MODEL_ERROR
    return handler


@pytest.fixture
def config(worker, monkeypatch):
    """Change the worker's config for one test: config(batch_max_items=2)."""

    def apply(**changes):
        monkeypatch.setattr(worker, "CFG", dataclasses.replace(worker.CFG, **changes))
        return worker.CFG

    return apply


def call_handler(worker, job: dict) -> dict:
    """One job through the real handler, in-process, as the SDK would await it."""
    out = worker.handler(job)
    return asyncio.run(out) if inspect.iscoroutine(out) else out


def run_job(worker, inputs, **params):
    """Run one job through the real handler; check the invariants every job must keep."""
    out = call_handler(worker, {"id": "test-job", "input": {"inputs": inputs, **params}})
    assert "error" not in out, out
    assert len(out["results"]) == len(inputs)
    assert [r["index"] for r in out["results"]] == list(range(len(inputs)))
    assert temp_leftovers() == [], "the job left files behind"
    return out


def run_together(worker, monkeypatch, jobs: list[dict], ready_units: int) -> list[dict]:
    """Run `jobs` at once, in-process, so that their items share batches for certain: a first
    one-clip job holds the real model thread inside its model call until `ready_units` units of
    these jobs wait in the real scheduler; then the model goes on and the scheduler plans."""
    entered, release = threading.Event(), threading.Event()
    real = worker._forward_decode

    def held(model, audio, lengths):
        entered.set()
        release.wait(120)
        return real(model, audio, lengths)

    monkeypatch.setattr(worker, "_forward_decode", held)
    blocker = {"id": "blocker", "input": {"inputs": [{"source": str(speech_file("one", "wav"))}]}}

    async def until(condition, what: str) -> None:
        deadline = time.monotonic() + 120
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)

    async def main() -> list[dict]:
        first = asyncio.ensure_future(worker.handler(blocker))
        await until(entered.is_set, "the model call")
        tasks = [asyncio.ensure_future(worker.handler(job)) for job in jobs]
        try:
            await until(lambda: len(worker._SCHEDULER.ready) >= ready_units, f"{ready_units} ready units")
        finally:
            release.set()
        assert "error" not in await first
        return list(await asyncio.gather(*tasks))

    return asyncio.run(main())


def temp_leftovers():
    return sorted(str(p) for p in TMP_ROOT.rglob("*")) if TMP_ROOT.exists() else []


def words_of(text: str) -> list[str]:
    return text.lower().split()


def word_errors(ref: list[str], hyp: list[str]) -> int:
    """Word-level edit distance (substitutions + insertions + deletions)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


@pytest.fixture(scope="session")
def data_dir():
    return DATA_ROOT


_SPEECH_CACHE: dict[tuple, Path] = {}


def speech_file(text: str, fmt: str = "wav", voice: str = "en-us", speed: int = 150, name: str | None = None) -> Path:
    """espeak-ng speech of `text`, converted by real ffmpeg to `fmt`, under DATA_ROOT (cached)."""
    key = (text, fmt, voice, speed, name)
    if key in _SPEECH_CACHE:
        return _SPEECH_CACHE[key]
    stem = name or f"{abs(hash(key)):x}"
    wav = DATA_ROOT / f"{stem}.src.wav"
    synth.write(wav, synth.speak(text, voice, speed))
    out = DATA_ROOT / f"{stem}.{fmt}"
    if fmt == "wav":
        wav.rename(out)
    else:
        encode(wav, out)
        wav.unlink()
    _SPEECH_CACHE[key] = out
    return out


ENCODERS = {
    "mp3": ["-c:a", "libmp3lame", "-b:a", "64k"],
    "flac": ["-c:a", "flac"],
    "ogg": ["-c:a", "libopus", "-b:a", "48k"],
    "opus": ["-c:a", "libopus", "-b:a", "48k"],
    "m4a": ["-c:a", "aac", "-b:a", "96k"],
    "webm": ["-c:a", "libopus"],
    "wav": ["-c:a", "pcm_s16le"],
}


def encode(src: Path, dest: Path, *extra: str) -> Path:
    """Real ffmpeg: `src` to the container of `dest`'s suffix (extra args go before the output)."""
    codec = ENCODERS[dest.suffix.lstrip(".")]
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(src), *codec, *extra, str(dest)]
    subprocess.run(cmd, check=True)
    return dest


# ---------------------------------------------------------------------------------------------
# A real HTTP server on 127.0.0.1 with the misbehaviours a worker meets in the wild.
# ---------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server_version = "TestHTTP/1.0"
    files: dict[str, Path] = {}
    hits: dict[str, int] = {}
    lock = threading.Lock()

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _count(self) -> int:
        with self.lock:
            self.hits[self.path] = self.hits.get(self.path, 0) + 1
            return self.hits[self.path]

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/octet-stream", length: bool = True):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        n = self._count()
        path = self.path.split("?")[0]
        parts = path.strip("/").split("/", 1)
        name = parts[1] if len(parts) > 1 else ""
        if parts[0] == "files" and name in self.files:
            self._send(200, self.files[name].read_bytes())
        elif parts[0] == "flaky" and name in self.files:  # 500 first, then the file
            self._send(500, b"try again") if n == 1 else self._send(200, self.files[name].read_bytes())
        elif parts[0] == "always500":
            self._send(503, b"down")
        elif parts[0] == "stall":  # promises a body, sends a little, then goes quiet
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.write(b"\0" * 1000)
            self.wfile.flush()
            time.sleep(8)
        elif parts[0] == "trickle":  # a byte every 0.2 s: never a read timeout, never done
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            try:
                for _ in range(150):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif parts[0] == "big":  # an honest Content-Length over the cap
            self.send_response(200)
            self.send_header("Content-Length", str(50 * 1024 * 1024))
            self.end_headers()
            self.wfile.write(b"\0" * 65536)
        elif parts[0] == "big-nolength":  # no Content-Length, body runs past the cap
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(200):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
        elif parts[0] == "loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif parts[0] == "redirect" and name in self.files:
            self.send_response(301)
            self.send_header("Location", f"/files/{name}")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif parts[0] == "html":
            self._send(200, b"<!doctype html><html><body><h1>Not audio</h1></body></html>", "text/html")
        else:
            self._send(404, b"not found", "text/plain")


@pytest.fixture(scope="session")
def http_server():
    """Serve files by name on 127.0.0.1: server.add(path) -> URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    class Server:
        url = base
        hits = _Handler.hits

        @staticmethod
        def add(path: Path, name: str | None = None) -> str:
            name = name or path.name
            _Handler.files[name] = path
            return f"{base}/files/{name}"

    yield Server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def refused_url():
    """A URL on 127.0.0.1 where nothing listens."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/audio.wav"
