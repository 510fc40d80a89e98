"""Temp disk: each job's temp dir under WORKER_TMP_DIR, made and removed; what a failed write
there means (disk full, read-only, removed); and the budget that bounds the bytes all jobs hold
there at once (WORKER_TMP_MAX_BYTES)."""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

from parakeet_worker import config, errors
from parakeet_worker.audio import headers, jobdirs
from parakeet_worker.config import SAMPLE_RATE
from parakeet_worker.errors import ItemError, JobError
from parakeet_worker.state import shared

log = logging.getLogger("parakeet-worker")


# --- Job temp dirs: made per job, removed at its end; what a failed write there means --------


# ENOSPC (no space, or no inodes, left) and EDQUOT: the worker's disk is full, not the item bad.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = tuple(os.strerror(e) for e in DISK_FULL_ERRNOS)  # as ffmpeg reports them


def disk_full(doing: str) -> ItemError:
    return ItemError(
        "disk_full", f"the worker ran out of disk space (WORKER_TMP_DIR) while {doing}; the item may be fine, retry it"
    )


def tmp_problem(folder: Path) -> ItemError | None:
    """What is wrong with the job's temp dir `folder`, if anything, once a write in it failed:
    it is gone (removed while the job ran), read-only, or full. The item is then likely fine:
    each of these codes says so, where ffmpeg or a write would only say what failed."""
    try:
        if not folder.is_dir():
            return ItemError(
                "temp_dir_gone", "this job's temp dir (under WORKER_TMP_DIR) was removed while the job ran; retry the item"
            )
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY or not os.access(folder, os.W_OK):
        return ItemError(
            "temp_not_writable", "the worker cannot write to its temp dir (WORKER_TMP_DIR is read-only); retry the item"
        )
    return disk_full("writing to it") if fs_full(folder) else None


@shared
def job_dirs() -> jobdirs.JobDirs:
    """The job dirs this process owns, each with its owner lock held (audio.jobdirs)."""
    return jobdirs.JobDirs()


def make_job_dir() -> Path:
    """A fresh temp dir for one job under WORKER_TMP_DIR, which is created if missing, named
    with its owner (this process) so that the next worker can remove it should this one be
    killed (audio.jobdirs). Raises JobError, never OSError, when that cannot be done
    (WORKER_TMP_DIR cannot be created, or the disk or its inodes are full), so the job gets an
    answer that says so."""
    root = Path(config.CFG.tmp_dir)
    try:
        return job_dirs().make(root)
    except OSError as exc:
        full = exc.errno in DISK_FULL_ERRNOS
        why = "the worker ran out of disk space or inodes" if full else f"{exc.strerror or exc}"
        log.warning("cannot make a job's temp dir under WORKER_TMP_DIR=%s: %s", root, why)  # the path: in the log only
        raise JobError("temp_dir_failed", f"cannot make this job's temp dir under WORKER_TMP_DIR: {why}") from None


class _Unremoved:
    """Job dirs whose removal failed (say, a read-only spell of the disk): retried later."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.dirs: set[Path] = set()


@shared
def unremoved() -> _Unremoved:
    return _Unremoved()


def remove_job_dir(workdir: Path) -> None:
    """Remove a finished job's temp dir, and retry every one whose removal failed before: a
    temp dir that was read-only for a while must not keep its files for good."""
    left_over = unremoved()
    with left_over.lock:
        todo = [workdir, *left_over.dirs]
        left_over.dirs.clear()
    left = {folder for folder in todo if not job_dirs().remove(folder)}
    if left:
        log.warning("%d job temp dir(s) could not be removed yet; retried at the next job's end", len(left))
        with left_over.lock:
            left_over.dirs.update(left)


def remove_dead_workers_dirs() -> list[Path]:
    """At a worker's start: remove the job dirs under WORKER_TMP_DIR whose owner is provably
    dead (a worker killed by the OOM killer, say), never a live worker's (audio.jobdirs.sweep)."""
    return jobdirs.sweep(Path(config.CFG.tmp_dir))


