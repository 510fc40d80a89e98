"""Confidence through the worker's public entry points: native jobs (`confidence`, `logprobs`),
and OpenAI's API with the official client (include[]=logprobs on json and on the stream,
verbose_json's avg_logprob and no_speech_prob). Text and timestamps are the same with it on or
off; no_speech_prob tells pure noise from speech where VAD ran."""

from __future__ import annotations

import json
import math

import numpy as np
import openai
import pytest
from conftest import DATA_ROOT, run_job, speech_file, temp_leftovers, until, words_of

from parakeet_worker import model as asr
from tools import synth, testkit

SPACED = ["three", "left", "hello", "nine", "down", "go", "seven", "world"]


@pytest.fixture(scope="module")
def clips() -> dict[str, str]:
    """Speech with pauses, the same in noise, and pure noise (white and pink), as WAVs."""
    rng = np.random.default_rng(29)
    spaced = synth.spaced_words(rng, SPACED, "en-us", 150, 50, (0.4, 1.0))
    loud = spaced[np.abs(spaced) > 0.02 * np.abs(spaced).max()]
    noisy = spaced + rng.standard_normal(len(spaced)).astype(np.float32) * np.float32(np.sqrt(np.mean(loud**2)))
    white = (rng.standard_normal(3 * synth.SAMPLE_RATE) * 0.05).astype(np.float32)
    pink = np.fft.irfft(np.fft.rfft(rng.standard_normal(3 * synth.SAMPLE_RATE)) / np.sqrt(np.arange(1, 24_002)))
    pink = (pink / np.sqrt(np.mean(pink**2)) * 0.05).astype(np.float32)
    audio = {"spaced": spaced, "noisy": noisy.astype(np.float32), "white": white, "pink": pink}
    return {name: str(synth.write(DATA_ROOT / f"conf-{name}.wav", x)) for name, x in audio.items()}


def scored_spans(result: dict) -> list[dict]:
    return result["timestamps"]["word"] + result["timestamps"]["segment"]


def times(result: dict) -> list[tuple]:
    """Words and segments without their scores."""
    return [(s.get("word", s.get("segment")), s["start"], s["end"], s.get("speaker")) for s in scored_spans(result)]


def test_native_confidence_on_every_word_and_segment(worker, clips):
    out = run_job(worker, [{"source": clips["spaced"]}, {"source": clips["noisy"]}], timestamps=True, confidence=True)
    for result in out["results"]:
        assert result["timestamps"]["word"] and result["timestamps"]["segment"], result
        assert all(0.0 <= s["confidence"] <= 1.0 for s in scored_spans(result))
        for seg in result["timestamps"]["segment"]:
            assert math.isfinite(seg["avg_logprob"]) and seg["avg_logprob"] < 0
            assert 0.0 <= seg["no_speech_prob"] <= 1.0
        assert 0.0 <= result["no_speech_prob"] <= 1.0
    clean, noisy = out["results"]
    assert words_of(clean["text"]) == SPACED
    assert np.median([w["confidence"] for w in noisy["timestamps"]["word"]]) < np.median(
        [w["confidence"] for w in clean["timestamps"]["word"]]
    )


def test_text_and_timestamps_are_the_same_with_confidence_on_or_off(worker, clips, config):
    """Batched, with VAD, and split into pieces: scoring changes no word and no time."""
    inputs = [{"source": clips[name]} for name in ("spaced", "noisy", "white")] + [
        {"source": str(speech_file("five six seven eight", "mp3"))},
        {"source": str(speech_file("two stop left nine", "wav")), "boost_phrases": ["stop left"]},  # boosted
    ]
    config(max_single_pass_sec=4.0, short_max_sec=3.0)  # the spaced clips come in pieces
    for vad in (False, True):
        off = run_job(worker, inputs, timestamps=True, vad=vad)
        on = run_job(worker, inputs, timestamps=True, vad=vad, confidence=True, logprobs=True)
        assert [r["text"] for r in on["results"]] == [r["text"] for r in off["results"]]
        assert [times(r) for r in on["results"]] == [times(r) for r in off["results"]]
        assert all("confidence" not in s for r in off["results"] for s in scored_spans(r))
        assert all("logprobs" not in r and "no_speech_prob" not in r for r in off["results"])
        for r in on["results"]:
            assert "".join(t["token"] for t in r["logprobs"]) == r["text"]
            assert all(s["confidence"] is not None for s in scored_spans(r))
    assert temp_leftovers() == []


