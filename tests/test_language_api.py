"""Language through the public entry points, with the demo model (English): every item's
`language` and `language_probability`, every segment's `language`, hints (`language` one,
`languages` several; per job, per item, on the OpenAI routes) with `language_mismatch`, the
script mask acting in a real model call, 400s for bad hints, and the OpenAI shapes as the
official client parses them (json, verbose_json, stream, diarized_json) and as Open WebUI sends
them (multipart `language=en`, and again without after an error).

The demo model speaks English only; where a test needs a second language to choose from, it sets
MODEL_LANGUAGES (config.model_languages) to en plus that language, as an operator would."""

from __future__ import annotations

import threading

import openai
import pytest
import requests
from conftest import DATA_ROOT, call_handler, run_job, speech_file, temp_leftovers, words_of

from parakeet_worker.analysis import language
from tools import synth, testkit
from tools.testkit import multipart

LONG_A = "hello world one two three four five"  # 35 characters: over the 20 detection needs
LONG_B = "seven eight nine zero stop go left right"
SHORT = "yes no"  # under 20: no language


def transcribe(client, path, **params):
    with open(path, "rb") as f:
        return client.audio.transcriptions.create(model="whisper-1", file=f, **params)


def item(text: str, fmt: str = "wav", **extra) -> dict:
    return {"source": str(speech_file(text, fmt)), **extra}


# --- native jobs ----------------------------------------------------------------------------


def test_english_files_are_en_per_item_and_per_segment(worker, config):
    config(model_languages=("en", "de"))  # a choice to make: English or German
    out = run_job(worker, [item(LONG_A), item(LONG_B, "mp3"), item(SHORT)], timestamps=True)
    first, second, short = out["results"]
    for result in (first, second):
        assert result["language"] == "en", result
        assert 0.5 <= result["language_probability"] <= 1.0
        assert "language_mismatch" not in result  # no hint, no mismatch to report
        segments = result["timestamps"]["segment"]
        assert segments and all(s["language"] == "en" for s in segments), segments
    assert words_of(short["text"]) == ["yes", "no"]
    assert short["language"] is None and short["language_probability"] is None  # too short to tell


def test_the_table_gives_the_demo_model_english(worker):
    """No MODEL_LANGUAGES: the demo model is English by the table, so an English file is en."""
    out = run_job(worker, [item(LONG_A)])
    assert out["results"][0]["language"] == "en"
    assert out["results"][0]["language_probability"] == 1.0


def test_hint_de_on_an_english_file_is_a_mismatch(worker, config):
    config(model_languages=("en", "de"))
    plain = run_job(worker, [item(LONG_A)], timestamps=True)["results"][0]
    out = run_job(worker, [item(LONG_A), item(LONG_B, languages=["en"]), item(LONG_A, language=None)],
                  language="de", timestamps=True)  # fmt: skip
    hinted_de, hinted_en, own_none = out["results"]
    assert hinted_de["language"] == "en" and hinted_de["language_mismatch"] is True
    assert all(s["language_mismatch"] is True for s in hinted_de["timestamps"]["segment"])
    # German is written in Latin letters too: the mask keeps every token the demo model has
    assert hinted_de["text"] == plain["text"]
    assert hinted_en["language"] == "en" and hinted_en["language_mismatch"] is False
    assert "language_mismatch" not in own_none  # the item's own null hint: no hint at all


def test_a_cyrillic_hint_keeps_latin_out_of_the_model_call(worker, config):
    """The demo model writes only Latin pieces; hinted Russian, every one of them is kept out of
    decoding: not one Latin letter comes back, while the same job's unhinted item is unchanged."""
    config(model_languages=("en", "ru"))
    out = run_job(worker, [item(LONG_A, language="ru"), item(LONG_A)])
    hinted, plain = out["results"]
    assert not any(ch.isascii() and ch.isalpha() for ch in hinted["text"]), hinted["text"]
    assert words_of(plain["text"]) == LONG_A.split()


def test_bad_hints(worker, config):
    out = call_handler(worker, {"id": "j", "input": {"inputs": [item(SHORT)], "language": "ja"}})
    assert out["error"].startswith("invalid input:") and "it transcribes: en" in out["error"], out
    both = call_handler(worker, {"id": "j", "input": {"inputs": [item(SHORT)], "language": "en", "languages": ["en"]}})
    assert "cannot both" in both["error"]
    bad_code = call_handler(worker, {"id": "j", "input": {"inputs": [item(SHORT)], "languages": ["english?!"]}})
    assert "ISO 639-1" in bad_code["error"]
    # an item's own bad hint costs that item only, before anything is fetched
    out = run_job(worker, [item(SHORT, language="fr"), item(SHORT)])
    bad, good = out["results"]
    assert bad["code"] == "invalid_language" and "it transcribes: en" in bad["error"]
    assert "duration" not in bad  # not fetched
    assert words_of(good["text"]) == ["yes", "no"]


