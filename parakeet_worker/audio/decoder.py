"""The decoder: PREPARE_WORKERS ffmpeg runs at once for every job's items, fair across jobs by
estimated decode time (fairshare.FairShare), the costliest file of a job first, small files
several to a process."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parakeet_worker import config, errors
from parakeet_worker.audio import ffmpeg, headers
from parakeet_worker.audio.headers import FFMPEG_START_MS
from parakeet_worker.fairshare import FairShare
from parakeet_worker.state import shared

log = logging.getLogger("parakeet-worker")


# --- The decoder: PREPARE_WORKERS ffmpeg runs at once, costliest first, small files grouped --


@dataclass(eq=False)
class Decode:
    """One file waiting for ffmpeg, and what came of it."""

    src: Path
    dest: Path
    cost_ms: float
    stop: threading.Event | None = None
    on_decoded: Callable[[], None] | None = None
    limit: int | None = None
    owner: Any = None  # its job (the job's stop event stands for it): the decoder takes turns by job
    done: bool = False
    result: tuple[int, str | None] | BaseException | None = None
    group: list[Decode] | None = None  # set when this file leads an ffmpeg run: its thread runs it


class Decoder:
    """Runs ffmpeg for every job's items, PREPARE_WORKERS processes at a time (it is CPU-bound,
    however many downloads are running). Fair across jobs, by estimated ffmpeg time (weighted
    fair queuing): each job counts the decode time it has been given, a job that comes (back)
    starts level with the last one served, and the next run goes to the job whose costliest
    pending file would finish first in that count; within a job the costliest file goes first,
    so that no long decode starts last and holds up that job's end, while the cheap files of
    small jobs never wait for every other job's expensive ones. Files that decode in less time
    than ffmpeg takes to start go several to a process. Each ffmpeg run is made by the thread of the file that leads it, so a thread only
    ever works for its own item's run; a thread whose job is stopped leaves its wait at once."""

    GROUP_BELOW_MS = 3 * FFMPEG_START_MS  # a file this cheap shares a process...
    GROUP_MAX_MS = 6 * FFMPEG_START_MS  # ...with others, up to this much decoding in all
    GROUP_ITEMS = 16

    def __init__(self, slots: int):
        self.slots = slots
        self.running = 0
        self.pending: list[Decode] = []
        self.cond = threading.Condition()
        self.fair = FairShare()  # decode ms given to each job with pending files

    def decode(
        self, src: Path, dest: Path, stop: threading.Event | None = None,
        on_decoded: Callable[[], None] | None = None, limit: int | None = None,
    ) -> tuple[int, str | None]:
        """`src` as a 16 kHz mono WAV at `dest`: (frames, warning); raises ItemError. Once `stop`
        is set, the file is not started, or, running alone, its ffmpeg is killed (cancelled).
        `on_decoded` is called when its ffmpeg run ends, together with the rest of its group;
        `limit` caps the WAV's bytes."""
        mine = Decode(src, dest, headers.decode_cost_ms(src), stop, on_decoded, limit, owner=stop)
        with self.cond:
            self.fair.arrive(mine.owner, any(d.owner is mine.owner for d in self.pending))
            self.pending.append(mine)
            self._dispatch()
            while not mine.done and mine.group is None:
                if stop is not None and stop.is_set() and mine in self.pending:  # (not in another's run)
                    self.pending.remove(mine)
                    self._forget_idle()
                    mine.result, mine.done = errors.cancelled("before this item was decoded"), True
                    break
                self.cond.wait()
        if mine.group is not None:
            try:
                self._run(mine.group)
            finally:
                with self.cond:
                    self.running -= 1
                    self._dispatch()
                    self.cond.notify_all()
        if isinstance(mine.result, BaseException):
            raise mine.result
        return mine.result  # type: ignore[return-value]

    def wake(self) -> None:
        """A job was stopped: its waiting threads look at their stop signal now."""
        with self.cond:
            self.cond.notify_all()

    def _dispatch(self) -> None:
        """Give each free slot its next run; its leader's thread runs it (holding the lock)."""
        while self.running < self.slots and self.pending:
            work = self._take()
            work[0].group = work
            self.running += 1
            self.cond.notify_all()

    def _take(self) -> list[Decode]:
        """The next process's work: the costliest pending file of the job whose turn it is, and,
        should it be cheap, other jobs' cheap files in turn (called holding the lock)."""
        for d in self.pending:
            if d.owner not in self.fair.served:
                self.fair.arrive(d.owner, waiting=False)
        work = [self._head_of(min(self._owners(), key=self._finish))]
        total = work[0].cost_ms
        while work[0].cost_ms < self.GROUP_BELOW_MS and self.pending and len(work) < self.GROUP_ITEMS:
            heads = sorted(self._owners(), key=self._finish)
            fits = [o for o in heads if total + self._costliest(o).cost_ms <= self.GROUP_MAX_MS]
            if not fits:
                break
            work.append(self._head_of(fits[0]))
            total += work[-1].cost_ms
        self._forget_idle()
        return work

    def _owners(self) -> list[Any]:
        """The jobs with pending files, in the order they first queued one."""
        return list(dict.fromkeys(d.owner for d in self.pending))

    def _finish(self, owner: Any) -> float:
        return self.fair.served[owner] + self._costliest(owner).cost_ms

    def _costliest(self, owner: Any) -> Decode:
        return max((d for d in self.pending if d.owner is owner), key=lambda d: d.cost_ms)

    def _head_of(self, owner: Any) -> Decode:
        """Take `owner`'s costliest pending file, and count its cost to the job."""
        head = self._costliest(owner)
        self.pending.remove(head)
        self.fair.charge([(owner, head.cost_ms)])
        return head

    def _forget_idle(self) -> None:
        waiting = {d.owner for d in self.pending}
        for owner in [o for o in self.fair.served if o not in waiting]:
            self.fair.forget(owner)

    @staticmethod
    def _run(work: list[Decode]) -> None:
        cancelled = [d for d in work if d.stop is not None and d.stop.is_set()]
        for d in cancelled:
            d.result, d.done = errors.cancelled("before this item was decoded"), True
        work = [d for d in work if not d.done]
        try:
            results: list[Any] = ffmpeg.to_wavs([(d.src, d.dest) for d in work], [d.stop for d in work], [d.limit for d in work])
        except Exception as exc:  # noqa: BLE001 - handed to each waiting item's own thread
            results = [exc] * len(work)
        for d in work:  # the whole group at once, before any of its threads wakes
            if d.on_decoded is not None:
                d.on_decoded()
        for d, result in zip(work, results, strict=True):
            d.result, d.done = result, True


@shared
def shared_decoder() -> Decoder:
    """The worker's decoder: PREPARE_WORKERS ffmpeg processes at once, for every job."""
    return Decoder(config.CFG.prepare_workers)
