"""Bucketing, batch packing and the scheduler's plan: every limit holds, edge cases included,
and the plan is fair and keeps attention switches rare (pure functions: no model, no disk)."""

from __future__ import annotations

import dataclasses
import itertools
import random
from pathlib import Path

import pytest

from handler import _bucketize_by_duration, _make_batches, _padding_efficiency, _plan_next
from parakeet_worker import config as settings
from parakeet_worker.config import SAMPLE_RATE
from parakeet_worker.fairshare import FairShare
from parakeet_worker.scheduler import Unit
from parakeet_worker.transcript import Prepared

CFG = dataclasses.replace(  # the config's limits alone: memory-aware plans are tests/test_memory_plans.py's
    settings.CFG, short_max_sec=600, batch_max_items=16, batch_max_total_sec=1200, local_attention_after_sec=1440,
    memory_planning=False,
)


@pytest.fixture(autouse=True)
def use(monkeypatch):
    """The planning functions read the worker's one config, CFG: each test sets its own."""
    monkeypatch.setattr(settings, "CFG", CFG)

    def apply(**changes):
        monkeypatch.setattr(settings, "CFG", dataclasses.replace(CFG, **changes))

    return apply


def items(*durations: float) -> list[Prepared]:
    return [Prepared(i, f"item{i}", Path("unused.wav"), round(d * SAMPLE_RATE)) for i, d in enumerate(durations)]


def check_limits(batches, given) -> None:
    cfg = settings.CFG
    flat = [p.index for b in batches for p in b]
    assert sorted(flat) == sorted(p.index for p in given), "every item in exactly one batch"
    for batch in batches:
        assert 1 <= len(batch) <= cfg.batch_max_items
        if len(batch) > 1:
            assert sum(p.duration for p in batch) <= cfg.batch_max_total_sec + 1e-9


def test_bucketize_boundaries():
    got = _bucketize_by_duration(items(1, 600, 600.001, 1440, 1440.001, 7200))
    assert [p.index for p in got["short"]] == [0, 1]
    assert [p.index for p in got["long"]] == [2, 3]
    assert [p.index for p in got["local"]] == [4, 5]


def test_bucketize_empty_and_sorted():
    assert _bucketize_by_duration([]) == {"short": [], "long": [], "local": []}
    got = _bucketize_by_duration(items(30, 5, 12))
    assert [p.duration for p in got["short"]] == pytest.approx([5, 12, 30])


def test_make_batches_empty():
    assert _make_batches([]) == []


def test_item_count_limit_exactly_at_limit():
    batch_items = items(*[10.0] * 16)
    batches = _make_batches(batch_items)
    assert [len(b) for b in batches] == [16]
    seventeen = items(*[10.0] * 17)
    batches = _make_batches(seventeen)
    assert len(batches) == 2
    check_limits(batches, seventeen)


def test_total_seconds_limit_exactly_at_limit(use):
    use(batch_overhead_sec=1000)  # make batching as eager as allowed
    exact = items(*[300.0] * 4)  # 1200 s: exactly the budget, one batch
    assert [len(b) for b in _make_batches(exact)] == [4]
    over = items(*[300.0] * 4, 0.5)  # 1200.5 s: must split
    batches = _make_batches(over)
    assert len(batches) == 2
    check_limits(batches, over)


def test_item_bigger_than_budget_goes_alone(use):
    use(batch_max_total_sec=100, batch_overhead_sec=1000)
    given = items(5, 150, 7)
    batches = _make_batches(given)
    check_limits(batches, given)
    alone = [b for b in batches if any(p.duration == 150 for p in b)]
    assert len(alone) == 1 and len(alone[0]) == 1


def test_sorted_packing_keeps_padding_low():
    rng = random.Random(7)
    durations = [rng.uniform(1, 600) for _ in range(60)]
    given = items(*durations)
    batches = _make_batches(given)
    check_limits(batches, given)
    assert _padding_efficiency(batches) >= 0.9
    # and it beats chunking the unsorted list into full batches
    naive = [given[i : i + 16] for i in range(0, len(given), 16)]
    assert _padding_efficiency(batches) > _padding_efficiency(naive)


def test_many_short_clips_share_batches():
    given = items(*[2.0 + 0.01 * i for i in range(40)])
    batches = _make_batches(given)
    check_limits(batches, given)
    assert len(batches) == 3  # 40 clips, at most 16 a batch


@pytest.mark.parametrize("seed", range(5))
def test_random_workloads_obey_all_limits(use, seed):
    rng = random.Random(seed)
    use(batch_max_items=rng.randint(1, 8), batch_max_total_sec=rng.uniform(20, 200), batch_overhead_sec=rng.uniform(0, 50))
    given = items(*[rng.uniform(0.1, 120) for _ in range(rng.randint(0, 50))])
    check_limits(_make_batches(given), given)


