"""Job dirs left by a dead worker are removed by the next worker's start; a live worker's dir, a
dir from another host and a dir that names no owner are not (parakeet_worker.jobdirs). The owners
are real processes, killed with SIGKILL as the kernel's OOM killer kills a worker."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from parakeet_worker.audio import jobdirs
from parakeet_worker.audio.jobdirs import LOCK_NAME, JobDirs, Owner, sweep, this_process
from tools.testkit import FakeRunpodQueue, LocalServer, loopback_only_env, start_worker, wait_for

REPO = Path(__file__).resolve().parent.parent
OWNER_SCRIPT = str(REPO / "tests" / "jobdir_owner.py")
NEEDS_PROC = pytest.mark.skipif(not this_process().boot_id, reason="needs Linux /proc (boot id, pid namespaces)")


class Owners:
    """Owner processes started by a test; every one still running is killed at its end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, root: Path, *, name: str | None = None, prefix: tuple[str, ...] = ()) -> tuple[subprocess.Popen, Path]:
        args = [*prefix, sys.executable, OWNER_SCRIPT, str(root), *([name] if name else [])]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        line = proc.stdout.readline().strip()
        if not line:
            proc.kill()
            raise RuntimeError(f"the owner did not start: {proc.stderr.read()[-500:]}")
        return proc, Path(line)

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL the owner itself: the process we started, or (under unshare) its child, after
        which unshare exits too: once it is reaped the owner is gone and its lock with it."""
        pid = proc.pid
        while True:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            if not children:
                break
            pid = int(children[0])
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc)
            proc.stdout.close()
            proc.stderr.close()


@pytest.fixture
def owners() -> Iterator[Owners]:
    o = Owners()
    yield o
    o.close()


@NEEDS_PROC
def test_a_killed_workers_dir_goes_and_a_live_workers_stays(tmp_path, owners):
    root = tmp_path / "tmp"
    killed, killed_dir = owners.start(root)
    live, live_dir = owners.start(root)
    assert Owner.of_dir(killed_dir.name) == Owner(this_process().boot_id, this_process().pidns, killed.pid,
                                                  Owner.of_dir(killed_dir.name).start)  # fmt: skip
    owners.kill(killed)
    assert (killed_dir / "0.wav").is_file()  # the kernel kill left it behind

    assert sweep(root) == [killed_dir]
    assert not killed_dir.exists()
    assert (live_dir / "0.wav").is_file() and (live_dir / LOCK_NAME).is_file()
    assert sweep(root) == []  # a second start finds nothing more to do

    owners.kill(live)
    assert sweep(root) == [live_dir]
    assert list(root.iterdir()) == []


def other_pidns_prefix() -> tuple[str, ...] | None:
    """A command prefix that runs its process in a new pid namespace (a container restarted on
    the same host), or None where this machine does not allow one."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for extra in ((), ("--user", "--map-root-user")):
        prefix = (unshare, *extra, "--pid", "--fork", "--mount-proc")
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0
        if ok:
            return prefix
    return None


@NEEDS_PROC
def test_an_owner_in_another_pid_namespace_is_judged_by_its_lock(tmp_path, owners):
    """Its pid means nothing here: the dir goes once the owner's lock is free, not before."""
    prefix = other_pidns_prefix()
    if prefix is None:
        pytest.skip("unshare cannot make a pid namespace on this machine")
    root = tmp_path / "tmp"
    proc, folder = owners.start(root, prefix=prefix)
    owner = Owner.of_dir(folder.name)
    assert owner.pidns != this_process().pidns and owner.boot_id == this_process().boot_id
    assert sweep(root) == []
    assert (folder / "0.wav").is_file()
    owners.kill(proc)
    assert sweep(root) == [folder]


@NEEDS_PROC
def test_the_lock_decides_for_another_namespace_also_without_unshare(tmp_path, owners):
    """The same proof where no namespace can be made: a dir whose name records another pid
    namespace of this kernel, its lock held by a real process, then that process killed."""
    me = this_process()
    name = f"job-{me.boot_id}-{me.pidns + 1}-7-12345-abcd"
    proc, folder = owners.start(tmp_path, name=name)
    assert sweep(tmp_path) == []
    owners.kill(proc)
    assert sweep(tmp_path) == [folder]


