"""The worker in the runpod SDK's real worker loop (`python handler.py`, RUNPOD_SERVERLESS=1) against
the fake Runpod queue (tools/testkit.py), one process for the module: no URL secret reaches its
log at any level, and at SIGTERM no job it has taken is lost."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from conftest import speech_file, words_of

from tools.testkit import FakeRunpodQueue, loopback_only_env, start_worker, stop_worker

SECRETS = ("hunter2-password", "deadbeef0signature", "AKIAEXAMPLECREDENTIAL", "sessiontoken0secret")
SIGNED = "?X-Amz-Credential=AKIAEXAMPLECREDENTIAL&X-Amz-Signature=deadbeef0signature#sessiontoken0secret"


class SdkWorker:
    def __init__(self, tmp: Path):
        self.tmp = tmp / "worker-tmp"
        self.log = tmp / "worker.log"
        self.queue = FakeRunpodQueue()
        env = loopback_only_env()
        for var in ("RUNPOD_LOG_LEVEL", "RUNPOD_DEBUG_LEVEL", "RUNPOD_ENDPOINT_ID"):
            env.pop(var, None)  # the image sets none of these: the SDK logs at DEBUG
        env.update(WORKER_TMP_DIR=str(self.tmp), LOG_LEVEL="DEBUG")  # the worker's own and libraries' lines too
        self.proc = start_worker(self.queue, env, self.log)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert self.proc.poll() is None, self.text()[-3000:]
            assert time.monotonic() < deadline, f"no {needle!r} in the worker's log"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def sdk_worker(tmp_path_factory):
    worker = SdkWorker(tmp_path_factory.mktemp("sdk-loop"))
    yield worker
    stop_worker(worker.proc)
    worker.queue.close()


def test_no_secret_in_any_log_line(sdk_worker, http_server, refused_url):
    good = http_server.add(speech_file("one two three", "wav"), "secret-good.wav")
    with_secrets = good.replace("http://", "http://alice:hunter2-password@") + SIGNED
    inputs = [
        {"source": with_secrets},
        {"source": with_secrets.replace("secret-good.wav", "missing.wav")},  # 404: the error quotes the URL
        {"source": refused_url.replace("http://", "http://alice:hunter2-password@") + SIGNED},
    ]
    job = sdk_worker.queue.add({"inputs": inputs}, "secrets")
    result = sdk_worker.queue.wait_done([job])[0]["output"]["results"]
    assert words_of(result[0]["text"]) == ["one", "two", "three"], result
    assert [r.get("code") for r in result[1:]] == ["download_failed", "download_failed"], result
    sdk_worker.wait_log("Finished Job")
    log = sdk_worker.text()
    assert "Handler output:" in log and "run_job return:" in log  # the SDK's DEBUG lines are there...
    assert "item 0: fetching http://***@127.0.0.1" in log  # ...and the worker's: LOG_LEVEL=DEBUG works
    assert "download attempt" in log  # the worker's own retry warnings
    leaked = [line for line in log.splitlines() if any(s in line for s in SECRETS)]
    assert leaked == [], leaked[:5]


def test_sigterm_loses_no_taken_job(sdk_worker):
    """SIGTERM while a job runs and a take request is open: the jobs that request hands out
    afterwards are still run and answered, then the worker exits."""
    queue = sdk_worker.queue
    queue.hold_takes = True  # the open take returns only once jobs come
    texts = ["one two three", "four five six", "seven eight nine", "yes no", "up down", "left right"]
    clips = [{"source": str(speech_file(t, "wav"))} for t in texts]
    running = queue.add({"inputs": clips}, "running")
    queue.wait_taken([running])
    queue.wait_open_take()
    sdk_worker.proc.send_signal(signal.SIGTERM)
    sdk_worker.wait_log("Received shutdown signal")
    with queue.cond:  # all at once: the open take hands out as many as it asked for (JOB_TAKE_MAX)
        late = [queue.add({"inputs": [clips[n % len(clips)]]}, f"late-{n}") for n in range(10)]
    (first,) = queue.wait_done([running], timeout=300)
    assert [words_of(r["text"]) for r in first["output"]["results"]] == [t.split() for t in texts]
    assert sdk_worker.proc.wait(timeout=300) == 0  # every take is over once the worker has exited
    taken = [n for n, job in enumerate(late) if job in queue.taken_at]
    assert taken, "the take that was open at SIGTERM handed out none of the late jobs"
    for n, out in zip(taken, queue.wait_done([late[n] for n in taken], timeout=10), strict=True):
        assert words_of(out["output"]["results"][0]["text"]) == texts[n % len(texts)].split(), out
    # the worker asked for no more after SIGTERM: the rest stay queued for another worker
    assert all(late[n] not in queue.taken_at for n in range(10) if n not in taken)
    assert not any(sdk_worker.tmp.rglob("job-*")), "a job's temp dir stayed behind"
    leaked = [line for line in sdk_worker.text().splitlines() if any(s in line for s in SECRETS)]
    assert leaked == [], leaked[:5]