# --- the scheduler's plan: ready units from every job in, the next batch out -------------------


def units(*durations: float, job: str = "job", first_seq: int = 0) -> list[Unit]:
    return [
        Unit(Prepared(i, f"{job}-{i}", Path("unused.wav"), round(d * SAMPLE_RATE)), job=job, seq=first_seq + i)
        for i, d in enumerate(durations)
    ]


def test_a_lone_clip_runs_at_once():
    (clip,) = units(3.0)
    assert _plan_next([clip], local_mode=False) == [clip]
    assert _plan_next([], local_mode=False) == []


def test_clips_of_different_jobs_share_a_batch():
    ready = [u for n in range(20) for u in units(2.0 + n * 0.1, job=f"job{n}", first_seq=n)]
    batch = _plan_next(ready, local_mode=False)
    assert 8 <= len(batch) <= 16 and len({u.job for u in batch}) == len(batch)  # 20 clips: two batches of 10
    assert ready[0] in batch  # the oldest is always in the next batch


def test_all_ready_at_once_plans_what_packing_at_the_end_would():
    rng = random.Random(3)
    durations = [rng.uniform(1, 30) for _ in range(40)] + [rng.uniform(300, 600) for _ in range(8)]
    ready, planned = units(*durations), []
    while ready:
        batch = _plan_next(ready, local_mode=False)
        planned.append(sorted(u.seq for u in batch))
        ready = [u for u in ready if u not in batch]
    assert sorted(planned) == sorted(sorted(u.seq for u in b) for b in _make_batches(units(*durations)))


def test_long_units_run_alone_in_arrival_order_with_short_ones():
    long_first = units(900.0, 3.0, 4.0)  # the long unit came first: it runs first, alone
    assert _plan_next(long_first, local_mode=False) == [long_first[0]]
    short_first = units(3.0, 900.0, 4.0)  # a short unit came first: the short ones run together
    assert _plan_next(short_first, local_mode=False) == [short_first[0], short_first[2]]


def test_among_earlier_long_units_one_needing_no_switch_goes_first():
    ready = units(900.0, 2000.0, 5.0)  # long (full attention), local, short
    assert _plan_next(ready, local_mode=True) == [ready[1]]
    assert _plan_next(ready, local_mode=False) == [ready[0]]


def simulate(
    arrivals: list[tuple[float, Unit]], pieces: dict[str, list[float]] | None = None
) -> tuple[list[list[Unit]], int, dict[int, tuple[float, float]]]:
    """Drive _plan_next and FairShare as the Scheduler does: the model time of a batch is its
    padded audio seconds / 100; units arrive at their times (a unit that arrives while a batch
    runs waits for it); a split item sends its next piece when the previous one is done. Returns
    the batches run, the number of attention switches, and each unit's (arrival, done) time."""
    pieces = pieces or {}
    clock, seq, ready, ran, switches, local = 0.0, 0, [], [], 0, False
    fair, running, times = FairShare(), [], {}
    pending = sorted(arrivals, key=lambda a: a[0])
    while pending or ready:
        while pending and pending[0][0] <= clock:
            at, unit = pending.pop(0)
            seq += 1
            unit.seq = seq  # as _Scheduler.submit numbers arrivals
            fair.arrive(unit.job, any(u.job == unit.job for u in ready + running))
            ready.append(unit)
            times[id(unit)] = (at, 0.0)
        if not ready:
            clock = pending[0][0]
            continue
        batch = _plan_next(ready, local_mode=local, served=fair.served)
        fair.charge((u.job, u.duration) for u in batch)
        running = batch
        ready = [u for u in ready if u not in batch]
        wants_local = max(u.duration for u in batch) > settings.CFG.local_attention_after_sec
        switches += wants_local != local
        local = wants_local
        clock += len(batch) * max(u.duration for u in batch) / 100
        ran.append(batch)
        for unit in batch:
            times[id(unit)] = (times[id(unit)][0], clock)
            rest = pieces.get(unit.job)
            if rest:
                nxt = Unit(Prepared(0, unit.job, Path("unused.wav"), round(rest.pop(0) * SAMPLE_RATE)), job=unit.job)
                pending.append((clock, nxt))  # after the clips that came while this piece ran
                pending.sort(key=lambda a: a[0])
    return ran, switches, times


def clip_jobs(n: int, at: float, every: float, duration: float = 2.0, name: str = "clip") -> list[tuple[float, Unit]]:
    """`n` one-clip jobs, the first at `at`, one every `every` seconds."""
    return [(at + every * k, units(duration, job=f"{name}{k}")[0]) for k in range(n)]