@NEEDS_PROC
def test_dirs_that_cannot_be_proven_dead_stay(tmp_path):
    me = this_process()
    other_boot = "0" * 32 if me.boot_id != "0" * 32 else "1" * 32
    keep = [
        f"job-{other_boot}-{me.pidns}-1-1-aaaa",  # another host (or before a reboot), lock free or not
        f"job-{me.boot_id}-{me.pidns + 1}-1-1-bbbb",  # another namespace, no lock file: unprovable
        "job-x1y2z3w4",  # an older worker's name: no owner recorded
        "uploads",
    ]
    for name in keep:
        (tmp_path / name).mkdir()
        (tmp_path / name / "0.wav").write_bytes(b"x")
    (tmp_path / keep[0] / LOCK_NAME).write_bytes(b"")
    dead = tmp_path / f"job-{me.boot_id}-{me.pidns}-{me.pid}-{me.start + 1}-cccc"  # this pid, reused: its owner is gone
    dead.mkdir()
    assert sweep(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


@NEEDS_PROC
def test_a_dir_of_this_process_holds_its_lock_until_removed(tmp_path):
    dirs = JobDirs()
    folder = dirs.make(tmp_path / "root")
    assert Owner.of_dir(folder.name) == this_process()
    assert not jobdirs._lock_is_free(folder / LOCK_NAME)  # another open file cannot take it
    assert sweep(tmp_path / "root") == []
    assert dirs.held() == [folder]
    assert dirs.remove(folder) and not folder.exists() and dirs.held() == []
    assert list((tmp_path / "root").iterdir()) == []


def test_a_dir_that_cannot_be_removed_keeps_its_lock(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root removes from a read-only dir")
    dirs = JobDirs()
    root = tmp_path / "root"
    folder = dirs.make(root)
    root.chmod(0o500)
    try:
        assert not dirs.remove(folder) and dirs.held() == [folder]
    finally:
        root.chmod(0o700)
    assert dirs.remove(folder) and dirs.held() == []


def test_a_missing_root_is_no_error(tmp_path):
    assert sweep(tmp_path / "never-made") == []


# ---------------------------------------------------------------------------------------------
# Through real workers: `python handler.py` on the SDK's loop, killed as the OOM killer kills
# ---------------------------------------------------------------------------------------------


class QueueWorker:
    """A dry-run worker (SKIP_MODEL_LOAD=1: no model, the rest real) polling its own fake queue."""

    def __init__(self, tmp: Path, root: Path, name: str):
        self.queue = FakeRunpodQueue()
        env = {**loopback_only_env(), "WORKER_TMP_DIR": str(root), "SKIP_MODEL_LOAD": "1", "LOG_LEVEL": "INFO"}
        self.proc = start_worker(self.queue, env, tmp / f"{name}.log")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.queue.close()


def job_dirs(root: Path) -> set[Path]:
    return {p for p in root.glob("job-*") if p.is_dir()} if root.exists() else set()


@NEEDS_PROC
def test_a_worker_killed_mid_job_leaves_a_dir_the_next_start_removes(tmp_path):
    """Worker B runs a job (its download trickles). Worker A starts (B's dir stays), takes a job
    and is killed (SIGKILL) in the middle of it: its job dir stays behind. Worker C starts: by
    the time it asks for jobs, A's dir is gone and B's is still there, B still running."""
    root = tmp_path / "worker-tmp"
    workers: list[QueueWorker] = []
    with LocalServer() as server:
        trickle = {"inputs": [{"source": f"{server.url}/trickle-forever/long.wav"}]}
        try:
            b = QueueWorker(tmp_path, root, "b")
            workers.append(b)
            b.queue.wait_taken([b.queue.add(trickle)])
            wait_for(lambda: len(job_dirs(root)) == 1, 60, "worker B's job dir")
            (live,) = job_dirs(root)

            a = QueueWorker(tmp_path, root, "a")
            workers.append(a)
            a.queue.wait_taken([a.queue.add(trickle)])
            wait_for(lambda: len(job_dirs(root)) == 2, 60, "worker A's job dir")
            (killed,) = job_dirs(root) - {live}
            a.proc.kill()
            a.proc.wait()
            assert killed.is_dir()  # what the OOM killer leaves behind

            c = QueueWorker(tmp_path, root, "c")
            workers.append(c)
            c.queue.wait_open_take()  # C has started: dead workers' dirs are swept before the SDK polls
            assert job_dirs(root) == {live}
            assert (live / LOCK_NAME).is_file() and b.proc.poll() is None
        finally:
            for w in workers:
                w.close()
