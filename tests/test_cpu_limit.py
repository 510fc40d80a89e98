"""PREPARE_WORKERS defaults to the CPUs the container may use (cgroup quota, affinity mask), not
os.cpu_count(), the host's count. The parsing is checked on sample cgroup trees."""

from __future__ import annotations

import os

import pytest

from parakeet_worker import config as settings
from tools.testkit import cgroup_tree as tree


@pytest.mark.parametrize(
    ("files", "self_cgroup", "affinity", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, "0::/\n", 64, 2),  # v2: 1.5 CPUs -> 2 ffmpeg processes
        ({"cpu.max": "400000 100000\n"}, "0::/\n", 64, 4),
        ({"cpu.max": "max 100000\n"}, "0::/\n", 3, 3),  # v2, no quota: the affinity mask
        ({"cpu.max": "800000 100000\n"}, "0::/\n", 2, 2),  # the mask is tighter than the quota
        ({"cpu.max": "25000 100000\n"}, "0::/\n", 16, 1),  # a quarter CPU still gets one
        (  # v2 outside a cgroup namespace: this process's cgroup and its ancestors, the tightest
            {"kubepods/cpu.max": "300000 100000\n", "kubepods/pod7/c1/cpu.max": "max 100000\n"},
            "0::/kubepods/pod7/c1\n", 96, 3,
        ),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
         "4:cpu,cpuacct:/\n", 128, 2),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "4:cpu,cpuacct:/\n", 6, 6),  # v1, none
        (  # v1 with the host's hierarchy mounted: the process's own cgroup under it
            {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n",
             "cpu/docker/abc/cpu.cfs_quota_us": "350000\n", "cpu/docker/abc/cpu.cfs_period_us": "100000\n"},
            "12:cpu,cpuacct:/docker/abc\n", 64, 4,
        ),
        ({}, "", 5, 5),  # no cgroup files at all
        ({"cpu.max": "garbage\n"}, "0::/\n", 7, 7),  # unreadable: ignored
    ],
)  # fmt: skip
def test_cpu_limit_from_cgroup_files(worker, tmp_path, files, self_cgroup, affinity, expected):
    root, me = tree(tmp_path, files, self_cgroup)
    assert settings.cpu_limit(root, me, affinity=affinity) == expected


def test_prepare_workers_defaults_to_the_cpu_limit(worker, monkeypatch):
    """The default is the container's limit (on this machine, its affinity mask and any quota);
    PREPARE_WORKERS still overrides it."""
    monkeypatch.delenv("PREPARE_WORKERS", raising=False)
    default = settings.Config.from_env().prepare_workers
    assert default == settings.cpu_limit() <= len(os.sched_getaffinity(0))
    monkeypatch.setenv("PREPARE_WORKERS", "3")
    assert settings.Config.from_env().prepare_workers == 3
