"""End to end through the real handler: real ffmpeg, real NeMo (the bundled demo model), real
speech from espeak-ng whose words we know."""

from __future__ import annotations

import random

import pytest
from conftest import DATA_ROOT, REPO, encode, run_job, speech_file, word_errors, words_of

from tools import synth

DIGITS = "zero one two three four five six seven eight nine".split()


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "ogg", "m4a", "webm"])
def test_containers_come_back_with_the_right_words(worker, fmt):
    text = "seven three nine one"
    out = run_job(worker, [{"source": str(speech_file(text, fmt))}])
    (result,) = out["results"]
    assert "error" not in result, result
    assert words_of(result["text"]) == text.split()


def test_resampled_stereo_sources(worker):
    wav = speech_file("two four six eight", "wav")
    stereo = encode(wav, DATA_ROOT / "stereo48k.flac", "-ac", "2", "-ar", "48000")
    narrow = encode(wav, DATA_ROOT / "narrow8k.wav", "-ar", "8000")
    out = run_job(worker, [{"source": str(stereo)}, {"source": str(narrow)}])
    for result in out["results"]:
        assert words_of(result["text"]) == "two four six eight".split(), result


def test_order_across_many_batches(worker, config, http_server):
    """24 clips of different lengths, several batches: each comes back with its own words."""
    config(batch_max_items=3)
    rng = random.Random(3)
    texts = [" ".join(rng.choice(DIGITS) for _ in range(rng.randint(1, 6))) for _ in range(24)]
    formats = ["wav", "mp3", "flac", "ogg"]
    inputs = []
    for i, text in enumerate(texts):
        path = speech_file(text, formats[i % 4], speed=rng.choice([130, 160, 190]))
        inputs.append({"source": http_server.add(path) if i % 2 else str(path)})
    out = run_job(worker, inputs)
    assert out["stats"]["batches"] >= 8
    got = [words_of(r["text"]) for r in out["results"]]
    expected = [t.split() for t in texts]
    for i, words in enumerate(got):
        # its own text is the closest of all 24: order holds even if the model slips a word
        own = word_errors(expected[i], words)
        assert all(own < word_errors(other, words) for other in expected if other != expected[i]), (i, words)
    errors = sum(word_errors(e, g) for e, g in zip(expected, got, strict=True))
    assert errors / sum(map(len, expected)) <= 0.05, got


def place_words(words: list[str], offsets: list[float], name: str) -> str:
    """A WAV of each word spoken alone, placed so that its speech starts at its offset."""
    return str(synth.write(DATA_ROOT / f"{name}.wav", synth.place_words(words, offsets)))


def test_word_timestamps_land_where_words_were_placed(worker):
    words = ["three", "hello", "seven", "stop", "nine", "left"]
    offsets = [0.5, 2.3, 3.9, 6.2, 7.4, 9.8]
    path = place_words(words, offsets, "placed")
    out = run_job(worker, [{"source": path}], timestamps=True)
    (result,) = out["results"]
    stamps = result["timestamps"]["word"]
    assert [w["word"] for w in stamps] == words
    for stamp, offset in zip(stamps, offsets, strict=True):
        assert abs(stamp["start"] - offset) <= 0.3, (stamp, offset)
        assert stamp["end"] >= stamp["start"]
    segments = result["timestamps"]["segment"]
    assert segments and segments[0]["start"] <= stamps[0]["start"] and segments[-1]["end"] >= stamps[-1]["end"] - 1e-6


def test_no_timestamps_unless_asked(worker):
    out = run_job(worker, [{"source": str(speech_file("one two", "wav"))}])
    assert "timestamps" not in out["results"][0]


def test_http_and_local_sources_agree(worker, http_server):
    path = speech_file("hello world yes no", "mp3")
    out = run_job(worker, [{"source": http_server.add(path)}, {"source": str(path)}, {"source": f"file://{path}"}])
    texts = [r["text"] for r in out["results"]]
    assert words_of(texts[0]) == "hello world yes no".split()
    assert texts[0] == texts[1] == texts[2]


def test_bundled_samples(worker):
    import json

    expected = json.loads((REPO / "samples" / "TRANSCRIPTS.json").read_text())
    inputs = [{"source": f"samples/{name}"} for name in sorted(expected)]
    out = run_job(worker, inputs)
    for name, result in zip(sorted(expected), out["results"], strict=True):
        assert words_of(result["text"]) == words_of(expected[name]), (name, result)