def says_disk_full(stderr: str) -> bool:
    return any(text in stderr for text in DISK_FULL_TEXTS)


def fs_full(path: Path) -> bool:
    """Whether the filesystem holding `path` has no space or no inodes left for us."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail == 0 or (st.f_files > 0 and st.f_favail == 0)


# --- Disk budget: WORKER_TMP_MAX_BYTES over all jobs -----------------------------------------


class DiskBudget:
    """Bounds the worker's temp disk (WORKER_TMP_MAX_BYTES) over all jobs. A downloaded or
    base64 source counts as its bytes arrive. Before ffmpeg runs, the item reserves what its WAV
    should take (see wav_bytes_estimate) and waits while that would pass the bound; once decoded
    it keeps just its WAV's size, and gives that back when the WAV is deleted (as soon as the
    scheduler has read it). An item bigger than the whole bound still runs, alone."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.held: dict[Path, int] = {}

    @property
    def used(self) -> int:
        return sum(self.held.values())

    def reserve(self, key: Path, nbytes: int, stop: threading.Event | None = None) -> None:
        """Hold `nbytes` for `key` (in place of what it held), waiting while that would pass the
        bound and anything else is held."""
        with self.cond:
            while (others := self.used - self.held.get(key, 0)) and others + nbytes > config.CFG.tmp_max_bytes:
                if stop is not None and stop.is_set():
                    raise errors.cancelled()
                self.cond.wait()
            self.held[key] = nbytes

    def resize(self, key: Path, nbytes: int) -> None:
        """What `key` really holds, once known (never blocks: the bytes are on disk already)."""
        with self.cond:
            self.held[key] = nbytes
            self.cond.notify_all()

    def release(self, key: Path) -> None:
        with self.cond:
            if self.held.pop(key, None) is not None:
                self.cond.notify_all()

    def wake(self) -> None:
        """A job was stopped: its waits look at their stop signal now."""
        with self.cond:
            self.cond.notify_all()

    def release_under(self, folder: Path) -> None:
        with self.cond:
            for key in [k for k in self.held if folder in k.parents]:
                del self.held[key]
            self.cond.notify_all()


@shared
def budget() -> DiskBudget:
    """The worker's temp-disk budget (WORKER_TMP_MAX_BYTES over all jobs)."""
    return DiskBudget()


WAV_BYTES_PER_SEC = SAMPLE_RATE * 2  # 16 kHz mono s16
# For a source whose header declares no length: its WAV as a multiple of its size. A 64 kbit/s
# mp3 or AAC decodes to 4x (256 kbit/s), 16 kbit/s speech opus to 16x. A longer WAV is not lost:
# ffmpeg stops at the reservation and the item is decoded again with the most it can take.
WAV_PER_SOURCE_BYTE = 16


def max_wav_bytes() -> int:
    """The largest WAV any item can make: ffmpeg stops at MAX_AUDIO_SEC (+1 s)."""
    return int((config.CFG.max_audio_sec + 1) * SAMPLE_RATE) * 2 + 4096


def wav_bytes_estimate(src: Path) -> int:
    """How many bytes the WAV of `src` should take: from the length its header declares (RIFF,
    FLAC, Ogg), else WAV_PER_SOURCE_BYTE times its size; at most max_wav_bytes()."""
    seconds = None
    try:
        if src.is_file():
            with open(src, "rb") as f:
                head = f.read(4096)
                declared = headers.declared_length(f, head)
                if declared is not None:
                    seconds = declared[1]
                elif head[:4] in (b"RIFF", b"RF64"):
                    seconds = headers.riff_header(f, os.fstat(f.fileno()).st_size)[0]
    except (OSError, ValueError, IndexError):
        seconds = None  # an unreadable header: the size decides
    size = src.stat().st_size if src.is_file() else 0
    guess = seconds * WAV_BYTES_PER_SEC * 1.01 + 65536 if seconds else size * WAV_PER_SOURCE_BYTE + (1 << 20)
    return int(min(guess, max_wav_bytes()))
