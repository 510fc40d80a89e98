"""Long audio: local attention above the threshold (and back), and splitting at pauses above
MAX_SINGLE_PASS_SEC, with thresholds lowered so the demo model shows it in seconds."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import DATA_ROOT, run_job, speech_file

from parakeet_worker import config as settings
from parakeet_worker import model as asr
from parakeet_worker import pieces, transcript
from tools import synth

WORDS = ["one", "hello", "seven", "stop", "three", "world", "nine", "left", "go", "five", "up", "eight", "no", "two"]


@pytest.fixture(scope="module")
def long_clip():
    """~60 s of words at known offsets, 3.5-4.5 s apart (pauses between them)."""
    rng = np.random.default_rng(11)
    offsets = list(np.cumsum(rng.uniform(3.5, 4.5, len(WORDS))) - 2.0)
    path = synth.write(DATA_ROOT / "long-placed.wav", synth.place_words(WORDS, offsets))
    return str(path), offsets


def check_words(result: dict, offsets: list[float], tolerance: float = 0.5) -> None:
    assert "error" not in result, result
    stamps = result["timestamps"]["word"]
    assert [w["word"] for w in stamps] == WORDS, result["text"]
    assert result["text"].split() == WORDS
    starts = [w["start"] for w in stamps]
    assert starts == sorted(starts), "timestamps go backwards"
    for stamp, offset in zip(stamps, offsets, strict=True):
        assert abs(stamp["start"] - offset) <= tolerance, (stamp, offset)


def test_local_attention_switch_and_back(worker, config, long_clip):
    path, offsets = long_clip
    short = {"source": str(speech_file("four two stop", "wav"))}
    alone = run_job(worker, [short], timestamps=True)["results"][0]  # full attention, before any switch

    config(short_max_sec=10, local_attention_after_sec=30, local_attention_context=(64, 64))
    mixed = run_job(worker, [{"source": path}, short], timestamps=True)  # either may run first
    check_words(mixed["results"][0], offsets)
    check_words(run_job(worker, [{"source": path}], timestamps=True)["results"][0], offsets)
    assert asr.state().local_attention is True  # the long item ran last, with local attention
    # NeMo builds the swapped-in attention modules in training mode: dropout must not stay on
    assert [n for n, m in asr.loaded_model().named_modules() if m.training] == []

    after = run_job(worker, [short], timestamps=True)["results"][0]
    assert asr.state().local_attention is False  # switched back for short work
    for result in (mixed["results"][1], after):
        assert result["text"] == alone["text"] == "four two stop"
        assert result["timestamps"] == alone["timestamps"]


def test_long_item_with_full_attention_runs_alone(worker, config, long_clip):
    path, offsets = long_clip
    config(short_max_sec=10, local_attention_after_sec=600)
    out = run_job(worker, [{"source": path}, {"source": str(speech_file("yes no", "wav"))}], timestamps=True)
    check_words(out["results"][0], offsets)
    assert out["results"][1]["text"] == "yes no"
    assert out["stats"]["batches"] == 2
    assert asr.state().local_attention is False


@pytest.mark.parametrize("piece_sec", [13.0, 21.0])
def test_split_at_pauses_keeps_every_word_once(worker, config, long_clip, piece_sec):
    path, offsets = long_clip
    config(max_single_pass_sec=piece_sec, short_max_sec=10, local_attention_after_sec=600)
    out = run_job(worker, [{"source": path}], timestamps=True)
    result = out["results"][0]
    check_words(result, offsets)
    assert result["duration"] > 2 * piece_sec  # it really was split, into three pieces or more
    ends = [w["end"] for w in result["timestamps"]["word"]]
    assert ends == sorted(ends)
    segments = result["timestamps"]["segment"]
    assert [s["start"] for s in segments] == sorted(s["start"] for s in segments)


def test_split_points_fall_in_pauses(worker, long_clip):
    """Every cut lands in silence between words, and no piece is longer than allowed."""
    path, _ = long_clip
    samples, rate = sf.read(path, dtype="float32")
    item = transcript.Prepared(index=0, source=path, wav=Path(path), frames=len(samples))
    cuts = pieces.split_points(item, 13.0)
    assert len(cuts) >= 4 and cuts[0] == 0
    for prev, cut in itertools.pairwise(cuts):
        assert 0 < cut - prev <= 13.0 * rate
        window = samples[max(0, cut - rate // 20) : cut + rate // 20]  # 100 ms around the cut
        assert np.abs(window).max() < 0.01, f"cut at {cut / rate:.2f} s is inside speech"
    assert len(samples) - cuts[-1] <= 13.0 * rate


def test_a_piece_that_runs_out_of_memory_is_split_smaller_and_the_transcript_is_whole(worker, config, long_clip,
                                                                                      monkeypatch):  # fmt: skip
    """The model runs out of memory on anything over 16 s: 30-second pieces are cut again at
    pauses (at most 0.6 of their length each time) until they fit, and the item comes back
    whole, every word once, on the original timeline. At the floor it is out_of_memory."""
    path, offsets = long_clip
    config(max_single_pass_sec=30.0, piece_min_sec=5.0, short_max_sec=10, local_attention_after_sec=600)
    real, tried = asr.forward_decode, []

    def small_memory(model, audio, lengths, *rest):
        tried.append(max(lengths) / settings.SAMPLE_RATE)
        if max(lengths) > 16 * settings.SAMPLE_RATE:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, audio, lengths, *rest)

    monkeypatch.setattr(asr, "forward_decode", small_memory)
    out = run_job(worker, [{"source": path}], timestamps=True)
    check_words(out["results"][0], offsets)
    assert any(sec > 16 for sec in tried) and max(tried) <= 30.0 and all(sec > 5 for sec in tried)
    assert out["stats"]["failed"] == 0

    config(max_single_pass_sec=30.0, piece_min_sec=20.0)  # no smaller piece than 20 s: 30 s ones fail
    (failed,) = run_job(worker, [{"source": path}], timestamps=True)["results"]
    assert failed["code"] == "out_of_memory" and "out of memory" in failed["error"]
