"""The library patches (parakeet_worker/patches.py) still fit the code they replace: each
upstream function's installed source is the one the patch was written against (UPSTREAM), and
each patch takes effect. An upgrade of NeMo or the runpod SDK that changes one fails here, not
silently in production."""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect

import pytest

from parakeet_worker import patches


def upstream_digest(module: str, qualified: str) -> str:
    """The source of `qualified` as written in `module`'s file (read from disk: a patch applied
    in this process does not hide it), hashed as UPSTREAM records it."""
    path = inspect.getsourcefile(importlib.import_module(module))
    assert path is not None
    text = open(path, encoding="utf-8").read()
    nodes, node = ast.parse(text).body, None
    for part in qualified.split("."):
        node = next(n for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                    and n.name == part)  # fmt: skip
        nodes = node.body
    return hashlib.sha256((ast.get_source_segment(text, node) or "").encode()).hexdigest()[:16]


@pytest.mark.parametrize("patch", sorted(patches.UPSTREAM))
def test_upstream_code_is_what_the_patch_was_written_for(patch):
    module, qualified, digest = patches.UPSTREAM[patch]
    assert upstream_digest(module, qualified) == digest, (
        f"{module}.{qualified} changed upstream: re-read it and update or drop the patch {patch}"
    )


def test_the_patches_take_effect():
    from nemo.collections.asr.parts.submodules.transducer_decoding import tdt_label_looping
    from runpod.serverless.modules import rp_logger, rp_scale

    assert patches.fix_tdt_durations() is True
    assert getattr(tdt_label_looping.GreedyBatchedTDTLabelLoopingComputer.torch_impl, "_durations_fixed", False)
    patches.redact_sdk_log()
    assert getattr(rp_logger.RunPodLogger.log, "redacts", False)
    patches.limit_job_takes()
    assert getattr(rp_scale.get_job, "_take_max", False)
    patches.finish_taken_jobs()
    assert getattr(rp_scale.JobScaler.run_jobs, "drains", False)
    patches.finish_taken_jobs()  # idempotent: applied once however often it is called
    assert getattr(rp_scale.JobScaler.run_jobs, "drains", False)


def test_the_sdk_logger_prints_redacted_lines(capsys):
    from runpod.serverless.modules.rp_logger import RunPodLogger

    patches.redact_sdk_log()
    RunPodLogger().info("fetching https://user:secret@bucket.example/a.wav?X-Amz-Signature=abc")
    out = capsys.readouterr().out
    assert "https://***@bucket.example/a.wav?***" in out and "secret" not in out and "abc" not in out, out
