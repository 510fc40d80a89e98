"""Job temp dirs that say who owns them, so the next worker can remove a dead worker's leftovers.

A worker killed by the kernel (out of memory, SIGKILL) cannot clean up: its job dirs (decoded
WAVs, uploads, tens of MB each) stay under WORKER_TMP_DIR for good. Every job dir made here
carries its owner twice:

- in its name, ``job-<boot id>-<pid namespace>-<pid>-<start ticks>-<random>``: written in the
  one mkdir, so no dir ever exists without an owner;
- as an exclusive ``flock`` that the owning process holds on ``<dir>/.owner`` while the dir is
  in use. The kernel drops the lock when the process dies, however it dies.

At start a worker removes the dirs whose owner is provably dead (:func:`sweep`):

- same kernel boot and same pid namespace: the pid is gone, or now belongs to a process that
  started at another time (pid reuse);
- same kernel boot, another pid namespace (a restarted container on the same host, with the same
  temp dir): its ``.owner`` lock can be taken, so no process holds it. Locks of processes on one
  kernel see each other, on a local disk and on a network mount alike;
- anything else is left alone: a dir made on another host (or before this host rebooted) on a
  shared network volume may belong to a live worker elsewhere, whose lock this kernel may not see;
  a dir in the old ``job-XXXXXXXX`` shape names no owner at all.

Pure stdlib; nothing runs at import. Linux only for the proofs (/proc); elsewhere nothing is
ever proven dead, so nothing is removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("parakeet-worker")

PREFIX = "job-"
LOCK_NAME = ".owner"  # in each job dir; upload and WAV names are <index>.src / .wav, never this
_NAME = re.compile(r"^job-([0-9a-f]{32})-(\d+)-(\d+)-(\d+)-[0-9a-z]+$")


@dataclass(frozen=True)
class Owner:
    """One process, named so that no other process on any host has the same name: the kernel's
    boot id (a random UUID per boot), the pid namespace's inode, the pid in that namespace, and
    the process's start time in clock ticks after boot (so a reused pid is a different owner)."""

    boot_id: str  # 32 hex digits, no dashes; "" where the kernel does not say
    pidns: int
    pid: int
    start: int

    @property
    def key(self) -> str:
        return f"{self.boot_id}-{self.pidns}-{self.pid}-{self.start}"

    @classmethod
    def of_dir(cls, name: str) -> Owner | None:
        """The owner a job dir's name records; None for any other name (old-style dirs too)."""
        m = _NAME.match(name)
        return cls(m[1], int(m[2]), int(m[3]), int(m[4])) if m else None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return ""


def _start_ticks(pid: int | str) -> int | None:
    """Field 22 of /proc/<pid>/stat: when the process started, in clock ticks after boot. The
    command name (field 2) may hold spaces and parentheses, so fields count from the last ')'."""
    stat = _read(f"/proc/{pid}/stat")
    tail = stat.rpartition(")")[2].split()
    try:
        return int(tail[19])
    except (IndexError, ValueError):
        return None


def _pidns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def this_process() -> Owner:
    """The Owner record of the calling process (all zeros and "" where /proc is missing)."""
    boot = _read("/proc/sys/kernel/random/boot_id").strip().replace("-", "").lower()
    return Owner(boot if re.fullmatch(r"[0-9a-f]{32}", boot) else "", _pidns(), os.getpid(), _start_ticks("self") or 0)


def owner_alive(owner: Owner, folder: Path | None = None, me: Owner | None = None) -> bool:
    """False only when `owner` is provably dead (see the module docstring); True otherwise,
    including every case that cannot be decided. `folder` is the owner's job dir, whose
    ``.owner`` lock is tried when the owner lives in another pid namespace on this kernel."""
    me = me or this_process()
    if not me.boot_id or owner.boot_id != me.boot_id:
        return True  # another host, or this one before a reboot: never provable from here
    if owner == me:
        return True
    if owner.pidns == me.pidns:
        return _start_ticks(owner.pid) == owner.start
    return folder is None or not _lock_is_free(folder / LOCK_NAME)


