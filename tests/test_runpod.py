"""The worker as Runpod runs it: the SDK's local test path, its local API server, progress
updates posted through the SDK, and a model that fails to load. Real subprocesses, real HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
import requests
from conftest import DATA_ROOT, DEMO_MODEL, REPO, call_handler, speech_file, words_of

from parakeet_worker import model as asr
from tools import synth


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PARAKEET_MODEL": str(DEMO_MODEL), "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "INFO"}
    env.pop("RUNPOD_WEBHOOK_GET_JOB", None)
    return {**env, **extra}


def test_handler_py_runs_test_input_json():
    """`python handler.py` with no arguments runs test_input.json through the SDK's local path."""
    job = json.loads((REPO / "test_input.json").read_text())
    proc = subprocess.run(
        [sys.executable, "handler.py"], cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "completed successfully" in proc.stdout
    expected = json.loads((REPO / "samples" / "TRANSCRIPTS.json").read_text())
    first = job["input"]["inputs"][0]["source"].rsplit("/", 1)[-1]
    assert expected[first] in proc.stdout


def test_runpod_serverless_flag(tmp_path):
    """Unset, `python handler.py` with nothing to run says what to do; RUNPOD_SERVERLESS=1 hands
    over to the SDK (off Runpod it looks for test_input.json in the working directory)."""
    env = worker_env(SKIP_MODEL_LOAD="1")
    run = [sys.executable, str(REPO / "handler.py")]
    idle = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert idle.returncode != 0
    assert "nothing to run: set RUNPOD_SERVERLESS=1" in idle.stderr
    started = subprocess.run(run, cwd=tmp_path, env={**env, "RUNPOD_SERVERLESS": "1"}, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    out = started.stdout + started.stderr
    assert "Starting Serverless Worker" in out and "test_input.json not found" in out, out[-2000:]


def test_test_input_argument_and_failed_model_exit_codes(tmp_path):
    """--test_input works, and a model that cannot load makes every job fail with its cause
    (the SDK's local path then exits non-zero) instead of crashing the worker at start."""
    wav = speech_file("four five six", "wav")
    job = json.dumps({"input": {"inputs": [{"source": str(wav)}]}})
    ok = subprocess.run(
        [sys.executable, "handler.py", "--test_input", job], cwd=REPO, env=worker_env(),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert "four five six" in ok.stdout

    broken = tmp_path / "broken.nemo"
    broken.write_bytes(b"this is not a nemo archive")
    bad = subprocess.run(
        [sys.executable, "handler.py", "--test_input", job], cwd=REPO, env=worker_env(PARAKEET_MODEL=str(broken)),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode != 0
    assert f"model '{broken}' could not be loaded" in bad.stdout + bad.stderr


def test_model_load_failure_answers_every_job(worker, config, monkeypatch):
    """In-process, with the session's model set aside: a model that cannot load is tried once,
    and every job gets its cause, the worker staying up."""
    for name, value in (("value", None), ("error", None), ("loaded", False)):
        monkeypatch.setattr(asr.MODEL, name, value)  # restored (the demo model back) after the test
    config(model="/nonexistent/model.nemo")
    job = {"id": "j", "input": {"inputs": [{"source": "samples/x.wav"}]}}
    outputs = [call_handler(worker, job) for _ in range(2)]
    for out in outputs:
        assert out == {"error": out["error"]}
        assert "/nonexistent/model.nemo" in out["error"] and "FileNotFoundError" in out["error"]
    assert asr.MODEL.loaded and asr.loaded_model() is None


class _Collector(BaseHTTPRequestHandler):
    posts: list[dict] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Collector.posts.append({**json.loads(body), "job": urlsplit(self.path).path.rsplit("/", 1)[-1]})
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


def run_with_progress(jobs: list[tuple[list[dict], dict]], tmp_path) -> list[tuple[dict, list[dict]]]:
    """Run jobs (inputs, config changes), one after the other, in one fresh worker process whose
    SDK posts progress to a collector on 127.0.0.1 (the SDK reads the URL at import: hence the
    process); return each job's output and its IN_PROGRESS updates, in the order posted. The
    outputs travel in a file: another thread's log line cannot glue onto them."""
    _Collector.posts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/job-done/$ID?gpu=test"
    result = tmp_path / "result.json"
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run(
        [sys.executable, "tests/workers.py", "progress", str(tmp_path / "jobs.json"), str(result)], cwd=REPO,
        env=worker_env(RUNPOD_WEBHOOK_POST_OUTPUT=url), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    server.shutdown()
    assert proc.returncode == 0, proc.stderr[-2000:]
    outs = json.loads(result.read_text())
    posts = [p for p in _Collector.posts if p.get("status") == "IN_PROGRESS"]
    return [(out, [p["output"] for p in posts if p["job"] == f"progress-{n}"]) for n, out in enumerate(outs)]


def test_progress_updates_go_through_the_sdk(tmp_path):
    """A job of six one-item batches posts progress after each batch that leaves work to do,
    with growing numbers, to the URL the SDK is given (here a collector on 127.0.0.1). The posts
    are awaited by the job, so all of them are in before its result; the last batch posts
    nothing (the result says it all). Then, in the same process, one item split into pieces
    reports after each piece, not only when the item is done."""
    texts = ["one", "two three", "four five six", "seven eight", "nine zero", "yes no"]
    words = ["one", "hello", "seven", "stop", "three", "world", "nine", "left", "go", "five", "up", "eight"]
    offsets = [1.0 + 4.0 * i for i in range(len(words))]
    path = synth.write(DATA_ROOT / "progress-long.wav", synth.place_words(words, offsets))
    (out, updates), (split_out, split_updates) = run_with_progress([
        ([{"source": str(speech_file(t, "wav"))} for t in texts], {"batch_max_items": 1}),
        ([{"source": str(path)}], {"batch_max_items": 16, "max_single_pass_sec": 15.0, "short_max_sec": 10.0,
                                   "local_attention_after_sec": 600.0}),
    ], tmp_path)  # fmt: skip
    assert [words_of(r["text"]) for r in out["results"]] == [t.split() for t in texts]
    assert out["stats"]["batch_sizes"] == [1] * 6
    done = [u["items_done"] for u in updates]
    assert done == list(range(1, 6)), _Collector.posts  # one post per batch, none after the last
    assert all(u["items_total"] == len(texts) for u in updates)
    seconds = [u["audio_sec_done"] for u in updates]
    assert seconds[0] > 0 and seconds == sorted(set(seconds))

    result = split_out["results"][0]
    assert result["text"].split() == words
    seconds = [u["audio_sec_done"] for u in split_updates]
    assert [u["items_done"] for u in split_updates] == [0] * len(split_updates), split_updates
    assert len(split_updates) >= 3, split_updates  # 49 s in pieces of at most 15 s: a post after each of 3+ cuts
    assert seconds == sorted(set(seconds)) and 0 < seconds[-1] < result["duration"]
    assert all(u["audio_sec_total"] == pytest.approx(result["duration"], abs=0.01) for u in split_updates)


@pytest.fixture(scope="module")
def local_api():
    """`python handler.py --rp_serve_api` on a free port: the SDK's own FastAPI server."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)],
        cwd=REPO, env=worker_env(ALLOWED_LOCAL_ROOTS=f"{DATA_ROOT}:{REPO / 'samples'}"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"API server exited: {proc.stdout.read()[-3000:]}")
        try:
            if requests.get(f"{base}/openapi.json", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("API server did not come up")
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_local_api_runsync(local_api):
    texts = ["hello world", "stop go left", "three two one", "yes", "five six seven eight nine", "up down",
             "zero", "right no"]  # fmt: skip
    kinds = ["mp3", "flac", "ogg", "wav", "m4a", "mp3", "opus", "wav"]
    inputs = [{"source": str(speech_file(t, kind))} for t, kind in zip(texts, kinds, strict=True)]
    reply = requests.post(f"{local_api}/runsync", json={"input": {"inputs": inputs, "timestamps": True}}, timeout=120)
    assert reply.status_code == 200
    body = reply.json()
    assert body["status"] == "COMPLETED", body
    results = body["output"]["results"]
    assert [words_of(r["text"]) for r in results] == [t.split() for t in texts]
    assert all(r["timestamps"]["word"] for r in results)


def test_local_api_run_then_status(local_api):
    texts = ["nine eight", "up down"]
    inputs = [{"source": str(speech_file(t, "flac"))} for t in texts]
    queued = requests.post(f"{local_api}/run", json={"input": {"inputs": inputs}}, timeout=30).json()
    assert queued["status"] == "IN_PROGRESS" and queued["id"]
    done = requests.post(f"{local_api}/status/{queued['id']}", timeout=120).json()
    assert done["status"] == "COMPLETED", done
    assert [words_of(r["text"]) for r in done["output"]["results"]] == [t.split() for t in texts]


def test_local_api_job_error_is_failed(local_api):
    body = requests.post(f"{local_api}/runsync", json={"input": {"inputs": []}}, timeout=60).json()
    assert body["status"] == "FAILED"
    assert "inputs" in body["error"]


def test_hub_name_loads_the_baked_copy_without_network(tmp_path):
    """What the image does: PARAKEET_MODEL is a hub name, and the .nemo that the build put in the
    HF cache (docker/fetch_model.py) is restored from disk. HF_HUB_OFFLINE=1 proves no download
    is tried. The demo model stands in for Parakeet's file here."""
    repo = tmp_path / "hub" / "models--nvidia--parakeet-tdt-0.6b-v3"
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd" / "parakeet-tdt-0.6b-v3.nemo").symlink_to(DEMO_MODEL)
    job = json.dumps({"input": {"inputs": [{"source": "samples/hello.mp3"}]}})
    proc = subprocess.run(
        [sys.executable, "handler.py", "--test_input", job], cwd=REPO,
        env=worker_env(PARAKEET_MODEL="nvidia/parakeet-tdt-0.6b-v3", HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "hello world" in proc.stdout
    assert "parakeet-tdt-0.6b-v3.nemo (file)" in proc.stdout + proc.stderr


def test_hub_name_restored_from_the_network_volume_copy(tmp_path):
    """Not baked, not in Runpod's caches: the copy an earlier worker of the endpoint left on the
    network volume (written here by the SDK's own VolumeCache.sync) is restored, and nothing is
    downloaded (HF_HUB_OFFLINE=1)."""
    from runpod.serverless.utils.rp_volume_cache import VolumeCache

    hf_home, volume = tmp_path / "hf", tmp_path / "volume"
    mirror = hf_home / "nemo-volume-mirror"
    local = mirror / "nvidia" / "parakeet-tdt-0.6b-v3" / "parakeet-tdt-0.6b-v3.nemo"
    local.parent.mkdir(parents=True)
    local.write_bytes(DEMO_MODEL.read_bytes())
    volume.mkdir()
    VolumeCache(dirs=[str(mirror)], namespace="endpoint-test", volume_path=str(volume)).sync(background=False)
    local.unlink()  # a fresh worker: the file is only on the volume now
    job = json.dumps({"input": {"inputs": [{"source": "samples/hello.mp3"}]}})
    env = worker_env(PARAKEET_MODEL="nvidia/parakeet-tdt-0.6b-v3", HF_HOME=str(hf_home), HF_HUB_OFFLINE="1",
                     NETWORK_VOLUME_PATH=str(volume), RUNPOD_ENDPOINT_ID="endpoint-test")  # fmt: skip
    proc = subprocess.run([sys.executable, "handler.py", "--test_input", job], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "hello world" in proc.stdout
    assert "from the network volume's copy" in proc.stdout + proc.stderr
    assert local.is_file() and local.stat().st_size == DEMO_MODEL.stat().st_size
