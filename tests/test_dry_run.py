"""SKIP_MODEL_LOAD=1: the worker still fetches, decodes, measures and batches, and never imports
torch, NeMo, librosa or silero-vad (not even with `vad` on). Run in a fresh interpreter, since the test session has NeMo loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import soundfile as sf
from conftest import DATA_ROOT, REPO, encode
from test_headers import HANG_HEADERS


def dry_env() -> dict[str, str]:
    return {**os.environ, "SKIP_MODEL_LOAD": "1", "PARAKEET_MODEL": "nvidia/parakeet-tdt-0.6b-v3"}


def test_dry_run_imports_nothing_heavy_and_measures_durations(http_server, tmp_path):
    rng = np.random.default_rng(0)
    made = {}
    for name, seconds, rate, channels in [("a", 1.25, 44100, 2), ("b", 3.5, 48000, 1), ("c", 7.0, 8000, 1)]:
        wav = DATA_ROOT / f"dry-{name}.wav"
        sf.write(wav, 0.1 * rng.standard_normal((int(seconds * rate), channels)), rate)
        made[name] = (wav, seconds)
    hostile = DATA_ROOT / "dry-hostile.wav"
    hostile.write_bytes(HANG_HEADERS[0])
    inputs = [
        {"source": str(made["a"][0])},
        {"source": http_server.add(encode(made["b"][0], DATA_ROOT / "dry-b.mp3"))},
        {"source": "file://" + str(encode(made["c"][0], DATA_ROOT / "dry-c.m4a"))},
        {"source": str(hostile)},  # a header that made libsndfile spin for ever (tests/test_headers.py)
    ]
    (tmp_path / "jobs.json").write_text(json.dumps([{"inputs": inputs, "vad": True}]))
    proc = subprocess.run(
        [sys.executable, "tests/workers.py", "dry", str(tmp_path / "jobs.json"), str(tmp_path / "report.json")],
        cwd=REPO, env=dry_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())  # a file: SDK log lines cannot glue onto it
    assert report["heavy"] == [], f"dry run imported {report['heavy'][:5]}"
    results = report["outs"][0]["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert results[3]["code"] == "not_audio", results[3]
    for result, (_, seconds) in zip(results[:3], [made["a"], made["b"], made["c"]], strict=True):
        assert "error" not in result, result
        assert "dry run" in result["text"]
        assert abs(result["duration"] - seconds) <= 0.05, (result, seconds)


def test_test_local_script_dry_run():
    proc = subprocess.run(
        [sys.executable, "test_local.py"], cwd=REPO, env=dry_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout[proc.stdout.index("{\n") :])
    assert len(out["results"]) >= 3
    assert all("dry run" in r["text"] and r["duration"] > 0.3 for r in out["results"])
