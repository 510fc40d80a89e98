"""Plans made by the memory there is (issue 26), through the real worker and the demo model: the
fitted cost against passes measured here; a small budget gets local attention and shorter pieces
and still answers; a large one keeps full attention; a pass that cannot fit is cut smaller, then
refused at the floor, never killed; and a 20-minute two-voice file with vad, diarize and
timestamps answered by a worker process whose peak RSS stays under 6 GB."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA_ROOT, REPO, run_job

from handler import _bucketize_by_duration, _make_batches
from parakeet_worker import memory
from parakeet_worker import model as asr
from parakeet_worker.config import SAMPLE_RATE
from parakeet_worker.memory import FULL, GiB, MiB
from parakeet_worker.transcript import Prepared
from tools import synth
from tools.testkit import attribution, conversation, word_errors

# ---------------------------------------------------------------------------------------------
# The planner's pure parts, with memory limits given
# ---------------------------------------------------------------------------------------------


def items(*durations: float) -> list[Prepared]:
    return [Prepared(i, f"item{i}", Path("unused.wav"), round(d * SAMPLE_RATE)) for i, d in enumerate(durations)]


def test_buckets_follow_the_full_attention_limit():
    got = _bucketize_by_duration(items(30, 200, 300, 301, 2000), full_sec=300)
    assert [p.index for p in got["short"]] == [0, 1, 2]  # SHORT_MAX_SEC (600) is the cap, 300 s fits
    assert [p.index for p in got["local"]] == [3, 4]
    assert got["long"] == []


def test_batches_hold_only_rows_that_fit():
    """fits(rows, longest): all rows are padded to the longest. Every batch obeys it, every
    item is in exactly one batch, and one item that fits nowhere still gets a batch alone."""
    given = items(5, 7, 9, 12, 20, 30, 31, 45, 80, 200)

    def fits(rows: int, longest: float) -> bool:
        return rows * longest <= 60

    batches = _make_batches(given, fits)
    assert sorted(p.index for b in batches for p in b) == list(range(len(given)))
    for batch in batches:
        assert len(batch) == 1 or fits(len(batch), max(p.duration for p in batch)), [p.duration for p in batch]
    assert [len(b) for b in batches if max(p.duration for p in b) >= 80] == [1, 1]
    assert len(_make_batches(given)) < len(batches)  # without the memory limit they pack tighter


# ---------------------------------------------------------------------------------------------
# The fitted cost against passes measured in this process
# ---------------------------------------------------------------------------------------------


def speech(minutes: float, seed: int, voices: tuple[int, ...] = (0, 1)) -> tuple[np.ndarray, list, list[str]]:
    """About `minutes` of a conversation (turns of espeak-ng speech): audio, true turns, words."""
    turns = max(2, round(minutes * 60 / 2.4))  # a turn and its pause: 2.4 s on average
    audio, truth, said = conversation([voices[i % len(voices)] for i in range(turns)], seed)
    return audio, truth, [w for sentence in said for w in sentence]


def test_calibrate_fits_measured_probes(tmp_path):
    """memory.calibrate on the demo model, in a worker process with the image's malloc settings
    (MALLOC_MMAP_THRESHOLD_: big blocks are mapped and unmapped, so resident memory says what is
    in use): the worker's probes of noise through the encoder, a fit, and passes measured
    against it: the encoder inside the probes' range and past it (1.5x the longest), and whole
    passes (encoder and decoder) of two minutes of speech in either mode; each under the
    predicted peak, none far below it."""
    report = tmp_path / "calibrate.json"
    env = {**os.environ, "MEMORY_PLANNING": "off", "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}
    subprocess.run([sys.executable, str(REPO / "tests" / "workers.py"), "calibrate", str(report)], env=env, cwd=REPO,
                   check=True, timeout=600)  # fmt: skip
    got = json.loads(report.read_text())
    cost = memory.PassCost.from_dict(got["cost"])
    assert [p["peak"] > 0 for p in got["probes"]] == [True] * len(memory.DEFAULT_PROBES) and len(got["checks"]) == 6
    assert cost.full_per_sec2 > 0  # full attention's square term is there to see
    for check in got["checks"]:
        seconds, mode, used = check["seconds"], check["mode"], check["used"]
        assert 0.5 * cost.raw(seconds, 1, mode) <= used <= cost.peak(seconds, 1, mode), (check, cost)


# ---------------------------------------------------------------------------------------------
# Jobs through the worker under a budget
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def five_minutes() -> tuple[str, list[str]]:
    audio, _, words = speech(5, seed=21)
    return str(synth.write(DATA_ROOT / "memory-five-minutes.wav", audio)), words


def check_words(result: dict, said: list[str], duration: float) -> None:
    assert "error" not in result, result
    assert word_errors(said, result["text"].split()) <= 0.25 * len(said), result["text"][:300]
    starts = [w["start"] for w in result["timestamps"]["word"]]
    assert starts == sorted(starts) and 0 <= starts[0] and starts[-1] <= duration, "timestamps out of order or range"


def attention_modes(monkeypatch) -> list[bool]:
    """Every attention switch the worker makes from now on (True: local), as it makes it."""
    modes: list[bool] = []
    real = asr.set_attention

    def recording(model, local: bool) -> None:
        modes.append(local)
        real(model, local)

    monkeypatch.setattr(asr, "set_attention", recording)
    return modes


def test_a_small_budget_takes_local_attention_and_shorter_pieces(worker, config, five_minutes, monkeypatch):
    """300 MB over what the worker holds: full attention over five minutes would need ~2 GB
    and local ~0.6 GB, so the item goes in pieces that fit (each under five minutes), with
    local attention where full attention does not fit them."""
    path, said = five_minutes
    config(memory_budget_bytes=memory.process_rss() + 300 * MiB, memory_wait_sec=0)
    lim = memory.planner().limits()
    assert lim.full_sec < 300 and 60 <= lim.piece_sec < 300, lim.line()
    modes = attention_modes(monkeypatch)
    out = run_job(worker, [{"source": path}], timestamps=True)
    (result,) = out["results"]
    check_words(result, said, result["duration"])
    assert out["stats"]["batches"] >= 2, out["stats"]  # one pass per piece
    assert True in modes, modes


def test_a_large_budget_keeps_full_attention(worker, config, five_minutes, monkeypatch):
    """Nothing but the device limits the worker: five minutes fit one pass with full attention
    (about 2.3 GB here), as before memory planning; no piece, no local attention."""
    config(memory_budget_bytes=0)
    cost, room = memory.planner().cost(), memory.planner().room()
    if room.free < cost.peak(300, 1, FULL) + GiB:
        pytest.skip(f"this machine has {room.free / GiB:.1f} GB free: too little to show full attention at 5 min")
    path, said = five_minutes
    modes = attention_modes(monkeypatch)
    out = run_job(worker, [{"source": path}], timestamps=True)
    (result,) = out["results"]
    check_words(result, said, result["duration"])
    assert out["stats"]["batches"] == 1, out["stats"]
    assert True not in modes and not asr.state().local_attention


def test_what_cannot_fit_is_cut_smaller_then_refused_at_the_floor(worker, config, five_minutes):
    """A budget of what the worker already holds: no pass fits. The item is cut (pieces of
    PIECE_MIN_SEC), each piece is refused by admission instead of run, and the answer is the
    out_of_memory item code (503): the worker is never killed and stays healthy."""
    path, _ = five_minutes
    config(memory_budget_bytes=memory.process_rss(), memory_wait_sec=0.5, piece_min_sec=60)
    out = run_job(worker, [{"source": path}])
    (result,) = out["results"]
    assert result["code"] == "out_of_memory", result
    assert "not enough memory for this audio in one pass" in result["error"]
    assert asr.worker_healthy()
    config(memory_budget_bytes=0)
    assert run_job(worker, [{"source": path}])["results"][0]["text"]  # and it runs once there is room


# ---------------------------------------------------------------------------------------------
# 20 minutes, two voices, vad + diarize + timestamps, in a worker process of its own
# ---------------------------------------------------------------------------------------------

RSS_LIMIT_GB = 6.0


def test_twenty_minute_conversation_with_vad_and_speakers_under_6_gb(tmp_path):
    """The issue's case: a long two-voice recording with vad and diarize. The worker process
    (model, VAD, speaker model and all) answers with both speakers and word timestamps, its
    peak RSS under 6 GB (WORKER_MEMORY_BUDGET_BYTES: what it may hold)."""
    audio, truth, said = speech(20, seed=26)
    path = synth.write(DATA_ROOT / "memory-twenty-minutes.wav", audio)
    request, result_file = tmp_path / "request.json", tmp_path / "result.json"
    job = {"inputs": [{"source": str(path)}], "vad": True, "diarize": True, "timestamps": True}
    request.write_text(json.dumps({"jobs": [job], "result": str(result_file)}))
    env = {**os.environ, "WORKER_MEMORY_BUDGET_BYTES": str(int(RSS_LIMIT_GB * GiB)),
           "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}  # as the image runs it
    subprocess.run([sys.executable, str(REPO / "tests" / "worker_process.py"), str(request)], env=env, cwd=REPO,
                   check=True, timeout=1500)  # fmt: skip
    report = json.loads(result_file.read_text())
    (result,) = report["outputs"][0]["results"]
    assert "error" not in result and "warning" not in result, result
    assert len(audio) / SAMPLE_RATE >= 19 * 60
    assert report["rss_peak_mb"] < RSS_LIMIT_GB * 1024, report["rss_peak_mb"]
    # Both voices found: under the best one-to-one mapping of labels to the two true speakers,
    # most of each one's speech carries its own label (a third label, if any, holds little).
    spoken: dict[str, float] = {}
    for turn in result["turns"]:
        spoken[turn["speaker"]] = spoken.get(turn["speaker"], 0.0) + turn["end"] - turn["start"]
    assert len(spoken) >= 2 and attribution(truth, result["turns"]) >= 0.85, spoken
    words = result["timestamps"]["word"]
    assert word_errors(said, [w["word"] for w in words]) <= 0.25 * len(said)
    assert all(a["start"] <= b["start"] for a, b in itertools.pairwise(words))
    assert {w["speaker"] for w in words} >= {"SPEAKER_00", "SPEAKER_01"}
