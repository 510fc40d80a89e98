"""OpenAI's request fields as the worker takes them on both OpenAI routes (Runpod's queue route,
in-process through handler.handler, and JSON bodies and forms over the real HTTP server): `file`
as every source a native job takes (one parser, sources.item_of), `keywords` as boost_phrases at
the default weight, and the speaker options that must not surprise (diarized_json and diarize,
speaker counts the audio cannot hold)."""

from __future__ import annotations

import base64
import json
import subprocess
from urllib.parse import quote

import openai
import pytest
import requests
from conftest import DATA_ROOT, call_handler, speech_file, temp_leftovers, words_of

from parakeet_worker import config as settings
from parakeet_worker.audio import sources
from tools import synth
from tools.testkit import conversation


def queue_route(worker, body: dict) -> dict | str:
    """One request through the queue's OpenAI route; an error comes back as its error object."""
    out = call_handler(worker, {"id": "q", "input": {"openai_route": "/v1/audio/transcriptions", "openai_input": body}})
    if isinstance(out, dict) and "error" in out:
        return json.loads(out["error"])
    return out


def http_json(api, body: dict) -> dict:
    """One request as a JSON body over HTTP: the body, with its status."""
    answer = requests.post(f"{api.url}/v1/audio/transcriptions", json=body, timeout=120)
    return {"status": answer.status_code, **answer.json()}


# --- file: every source on every route ----------------------------------------------------------


def test_file_by_path_and_file_url_on_both_routes(worker, api):
    clip = speech_file("nine up", "flac")
    spaced = speech_file("nine up", "flac", name="nine up, spaced")  # its file:// URL quotes the spaces
    for file in (str(clip), f"file://{clip}", f"file://{quote(str(spaced))}", str(spaced)):
        assert words_of(queue_route(worker, {"file": file})["text"]) == ["nine", "up"], file
        answer = http_json(api, {"file": file, "model": "whisper-1"})
        assert answer["status"] == 200 and words_of(answer["text"]) == ["nine", "up"], answer
    assert temp_leftovers() == []


@pytest.mark.parametrize(
    ("file", "code"),
    [("/etc/hostname", "forbidden_path"), ("file:///etc/hostname", "forbidden_path"),
     (f"{DATA_ROOT}/no-such-file.wav", "not_found"), (f"file://{DATA_ROOT}/../etc/hostname", "forbidden_path")],
)  # fmt: skip
def test_a_path_outside_the_roots_or_missing_is_refused_on_both_routes(worker, api, file, code):
    error = queue_route(worker, {"file": file})["error"]
    assert (error["code"], error["param"], error["type"]) == (code, "file", "invalid_request_error"), error
    answer = http_json(api, {"file": file})
    assert answer["status"] == 400 and answer["error"]["code"] == code, answer


def test_base64_that_starts_like_a_path_is_still_base64(worker, api, tmp_path):
    """An MP3 without tags begins with a frame sync (0xFF 0xFB), "//s" in base64: no path."""
    mp3 = tmp_path / "bare.mp3"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(speech_file("go left", "wav")),
                    "-c:a", "libmp3lame", "-b:a", "64k", "-id3v2_version", "0", "-write_xing", "0", str(mp3)],
                   check=True)  # fmt: skip
    text = base64.b64encode(mp3.read_bytes()).decode()
    assert text.startswith("//") and sources.item_of(text) == {"audio_base64": text}
    assert words_of(queue_route(worker, {"file": text})["text"]) == ["go", "left"]
    answer = http_json(api, {"file": text})
    assert answer["status"] == 200 and words_of(answer["text"]) == ["go", "left"]


def test_item_of_tells_paths_from_base64():
    root = settings.CFG.allowed_local_roots[0]
    assert sources.item_of(f"{root}/my talk.wav") == {"source": f"{root}/my talk.wav"}  # a root: spaces are fine
    assert sources.item_of("/elsewhere/a.wav") == {"source": "/elsewhere/a.wav"}  # refused later, as a path
    assert sources.item_of("HTTPS://h/a.wav") == {"source": "HTTPS://h/a.wav"}
    assert sources.item_of("data:audio/wav;base64,AAAA") == {"source": "data:audio/wav;base64,AAAA"}
    assert sources.item_of("/etc/passwd") == {"source": "/etc/passwd"}  # valid base64 too, but path-sized
    long = "/" * 4 + "A" * 5000  # longer than a path can be
    assert sources.item_of(long) == {"audio_base64": long}
    assert sources.item_of("/abc\n/def") == {"audio_base64": "/abc\n/def"}  # wrapped: not a path


