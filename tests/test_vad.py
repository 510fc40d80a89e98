"""Voice activity (`vad`): silero-vad finds each item's speech and only that reaches the model;
words, segments and subtitles stay on the item's own timeline; noise and silence get no words
and silence no model call; long items are cut in pauses VAD finds."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import DATA_ROOT, REPO, call_handler, run_job, run_together, speech_file, temp_leftovers, until, words_of

from parakeet_worker import config as settings
from parakeet_worker import errors, pieces, transcript
from parakeet_worker.analysis import vad
from tools import synth

SR = synth.SAMPLE_RATE
# Words spoken alone, between long silences (and two pairs close together), at these offsets.
WORDS = ["one", "seven", "hello", "six", "stop", "three", "go", "world"]
OFFSETS = [1.0, 8.5, 9.3, 17.0, 25.2, 26.0, 33.0, 40.0]


@pytest.fixture(scope="module")
def spaced() -> str:
    audio = synth.place_words(WORDS, OFFSETS)
    audio += 0.003 * np.random.default_rng(0).standard_normal(len(audio)).astype(np.float32)  # a line's hiss
    return str(synth.write(DATA_ROOT / "vad-spaced.wav", audio))


@pytest.fixture(scope="module")
def not_speech() -> dict[str, str]:
    """Ten seconds each of white noise, a music-like signal (a chord whose notes swell and fade)
    and digital silence."""
    t = np.arange(10 * SR) / SR
    chord = sum(0.1 * np.sin(2 * np.pi * f * t) * (0.5 + 0.5 * np.sin(np.pi * t + i)) for i, f in enumerate([220, 277, 330, 440]))
    signals = {
        "noise": 0.1 * np.random.default_rng(0).standard_normal(10 * SR),
        "music": chord,
        "silence": np.zeros(10 * SR),
    }
    return {name: str(synth.write(DATA_ROOT / f"vad-{name}.wav", x.astype(np.float32))) for name, x in signals.items()}


def _cues(srt: str) -> list[tuple[float, str]]:
    """(start in seconds, text) of each SRT cue."""
    out = []
    for block in srt.strip().split("\n\n"):
        _, clock, text = block.split("\n", 2)
        h, m, s, ms = map(int, re.match(r"(\d+):(\d+):(\d+),(\d+)", clock).groups())
        out.append((h * 3600 + m * 60 + s + ms / 1000, text))
    return out


def test_speech_between_long_silences_keeps_its_words_and_timeline(worker, spaced):
    off = run_job(worker, [{"source": spaced}], timestamps=True, vad=False)
    on = run_job(worker, [{"source": spaced}], timestamps=True, vad=True, output_format="srt")
    plain, vad = off["results"][0], on["results"][0]
    assert words_of(plain["text"]) == WORDS
    assert words_of(vad["text"]) == WORDS
    starts = [w["start"] for w in vad["timestamps"]["word"]]
    assert [w["word"] for w in vad["timestamps"]["word"]] == WORDS
    assert all(abs(got - spoken) <= 0.1 for got, spoken in zip(starts, OFFSETS, strict=True)), starts
    assert all(w["end"] > w["start"] for w in vad["timestamps"]["word"])
    seg = vad["timestamps"]["segment"]
    assert seg[0]["start"] == starts[0] and seg[-1]["end"] == vad["timestamps"]["word"][-1]["end"]
    # The subtitles are on the item's timeline too: each cue starts where its first word does.
    firsts = iter(vad["timestamps"]["word"])
    for start, text in _cues(vad["subtitles"]):
        first = next(firsts)
        for _ in text.split()[1:]:
            next(firsts)
        assert (text.split()[0], start) == (first["word"], first["start"])
    # The model was given the speech (8 short words, each padded), not the 41 s of the file.
    assert 1.5 < vad["speech_sec"] < 10 and on["stats"]["speech_sec"] == vad["speech_sec"]
    assert on["stats"]["audio_sec"] == off["stats"]["audio_sec"] == plain["duration"]
    assert "speech_sec" not in plain and off["stats"]["speech_sec"] == off["stats"]["audio_sec"]


def test_noise_and_music_get_no_words_with_vad(worker, not_speech):
    inputs = [{"source": not_speech["noise"]}, {"source": not_speech["music"]}]
    off = run_job(worker, inputs, timestamps=True)
    on = run_job(worker, inputs, timestamps=True, vad=True)
    # Without VAD the demo model writes words no one said: on this noise a string of digits and
    # commands ("two seven go two stop ..."), on the chord "down one one one ...".
    assert all(words_of(r["text"]) for r in off["results"]), off["results"]
    for r in on["results"]:
        assert r["text"] == "" and r["timestamps"] == {"word": [], "segment": []} and r["speech_sec"] == 0
    assert on["stats"]["batches"] == 0 and on["stats"]["speech_sec"] == 0 and on["stats"]["audio_sec"] == 20


def test_digital_silence_costs_no_model_call(worker, not_speech):
    speech = str(speech_file("one two three"))
    out = run_job(worker, [{"source": not_speech["silence"]}, {"source": speech}], vad=True)
    silent, spoken = out["results"]
    assert silent["text"] == "" and silent["speech_sec"] == 0 and silent["duration"] == 10
    assert words_of(spoken["text"]) == ["one", "two", "three"]
    assert out["stats"]["batch_sizes"] == [1]  # the speech alone: the silence never reached the model


def test_jobs_with_and_without_vad_share_a_batch(worker, monkeypatch, spaced):
    script = "four five six two eight nine zero"  # about as long as the other's speech: one batch is cheapest
    speech = str(speech_file(script))
    jobs = [
        {"id": "vad", "input": {"inputs": [{"source": spaced}], "vad": True, "timestamps": True}},
        {"id": "plain", "input": {"inputs": [{"source": speech}]}},
    ]
    with_vad, plain = run_together(worker, monkeypatch, jobs, ready_units=2)
    assert with_vad["stats"]["batch_sizes"] == plain["stats"]["batch_sizes"] == [2]
    assert words_of(with_vad["results"][0]["text"]) == WORDS
    assert words_of(plain["results"][0]["text"]) == script.split()
    assert with_vad["stats"]["speech_sec"] < with_vad["stats"]["audio_sec"] / 3


def _speech_and_pauses(rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A quiet voice (peak 0.05) reading two lists, then 1.2 s of fan noise louder than the
    voice, four times over; and where the pauses are. The energy rule cuts in the voice here."""
    a = synth.trim(synth.speak("hello world stop go left right up down"))
    b = synth.trim(synth.speak("one two three four five six seven eight"))
    parts, pauses, pos = [], [], 0
    for _ in range(4):
        for s in (a, b):
            parts.append(s / np.abs(s).max() * 0.05)
            pos += len(s)
        parts.append(0.02 * rng.standard_normal(int(1.2 * SR)))
        pauses.append((pos, pos + len(parts[-1])))
        pos += len(parts[-1])
    return np.concatenate(parts).astype(np.float32), pauses