def test_detection_runs_off_the_model_thread(worker, monkeypatch):
    threads: list[str] = []
    real = language.label

    def label(*args):
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(language, "label", label)
    out = run_job(worker, [item(LONG_A), item(LONG_B)])
    assert [r["language"] for r in out["results"]] == ["en", "en"]
    assert len(threads) == 2 and "model" not in threads and threading.main_thread().name not in threads


# --- OpenAI routes ----------------------------------------------------------------------------


def test_official_client_parses_every_shape(client, config):
    config(model_languages=("en", "de"))
    clip = speech_file(LONG_A, "flac")
    out = transcribe(client, clip)
    assert isinstance(out, openai.types.audio.Transcription)
    assert [lang.code for lang in out.languages] == ["en"]
    verbose = transcribe(client, clip, response_format="verbose_json", timestamp_granularities=["segment"])
    assert isinstance(verbose, openai.types.audio.TranscriptionVerbose)
    assert verbose.language == "english"  # as whisper-1 writes it
    assert verbose.segments and words_of(verbose.text) == LONG_A.split()
    with open(clip, "rb") as f:
        events = list(client.audio.transcriptions.create(model="whisper-1", file=f, stream=True))
    done = events[-1]
    assert done.type == "transcript.text.done" and [lang.code for lang in done.languages] == ["en"]
    short = transcribe(client, speech_file(SHORT, "wav"))
    assert short.languages == []  # OpenAI: "no language could be reliably detected"
    hinted = transcribe(client, speech_file(SHORT, "wav"), response_format="verbose_json", language="de")
    assert hinted.language == "german"  # nothing detected: the language the request named


def test_languages_on_openai_routes(client, api, config):
    config(model_languages=("en", "de"))
    clip = speech_file(LONG_B, "wav")
    out = transcribe(client, clip, languages=["de", "en"])
    assert [lang.code for lang in out.languages] == ["en"]
    with pytest.raises(openai.BadRequestError) as both:
        transcribe(client, clip, language="en", languages=["en"])
    assert both.value.body["param"] == "languages" and "cannot both" in both.value.message
    with pytest.raises(openai.BadRequestError) as unknown:
        transcribe(client, clip, languages=["en", "fr"])
    assert "'fr'" in unknown.value.message and "it transcribes: en, de" in unknown.value.message
    form, ctype = multipart({"model": "whisper-1", "languages[]": ["de", "en"], "response_format": "json"}, clip)
    answer = requests.post(
        f"{api.url}/v1/audio/transcriptions", data=form, headers={"Content-Type": ctype}, timeout=120
    )
    assert answer.status_code == 200 and answer.json()["languages"] == [{"code": "en"}], answer.text
    assert temp_leftovers() == []


def test_open_webui_flow(api):
    """Open WebUI posts multipart with its configured `language`; on an error it posts again
    without it. A language the model does not speak is that error (400, param language)."""
    clip = speech_file(LONG_A, "webm")
    url = f"{api.url}/v1/audio/transcriptions"
    for fields in ({"model": "whisper-1", "language": "en"}, {"model": "whisper-1"}):
        body, ctype = multipart(fields, clip)
        answer = requests.post(url, data=body, headers={"Content-Type": ctype}, timeout=120)
        assert answer.status_code == 200, answer.text
        assert words_of(answer.json()["text"]) == LONG_A.split()
    body, ctype = multipart({"model": "whisper-1", "language": "pt"}, clip)
    refused = requests.post(url, data=body, headers={"Content-Type": ctype}, timeout=120)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "language"
    assert "it transcribes: en" in refused.json()["error"]["message"]
    body, ctype = multipart({"model": "whisper-1"}, clip)
    assert requests.post(url, data=body, headers={"Content-Type": ctype}, timeout=120).status_code == 200
    assert temp_leftovers() == []


def test_queue_route_refuses_a_bad_hint_as_openai_does(worker):
    out = call_handler(worker, {"id": "q", "input": {"openai_route": "/v1/audio/transcriptions", "openai_input": {
        "file": "https://127.0.0.1:1/none.wav", "language": "en", "languages": ["en"]}}})  # fmt: skip
    assert '"param": "languages"' in out["error"] and "cannot both" in out["error"]


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_diarized_json_segments_carry_their_language(client, config):
    config(model_languages=("en", "de"))
    audio, _truth, _said = testkit.conversation([0, 1, 0], seed=11, words=(6, 9))
    path = synth.write(DATA_ROOT / "language-two-voices.wav", audio)
    out = transcribe(client, path, response_format="diarized_json", extra_body={"num_speakers": "2"})
    body = out.model_dump() if hasattr(out, "model_dump") else out
    long_segments = [s for s in body["segments"] if len(s["text"]) >= language.MIN_CHARS]
    assert long_segments, body
    assert all(s["language"] == "en" for s in long_segments), body["segments"]
    assert all("language" not in s for s in body["segments"] if len(s["text"]) < language.MIN_CHARS)