def latency(times: dict[int, tuple[float, float]], arrivals: list[tuple[float, Unit]]) -> list[float]:
    return [times[id(u)][1] - times[id(u)][0] for _, u in arrivals]


def test_short_clips_run_between_the_pieces_of_a_split_item():
    """A 4-hour item in 3 local-attention pieces, and one short clip arriving every 2 s of model
    time from other jobs: every clip waits for at most one piece, and the mode switches at most
    twice per piece."""
    first = Unit(Prepared(0, "long", Path("unused.wav"), 5000 * SAMPLE_RATE), job="long", seq=0)
    arrivals = [(0.0, first)] + [(2.0 * n + 0.5, units(5.0, job=f"clip{n}", first_seq=n + 1)[0]) for n in range(80)]
    ran, switches, _ = simulate(arrivals, {"long": [5000.0, 4400.0]})
    order = [u.job for batch in ran for u in batch]
    assert sorted(order) == sorted(["long"] * 3 + [f"clip{n}" for n in range(80)])
    piece_at = [i for i, batch in enumerate(ran) if batch[0].job == "long"]
    assert len(piece_at) == 3 and piece_at[1] > piece_at[0] + 1  # clips ran between the pieces
    for batch in ran:
        assert len(batch) <= settings.CFG.batch_max_items
    assert switches <= 2 * 3




def test_clips_arriving_after_a_big_backlog_are_not_served_after_all_of_it():
    """A job of 500 short inputs, all ready; then 20 one-clip jobs arrive while its first batch
    runs. Every clip is answered within two batches of arriving (the bound in _plan_next),
    long before the backlog ends, and the backlog still runs in full batches."""
    backlog = [(0.0, u) for u in units(*[3.0 + 0.001 * i for i in range(500)], job="big")]
    clips = clip_jobs(20, at=0.1, every=0.02)
    ran, _, times = simulate(backlog + clips)
    batch_time = 16 * 3.5 / 100  # one full batch of the backlog
    alone = 2.0 / 100
    for lat in latency(times, clips):
        assert lat <= 2 * batch_time + alone, lat
    backlog_end = max(times[id(u)][1] for _, u in backlog)
    assert max(times[id(u)][1] for _, u in clips) < backlog_end / 5
    assert sum(len(b) for b in ran) == 520
    assert len(ran) <= 520 // 15 + 1  # batches stay (nearly) full


def test_a_job_with_a_big_backlog_still_progresses_under_a_stream_of_new_jobs():
    """New one-clip jobs start level with the job running now, not at zero: a stream of them
    cannot hold back an older job for ever."""
    backlog = [(0.0, u) for u in units(*[3.0] * 64, job="big")]
    clips = clip_jobs(400, at=0.0, every=0.03)
    _, _, times = simulate(backlog + clips)
    big_done = max(times[id(u)][1] for _, u in backlog)
    assert big_done < max(times[id(u)][1] for _, u in clips)  # done while the stream still flows


def test_a_flood_of_one_clip_jobs_still_fills_batches():
    """300 one-clip jobs, one every 2 ms of model time (more than it can take): batches stay full."""
    clips = clip_jobs(300, at=0.0, every=0.002, duration=1.5)
    for n, (_, unit) in enumerate(clips):
        unit.item = dataclasses.replace(unit.item, frames=round((1.0 + (n % 7) * 0.3) * SAMPLE_RATE))
    ran, _, times = simulate(clips)
    sizes = [len(b) for b in ran]
    assert sum(sizes) == 300
    assert sum(sizes) / len(sizes) >= 12, sizes
    # more arrive than the model can take, yet no clip is done later than one batch after every
    # clip that came before it (packing may put later clips first, fairness never far)
    done = [times[id(u)][1] for _, u in clips]
    longest_batch = 16 * 2.8 / 100
    for k, finished in enumerate(done[1:], start=1):
        assert finished <= max(done[:k]) + longest_batch + 1e-9


def test_clips_wait_for_at_most_one_piece_of_a_long_file():
    """A 3-hour item cut into 30-minute pieces (local attention) runs while one-clip jobs arrive
    every 2 s of model time: a clip waits for at most the piece that is running, plus its own
    batch."""
    first = Unit(Prepared(0, "long", Path("unused.wav"), 1800 * SAMPLE_RATE), job="long")
    clips = clip_jobs(60, at=0.5, every=2.0, duration=4.0)
    ran, _, times = simulate([(0.0, first), *clips], {"long": [1800.0] * 5})
    piece_time = 1800 / 100
    lats = latency(times, clips)
    assert max(lats) <= piece_time + 2 * 16 * 4.0 / 100, max(lats)
    pieces = [i for i, b in enumerate(ran) if b[0].job == "long"]
    assert len(pieces) == 6 and all(b - a > 1 for a, b in itertools.pairwise(pieces))  # clips in between
