"""The memory model (parakeet_worker.memory): what the worker can use, read from real /proc and
cgroup files and from sample cgroup trees; the cost of a pass, fitted to passes of the demo model
measured here; and the plans made from both (attention mode, rows of a batch, piece length)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from parakeet_worker import memory
from parakeet_worker.memory import FULL, LOCAL, GiB, MiB, PassCost, Probe
from tools.testkit import cgroup_tree as tree

# ---------------------------------------------------------------------------------------------
# What the worker can use
# ---------------------------------------------------------------------------------------------


G, M = GiB, MiB


@pytest.mark.parametrize(
    ("files", "self_cgroup", "expected"),
    [
        # v2: the limit less what is in use, the inactive page cache not counted
        ({"memory.max": f"{4 * G}\n", "memory.current": f"{G}\n", "memory.stat": f"anon 1\ninactive_file {256 * M}\n"},
         "0::/\n", [4 * G - (G - 256 * M)]),
        ({"memory.max": "max\n", "memory.current": f"{G}\n"}, "0::/\n", []),  # v2, no limit
        ({"memory.max": "max\n", "memory.high": f"{2 * G}\n", "memory.current": f"{G}\n"}, "0::/\n", [G]),
        (  # v2 outside a cgroup namespace: the process's cgroup and its ancestors
            {"kubepods/memory.max": f"{3 * G}\n", "kubepods/memory.current": f"{2 * G}\n",
             "kubepods/pod7/c1/memory.max": f"{8 * G}\n", "kubepods/pod7/c1/memory.current": f"{G}\n"},
            "0::/kubepods/pod7/c1\n", [G, 7 * G],
        ),
        # v1: memory.limit_in_bytes less usage, total_inactive_file not counted
        ({"memory/memory.limit_in_bytes": f"{2 * G}\n", "memory/memory.usage_in_bytes": f"{512 * M}\n",
          "memory/memory.stat": f"cache 9\ntotal_inactive_file {100 * M}\n"}, "4:memory:/\n", [2 * G - 412 * M]),
        ({"memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "5\n"},
         "4:memory:/\n", []),  # v1, no limit
        (  # v1 with the host's hierarchy mounted: the process's own cgroup under it
            {"memory/docker/abc/memory.limit_in_bytes": f"{G}\n", "memory/docker/abc/memory.usage_in_bytes": f"{G // 4}\n",
             "memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": f"{9 * G}\n"},
            "4:memory:/docker/abc\n", [3 * G // 4],
        ),
        ({}, "", []),
        ({"memory.max": "garbage\n", "memory.current": "1\n"}, "0::/\n", []),
    ],
)  # fmt: skip
def test_room_under_cgroup_limits(tmp_path, files, self_cgroup, expected):
    root, me = tree(tmp_path, files, self_cgroup)
    assert sorted(memory.cgroup_limits(root, me).values()) == sorted(expected)


def test_the_tightest_reading_bounds_the_headroom(tmp_path):
    root, me = tree(tmp_path, {"memory.max": f"{4 * G}\n", "memory.current": f"{3 * G}\n"})
    (tmp_path / "meminfo").write_text("MemTotal: 9000000 kB\nMemAvailable: 2097152 kB\n")
    (tmp_path / "status").write_text("Name: x\nVmRSS:\t  524288 kB\n")
    room = memory.cpu_headroom(None, root, me, tmp_path / "meminfo", tmp_path / "status")
    assert (room.free, room.source) == (G, f"cgroup v2 memory.max at {root}")
    assert room.readings["MemAvailable"] == 2 * G
    budget = memory.cpu_headroom(G, root, me, tmp_path / "meminfo", tmp_path / "status")  # the worker may hold 1 GB
    assert (budget.free, budget.source) == (G // 2, "WORKER_MEMORY_BUDGET_BYTES less the worker's RSS")
    nothing = memory.cpu_headroom(None, tmp_path / "none", tmp_path / "none", tmp_path / "none", tmp_path / "none")
    assert nothing.free is None


def test_real_proc_files():
    """This machine's own files: MemAvailable within MemTotal, this process's RSS, and a budget
    just over that RSS leaving about its excess free."""
    text = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    if "MemAvailable" not in text:
        pytest.skip("no /proc/meminfo")
    total = int(next(line for line in text.splitlines() if line.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 < memory.mem_available() <= total
    rss = memory.process_rss()
    assert 10 * M < rss < total
    room = memory.cpu_headroom(rss + 200 * M)
    assert room.source == "WORKER_MEMORY_BUDGET_BYTES less the worker's RSS"
    assert 100 * M < room.free <= 200 * M
    assert set(room.readings) >= {"MemAvailable", room.source}


def test_real_cgroup_files():
    """Every memory limit this machine sets on this process (if any) is read, and each room is
    at most its limit."""
    rooms = memory.cgroup_limits()
    for source, room in rooms.items():
        limit_file = Path(source.split(" at ")[1]) / source.split()[2]
        assert room <= int(limit_file.read_text())
    assert memory.cpu_headroom().free <= min(rooms.values(), default=math.inf)


# ---------------------------------------------------------------------------------------------
# The cost of a pass
# ---------------------------------------------------------------------------------------------

COST = PassCost(full_fixed=20 * M, full_per_sec=1 * M, full_per_sec2=0.02 * M, local_fixed=50 * M,
                local_per_sec=1.5 * M, margin=0.25)  # fmt: skip


def test_fit_recovers_the_terms_of_measured_passes():
    probes = [Probe(s, r, m, round(COST.raw(s, r, m))) for s, r, m in memory.DEFAULT_PROBES]
    fitted = memory.fit(probes, margin=0.25)
    assert fitted.allowance == memory.PASS_ALLOWANCE  # the decoder and rows, on top of what probes see
    for s, rows, mode in [(600, 1, FULL), (60, 8, FULL), (3600, 1, LOCAL)]:
        assert fitted.raw(s, rows, mode) - fitted.allowance == pytest.approx(COST.raw(s, rows, mode), rel=1e-6)


def test_fit_drops_terms_the_data_does_not_support():
    """Passes whose cost falls with the length would fit a negative term: it is dropped, and no
    prediction is ever below zero."""
    probes = [Probe(10, 1, FULL, 100 * M), Probe(20, 1, FULL, 90 * M), Probe(40, 1, FULL, 95 * M)]
    fitted = memory.fit(probes)
    assert min(fitted.full_fixed, fitted.full_per_sec, fitted.full_per_sec2) >= 0
    assert fitted.local_per_sec == fitted.full_per_sec  # no local probes: local costs what full's linear part does


def test_longest_and_max_rows_invert_peak():
    for free in (300 * M, 2 * G, 40 * G):
        for mode in (FULL, LOCAL):
            t = COST.longest(free, mode)
            assert COST.peak(t * 0.999, 1, mode) <= free < COST.peak(t * 1.01 + 1, 1, mode)
        rows = COST.max_rows(30, free, FULL)
        assert COST.peak(30, rows, FULL) <= free < COST.peak(30, rows + 1, FULL)
    assert COST.longest(10 * M, FULL) == 0 and COST.max_rows(30, 10 * M, FULL) == 0


# ---------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------


def test_full_attention_where_it_fits():
    plan = memory.plan_pass(COST, [120.0], 10 * G, local_after_sec=1440)
    assert (plan.mode, plan.rows, plan.fits) == (FULL, 1, True)
    assert plan.predicted == COST.peak(120, 1, FULL)
    assert "full attention" in plan.line() and "fits" in plan.line()


def test_local_attention_when_full_does_not_fit_or_past_the_cap():
    long = 1260.0  # 21 minutes of speech: full attention ~40 GB here, local ~2.4 GB
    plan = memory.plan_pass(COST, [long], 8 * G, local_after_sec=1440)
    assert (plan.mode, plan.rows, plan.fits) == (LOCAL, 1, True)
    assert "full attention would need" in plan.why
    capped = memory.plan_pass(COST, [600.0], 1000 * G, local_after_sec=300)  # the user's cap still holds
    assert capped.mode == LOCAL and "LOCAL_ATTENTION_AFTER_SEC=300" in capped.why


def test_a_batch_that_does_not_fit_runs_its_shortest_rows():
    durations = [30.0, 10.0, 20.0, 40.0, 25.0]
    free = COST.peak(25.0, 3, FULL)
    plan = memory.plan_pass(COST, durations, free, local_after_sec=1440)
    assert (plan.mode, plan.rows, plan.seconds) == (FULL, 3, 25.0)
    assert "2 longer row(s) wait" in plan.why


def test_nothing_fits():
    plan = memory.plan_pass(COST, [600.0], 100 * M, local_after_sec=1440)
    assert not plan.fits and plan.predicted > 100 * M


def test_without_a_model_the_config_decides():
    assert memory.plan_pass(None, [2000.0], 1 * M, 1440).mode == LOCAL
    assert memory.plan_pass(COST, [60.0, 30.0], None, 1440).rows == 2


def test_limits_are_capped_by_the_config():
    room = memory.Headroom("cpu", 4 * G, "test")
    lim = memory.limits(COST, room, local_after_sec=1440, max_single_pass_sec=1800, piece_min_sec=60)
    assert lim.full_sec == pytest.approx(COST.longest(4 * G, FULL)) and lim.full_sec < 1440
    assert lim.piece_sec == 1800  # local attention fits far more: the user's piece length holds
    small = memory.limits(COST, memory.Headroom("cpu", 500 * M, "test"), 1440, 1800, 60)
    assert 60 < small.piece_sec < 1800 and COST.peak(small.piece_sec * 0.999, 1, LOCAL) <= 500 * M
    floor = memory.limits(COST, memory.Headroom("cpu", 60 * M, "test"), 1440, 1800, 60)
    assert floor.piece_sec == 60 and floor.full_sec < 60