def test_diarized_segments_carry_confidence(worker):
    audio, _, _ = testkit.conversation([0, 1, 0], seed=5)
    path = synth.write(DATA_ROOT / "conf-conversation.wav", audio)
    result = run_job(worker, [{"source": str(path)}], diarize=True, num_speakers=2, timestamps=True, confidence=True)["results"][0]
    segments = result["timestamps"]["segment"]
    assert {s["speaker"] for s in segments} == {"SPEAKER_00", "SPEAKER_01"}
    assert all(0.0 <= s["confidence"] <= 1.0 and s["avg_logprob"] < 0 for s in segments)
    assert sum(len(s["segment"].split()) for s in segments) == len(result["timestamps"]["word"])


def test_openai_json_logprobs_parse_with_the_official_client(client):
    clip = speech_file("seven eight nine", "mp3")
    with open(clip, "rb") as f:
        out = client.audio.transcriptions.create(model="whisper-1", file=f, include=["logprobs"])
    assert words_of(out.text) == ["seven", "eight", "nine"]
    assert out.logprobs and "".join(p.token for p in out.logprobs) == out.text
    assert all(p.logprob < 0 and bytes(int(b) for b in p.bytes) == p.token.encode() for p in out.logprobs)
    with open(clip, "rb") as f:
        plain = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert plain.logprobs is None and plain.text == out.text


def test_openai_stream_logprobs_on_each_delta_and_on_done(client, config):
    offsets = [1.0, 3.6, 6.2, 8.8, 11.4, 14.0]  # as test_openai's stream test: pieces of at most 5 s
    words = ["one", "hello", "seven", "stop", "three", "world"]
    clip = synth.write(DATA_ROOT / "conf-stream.wav", synth.place_words(words, offsets))
    config(max_single_pass_sec=5.0, short_max_sec=4.0)
    with open(clip, "rb") as f:
        events = list(client.audio.transcriptions.create(model="whisper-1", file=f, stream=True, include=["logprobs"]))
    deltas, done = events[:-1], events[-1]
    assert len(deltas) >= 2 and all(e.type == "transcript.text.delta" for e in deltas)
    assert done.type == "transcript.text.done" and words_of(done.text) == words
    for delta in deltas:
        assert delta.logprobs and "".join(p.token for p in delta.logprobs) == delta.delta
    assert "".join(p.token for p in done.logprobs) == done.text
    assert [p.logprob for p in done.logprobs] == [p.logprob for d in deltas for p in d.logprobs]


def test_verbose_json_has_real_avg_logprob_and_confidence(client, clips):
    with open(clips["spaced"], "rb") as f:
        out = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json",
                                                 timestamp_granularities=["word", "segment"])  # fmt: skip
    body = out.model_dump()
    assert [w["word"] for w in body["words"]] == SPACED
    assert all(0.0 <= w["confidence"] <= 1.0 for w in body["words"])
    for seg in out.segments:
        assert math.isfinite(seg.avg_logprob) and seg.avg_logprob < 0
        assert 0.0 <= seg.no_speech_prob <= 1.0
        assert 0.0 <= seg.model_dump()["confidence"] <= 1.0


def test_no_speech_prob_with_vad_is_high_on_noise_and_low_on_speech(client, clips):
    def verbose(name: str):
        with open(clips[name], "rb") as f:
            return client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json",
                                                      extra_body={"vad": "true"})  # fmt: skip

    for name in ("white", "pink"):
        noise = verbose(name)
        assert noise.text == "" and noise.segments, noise
        assert all(seg.no_speech_prob > 0.9 for seg in noise.segments)
    speech = verbose("spaced")
    assert words_of(speech.text) == SPACED
    assert speech.segments and all(seg.no_speech_prob < 0.1 for seg in speech.segments)


