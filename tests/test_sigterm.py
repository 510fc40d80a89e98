"""SIGTERM in HTTP mode, as the image runs it (`WORKER_MODE=http python handler.py`, the demo
model loaded): with a plain request, a streaming request and an upload in flight, new requests
get a JSON 503 at once and /ping turns 503 (on PORT and on PORT_HEALTH); each request in flight
gets its answer (finished within SHUTDOWN_GRACE_SEC) or a JSON 503 (a stream: a final error
event); the process exits 0, without the C++ abort (`terminate called without an active
exception`, exit 134) that a job still inside torch caused, and leaves no temp file."""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
from conftest import speech_file

from tools import synth
from tools.testkit import REPO, loopback_only_env, multipart, wait_for

GRACE_SEC = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def long_clip(path: Path, seconds: int = 360) -> Path:
    """Minutes of speech (a sentence, then silence, over and over): a job that is still
    running when the grace period ends, on a CPU."""
    sentence = synth.speak("one two three four five six seven eight nine")
    period = np.concatenate([sentence, np.zeros(16000 * 2, np.float32)])
    return synth.write(path, np.tile(period, seconds * 16000 // len(period) + 1)[: seconds * 16000])


def status(url: str) -> int | None:
    try:
        return requests.get(url, timeout=10).status_code
    except requests.RequestException:
        return None


def post_plain(url: str, clip: Path) -> tuple[int, str, str]:
    with open(clip, "rb") as f:
        answer = requests.post(url, files={"file": f}, data={"model": "whisper-1"}, timeout=300)
    return answer.status_code, answer.headers.get("content-type", ""), answer.text


def post_stream(url: str, clip: Path) -> tuple[int, list[dict[str, Any]]]:
    """The stream's events, read to the end (a connection error fails the test)."""
    with open(clip, "rb") as f:
        answer = requests.post(url, files={"file": f}, data={"model": "whisper-1", "stream": "true"},
                               stream=True, timeout=300)  # fmt: skip
        events = [json.loads(line[6:]) for line in answer.iter_lines() if line.startswith(b"data: ")]
    return answer.status_code, events


class EndlessUpload:
    """An upload that keeps sending (64 KiB every 0.1 s, ~640 KB/s: over any minimum rate) and
    never ends its body, on a raw socket, reading the server's answer meanwhile."""

    def __init__(self, port: int, clip: Path):
        body, ctype = multipart({"model": "whisper-1"}, clip)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=300)
        self.sock.sendall((f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                           f"Content-Length: {len(body) * 1000}\r\n\r\n").encode() + body[: len(body) // 2])  # fmt: skip
        self.sent = len(body) // 2
        self.done = threading.Event()
        threading.Thread(target=self._send, daemon=True).start()

    def _send(self) -> None:
        block = b"\x00" * 65536
        try:
            while not self.done.wait(0.1):
                self.sock.sendall(block)
                self.sent += len(block)
        except OSError:
            pass

    def answer(self) -> tuple[int, str, bytes]:
        data = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                head, sep, body = data.partition(b"\r\n\r\n")
                if sep and b"content-length:" in head.lower():
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    if len(body) >= length:
                        break
        except OSError:
            pass
        finally:
            self.done.set()
            self.sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head, "the upload got no answer"
        lines = head.decode("latin-1").split("\r\n")
        ctype = next((line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("content-type:")), "")
        return int(lines[0].split()[1]), ctype, body


def assert_shutdown_503(code: int, ctype: str, body: str | bytes, log: Path | None = None) -> None:
    said = log.read_text()[-4000:] if log is not None and log.exists() else ""
    assert code == 503 and ctype.startswith("application/json"), (code, ctype, body[:300], said)
    assert json.loads(body)["error"]["code"] == "shutting_down", body[:300]


def test_sigterm_answers_everyone_in_json_and_exits_0(tmp_path):
    port, health = free_port(), free_port()
    tmp = tmp_path / "tmp"
    clip = long_clip(tmp_path / "long.wav")
    env = loopback_only_env()
    env.update(WORKER_MODE="http", HOST="127.0.0.1", PORT=str(port), PORT_HEALTH=str(health), LOG_LEVEL="INFO",
               PARAKEET_MODEL=str(REPO / "models" / "demo-tdt.nemo"), WORKER_TMP_DIR=str(tmp),
               SHUTDOWN_GRACE_SEC=str(GRACE_SEC), MAX_CONCURRENT_JOBS="8", PYTHONUNBUFFERED="1")  # fmt: skip
    env.pop("SKIP_MODEL_LOAD", None)
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "handler.py")], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1/audio/transcriptions"
    try:
        wait_for(lambda: status(f"http://127.0.0.1:{health}/ping") == 200 or proc.poll() is not None, 180, "ready")
        assert proc.poll() is None, log.read_text()[-3000:]
        with cf.ThreadPoolExecutor(2) as pool:
            plain = pool.submit(post_plain, url, clip)
            stream = pool.submit(post_stream, url, clip)
            upload = EndlessUpload(port, speech_file("one", "wav"))
            wait_for(lambda: len(list(tmp.glob("job-*"))) == 3, 120, "three requests in flight")
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)

            wait_for(lambda: status(f"http://127.0.0.1:{port}/ping") == 503, 10, "/ping to turn 503")
            assert status(f"http://127.0.0.1:{health}/ping") == 503
            with open(speech_file("two", "wav"), "rb") as f:
                late = requests.post(url, files={"file": f}, data={"model": "whisper-1"}, timeout=30)
            assert_shutdown_503(late.status_code, late.headers["content-type"], late.text)
            assert int(late.headers["Retry-After"]) >= 1
            assert time.monotonic() - started < GRACE_SEC, "the checks above ran past the grace period"

            code, ctype, text = plain.result(120)
            if code != 200:  # not finished within the grace: stopped, and told so
                assert_shutdown_503(code, ctype, text)
            else:
                assert "one two three" in json.loads(text)["text"]
            code, events = stream.result(120)
            assert code == 200 and events, events
            last = events[-1]
            assert last.get("type") == "transcript.text.done" or last["error"]["code"] == "shutting_down", last
            uploaded = upload.answer()
        exit_code = proc.wait(60)
        assert_shutdown_503(*uploaded, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert exit_code == 0, text[-3000:]
    assert "terminate called" not in text and "Fatal Python error" not in text, text[-3000:]
    assert list(tmp.rglob("*")) == [], "temp files left behind"
