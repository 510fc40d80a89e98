"""Output formats: json (default), text, srt and vtt, checked against their formats."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import DATA_ROOT, run_job, speech_file

from tools import synth

SRT_TIME = r"(\d\d):(\d\d):(\d\d),(\d\d\d)"
VTT_TIME = r"(\d\d):(\d\d):(\d\d)\.(\d\d\d)"


def seconds(match: tuple[str, ...]) -> float:
    h, m, s, ms = (int(x) for x in match)
    return h * 3600 + m * 60 + s + ms / 1000


def parse_cues(blocks: list[str], time_re: str, numbered: bool) -> list[tuple[float, float, list[str]]]:
    cues = []
    for n, block in enumerate(blocks, start=1):
        lines = block.split("\n")
        if numbered:
            assert lines[0] == str(n), f"cue {n} is numbered {lines[0]!r}"
            lines = lines[1:]
        m = re.fullmatch(f"{time_re} --> {time_re}", lines[0])
        assert m, f"bad timing line {lines[0]!r}"
        start, end = seconds(m.groups()[:4]), seconds(m.groups()[4:])
        assert lines[1:] and all(lines[1:]), f"cue {n} has no text"
        cues.append((start, end, lines[1:]))
    return cues


def check_cues(cues: list[tuple[float, float, list[str]]], words: list[str]) -> None:
    assert cues
    previous_end = 0.0
    for start, end, text in cues:
        assert start < end, (start, end)
        assert start >= previous_end - 1e-9, "cues overlap or go backwards"
        assert end - start <= 7.0 + 1e-9, "cue longer than 7 s"
        assert all(len(line) <= 42 for line in text), text
        previous_end = end
    assert " ".join(" ".join(text) for _, _, text in cues).split() == words


@pytest.fixture(scope="module")
def many_words():
    """~45 words in ~40 s: enough to need several cues of <= 42 characters and <= 7 s."""
    rng = np.random.default_rng(5)
    words = [str(w) for w in rng.choice(synth.VOCAB, 45)]
    offsets = list(np.cumsum(rng.uniform(0.55, 1.3, len(words))))
    path = synth.write(DATA_ROOT / "many-words.wav", synth.place_words(words, offsets))
    return str(path), words


def test_srt(worker, many_words):
    path, words = many_words
    result = run_job(worker, [{"source": path}], output_format="srt")["results"][0]
    assert "timestamps" not in result  # subtitles do not imply timestamps in the output
    srt = result["subtitles"]
    assert srt.endswith("\n") and not srt.startswith("\n")
    cues = parse_cues(srt.strip("\n").split("\n\n"), SRT_TIME, numbered=True)
    assert len(cues) >= 4
    check_cues(cues, result["text"].split())
    assert result["text"].split() == words


def test_vtt(worker, many_words):
    path, words = many_words
    result = run_job(worker, [{"source": path}], output_format="vtt", timestamps=True)["results"][0]
    vtt = result["subtitles"]
    assert vtt.startswith("WEBVTT\n\n")
    cues = parse_cues(vtt[len("WEBVTT\n\n") :].strip("\n").split("\n\n"), VTT_TIME, numbered=False)
    check_cues(cues, words)
    first_word = result["timestamps"]["word"][0]
    assert abs(cues[0][0] - first_word["start"]) < 1e-3


def test_text_format_and_default_json(worker):
    a, b = speech_file("one two", "wav"), speech_file("left right", "mp3")
    out = run_job(worker, [{"source": str(a)}, {"source": str(b)}], output_format="text")
    assert out["text"] == "one two\nleft right"
    plain = run_job(worker, [{"source": str(a)}])
    assert "text" not in plain and "subtitles" not in plain["results"][0]
    assert set(plain["results"][0]) == {"index", "source", "duration", "text", "language", "language_probability"}
    assert set(plain["stats"]) >= {"audio_sec", "wall_sec", "batches", "padding_efficiency", "items", "failed"}


def test_subtitles_for_silence_are_empty_but_valid(worker):
    path = synth.write(DATA_ROOT / "silence.wav", np.zeros(synth.SAMPLE_RATE * 2, np.float32))
    result = run_job(worker, [{"source": str(path)}], output_format="srt")["results"][0]
    assert result["text"] == ""
    assert result["subtitles"] == ""
