"""The CUDA-only paths of the worker: bf16 autocast, CUDA-graph TDT decoding and its fallback,
out-of-memory halving, an hour under local attention, and splitting past MAX_SINGLE_PASS_SEC.

They run where CUDA is present and are skipped, with the reason, everywhere else (CI has no GPU):

    pytest tests/test_cuda.py -q          # on a GPU machine; `make bench-gpu` measures the rest
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA_ROOT, DEMO_MODEL, REPO, run_job, speech_file, word_errors

from bench import common
from parakeet_worker import model as asr
from tools import make_parakeet_shaped as shaped

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: these tests need a GPU (on one: pytest tests/test_cuda.py; CPU CI skips them)",
)

GIB = 2**30
# An hour under local attention must fit the smallest cards the Hub listing allows (AMPERE_16,
# 16 GB): the job's peak plus the full-size model's weights stays under 15 GiB.
HOUR_BUDGET_GIB = 15.0
FULL_SIZE_WEIGHT_BYTES = 627_450_502 * 4  # tools/make_parakeet_shaped.py --layers 24, fp32


def run_worker(tmp_path: Path, jobs: list[dict], **env: str) -> dict:
    """tests/worker_process.py in a fresh process with the test environment plus `env`."""
    request, result = tmp_path / "request.json", tmp_path / "result.json"
    result.unlink(missing_ok=True)
    request.write_text(json.dumps({"jobs": jobs, "result": str(result)}))
    subprocess.run([sys.executable, str(REPO / "tests" / "worker_process.py"), str(request)],
                   env={**os.environ, **env}, cwd=REPO, check=True)  # fmt: skip
    return json.loads(result.read_text())


def graphs_mode(model) -> object:
    """The CUDA-graph mode NeMo's TDT label-looping decoder is in (None: no graphs)."""
    computer = getattr(model.decoding.decoding, "decoding_computer", None)
    return getattr(computer, "cuda_graphs_mode", None)


@pytest.fixture(scope="module")
def clips():
    texts = ["seven three nine one", "hello world", "stop go left right", "zero five eight two six four", "yes no up down"]
    paths = [str(speech_file(t, fmt)) for t, fmt in zip(texts, ["wav", "mp3", "flac", "ogg", "m4a"], strict=True)]
    return [{"source": p} for p in paths] + [{"source": str(p)} for p in sorted((REPO / "samples").glob("*.wav"))]


def test_bf16_text_equals_fp32_on_demo_model(tmp_path, clips):
    if not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name(0)} has no bf16")
    job = {"inputs": clips, "timestamps": True}
    bf16 = run_worker(tmp_path, [job], PARAKEET_DTYPE="bf16")
    fp32 = run_worker(tmp_path, [job], PARAKEET_DTYPE="fp32")
    assert bf16["autocast"] == "torch.bfloat16" and fp32["autocast"] == "None"
    a, b = bf16["outputs"][0]["results"], fp32["outputs"][0]["results"]
    assert all(r.get("text") for r in a + b), (a, b)
    assert [r["text"] for r in a] == [r["text"] for r in b]


def test_cuda_graph_decoding_equals_plain_decoding(worker, clips):
    model = asr.loaded_model()
    with_graphs = run_job(worker, clips, timestamps=True)
    assert graphs_mode(model) is not None, "the worker did not decode with CUDA graphs"
    try:
        asr.configure_decoding(model, timestamps=True, cuda_graphs=False)
        without = run_job(worker, clips, timestamps=True)
        assert graphs_mode(model) is None
    finally:
        asr.configure_decoding(model, timestamps=False, cuda_graphs=True)
    for a, b in zip(with_graphs["results"], without["results"], strict=True):
        assert a["text"] and a["text"] == b["text"]
        assert [w["word"] for w in a["timestamps"]["word"]] == [w["word"] for w in b["timestamps"]["word"]]


def test_script_mask_on_cuda_leaves_graph_decoding_as_it_was(worker, clips, config):
    """A hinted item is decoded without CUDA graphs, its mask on the GPU; the batch's unhinted
    items, and every later batch, decode as before (graphs back on, same words)."""
    model = asr.loaded_model()
    before = run_job(worker, clips, timestamps=True)
    mode = graphs_mode(model)
    assert mode is not None, "the worker did not decode with CUDA graphs"
    config(model_languages=("en", "ru"))
    mixed = run_job(worker, [{**clips[0], "language": "ru"}, *clips[1:]], timestamps=True)
    assert not any(ch.isascii() and ch.isalpha() for ch in mixed["results"][0]["text"])
    assert graphs_mode(model) is mode
    after = run_job(worker, clips, timestamps=True)
    for a, b in zip(before["results"][1:], mixed["results"][1:], strict=True):
        assert a["text"] == b["text"]
    assert [r["text"] for r in before["results"]] == [r["text"] for r in after["results"]]


