"""Shared test set-up: the worker with the bundled demo model, real speech, a real HTTP server.

The environment is fixed here, before anything reads the worker's config (config.CFG is read from
the environment on first use; the model loads on the first job, or in the `worker` fixture, once
per session).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
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

from parakeet_worker import config as settings  # noqa: E402
from parakeet_worker import model as asr  # noqa: E402
from tools import synth  # noqa: E402
from tools.testkit import (  # noqa: E402, F401 - encode, word_errors, until: for the tests
    LocalServer,
    LoopbackOnly,
    answer,
    encode,
    load_worker,
    until,
    word_errors,
)


def _defined_in(path: Path) -> frozenset[str]:
    """The names a module defines itself at top level (not those it imports)."""
    import ast

    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return frozenset(names)


HANDLER_OWN = _defined_in(REPO / "handler.py")
_setattr = pytest.MonkeyPatch.setattr


def _guarded_setattr(self, target, *args, **kwargs):
    """monkeypatch.setattr, refusing a patch of a name handler.py only imports: such a patch
    changes nothing the worker runs (its parts look the name up where it lives), so the test
    would test nothing. Patch the name in its own module (config.CFG, model.forward_decode...)."""
    if isinstance(target, str):
        where, attr = target.rsplit(".", 1)
    else:
        where, attr = getattr(target, "__name__", None), args[0] if args else kwargs.get("name")
    if where == "handler" and isinstance(attr, str) and attr not in HANDLER_OWN:
        raise AssertionError(f"handler.{attr} is only imported by handler.py; patch it where it is defined")
    return _setattr(self, target, *args, **kwargs)


pytest.MonkeyPatch.setattr = _guarded_setattr  # type: ignore[method-assign]

LOOPBACK = LoopbackOnly()  # LOOPBACK.refused: the names tests tried to resolve


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(DATA_ROOT, ignore_errors=True)
    shutil.rmtree(TMP_ROOT, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def loopback_only():
    """No test sends traffic anywhere but 127.0.0.1, name look-ups included: any other name
    fails as an unknown host does, without asking the machine's resolver."""
    with LOOPBACK:
        yield LOOPBACK


@pytest.fixture(scope="session")
def worker():
    """The handler module with the demo model loaded (once per session)."""
    return load_worker()


@pytest.fixture
def config(worker, monkeypatch):
    """Change the worker's config for one test: config(batch_max_items=2)."""

    def apply(**changes):
        monkeypatch.setattr(settings, "CFG", dataclasses.replace(settings.CFG, **changes))
        return settings.CFG

    return apply


def call_handler(worker, job: dict) -> dict:
    """One job through the real handler, in-process, as the SDK would await it."""
    return answer(worker, job)


def run_job(worker, inputs, **params):
    """Run one job through the real handler; check the invariants every job must keep."""
    out = call_handler(worker, {"id": "test-job", "input": {"inputs": inputs, **params}})
    assert "error" not in out, out
    assert len(out["results"]) == len(inputs)
    assert [r["index"] for r in out["results"]] == list(range(len(inputs)))
    assert temp_leftovers() == [], "the job left files behind"
    return out


def hold_model(worker, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Hold the real model thread inside its model calls until the second event is set; the
    first is set once a call has begun. Meanwhile units pile up in the real scheduler."""
    entered, release = threading.Event(), threading.Event()
    real = asr.forward_decode

    def held(*args, **kwargs):
        entered.set()
        release.wait(120)
        return real(*args, **kwargs)

    monkeypatch.setattr(asr, "forward_decode", held)
    return entered, release


def run_together(worker, monkeypatch, jobs: list[dict], ready_units: int) -> list[dict]:
    """Run `jobs` at once, in-process, so that their items share batches for certain: a first
    one-clip job holds the real model thread inside its model call until `ready_units` units of
    these jobs wait in the real scheduler; then the model goes on and the scheduler plans."""
    entered, release = hold_model(worker, monkeypatch)
    blocker = {"id": "blocker", "input": {"inputs": [{"source": str(speech_file("one", "wav"))}]}}

    async def main() -> list[dict]:
        first = asyncio.ensure_future(worker.handler(blocker))
        await until(entered.is_set, "the model call")
        tasks = [asyncio.ensure_future(worker.handler(job)) for job in jobs]
        try:
            await until(lambda: len(worker.model_thread().ready) >= ready_units, f"{ready_units} ready units")
        finally:
            release.set()
        assert "error" not in await first
        return list(await asyncio.gather(*tasks))

    return asyncio.run(main())


def temp_leftovers():
    return sorted(str(p) for p in TMP_ROOT.rglob("*")) if TMP_ROOT.exists() else []


def words_of(text: str) -> list[str]:
    return text.lower().split()


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


@pytest.fixture(scope="session")
def http_server():
    """A real HTTP server on 127.0.0.1 (tools.testkit.AudioRoutes): server.add(path) -> URL."""
    with LocalServer() as server:
        yield server


@pytest.fixture(scope="session")
def refused_url():
    """A URL on 127.0.0.1 where nothing listens."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/audio.wav"


@contextlib.contextmanager
def tmpfs(options: str) -> Iterator[Path]:
    """A fresh tmpfs mounted with `options` (e.g. "size=512k"); unmounted afterwards."""
    where = Path(tempfile.mkdtemp(prefix="pw-tmpfs-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)
        where.rmdir()


@pytest.fixture(scope="module")
def api(worker):
    """The worker's own HTTP server (handler.http_app) on 127.0.0.1, for a test module."""
    from tools.testkit import UvicornThread

    with UvicornThread(worker.http_app()) as running:
        yield running


@pytest.fixture
def client(api):
    """The official openai client, pointed at `api`."""
    import openai

    return openai.OpenAI(base_url=f"{api.url}/v1", api_key="anything", max_retries=0, timeout=120)
