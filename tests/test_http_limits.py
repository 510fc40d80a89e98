"""HTTP limits of the worker's own server (WORKER_MODE=http), with the server's real uvicorn
settings (server_config) on 127.0.0.1: a request head is capped in bytes and in time, a body
must keep arriving and holds no job slot while it does, 429s say when to retry, a multipart
boundary past the parser's limit is a 400, and every answer, errors included, is JSON that
gives nothing away. Slow or huge clients are raw sockets beside a normal client (the official
`openai` client), which is served meanwhile."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import requests
from conftest import REPO, TMP_ROOT, hold_model, speech_file, temp_leftovers, words_of

from tools.testkit import multipart, wait_for


class Served:
    """The worker's HTTP app served as `serve()` serves it (the same uvicorn settings), on
    127.0.0.1 (a free port), in a thread of this process."""

    def __init__(self, worker: Any) -> None:
        import uvicorn

        from parakeet_worker import http_server

        config = http_server.server_config(worker.http_app(), 0)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="uvicorn-limits", daemon=True)
        self._thread.start()
        wait_for(lambda: self.server.started or not self._thread.is_alive(), 60, "the server to start")
        assert self.server.started
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)


@pytest.fixture
def served(worker, config) -> Iterator[Any]:
    """A fresh server for each test, after the test's config(...) changes: call it."""
    started: list[Served] = []

    def start(**changes: Any) -> Served:
        config(host="127.0.0.1", **changes)
        started.append(Served(worker))
        return started[-1]

    yield start
    for one in started:
        one.close()


def client_of(api: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key="anything", max_retries=0, timeout=120)


def transcribe(api: Served, text: str) -> str:
    with open(speech_file(text, "wav"), "rb") as f:
        return client_of(api).audio.transcriptions.create(model="whisper-1", file=f).text


def job_dirs() -> list[str]:
    return sorted(p.name for p in TMP_ROOT.glob("job-*"))


def no_leftovers() -> bool:
    """No temp file left; False (look again) when a dir vanished while it was being listed."""
    try:
        return temp_leftovers() == []
    except FileNotFoundError:
        return False


# --- raw HTTP/1.1 over a socket ------------------------------------------------------------------


def connect(api: Served) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=60)
    return sock