def test_confidence_fields_are_checked(worker):
    from conftest import call_handler

    for bad in ({"confidence": "yes"}, {"logprobs": 1.5}):
        out = call_handler(worker, {"id": "bad", "input": {"inputs": [{"source": "x"}], **bad}})
        assert "error" in out and next(iter(bad)) in out["error"], out


def test_bad_include_is_a_bad_request(client):
    with open(speech_file("one two", "wav"), "rb") as f, pytest.raises(openai.BadRequestError, match="include"):
        client.audio.transcriptions.create(model="whisper-1", file=f, include=["everything"])


def test_a_bad_calibration_file_is_named(worker, config, tmp_path):
    bad = tmp_path / "calibration.json"
    bad.write_text(json.dumps({"word": {"xs": [2, 1], "ys": [0.5, 0.6]}}))
    config(confidence_calibration=str(bad))
    with pytest.raises(ValueError, match="CONFIDENCE_CALIBRATION"):
        asr.confidence_calibration()
    config(confidence_calibration=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"missing\.json"):
        asr.confidence_calibration()


def test_live_session_with_logprobs_include_sends_them_on_delta_and_completed(worker):
    """A Realtime transcription session that includes item.input_audio_transcription.logprobs:
    the official client's event types take them; each delta's tokens join to the delta, each
    completed's to its transcript. Paced (a barrier, then no model call waiting) so partials run."""
    import asyncio

    from openai.types.realtime import (
        ConversationItemInputAudioTranscriptionCompletedEvent,
        ConversationItemInputAudioTranscriptionDeltaEvent,
    )
    from test_realtime import COMPLETED, DELTA, U1, U2, serve, utterances

    from tools.live_client import LiveClient, append, encode_input, frames, session_update

    audio, _ = utterances(U1, U2)
    data = encode_input(audio, "pcm24")
    update = session_update("pcm24")
    update["session"]["include"] = ["item.input_audio_transcription.logprobs"]

    async def main(server, manager) -> list[dict]:
        async with LiveClient(server.url) as c:
            await c.send(update)
            for n, chunk in enumerate(frames(data, "pcm24", 20)):
                await c.send(append(chunk))
                if n % 25 == 24:
                    await c.barrier()
                    await until(manager.engine.idle, "the partials")
            await c.wait_for(COMPLETED, 2)
            return c.events

    with serve(worker) as (server, manager):
        events = asyncio.run(main(server, manager))
    updated = next(e for e in events if e["type"] == "session.updated")
    assert updated["session"]["include"] == ["item.input_audio_transcription.logprobs"]
    done = [ConversationItemInputAudioTranscriptionCompletedEvent.model_validate(e) for e in events if e["type"] == COMPLETED]
    deltas = [ConversationItemInputAudioTranscriptionDeltaEvent.model_validate(e) for e in events if e["type"] == DELTA]
    assert [d.transcript for d in done] == [U1, U2] and deltas
    for d in done:
        assert d.logprobs and "".join(p.token for p in d.logprobs) == d.transcript
        assert all(p.logprob < 0 for p in d.logprobs)
    for d in deltas:
        assert d.logprobs and "".join(p.token for p in d.logprobs) == d.delta


def test_queue_route_json_with_logprobs(worker):
    """Runpod's OpenAI route on a queue endpoint: include logprobs on json, as over HTTP."""
    import base64

    from conftest import call_handler
    from openai.types.audio import Transcription

    data = base64.b64encode(speech_file("four five six", "wav").read_bytes()).decode()
    body = {"file": f"data:audio/wav;base64,{data}", "model": "whisper-1", "include": ["logprobs"]}
    out = call_handler(worker, {"id": "q", "input": {"openai_route": "/v1/audio/transcriptions", "openai_input": body}})
    parsed = Transcription.model_validate(out)
    assert words_of(parsed.text) == ["four", "five", "six"]
    assert "".join(p.token for p in parsed.logprobs) == parsed.text