def test_warm_up_falls_back_when_graph_decoding_fails(worker, monkeypatch, caplog):
    """Force the CUDA-graph decoder to fail in the warm-up: load_model must retry without graphs."""
    original = asr.forward_decode
    calls: list[bool] = []

    def failing_with_graphs(model, audio, lengths):
        graphs = bool(model.cfg.decoding.greedy.get("use_cuda_graph_decoder"))
        calls.append(graphs)
        if graphs:
            raise RuntimeError("forced failure of CUDA-graph decoding")
        return original(model, audio, lengths)

    saved_state = dataclasses.replace(asr.state())
    monkeypatch.setattr(asr, "forward_decode", failing_with_graphs)
    try:
        with caplog.at_level(logging.WARNING, logger="parakeet-worker"):
            model = asr.load_model(str(DEMO_MODEL))
    finally:
        asr.state().__dict__.update(saved_state.__dict__)
    assert calls == [True, False]
    assert model.cfg.decoding.greedy.use_cuda_graph_decoder is False
    assert "falling back" in caplog.text
    monkeypatch.setattr(asr, "forward_decode", original)
    audio = np.zeros((1, 16000), np.float32)
    assert original(model, audio, [16000])  # decodes without graphs


def test_oom_batch_is_halved_and_every_item_comes_back(worker, config, caplog):
    """Cap this process's GPU memory between what half the batch and the whole batch need:
    the whole batch runs out of memory, its halves do not, and every item gets its text."""
    bank = common.utterance_bank(5, 40)
    items, scripts = [], []
    for i in range(8):
        path = DATA_ROOT / f"oom-{i}.wav"
        scripts.append(common.write_speech(path, 240.0, seed=500 + i, bank=bank))
        items.append({"source": str(path)})
    config(batch_max_items=8, batch_max_total_sec=4000, short_max_sec=600, local_attention_after_sec=1440)

    def peak_of(inputs):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = run_job(worker, inputs)
        return out, torch.cuda.max_memory_allocated() - base

    whole, peak_whole = peak_of(items)
    assert whole["stats"]["batches"] == 1
    _, peak_half = peak_of(items[:4])
    assert peak_whole > 1.5 * peak_half, (peak_whole, peak_half)
    total = torch.cuda.get_device_properties(0).total_memory
    limit = torch.cuda.memory_reserved() + (peak_half + peak_whole) / 2
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total))
    try:
        with caplog.at_level(logging.WARNING, logger="parakeet-worker"):
            capped = run_job(worker, items)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert "retrying in halves" in caplog.text
    for result, script in zip(capped["results"], scripts, strict=True):
        assert "error" not in result, result
        assert word_errors(script, result["text"].split()) <= 0.1 * len(script), result["text"]


@pytest.fixture(scope="module")
def shaped_small(tmp_path_factory):
    root = tmp_path_factory.mktemp("parakeet-shaped-gpu")
    shaped.make(root / "p2.nemo", 2, unpacked=root / "p2", calibration_sec=10.0)
    return root / "p2"


def test_an_hour_under_local_attention_stays_within_memory_bound(tmp_path, shaped_small):
    """Parakeet's layer sizes (2 of its 24 layers: in inference the peak is one layer's working
    set plus the weights). An hour must fit a 16 GB card with the full model's weights, and
    memory must grow about linearly with length (local attention), not with its square."""
    bank = common.utterance_bank(9, 60)
    quarter, hour = DATA_ROOT / "quarter.flac", DATA_ROOT / "hour.flac"
    for path, seconds in ((quarter, 900.0), (hour, 3600.0)):
        wav = path.with_suffix(".wav")
        common.write_speech(wav, seconds, seed=int(seconds), bank=bank)
        common.encode(wav, path, ("-c:a", "flac"), 16000, 1)
        wav.unlink()
    jobs = [{"inputs": [{"source": str(quarter)}]}, {"inputs": [{"source": str(hour)}]}]
    out = run_worker(tmp_path, jobs, PARAKEET_MODEL=str(shaped_small), LOCAL_ATTENTION_AFTER_SEC="600",
                     MAX_SINGLE_PASS_SEC="3600")  # one pass: the hour itself, not 30-minute pieces
    for job in out["outputs"]:
        assert "error" not in job["results"][0], job
    peak_quarter, peak_hour = (mb * 2**20 for mb in out["gpu_peak_mb"])
    weights = out["model_gpu_mb"] * 2**20
    assert peak_hour - weights + FULL_SIZE_WEIGHT_BYTES <= HOUR_BUDGET_GIB * GIB, out["gpu_peak_mb"]
    assert peak_hour - weights <= 4.5 * (peak_quarter - weights), out["gpu_peak_mb"]  # linear: 4x


def test_split_path_past_max_single_pass_sec(worker, config, monkeypatch):
    """A 14-minute file with MAX_SINGLE_PASS_SEC=300: three pieces cut at pauses, one text, word
    timestamps in order across the joins."""
    bank = common.utterance_bank(13, 40)
    path = DATA_ROOT / "split-14min.wav"
    script = common.write_speech(path, 840.0, seed=14, bank=bank)
    config(max_single_pass_sec=300, short_max_sec=600, local_attention_after_sec=1440)
    original, calls = asr.forward_decode, []

    def counting(model, audio, lengths):
        calls.append(audio.shape)
        return original(model, audio, lengths)

    monkeypatch.setattr(asr, "forward_decode", counting)
    result = run_job(worker, [{"source": str(path)}], timestamps=True)["results"][0]
    assert "error" not in result, result
    assert len(calls) == 3 and all(shape[0] == 1 and shape[1] <= 300 * 16000 for shape in calls)
    assert word_errors(script, result["text"].split()) <= 0.1 * len(script)
    starts = [w["start"] for w in result["timestamps"]["word"]]
    assert starts == sorted(starts) and starts[-1] <= 840.0