def read_answer(sock: socket.socket, timeout: float = 60) -> tuple[int, dict[str, str], bytes] | None:
    """The server's response on `sock`: (status, headers, body), or None if the connection
    ended (closed or reset) without one."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split()[1]), headers, body
    except (ConnectionResetError, BrokenPipeError):
        return None


def assert_json_error(answer: tuple[int, dict[str, str], bytes] | None, status: int, code: str | None = None) -> dict:
    assert answer is not None, "the connection ended without an answer"
    got, headers, body = answer
    assert got == status, (got, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert code is None or error["code"] == code, error
    assert "Traceback" not in error["message"] and "<class" not in error["message"]
    return error


def upload_head(api_path: str, ctype: str, length: int) -> bytes:
    return (f"POST {api_path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()  # fmt: skip


class Trickle:
    """A client sending `data` a few bytes at a time, every `every` seconds, on its own thread,
    until it is sent, the server ends the connection, or stop() is called."""

    def __init__(self, api: Served, data: bytes, every: float = 0.05, step: int = 1, first: int = 0):
        self.sock = connect(api)
        self.sent = 0
        self.failed: BaseException | None = None
        self._stop = threading.Event()
        self._data, self._every, self._step, self._first = data, every, step, first
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._first:
                self.sock.sendall(self._data[: self._first])
                self.sent = self._first
            while self.sent < len(self._data) and not self._stop.wait(self._every):
                self.sock.sendall(self._data[self.sent : self.sent + self._step])
                self.sent += self._step
        except OSError as exc:  # the server closed the connection: what the test waits for
            self.failed = exc

    def answer(self, timeout: float = 60) -> tuple[int, dict[str, str], bytes] | None:
        got = read_answer(self.sock, timeout)
        self.stop()
        return got

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        with contextlib.suppress(OSError):
            self.sock.close()


# --- request heads --------------------------------------------------------------------------------


def test_a_head_over_the_cap_is_431_and_others_are_served(served):
    api = served(http_head_max_bytes=64 * 1024)
    sock = connect(api)
    sock.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 100_000)  # no end of head
    assert_json_error(read_answer(sock), 431, "headers_too_large")
    sock.close()
    big = requests.get(f"{api.url}/ping", headers={"X-Pad": "a" * 60_000}, timeout=30)
    assert big.status_code == 200  # under the cap: served
    assert words_of(transcribe(api, "one two")) == ["one", "two"]


def test_a_streamed_huge_header_is_cut_off_early_while_ping_answers(served):
    """One client streams a 64 MiB header as fast as it can; the server stops it near the cap
    (it answers 431, reads and drops at most LINGER_MAX_BYTES more, then resets: the client
    cannot send it all), and /ping and a transcription are answered meanwhile."""
    api = served(http_head_max_bytes=64 * 1024)
    sock = connect(api)
    chunk = b"X-Pad: " + b"a" * 65_536 + b"\r\n"
    sent = 0
    with cf.ThreadPoolExecutor(1) as pool:

        def flood() -> int:
            nonlocal sent
            sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            with contextlib.suppress(OSError):
                while sent < 64 * 2**20:
                    sock.sendall(chunk)
                    sent += len(chunk)
            return sent

        flooding = pool.submit(flood)
        assert requests.get(f"{api.url}/ping", timeout=30).status_code == 200
        assert words_of(transcribe(api, "three four")) == ["three", "four"]
        assert flooding.result(60) < 64 * 2**20, "the whole 64 MiB header was taken in"
    sock.close()


def test_a_slow_head_gets_408_and_a_silent_connection_is_closed(served):
    api = served(http_head_timeout_sec=1.0)
    slow = Trickle(api, b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100_000, every=0.05)
    silent = connect(api)
    assert words_of(transcribe(api, "five six")) == ["five", "six"]  # served beside them
    answer = slow.answer(30)
    assert answer is None or answer[0] == 408, answer
    if answer is not None:
        assert_json_error(answer, 408, "request_timeout")
    assert slow.sent < 100_000, "the slow head was never cut off"
    silent_answer = read_answer(silent, 30)  # closed: a 408 or nothing, but never left open
    assert silent_answer is None or silent_answer[0] == 408
    silent.close()


def test_invalid_http_is_a_json_400(served):
    api = served()
    sock = connect(api)
    sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
    assert_json_error(read_answer(sock), 400, "invalid_request")
    sock.close()


# --- request bodies -------------------------------------------------------------------------------


def slow_upload(api: Served, text: str = "seven") -> Trickle:
    """An upload whose head and first 1,000 body bytes arrive at once, then a byte every 0.2 s."""
    body, ctype = multipart({"model": "whisper-1"}, speech_file(text, "wav"))
    return Trickle(api, upload_head("/v1/audio/transcriptions", ctype, len(body)) + body, every=0.2,
                   first=len(upload_head("/v1/audio/transcriptions", ctype, len(body))) + 1000)  # fmt: skip


def test_slow_bodies_hold_no_job_slot(served):
    """Four uploads crawling in (more than MAX_CONCURRENT_JOBS=2): a normal client is served,
    not told 429; their bodies are read in their own pool."""
    api = served(max_concurrent_jobs=2, http_body_readers=8, http_body_idle_sec=120.0, http_body_min_rate=0)
    slow = [slow_upload(api) for _ in range(4)]
    try:
        wait_for(lambda: len(job_dirs()) == 4, 30, "four uploads to be reading")  # each streams to its job dir
        assert words_of(transcribe(api, "eight nine")) == ["eight", "nine"]
        assert words_of(transcribe(api, "up down")) == ["up", "down"]
    finally:
        for one in slow:
            one.stop()
    wait_for(no_leftovers, 30, "the abandoned uploads to be cleaned up")


def test_a_stalled_body_gets_408(served):
    api = served(http_body_idle_sec=0.5, http_body_min_rate=0)
    body, ctype = multipart({"model": "whisper-1"}, speech_file("yes", "wav"))
    sock = connect(api)
    sock.sendall(upload_head("/v1/audio/transcriptions", ctype, len(body)) + body[:1000])  # then nothing
    assert_json_error(read_answer(sock, 30), 408, "request_timeout")
    sock.close()
    json_sock = connect(api)
    json_sock.sendall(upload_head("/transcribe", "application/json", 1000) + b'{"input": ')
    assert_json_error(read_answer(json_sock, 30), 408, "request_timeout")
    json_sock.close()
    wait_for(no_leftovers, 30, "the stalled upload to be cleaned up")


def test_a_trickling_body_gets_408_under_the_minimum_rate(served):
    """A byte every 0.1 s never trips the idle deadline, but averages far under the minimum rate."""
    api = served(http_body_idle_sec=30.0, http_body_min_rate=1000, http_body_grace_sec=1.0)
    trickle = slow_upload(api)
    trickle._every = 0.1
    assert_json_error(trickle.answer(30), 408, "request_timeout")
    wait_for(no_leftovers, 30, "the trickled upload to be cleaned up")


def test_429s_carry_retry_after(served, worker, monkeypatch):
    """Busy with jobs, or with bodies being read: 429, JSON, with Retry-After."""
    api = served(max_concurrent_jobs=1, http_body_readers=1, http_body_idle_sec=120.0, http_body_min_rate=0)
    entered, release = hold_model(worker, monkeypatch)
    with cf.ThreadPoolExecutor(1) as pool:
        first = pool.submit(transcribe, api, "two")
        try:
            assert entered.wait(60)
            with open(speech_file("three", "wav"), "rb") as f:
                busy = requests.post(f"{api.url}/v1/audio/transcriptions", files={"file": f},
                                     data={"model": "whisper-1"}, timeout=60)  # fmt: skip
            assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
            assert int(busy.headers["Retry-After"]) >= 1
        finally:
            release.set()
        assert words_of(first.result()) == ["two"]
    reading = slow_upload(api)
    try:
        wait_for(lambda: len(job_dirs()) == 1, 30, "the slow upload to be reading")
        with open(speech_file("four", "wav"), "rb") as f:
            full = requests.post(f"{api.url}/v1/audio/transcriptions", files={"file": f},
                                 data={"model": "whisper-1"}, timeout=60)  # fmt: skip
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1, full.text
    finally:
        reading.stop()
    wait_for(no_leftovers, 30, "the abandoned upload to be cleaned up")


def test_an_early_answer_reaches_a_client_still_sending(served):
    """A 413 sent while the client is still sending its upload (over MAX_UPLOAD_BYTES): the
    client, which stops once it sees an answer, reads it whole, not a connection reset; then
    the connection closes (the rest of the body is not read for as long as it comes)."""
    api = served(max_upload_bytes=64 * 1024)
    body, ctype = multipart({"model": "whisper-1"}, speech_file("nine", "wav"))
    sock = connect(api)
    sock.sendall(upload_head("/v1/audio/transcriptions", ctype, len(body) + 50 * 2**20) + body[:1000])
    sock.setblocking(False)
    got, sent = b"", 0
    block = b"\x00" * 65536
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:  # send until an answer comes (50 MiB at most)
        with contextlib.suppress(BlockingIOError):
            got += sock.recv(65536)
        try:
            sent += sock.send(block) if sent < 50 * 2**20 else 0
        except BlockingIOError:
            pass  # the server is not reading as fast
        time.sleep(0.005)  # ~13 MB/s: a fast client, not one that fills every buffer at once
    sock.setblocking(True)
    assert got, "no answer while sending"
    rest = read_answer_from(sock, got)
    assert_json_error(rest, 413, "too_large")
    assert read_answer(sock, 30) is None  # closed afterwards
    sock.close()
    wait_for(no_leftovers, 30, "the refused upload to be cleaned up")


def read_answer_from(sock: socket.socket, start: bytes) -> tuple[int, dict[str, str], bytes] | None:
    """read_answer, with the first bytes already read."""
    data = start
    sock.settimeout(30)
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


# --- multipart --------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [257, 300, 5000])
def test_a_boundary_over_the_parsers_limit_is_400(served, length):
    api = served()
    boundary = "b" * length
    body = f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--{boundary}--\r\n"
    answer = requests.post(f"{api.url}/v1/audio/transcriptions", data=body.encode(), timeout=30,
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_request", answer.text
    assert "boundary" in answer.json()["error"]["message"]
    assert temp_leftovers() == []


# --- answers that give nothing away -------------------------------------------------------------------


def test_every_error_is_json(served, config):
    api = served(worker_api_key="k3y")
    key = {"Authorization": "Bearer k3y"}
    answers = {
        "401": requests.post(f"{api.url}/transcribe", json={"input": {}}, timeout=30),
        "404": requests.get(f"{api.url}/nothing", headers=key, timeout=30),
        "405": requests.get(f"{api.url}/v1/audio/transcriptions", headers=key, timeout=30),
        "transcribe-400": requests.post(f"{api.url}/transcribe", json={"input": {"inputs": "x"}}, headers=key, timeout=30),
        "transcribe-not-json": requests.post(f"{api.url}/transcribe", data=b"nope", headers=key, timeout=30),
        "form-not-form": requests.post(f"{api.url}/v1/audio/transcriptions", data=b"x", headers=key, timeout=30),
    }  # fmt: skip
    for name, answer in answers.items():
        assert answer.status_code >= 400, name
        assert answer.headers["content-type"].startswith("application/json"), (name, answer.text[:200])
        assert "error" in answer.json(), name


def test_errors_name_the_audio_not_its_temp_path(served, tmp_path):
    api = served()
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF" + b"\x00" * 5000)
    with open(junk, "rb") as f:
        answer = requests.post(f"{api.url}/v1/audio/transcriptions", files={"file": ("junk.wav", f)},
                               data={"model": "whisper-1"}, timeout=60)  # fmt: skip
    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert str(TMP_ROOT) not in message and "job-" not in message and ".src" not in message, message
    assert "ffmpeg could not decode the audio" in message or "the audio:" in message, message  # its own words stay


def test_models_names_the_model_not_its_path(served):
    api = served()
    (model,) = client_of(api).models.list().data
    assert model.id == "demo-tdt", model.id  # models/demo-tdt.nemo
    assert str(REPO) not in json.dumps(requests.get(f"{api.url}/v1/models", timeout=30).json())


def test_uvicorns_own_loggers_go_through_the_redaction(worker, capfd):
    """With the server's uvicorn settings, uvicorn's loggers (uvicorn.error logs exceptions and
    protocol errors) have no handlers of their own: their records reach the root logger's
    handlers, which the worker's logging set-up makes redact URL secrets; the access log
    (off) writes nothing anywhere."""
    import io
    import logging

    from parakeet_worker import http_server, patches

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        patches.configure_logging()
        http_server.server_config(worker.http_app(), 0)  # uvicorn configures its logging here
        for name in ("uvicorn.error", "uvicorn.access", "uvicorn"):
            logging.getLogger(name).error("fetching https://user:pa55@host.example/a.wav?X-Amz-Signature=s3cr3t")
    finally:
        root.removeHandler(handler)
    written = out.getvalue() + "".join(capfd.readouterr())
    assert written.count("https://***@host.example/a.wav?***") == 2, written  # uvicorn.error, uvicorn
    assert "s3cr3t" not in written and "pa55" not in written
