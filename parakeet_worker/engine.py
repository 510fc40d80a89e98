"""Running a batch so that one bad item, an out-of-memory batch or a GPU fault costs as little
as it can: a failing batch is retried in halves, so only an item that fails alone gets an error;
a GPU fault (a CUDA context no later call survives) fails the batch and marks the worker
unhealthy, so Runpod replaces it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from parakeet_worker import errors
from parakeet_worker import model as asr
from parakeet_worker.analysis.boosting import Boost
from parakeet_worker.errors import ItemError
from parakeet_worker.transcript import Transcript

log = logging.getLogger("parakeet-worker")


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


# Errors after which a CUDA context is unusable: every later call on it fails the same way.
GPU_FAULT_MARKERS = (
    "illegal memory access", "device-side assert", "unspecified launch failure", "uncorrectable ecc",
    "illegal instruction", "misaligned address", "cuda driver error",
)  # fmt: skip


def _is_gpu_fault(exc: BaseException) -> bool:
    """A known sticky CUDA error, or any other CUDA-side error after which the device fails a
    one-element probe: either way no later batch can run on this worker."""
    if _is_oom(exc):
        return False
    text = str(exc).lower()
    if any(marker in text for marker in GPU_FAULT_MARKERS):
        return True
    if asr.state().device != "cuda" or not any(k in text for k in ("cuda", "cudnn", "cublas", "nccl")):
        return False
    import torch

    try:
        torch.ones(1, device="cuda").add_(1).item()
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - the probe failing is the answer
        return True
    return False


def gpu_fault_error() -> ItemError:
    return ItemError("gpu_failed", f"the GPU failed ({asr.state().gpu_fault}); this worker is being replaced")


def run_resilient(
    model: Any, audio: np.ndarray, lengths: list[int], timestamps: bool, boosts: Sequence[Boost | None] | None = None,
    prepare: asr.Prepare | None = None, scripts: Sequence[frozenset[str] | None] | None = None,
    scored: Sequence[bool] | None = None,
) -> list[Transcript | ItemError]:
    """Run a batch; if the model fails, retry its halves, so only an item that fails alone
    gets an error. A CUDA out-of-memory takes the same path, after emptying the cache. A GPU
    fault is not retried: it fails the batch and marks the worker sick (see _is_gpu_fault).
    `boosts`, `scripts` (one per row, or None) and `scored` (the rows that want confidence) are
    split with the rows."""
    if asr.state().gpu_fault:
        return [gpu_fault_error() for _ in lengths]
    boosts = list(boosts) if boosts is not None else [None] * len(lengths)
    scripts = list(scripts) if scripts is not None else [None] * len(lengths)
    scored = list(scored) if scored is not None else [False] * len(lengths)
    try:
        return list(asr.run_model(model, audio, lengths, timestamps, boosts, prepare, scripts, scored))
    except Exception as exc:
        if _is_gpu_fault(exc):
            log.error("GPU fault, asking Runpod to replace this worker: %s", errors.short(exc))
            asr.state().gpu_fault = f"{type(exc).__name__}: {errors.short(exc, 200)}"
            return [gpu_fault_error() for _ in lengths]
        if _is_oom(exc):
            import torch

            torch.cuda.empty_cache()
        if len(lengths) == 1:
            log.exception("transcription failed for one item")
            code = "out_of_memory" if _is_oom(exc) else "transcription_failed"
            return [ItemError(code, f"the model failed on this item: {type(exc).__name__}: {errors.short(exc)}")]
        log.warning("batch of %d failed (%s); retrying in halves", len(lengths), errors.short(exc, 120))
        half = len(lengths) // 2
        first, second = lengths[:half], lengths[half:]
        return run_resilient(
            model, audio[:half, : max(first)], first, timestamps, boosts[:half], prepare, scripts[:half], scored[:half]
        ) + run_resilient(
            model, audio[half:, : max(second)], second, timestamps, boosts[half:], prepare, scripts[half:], scored[half:]
        )


def model_failed_error() -> ItemError:
    return ItemError(
        "model_failed", f"the worker's model thread died ({asr.state().model_thread_died}); this worker is being replaced, retry the item"
    )