def _locked(path: Path) -> int | None:
    """An open file on `path` holding an exclusive flock (not waiting), or None where it cannot
    be taken: held by another process, or a filesystem without locks. Read-only where it can be
    (a file open for writing keeps its filesystem from being remounted read-only); NFS emulates
    flock with POSIX locks, which want write access (EBADF read-only): then read-write."""
    for flags in (os.O_RDONLY, os.O_RDWR):
        try:
            fd = os.open(path, flags | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            os.close(fd)
            if exc.errno != errno.EBADF:
                return None
    return None


def _lock_is_free(lock: Path) -> bool:
    """Whether no process holds the lock file `lock` (tried without waiting, then let go). A
    missing or unlockable lock file proves nothing: False."""
    fd = _locked(lock)
    if fd is None:
        return False
    os.close(fd)  # closing drops the lock
    return True


class JobDirs:
    """The job dirs this process owns, each with its lock held (one open file per live dir). One
    per process; `root` (WORKER_TMP_DIR) is passed on each call, so a test that swaps the config
    is seen at once."""

    def __init__(self) -> None:
        self._locks: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._owner: Owner | None = None

    @property
    def owner(self) -> Owner:
        if self._owner is None or self._owner.pid != os.getpid():  # a fork is another owner
            self._owner = this_process()
        return self._owner

    def make(self, root: Path) -> Path:
        """A fresh dir for one job under `root` (made if missing), named with this process as
        owner, its lock held until :meth:`remove`. Raises OSError as mkdir does."""
        root.mkdir(parents=True, exist_ok=True)
        while True:
            folder = root / f"{PREFIX}{self.owner.key}-{secrets.token_hex(4)}"
            try:
                folder.mkdir(mode=0o700)
                break
            except FileExistsError:
                continue
        staged = folder / f"{LOCK_NAME}.new"  # locked under another name first: a sweeper never sees an unlocked .owner
        fd: int | None = None
        try:
            os.close(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))  # empty: no block on a full disk
            fd = _locked(staged)  # None on a filesystem without locks: the name still says who owns it
            staged.rename(folder / LOCK_NAME)
        except OSError:
            if fd is not None:
                os.close(fd)
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if fd is None:
            return folder
        with self._lock:
            self._locks[folder] = fd
        return folder

    def remove(self, folder: Path) -> bool:
        """Remove a dir of this process's and let its lock go; True once it is gone. A dir that
        cannot be removed yet (a read-only spell) keeps its lock, so no other worker takes it
        for dead while this one still retries."""
        shutil.rmtree(folder, ignore_errors=True)
        gone = not os.path.lexists(folder)
        if gone:
            self.release(folder)
        return gone

    def release(self, folder: Path) -> None:
        """Let a dir's lock go without removing the dir (it was removed some other way)."""
        with self._lock:
            fd = self._locks.pop(folder, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def held(self) -> list[Path]:
        with self._lock:
            return list(self._locks)


def sweep(root: Path, me: Owner | None = None) -> list[Path]:
    """At a worker's start: remove every job dir under `root` whose owner is provably dead
    (see :func:`owner_alive`); return those removed. Dirs of live workers, of other hosts and
    of unknown owners stay. Safe to run by several workers at once. Never raises."""
    me = me or this_process()
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    removed: list[Path] = []
    for entry in entries:
        owner = Owner.of_dir(entry.name)
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            continue
        if owner is None or not is_dir or owner_alive(owner, Path(entry.path), me):
            continue
        try:
            shutil.rmtree(entry.path)
        except FileNotFoundError:
            continue  # another worker got there first
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("could not remove a dead worker's temp dir %s: %s", entry.name, exc.strerror or exc)
            continue
        removed.append(Path(entry.path))
    if removed:
        log.info("removed %d temp dir(s) left by dead workers under WORKER_TMP_DIR", len(removed))
    return removed