def test_long_item_is_cut_in_the_pauses_vad_finds(worker):
    audio, pauses = _speech_and_pauses(np.random.default_rng(1))
    wav = synth.write(DATA_ROOT / "vad-long.wav", audio)
    item = transcript.Prepared(index=0, source="x", wav=wav, frames=len(audio))
    cuts = pieces.split_points(item, 7.0, pieces.vad_pause)
    assert len(cuts) == 4  # 25 s in pieces of at most 7 s
    assert all(any(lo <= c < hi for lo, hi in pauses) for c in cuts[1:]), (cuts, pauses)
    assert all(b - a <= 7 * SR for a, b in zip(cuts, [*cuts[1:], len(audio)], strict=False))


def test_cut_point_falls_back_to_energy_without_a_pause(worker):
    voice = synth.trim(synth.speak("one two three four five six seven eight nine"))[: 2 * SR]
    assert vad.pause_cut(voice) is None  # no 0.2 s without speech in 2 s of a sentence
    wav = synth.write(DATA_ROOT / "vad-no-pause.wav", voice)
    item = transcript.Prepared(index=0, source="x", wav=wav, frames=len(voice))
    assert pieces.vad_pause(item, len(voice), len(voice)) == pieces.quietest_pause(item, len(voice), len(voice))


