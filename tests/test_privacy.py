"""No telemetry, nothing outbound but what a request names (parakeet_worker/privacy.py).

The worker runs as the image runs it (`python handler.py`, RUNPOD_SERVERLESS=1, the SDK's real
loop against a fake Runpod queue on 127.0.0.1), with VAD on and the speaker model loaded at
start, under a fresh HOME and TMPDIR and with none of the telemetry switches set in its
environment: it must set them itself. A job with VAD, diarization and a known speaker runs; an
audit hook (installed before `import handler`, tests/workers.py) records every connect, send and
name look-up made from Python."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
from conftest import DATA_ROOT, speech_file

from parakeet_worker import privacy
from tools import synth
from tools.testkit import FakeRunpodQueue, LocalServer, conversation, loopback_only_env, start_worker, stop_worker

# Left behind by imports, empty, and the same on every machine: lhotse (a NeMo dependency) makes
# ~/.lhotse/tools at import; torch._dynamo makes its compile cache dir, $TMPDIR/torchinductor_<user>;
# WORKER_TMP_DIR's default is $TMPDIR/parakeet-worker (job dirs go inside it and are removed).
EMPTY_DIRS_ALLOWED = ("home/.lhotse", "home/.lhotse/tools", "tmp/parakeet-worker", "tmp/parakeet-worker-memory")
# The worker's own file: the model's fitted memory cost (numbers per pass length, nothing about
# the machine's user or the audio; memory.default_cache), kept for the next start.
OWN_FILES = ("tmp/parakeet-worker-memory/memory-cost-",)


def test_telemetry_off_sets_only_what_is_unset():
    env = {"ORT_DISABLE_TELEMETRY": "0", "DO_NOT_TRACK": ""}
    changed = privacy.telemetry_off(env)
    assert env["ORT_DISABLE_TELEMETRY"] == "0"  # the operator's explicit choice stands
    assert changed == {k: v for k, v in privacy.TELEMETRY_SWITCHES.items() if k != "ORT_DISABLE_TELEMETRY"}
    assert env["DO_NOT_TRACK"] == "1" and env["HF_HUB_DISABLE_TELEMETRY"] == "1"
    assert privacy.telemetry_off(env) == {}


@pytest.fixture(scope="module")
def worker_run(tmp_path_factory):
    """One worker process from start to SIGTERM: its job's answer, exit code, what it left on
    disk and what it connected to."""
    base = tmp_path_factory.mktemp("privacy")
    home, tmp, audit = base / "home", base / "tmp", base / "audit.jsonl"
    home.mkdir(), tmp.mkdir()
    env = loopback_only_env()
    for name in (*privacy.TELEMETRY_SWITCHES, "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "HF_HOME", "WORKER_TMP_DIR"):
        env.pop(name, None)
    env.update(HOME=str(home), TMPDIR=str(tmp), VAD="on", SPEAKER_PRELOAD="1", PW_AUDIT=str(audit), LOG_LEVEL="INFO")
    audio, _, _ = conversation([0, 1] * 4, seed=5)
    talk = synth.write(DATA_ROOT / "privacy-talk.wav", audio)
    reference = speech_file("seven left hello right nine up", "wav", name="privacy-reference")
    queue = FakeRunpodQueue()
    try:
        with LocalServer() as audio_server:
            url = audio_server.add(talk)
            proc = start_worker(queue, env, base / "worker.log", "outbound-audit")
            try:
                job = queue.add({"inputs": [{"source": url}], "diarize": True, "vad": True, "timestamps": True,
                                 "known_speakers": [{"name": "ann", "source": str(reference)}]})  # fmt: skip
                (result,) = queue.wait_done([job], timeout=600)
            finally:
                code = stop_worker(proc, timeout=60)
            ports = {int(audio_server.url.rsplit(":", 1)[1]), int(queue.url.rsplit(":", 1)[1])}
    finally:
        queue.close()
    events = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
    return {"result": result, "code": code, "base": base, "events": events, "ports": ports,
            "log": (base / "worker.log").read_text(errors="replace")}  # fmt: skip


def test_the_job_ran(worker_run):
    out = worker_run["result"].get("output", {})
    assert worker_run["code"] == 0, worker_run["log"][-3000:]
    (item,) = out["results"]
    assert item["text"] and item["turns"], out


def test_nothing_is_written_outside_the_job_dirs(worker_run):
    base = worker_run["base"]
    found = sorted(str(p.relative_to(base)) for root in ("home", "tmp") for p in (base / root).rglob("*"))
    files = [f for f in found if not (base / f).is_dir() and not f.startswith(OWN_FILES)]
    assert files == [], files  # onnxruntime's ~/.cache/Microsoft/DeveloperTools/... and $TMPDIR/.ses among them
    unexpected = [d for d in found if d not in EMPTY_DIRS_ALLOWED and not d.startswith(OWN_FILES)
                  and not Path(d).name.startswith("torchinductor_")]  # fmt: skip
    assert unexpected == [], unexpected


def test_no_connection_but_to_the_queue_and_the_requests_own_url(worker_run):
    events = worker_run["events"]
    connects = [e for e in events if e["event"] == "socket.connect"]
    assert connects, "the audit hook saw no connect at all: it was not installed"
    for event in events:
        where = ast.literal_eval(event["where"])
        if event["event"] in ("socket.connect", "socket.sendto", "socket.sendmsg"):
            assert isinstance(where, tuple) and where[0] == "127.0.0.1" and where[1] in worker_run["ports"], event
        else:  # a name look-up: only of the loopback address the URLs hold
            assert where[0] in ("127.0.0.1", b"127.0.0.1"), event


def test_the_worker_set_the_switches_itself():
    """What the subprocess above relies on, in this process: main() and ensure_model() call
    telemetry_off() first (checked on a copy of the environment, restored after)."""
    import handler

    saved = {k: os.environ.pop(k) for k in list(privacy.TELEMETRY_SWITCHES) if k in os.environ}
    try:
        handler.ensure_model()
        assert {k: os.environ.get(k) for k in privacy.TELEMETRY_SWITCHES} == privacy.TELEMETRY_SWITCHES
    finally:
        for name in privacy.TELEMETRY_SWITCHES:
            os.environ.pop(name, None)
        os.environ.update(saved)