# --- keywords -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def misheard():
    """"seven", fast and in noise: the demo model hears "two" (tools.synth.noisy_word)."""
    return synth.write(DATA_ROOT / "parity-noisy-seven.wav", synth.noisy_word("seven"))


def test_keywords_boost_as_boost_phrases_do(worker, api, misheard):
    plain = queue_route(worker, {"file": str(misheard), "response_format": "verbose_json",
                                 "timestamp_granularities": ["word"]})  # fmt: skip
    assert words_of(plain["text"]) != ["seven"], plain
    by_keywords = queue_route(worker, {"file": str(misheard), "keywords": ["seven"], "response_format": "verbose_json",
                                       "timestamp_granularities": ["word"]})  # fmt: skip
    by_phrases = queue_route(worker, {"file": str(misheard), "boost_phrases": ["seven"],
                                      "response_format": "verbose_json", "timestamp_granularities": ["word"]})  # fmt: skip
    assert words_of(by_keywords["text"]) == ["seven"]
    assert by_keywords["words"] == by_phrases["words"]  # the same words at the same times
    with open(misheard, "rb") as f:  # a form, as the official client sends a list: keywords[]
        client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="x", max_retries=0, timeout=120)
        out = client.audio.transcriptions.create(model="m", file=f, extra_body={"keywords": ["seven", "nine"]})
    assert words_of(out.text) == ["seven"]
    weighted = queue_route(worker, {"file": str(misheard), "keywords": ["seven"], "boost_weight": 0})
    assert words_of(weighted["text"]) == words_of(plain["text"])  # the request's weight applies to keywords too


@pytest.mark.parametrize(
    ("keywords", "says"),
    [(["seven", ""], "keywords[1] is empty or only whitespace"), (["seven", 7], "keywords[1] must be a string"),
     ({"a": 1}, "'keywords' must be a list of strings"), (["x" * 101], "keywords[0] has 101 characters"),
     (["a\u0000b"], "keywords[0] 'a"), ([f"w{i}" for i in range(1001)], "more than BOOST_MAX_PHRASES=1000")],
)  # fmt: skip
def test_bad_keywords_are_refused_naming_keywords(worker, api, keywords, says):
    error = queue_route(worker, {"file": "/x.wav", "keywords": keywords})["error"]
    assert error["param"] == "keywords" and says in error["message"], error
    answer = http_json(api, {"file": "/x.wav", "keywords": keywords})
    assert answer["status"] == 400 and answer["error"]["param"] == "keywords", answer


def test_keywords_and_boost_phrases_together_count_against_one_cap(worker):
    phrases = [f"p{i}" for i in range(600)]
    error = queue_route(worker, {"file": "/x.wav", "boost_phrases": phrases, "keywords": [f"k{i}" for i in range(600)]})
    assert error["error"]["param"] == "keywords" and "hold 1200 phrases together" in error["error"]["message"]


# --- no silent surprises ------------------------------------------------------------------------


def test_diarized_json_turns_diarization_on_and_diarize_false_is_refused(worker, api):
    audio, _, _ = conversation([0, 1] * 4, seed=3)
    path = str(synth.write(DATA_ROOT / "parity-two-voices.wav", audio))
    out = queue_route(worker, {"file": path, "response_format": "diarized_json"})
    assert {s["speaker"] for s in out["segments"]} == {"A", "B"}, out
    for diarize in (False, "false", "0"):
        error = queue_route(worker, {"file": path, "response_format": "diarized_json", "diarize": diarize})["error"]
        assert error["param"] == "diarize" and "diarized_json" in error["message"], error
    answer = http_json(api, {"file": path, "response_format": "diarized_json", "diarize": False})
    assert answer["status"] == 400 and answer["error"]["param"] == "diarize"
    same = queue_route(worker, {"file": path, "response_format": "diarized_json", "diarize": True})
    assert same["segments"] == out["segments"]


def test_a_speaker_count_the_audio_cannot_hold_is_lowered_with_a_warning(worker, api):
    path = str(speech_file("hello world", "wav"))
    out = queue_route(worker, {"file": path, "response_format": "diarized_json", "num_speakers": 20})
    assert out["warning"].startswith("num_speakers=20 is more than ") and out["warning"].endswith("looked for 1")
    assert {s["speaker"] for s in out["segments"]} == {"A"}
    answer = http_json(api, {"file": path, "diarize": True, "min_speakers": 5})
    assert answer["status"] == 200 and answer["warning"].startswith("min_speakers=5 is more than "), answer
    plain = queue_route(worker, {"file": path, "response_format": "diarized_json", "num_speakers": 1})
    assert "warning" not in plain
