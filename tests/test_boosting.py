"""Batch neighbours and NeMo 3.0's TDT durations: with the worker's fix, a clip's word timestamps
are the same alone and batched."""

from __future__ import annotations

from conftest import run_job, run_together, speech_file


def solo(worker, source: str) -> dict:
    """One clip alone in its job and its batch, with no boosting anywhere: the reference."""
    return run_job(worker, [{"source": source}], timestamps=True)["results"][0]


def test_word_ends_do_not_depend_on_batch_neighbours(worker, monkeypatch):
    """NeMo 3.0's stale TDT durations (patched by the worker, see _fix_tdt_durations) moved the
    end of "no" from 0.56 to 0.64 s when "four two stop" shared its batch, and "two"'s end the
    other way; with the fix each clip's timestamps are the same alone and batched."""
    assert worker._STATE["durations_fixed"] is True
    assert getattr(type(worker._MODEL.decoding.decoding.decoding_computer).torch_impl, "_durations_fixed", False)
    a, b = str(speech_file("yes no", "wav")), str(speech_file("four two stop", "wav"))
    alone = [solo(worker, a), solo(worker, b)]
    jobs = [{"id": f"j{n}", "input": {"inputs": [{"source": s}], "timestamps": True}} for n, s in enumerate((a, b))]
    together = [out["results"][0] for out in run_together(worker, monkeypatch, jobs, ready_units=2)]
    assert together == alone
