"""The OpenAI-compatible API over HTTP (parakeet_worker/http_server.py, WORKER_MODE=http): the official `openai`
Python client against the real server (uvicorn on 127.0.0.1, in this process, with the
session's model), on the same scheduler as every other job."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import re
import socket
import threading
import time

import numpy as np
import openai
import pytest
import requests
from conftest import DATA_ROOT, TMP_ROOT, call_handler, hold_model, speech_file, temp_leftovers, words_of

from parakeet_worker import config as settings
from parakeet_worker import model as asr
from parakeet_worker.audio import disk
from tools import synth, testkit
from tools.testkit import UvicornThread, multipart

PLACED = ["one", "hello", "seven", "stop", "three", "world"]


def job_dirs() -> list[str]:
    return sorted(p.name for p in TMP_ROOT.glob("job-*"))


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def transcribe(client, path, **params):
    with open(path, "rb") as f:
        return client.audio.transcriptions.create(model="whisper-1", file=f, **params)


# --- response formats -----------------------------------------------------------------------


def test_json_and_text(client):
    clip = speech_file("seven eight nine", "mp3")
    out = transcribe(client, clip)
    assert isinstance(out, openai.types.audio.Transcription)
    assert words_of(out.text) == ["seven", "eight", "nine"]
    assert out.usage.type == "duration" and out.usage.seconds > 0.5
    text = transcribe(client, clip, response_format="text")
    assert isinstance(text, str) and words_of(text) == ["seven", "eight", "nine"]
    assert temp_leftovers() == []


def test_srt_and_vtt(client):
    clip = speech_file("hello world stop", "wav")
    srt = transcribe(client, clip, response_format="srt")
    assert re.fullmatch(r"1\n00:00:\d\d,\d{3} --> 00:00:\d\d,\d{3}\nhello world stop\n", srt), srt
    vtt = transcribe(client, clip, response_format="vtt")
    assert re.fullmatch(r"WEBVTT\n\n00:00:\d\d\.\d{3} --> 00:00:\d\d\.\d{3}\nhello world stop\n", vtt), vtt


@pytest.mark.parametrize("granularities", [None, ["word"], ["segment"], ["word", "segment"]])
def test_verbose_json_granularities(client, granularities):
    clip = speech_file("left right up down", "flac")
    params = {"timestamp_granularities": granularities} if granularities else {}
    out = transcribe(client, clip, response_format="verbose_json", language="en", temperature=0.0,
                     prompt="ignored here", **params)  # fmt: skip
    assert isinstance(out, openai.types.audio.TranscriptionVerbose)
    assert words_of(out.text) == ["left", "right", "up", "down"]
    assert out.language == "english" and out.task == "transcribe"  # whisper-1 names it
    assert 1.0 < out.duration < 5.0
    wanted = granularities or ["segment"]
    if "word" in wanted:
        assert [w.word for w in out.words] == ["left", "right", "up", "down"]
        starts = [w.start for w in out.words]
        assert starts == sorted(starts) and all(w.start < w.end <= out.duration + 0.1 for w in out.words)
    else:
        assert out.words is None
    if "segment" in wanted:
        assert out.segments and " ".join(s.text for s in out.segments).split() == out.text.split()
        first = out.segments[0]
        assert first.id == 0 and first.start < first.end and first.temperature == 0.0 and first.tokens == []
    else:
        assert out.segments is None


def test_boost_phrases_as_form_fields(client):
    clip = speech_file("go left", "wav")
    out = transcribe(client, clip, extra_body={"boost_phrases": ["go left"], "boost_weight": 1.5})
    assert words_of(out.text) == ["go", "left"]
    with pytest.raises(openai.BadRequestError) as bad:
        transcribe(client, clip, extra_body={"boost_weight": 99})
    assert bad.value.body["param"] == "boost_weight"


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the client marks translations deprecated
def test_diarized_json_names_speakers_in_openai_shape(client):
    """response_format=diarized_json: OpenAI's shape (segments typed transcript.text.segment,
    speakers "A", "B" in order of appearance), on a conversation of two voices; speaker counts
    come as extra form fields, refused without diarization as on the native API."""
    audio, truth, said = testkit.conversation([0, 1, 0, 1], seed=3)
    path = synth.write(DATA_ROOT / "openai-two-voices.wav", audio)
    out = transcribe(client, path, response_format="diarized_json", extra_body={"num_speakers": "2"})
    body = out.model_dump() if hasattr(out, "model_dump") else out
    assert body["task"] == "transcribe" and body["segments"], body
    assert all(seg["type"] == "transcript.text.segment" for seg in body["segments"])
    assert body["segments"][0]["speaker"] == "A"
    assert {seg["speaker"] for seg in body["segments"]} == {"A", "B"}
    turns = [{"speaker": f"SPEAKER_{ord(seg['speaker']) - 65:02d}", "start": seg["start"], "end": seg["end"]}
             for seg in body["segments"]]  # fmt: skip
    assert testkit.attribution(truth, turns) >= 0.8
    spoken = [w for turn in said for w in turn]
    assert testkit.word_errors(spoken, words_of(body["text"])) <= len(spoken) // 10  # the demo model's few slips
    text = transcribe(client, path, response_format="text", extra_body={"diarize": "true", "num_speakers": 2})
    assert [line.split(":")[0] for line in text.strip().splitlines()][:2] == ["SPEAKER_00", "SPEAKER_01"], text
    with pytest.raises(openai.BadRequestError, match="diarize"):
        transcribe(client, path, extra_body={"num_speakers": "2"})


def test_vad_and_chunking_strategy_turn_voice_activity_on(client):
    """White noise: the demo model writes words on it; with `vad` (or OpenAI's own
    chunking_strategy=auto) the model is given nothing and the text is empty."""
    rng = np.random.default_rng(5)
    path = synth.write(DATA_ROOT / "openai-noise.wav", (0.1 * rng.standard_normal(6 * 16000)).astype(np.float32))
    assert words_of(transcribe(client, path).text)  # without VAD, noise gets words
    assert transcribe(client, path, extra_body={"vad": "true"}).text == ""
    assert transcribe(client, path, extra_body={"chunking_strategy": "auto"}).text == ""
    with pytest.raises(openai.BadRequestError, match="chunking_strategy"):
        transcribe(client, path, extra_body={"chunking_strategy": "sometimes"})


def test_bad_requests_are_openai_errors(client, api):
    clip = speech_file("yes", "wav")
    with pytest.raises(openai.BadRequestError) as fmt:
        transcribe(client, clip, response_format="docx")
    assert fmt.value.body["param"] == "response_format" and fmt.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as temp:
        transcribe(client, clip, temperature=3)
    assert temp.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as unknown:
        transcribe(client, clip, extra_body={"colour": "blue"})
    assert "colour" in unknown.value.message
    no_file = requests.post(f"{api.url}/v1/audio/transcriptions", files={"model": (None, "whisper-1")}, timeout=30)
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    with pytest.raises(openai.NotFoundError) as translate:
        with open(clip, "rb") as f:
            client.audio.translations.create(model="whisper-1", file=f)
    assert "does not translate" in translate.value.message
    missing = requests.get(f"{api.url}/v1/nothing-here", timeout=30)
    assert missing.status_code == 404 and "/v1/nothing-here" in missing.json()["error"]["message"]
    assert temp_leftovers() == []


def test_a_json_body_takes_the_file_by_url(api, http_server):
    """Over HTTP too, a JSON body (the queue route's openai_input) may name the file by URL."""
    url = http_server.add(speech_file("nine up", "ogg"))
    body = {"file": url, "model": "whisper-1", "response_format": "verbose_json", "timestamp_granularities": ["word"]}
    out = requests.post(f"{api.url}/v1/audio/transcriptions", json=body, timeout=120)
    assert out.status_code == 200, out.text
    assert [w["word"] for w in out.json()["words"]] == ["nine", "up"]
    bad = requests.post(f"{api.url}/v1/audio/transcriptions", data="[1, 2]", timeout=30,
                        headers={"Content-Type": "application/json"})  # fmt: skip
    assert bad.status_code == 400 and "JSON object" in bad.json()["error"]["message"]
    assert temp_leftovers() == []


def test_undecodable_file_is_a_bad_request_with_the_item_code(client, tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(np.random.default_rng(3).bytes(50_000))
    with pytest.raises(openai.BadRequestError) as bad:
        transcribe(client, junk)
    assert bad.value.status_code == 400
    assert bad.value.body["code"] in ("not_audio", "invalid_source") and bad.value.body["param"] == "file"
    assert temp_leftovers() == []


def test_models(client, worker):
    (model,) = client.models.list().data
    assert model.id == settings.model_name(settings.CFG.model) == "demo-tdt" and model.object == "model"


# --- streaming ------------------------------------------------------------------------------


def test_stream_sends_a_delta_per_piece_then_done(client, config):
    """A file split into pieces (MAX_SINGLE_PASS_SEC lowered): a delta as each piece is done,
    then one done event with the whole text, which the deltas add up to."""
    offsets = [1.0, 3.6, 6.2, 8.8, 11.4, 14.0]
    clip = synth.write(DATA_ROOT / "stream-placed.wav", synth.place_words(PLACED, offsets))
    config(max_single_pass_sec=5.0, short_max_sec=4.0)
    with open(clip, "rb") as f:
        events = list(client.audio.transcriptions.create(model="whisper-1", file=f, stream=True))
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    assert [e.type for e in events] == ["transcript.text.delta"] * len(deltas) + ["transcript.text.done"]
    assert len(deltas) >= 3  # one per piece (16 s in pieces of at most 5 s)
    done = events[-1]
    assert words_of(done.text) == PLACED
    assert "".join(d.delta for d in deltas) == done.text
    assert temp_leftovers() == []


def test_stream_of_a_bad_file_ends_with_an_error(client, tmp_path):
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"\0" * 10_000)
    with open(junk, "rb") as f, pytest.raises(openai.APIError) as failed:
        list(client.audio.transcriptions.create(model="whisper-1", file=f, stream=True))
    assert failed.value.body["code"] in ("not_audio", "invalid_source")


# --- auth, limits, health -------------------------------------------------------------------


def test_api_key(api, config):
    config(worker_api_key="s3cret-key")
    clip = speech_file("yes", "wav")
    wrong = openai.OpenAI(base_url=f"{api.url}/v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        transcribe(wrong, clip)
    assert denied.value.status_code == 401 and denied.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert requests.post(f"{api.url}/transcribe", json={"input": {}}, timeout=30).status_code == 401
    assert requests.get(f"{api.url}/ping", timeout=30).status_code == 200  # health needs no key
    right = openai.OpenAI(base_url=f"{api.url}/v1", api_key="s3cret-key", max_retries=0)
    assert words_of(transcribe(right, clip).text) == ["yes"]


def test_upload_over_the_cap_is_413_and_leaves_nothing(client, config, worker, tmp_path):
    config(max_upload_bytes=64 * 1024)
    big = tmp_path / "big.wav"
    synth.write(big, np.zeros(16000 * 8, np.float32))  # 256 KB
    with pytest.raises(openai.APIStatusError) as too_big:
        transcribe(client, big)
    assert too_big.value.status_code == 413 and too_big.value.body["code"] == "too_large"
    assert temp_leftovers() == [] and disk.budget().used == 0


def test_busy_worker_answers_429(client, config, worker, monkeypatch):
    config(max_concurrent_jobs=1)
    entered, release = hold_model(worker, monkeypatch)
    with cf.ThreadPoolExecutor(1) as pool:
        first = pool.submit(transcribe, client, speech_file("two", "wav"))
        try:
            assert entered.wait(60)
            with pytest.raises(openai.RateLimitError) as busy:
                transcribe(client, speech_file("three", "wav"))
            assert "MAX_CONCURRENT_JOBS=1" in busy.value.message
        finally:
            release.set()
        assert words_of(first.result().text) == ["two"]


def test_gpu_fault_makes_ping_503(api, client, worker, monkeypatch):
    assert requests.get(f"{api.url}/ping", timeout=30).status_code == 200
    monkeypatch.setattr(asr.state(), "gpu_fault", "CUDA error: an illegal memory access was encountered")
    assert requests.get(f"{api.url}/ping", timeout=30).status_code == 503
    with pytest.raises(openai.InternalServerError) as refused:
        transcribe(client, speech_file("yes", "wav"))
    assert refused.value.status_code == 503


def test_ping_is_204_while_the_model_loads_then_200(worker, monkeypatch):
    """A fresh server whose model load is held: /ping 204 until it is done, then 200."""
    loading, release = threading.Event(), threading.Event()
    model = asr.loaded_model()

    def held_load(name):
        loading.set()
        assert release.wait(60)
        return model

    monkeypatch.setattr(asr.MODEL, "loaded", False)
    monkeypatch.setattr(asr, "load_model", held_load)
    with UvicornThread(worker.http_app()) as fresh:
        assert loading.wait(60)  # the load runs in the background, the server already answers
        assert requests.get(f"{fresh.url}/ping", timeout=30).status_code == 204
        assert requests.get(f"{fresh.url}/ping", timeout=30).status_code == 204
        release.set()
        wait_for(lambda: requests.get(f"{fresh.url}/ping", timeout=30).status_code == 200, "ping 200")
    assert asr.loaded_model() is model


# --- concurrency and stops ------------------------------------------------------------------


def test_16_requests_at_once_share_batches_and_get_their_own_words(client, worker, monkeypatch):
    """A held first request keeps the model busy while 16 more arrive: they wait in the shared
    scheduler and run as one batch; each answer holds its own words."""
    texts = [" ".join(t) for t in [("one", "two"), ("three", "four"), ("five", "six"), ("seven", "eight"),
             ("nine", "zero"), ("yes", "no"), ("up", "down"), ("left", "right"), ("stop", "go"),
             ("hello", "world"), ("two", "nine"), ("four", "up"), ("six", "left"), ("eight", "stop"),
             ("zero", "hello"), ("no", "go")]]  # fmt: skip
    clips = [speech_file(t, "wav") for t in texts]
    sizes: list[int] = []
    plan = worker._plan_next

    def recorded(*args):
        batch = plan(*args)
        sizes.append(len(batch))
        return batch

    monkeypatch.setattr(worker, "_plan_next", recorded)
    entered, release = hold_model(worker, monkeypatch)
    with cf.ThreadPoolExecutor(17) as pool:
        first = pool.submit(transcribe, client, speech_file("hello", "wav"))
        try:
            assert entered.wait(60)
            outs = [pool.submit(transcribe, client, clip) for clip in clips]
            wait_for(lambda: len(worker.model_thread().ready) >= 16, "16 ready units", 120)
        finally:
            release.set()
        assert words_of(first.result().text) == ["hello"]
        for text, out in zip(texts, outs, strict=True):
            assert words_of(out.result().text) == text.split()
    assert sizes == [1, 16]
    assert temp_leftovers() == []


def test_client_disconnect_stops_its_job(api, client, worker, monkeypatch):
    """A client that hangs up while its clip waits for the model: its unit leaves the
    scheduler and its temp dir goes at once; the request beside it is answered as usual."""
    entered, release = hold_model(worker, monkeypatch)
    body, ctype = multipart({"model": "whisper-1"}, speech_file("nine nine", "wav"))
    with cf.ThreadPoolExecutor(1) as pool:
        first = pool.submit(transcribe, client, speech_file("three up", "wav"))
        try:
            assert entered.wait(60)
            sock = socket.create_connection(("127.0.0.1", api.port))
            head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
            sock.sendall(head + body)
            wait_for(lambda: len(worker.model_thread().ready) == 1, "the second clip to wait for the model")
            assert len(job_dirs()) == 2
            sock.close()
            wait_for(lambda: len(job_dirs()) == 1 and not worker.model_thread().ready, "the stopped job to go")
        finally:
            release.set()
        assert words_of(first.result().text) == ["three", "up"]
    wait_for(lambda: temp_leftovers() == [], "no files left")


def test_client_disconnect_mid_stream_stops_its_job(api, worker, monkeypatch):
    entered, release = hold_model(worker, monkeypatch)
    body, ctype = multipart({"model": "whisper-1", "stream": "true"}, speech_file("five six", "wav"))
    try:
        sock = socket.create_connection(("127.0.0.1", api.port))
        head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        sock.sendall(head + body)
        assert entered.wait(60)
        assert len(job_dirs()) == 1
        sock.close()
        wait_for(lambda: job_dirs() == [], "the stopped job's temp dir to go")
    finally:
        release.set()
    wait_for(lambda: temp_leftovers() == [], "no files left")


# --- the native body over HTTP --------------------------------------------------------------


def test_transcribe_route_answers_what_a_queue_job_gets(api, worker):
    inputs = [{"source": str(speech_file("up down", "wav"))}, {"source": str(DATA_ROOT / "absent.wav")}]
    job = {"input": {"inputs": inputs, "timestamps": True}}
    over_http = requests.post(f"{api.url}/transcribe", json=job, timeout=120)
    assert over_http.status_code == 200
    got = over_http.json()
    in_process = call_handler(worker, {"id": "same", **job})
    for out in (got, in_process):
        out["stats"].pop("wall_sec")
    assert got == in_process
    assert words_of(got["results"][0]["text"]) == ["up", "down"] and got["results"][1]["code"] == "not_found"
    bad = requests.post(f"{api.url}/transcribe", json={"input": {"inputs": []}}, timeout=30)
    assert bad.status_code == 400 and "inputs" in bad.json()["error"]
    assert temp_leftovers() == []


def test_run_job_reports_text_events_and_is_stopped_by_cancel(worker, monkeypatch):
    """The transport-neutral runner: an item's text as an event, and a cancelled task (a
    Runpod stop) cleans up: no unit left in the scheduler, no temp dir."""
    seen: list[tuple[str, dict]] = []

    async def events(kind, payload):
        seen.append((kind, payload))

    clip = str(speech_file("stop go", "wav"))
    out = asyncio.run(worker.run_job({"inputs": [{"source": clip}]}, events))
    assert words_of(out["results"][0]["text"]) == ["stop", "go"]
    assert [(k, p["index"], words_of(p["text"])) for k, p in seen if k == "text"] == [("text", 0, ["stop", "go"])]

    entered, release = hold_model(worker, monkeypatch)

    async def stopped():
        blocker = asyncio.ensure_future(worker.run_job({"inputs": [{"source": clip}]}))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        task = asyncio.ensure_future(worker.run_job({"inputs": [{"source": clip}]}))
        while not worker.model_thread().ready:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        left = (list(worker.model_thread().ready), job_dirs())
        release.set()
        await blocker
        return left

    ready, dirs = asyncio.run(stopped())
    assert ready == [] and len(dirs) == 1  # only the blocker's dir, at that moment
    assert temp_leftovers() == []


# --- Runpod's OpenAI route on a queue endpoint: the SDK's real worker loop -------------------



def test_queue_route_through_the_sdk_shares_batches_with_native_jobs(tmp_path, http_server):
    import base64
    import json

    from tools.testkit import FakeRunpodQueue, loopback_only_env, start_worker, stop_worker

    queue = FakeRunpodQueue()
    held = tmp_path / "held"
    env = loopback_only_env()
    env.update(WORKER_TMP_DIR=str(tmp_path / "tmp"), PW_HOLD="6", PW_HELD=str(held), PW_POISON="{}")
    proc = start_worker(queue, env, tmp_path / "worker.log", "poisoned-batch")  # holds the first batch; fails nothing

    def route(path, **body):
        return {"openai_route": path, "openai_input": body}

    def native(text, **params):
        return {"inputs": [{"source": str(speech_file(text, "wav"))}], **params}

    wav = speech_file("five six", "wav").read_bytes()
    b64 = base64.b64encode(wav).decode()
    try:
        queue.add(native("hello"))
        deadline = time.monotonic() + 300
        while not held.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.1)
        jobs = [
            native("one two"),
            native("three four", timestamps=True),
            route("/v1/audio/transcriptions", file=http_server.add(speech_file("left right", "mp3")),
                  model="whisper-1", response_format="verbose_json", timestamp_granularities=["word"]),
            route("/v1/audio/transcriptions", file=f"data:audio/wav;base64,{b64}", response_format="text"),
            route("/v1/audio/transcriptions", file=base64.b64encode(speech_file("up down", "wav").read_bytes()).decode(),
                  response_format="srt"),
            route("/v1/audio/transcriptions", file=http_server.add(speech_file("stop go", "flac")), model="x"),
        ]  # fmt: skip
        ids = [queue.add(job) for job in jobs]
        outs = queue.wait_done(ids)
        later = [
            route("/v1/models"),
            route("/v1/embeddings", input="hi"),
            route("/v1/audio/translations", file=b64),
            route("/v1/audio/transcriptions", file="not base64 at all!"),
            route("/v1/audio/transcriptions", file=b64, stream=True),
        ]
        models, unknown, translation, bad, streamed = queue.wait_done([queue.add(job) for job in later])
    finally:
        code = stop_worker(proc)
        queue.close()
    assert code == 0, (tmp_path / "worker.log").read_text()[-3000:]

    first, stamped, verbose, text, srt, plain = outs
    for out, words in ((first, ["one", "two"]), (stamped, ["three", "four"])):
        assert words_of(out["output"]["results"][0]["text"]) == words
        assert out["output"]["stats"]["batch_sizes"] == [6]  # one batch for the six jobs
    assert [w["word"] for w in verbose["output"]["words"]] == ["left", "right"]
    assert verbose["output"]["task"] == "transcribe" and "segments" not in verbose["output"]
    assert words_of(text["output"]) == ["five", "six"]
    assert re.fullmatch(r"1\n00:00:\d\d,\d{3} --> 00:00:\d\d,\d{3}\nup down\n", srt["output"])
    assert words_of(plain["output"]["text"]) == ["stop", "go"] and set(plain["output"]) == {"text", "languages", "usage"}
    assert plain["output"]["languages"] == []  # "stop go": too short to tell

    assert models["output"]["data"][0]["object"] == "model"
    assert "/v1/embeddings" in unknown["error"] and "output" not in unknown
    assert json.loads(translation["error"])["error"]["message"].startswith("Parakeet transcribes")
    error = json.loads(bad["error"])["error"]
    assert error["code"] == "invalid_source" and error["param"] == "file" and error["type"] == "invalid_request_error"
    assert json.loads(streamed["error"])["error"]["param"] == "stream"
    assert list((tmp_path / "tmp").rglob("*")) == []


# --- HTTP mode as the image runs it: `WORKER_MODE=http python handler.py` ---------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_mode_dry_run_health_port_and_sigterm_drain(tmp_path):
    """A dry run (SKIP_MODEL_LOAD=1) serves without torch or NeMo, /ping answers on its own
    port, and after SIGTERM /ping says 503 on both ports and a new request gets a JSON 503 at
    once, while the request in flight still gets its answer; then the process exits 0 and leaves
    no temp files."""
    import subprocess
    import sys

    from tools.testkit import REPO, loopback_only_env

    port, health = free_port(), free_port()
    held, release = tmp_path / "held", tmp_path / "release"
    env = loopback_only_env()
    env.update(WORKER_MODE="http", HOST="127.0.0.1", PORT=str(port), PORT_HEALTH=str(health), SKIP_MODEL_LOAD="1",
               WORKER_TMP_DIR=str(tmp_path / "tmp"), PW_HELD=str(held), PW_RELEASE=str(release))  # fmt: skip
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "tests/workers.py", "serve", "hold-first-batch"], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:

        def answers(p: int, path: str = "/ping") -> int | None:
            try:
                return requests.get(f"http://127.0.0.1:{p}{path}", timeout=10).status_code
            except requests.ConnectionError:
                return None

        wait_for(lambda: answers(health) == 200 or proc.poll() is not None, "the health port", 120)
        assert proc.poll() is None, log.read_text()
        assert answers(port) == 200 and answers(health, "/v1/models") == 404  # the health port serves /ping only
        with cf.ThreadPoolExecutor(1) as pool, open(speech_file("one", "wav"), "rb") as f:
            url = f"http://127.0.0.1:{port}/v1/audio/transcriptions"
            inflight = pool.submit(requests.post, url, files={"file": f}, data={"model": "m"}, timeout=120)
            wait_for(held.exists, "the request to reach the model")
            proc.terminate()  # SIGTERM
            wait_for(lambda: answers(port) == 503, "/ping to turn 503")
            assert answers(health) == 503
            late = requests.post(url, files={"file": ("a.wav", b"RIFF")}, data={"model": "m"}, timeout=30)
            assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
            assert inflight.running()
            release.touch()
            answer = inflight.result()
        assert answer.status_code == 200 and "dry run" in answer.json()["text"]
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert held.read_text() == "[]"  # neither torch nor NeMo was imported
    assert list((tmp_path / "tmp").rglob("*")) == []
