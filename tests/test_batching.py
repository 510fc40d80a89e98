"""Bucketing and batch packing: every limit holds, edge cases included (no model needed)."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

import handler
from handler import SAMPLE_RATE, Prepared, _bucketize_by_duration, _make_batches, _padding_efficiency

CFG = dataclasses.replace(
    handler.CFG, short_max_sec=600, batch_max_items=16, batch_max_total_sec=1200, local_attention_after_sec=1440
)


def items(*durations: float) -> list[Prepared]:
    return [Prepared(i, f"item{i}", Path("unused.wav"), round(d * SAMPLE_RATE)) for i, d in enumerate(durations)]


def check_limits(batches: list[list[Prepared]], given: list[Prepared], cfg=CFG) -> None:
    flat = [p.index for b in batches for p in b]
    assert sorted(flat) == sorted(p.index for p in given), "every item in exactly one batch"
    for batch in batches:
        assert 1 <= len(batch) <= cfg.batch_max_items
        if len(batch) > 1:
            assert sum(p.duration for p in batch) <= cfg.batch_max_total_sec + 1e-9


def test_bucketize_boundaries():
    got = _bucketize_by_duration(items(1, 600, 600.001, 1440, 1440.001, 7200), CFG)
    assert [p.index for p in got["short"]] == [0, 1]
    assert [p.index for p in got["long"]] == [2, 3]
    assert [p.index for p in got["local"]] == [4, 5]


def test_bucketize_empty_and_sorted():
    assert _bucketize_by_duration([], CFG) == {"short": [], "long": [], "local": []}
    got = _bucketize_by_duration(items(30, 5, 12), CFG)
    assert [p.duration for p in got["short"]] == pytest.approx([5, 12, 30])


def test_make_batches_empty():
    assert _make_batches([], CFG) == []


def test_item_count_limit_exactly_at_limit():
    batch_items = items(*[10.0] * 16)
    batches = _make_batches(batch_items, CFG)
    assert [len(b) for b in batches] == [16]
    seventeen = items(*[10.0] * 17)
    batches = _make_batches(seventeen, CFG)
    assert len(batches) == 2
    check_limits(batches, seventeen)


def test_total_seconds_limit_exactly_at_limit():
    cfg = dataclasses.replace(CFG, batch_overhead_sec=1000)  # make batching as eager as allowed
    exact = items(*[300.0] * 4)  # 1200 s: exactly the budget, one batch
    assert [len(b) for b in _make_batches(exact, cfg)] == [4]
    over = items(*[300.0] * 4, 0.5)  # 1200.5 s: must split
    batches = _make_batches(over, cfg)
    assert len(batches) == 2
    check_limits(batches, over, cfg)


def test_item_bigger_than_budget_goes_alone():
    cfg = dataclasses.replace(CFG, batch_max_total_sec=100, batch_overhead_sec=1000)
    given = items(5, 150, 7)
    batches = _make_batches(given, cfg)
    check_limits(batches, given, cfg)
    alone = [b for b in batches if any(p.duration == 150 for p in b)]
    assert len(alone) == 1 and len(alone[0]) == 1


def test_sorted_packing_keeps_padding_low():
    rng = random.Random(7)
    durations = [rng.uniform(1, 600) for _ in range(60)]
    given = items(*durations)
    batches = _make_batches(given, CFG)
    check_limits(batches, given)
    assert _padding_efficiency(batches) >= 0.9
    # and it beats chunking the unsorted list into full batches
    naive = [given[i : i + 16] for i in range(0, len(given), 16)]
    assert _padding_efficiency(batches) > _padding_efficiency(naive)


def test_many_short_clips_share_batches():
    given = items(*[2.0 + 0.01 * i for i in range(40)])
    batches = _make_batches(given, CFG)
    check_limits(batches, given)
    assert len(batches) == 3  # 40 clips, at most 16 a batch


@pytest.mark.parametrize("seed", range(5))
def test_random_workloads_obey_all_limits(seed):
    rng = random.Random(seed)
    cfg = dataclasses.replace(
        CFG, batch_max_items=rng.randint(1, 8), batch_max_total_sec=rng.uniform(20, 200), batch_overhead_sec=rng.uniform(0, 50)
    )
    given = items(*[rng.uniform(0.1, 120) for _ in range(rng.randint(0, 50))])
    check_limits(_make_batches(given, cfg), given, cfg)


@pytest.mark.parametrize("order", ["input", "largest_first", "smallest_first", "shuffled"])
def test_streaming_packs_as_well_as_packing_at_the_end(monkeypatch, order):
    """transcribe_batched() starts batches while items still arrive; whatever the arrival order
    (the decoder hands out the costliest files first), the batches stay as few and as full as
    packing everything at the end would make them (dry run: model None)."""
    monkeypatch.setattr(handler, "CFG", CFG)
    rng = random.Random(3)
    given = items(*[rng.uniform(300, 600) for _ in range(8)], *[rng.uniform(1, 30) for _ in range(40)])
    arrival = {
        "input": given,
        "largest_first": sorted(given, key=lambda p: -p.frames),
        "smallest_first": sorted(given, key=lambda p: p.frames),
        "shuffled": rng.sample(given, len(given)),
    }[order]
    results, batches = handler.transcribe_batched(None, iter(arrival), timestamps=False)
    assert sorted(results) == [p.index for p in given]
    check_limits(batches, given)
    at_end = _make_batches(given, CFG)
    assert len(batches) <= len(at_end) + 2, [len(b) for b in batches]
    assert _padding_efficiency(batches) >= _padding_efficiency(at_end) - 0.02


def test_a_failure_outside_the_model_costs_only_its_batch(monkeypatch, tmp_path):
    """An item whose audio vanished before it was split (the cut search reads the file) gets
    an internal_error; the job goes on and the other items still come back (dry run)."""
    monkeypatch.setattr(handler, "CFG", dataclasses.replace(CFG, short_max_sec=5, max_single_pass_sec=10))
    gone = Prepared(0, "gone", tmp_path / "gone.wav", 30 * SAMPLE_RATE)
    fine = Prepared(1, "fine", tmp_path / "fine.wav", 2 * SAMPLE_RATE)
    results, batches = handler.transcribe_batched(None, iter([gone, fine]), timestamps=False)
    assert isinstance(results[0], handler.ItemError) and results[0].code == "internal_error"
    assert "gone.wav" in results[0].message, results[0].message
    assert results[1].text == handler.DRY_RUN_TEXT
    assert len(batches) == 2