def test_a_job_stopped_while_vad_runs(worker, monkeypatch):
    """Runpod cancels the job's task while VAD is inside an item (40 s: three ONNX blocks): the
    task ends cancelled, VAD stops at its next block, nothing reaches the model, no file is
    left and every VAD slot is free. The first block's read waits for the stop, so the stop
    lands inside VAD for certain."""
    wav = synth.write(DATA_ROOT / "vad-stopped.wav", np.tile(synth.place_words(["one", "two"], [0.5, 3.0]), 10))
    entered, seen = threading.Event(), {}
    real = vad.vad_probs

    def gated(samples, frames, stop=None):
        def read(n):
            entered.set()
            stop.wait(60)
            return samples(n)

        try:
            return real(read, frames, stop)
        except BaseException as exc:
            seen["raised"] = exc
            raise

    monkeypatch.setattr(vad, "vad_probs", gated)
    batches = next(worker.model_thread().batch_ids)

    async def main() -> None:
        task = asyncio.ensure_future(worker.handler({"id": "stop", "input": {"inputs": [{"source": str(wav)}], "vad": True}}))
        await until(entered.is_set, "VAD to start")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert isinstance(seen["raised"], errors.ItemError) and seen["raised"].code == "cancelled"
    assert temp_leftovers() == []
    assert next(worker.model_thread().batch_ids) == batches + 1  # no batch ran meanwhile
    slots, free = vad.vad_slots(), 0
    while slots.acquire(blocking=False):
        free += 1
    for _ in range(free):
        slots.release()
    assert free == settings.CFG.prepare_workers


def test_vad_failure_costs_the_item_nothing(worker, monkeypatch, spaced):
    for name, value in (("value", None), ("error", "OSError: silero_vad.onnx: no such file"), ("loaded", True)):
        monkeypatch.setattr(vad.SILERO, name, value)  # a load that failed
    out = run_job(worker, [{"source": spaced}], vad=True)
    result = out["results"][0]
    assert words_of(result["text"]) == WORDS
    assert "voice activity detection failed" in result["warning"] and "no such file" in result["warning"]
    assert "speech_sec" not in result and out["stats"]["speech_sec"] == out["stats"]["audio_sec"]


@pytest.mark.parametrize("value", ["yes", 1, 0, [], {}])
def test_malformed_vad_is_refused(worker, value, spaced):
    out = call_handler(worker, {"id": "bad", "input": {"inputs": [{"source": spaced}], "vad": value}})
    assert out.keys() == {"error"} and "vad must be true or false" in out["error"], out


def test_vad_default_comes_from_the_config(worker, config, not_speech):
    config(vad=True)
    out = run_job(worker, [{"source": not_speech["silence"]}])
    assert out["results"][0]["speech_sec"] == 0 and out["stats"]["batches"] == 0
    out = run_job(worker, [{"source": not_speech["silence"]}], vad=False)
    assert "speech_sec" not in out["results"][0] and out["stats"]["batches"] == 1


def test_pad_and_bridge(worker):
    regions = [(16000, 32000), (40000, 48000), (160000, 170000)]
    # 0.2 s (3200 samples) either side, out to the 1280-sample frame grid; the first two then
    # touch and become one; the last stops at the end of the audio. Without padding, a gap
    # under 0.6 s is still bridged, and one over it not.
    assert vad.pad_and_bridge(regions, 172000, pad=0.2, bridge=0.6) == [(12800, 51200), (156160, 172000)]
    assert vad.pad_and_bridge(regions, 400000, pad=0.0, bridge=0.0) == [(15360, 32000), (39680, 48640), (160000, 170240)]
    assert vad.pad_and_bridge(regions, 400000, pad=0.0, bridge=0.6) == [(15360, 48640), (160000, 170240)]
    assert vad.pad_and_bridge([], 1000) == []


def test_loading_vad_keeps_the_workers_torch_threads(tmp_path):
    """silero_vad sets torch's thread count to 1 when imported; the worker's stays."""
    report = tmp_path / "threads.json"
    proc = subprocess.run([sys.executable, "tests/workers.py", "vad-threads", str(report)], cwd=REPO,
                          env=dict(os.environ), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text()) == [3, True]
