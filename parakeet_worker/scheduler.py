"""The scheduler: the one thread that runs the model, for every job (continuous batching).

Jobs submit units (a whole item, or one piece of a long one) as their items become ready, and
live sessions their turns (realtime_engine); the thread runs whatever batch its planner picks
from all of them (handler._plan_next, handed in), through its `run` (handed in too: handler.py
sets the encoder up for each batch), and hands each unit its result through its future. Fair
between jobs by model seconds (fairshare.FairShare); a live turn's final goes in the next batch.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from parakeet_worker import engine, errors
from parakeet_worker import model as asr
from parakeet_worker.analysis.boosting import Boost
from parakeet_worker.errors import ItemError
from parakeet_worker.fairshare import FairShare
from parakeet_worker.transcript import Prepared, Transcript

log = logging.getLogger("parakeet-worker")


@dataclass(eq=False)
class Unit:
    """One model call's worth of one item (a whole item, or one piece of a split one), waiting
    for the scheduler. `seq` is its place in arrival order, over every job."""

    item: Prepared
    job: Any = None  # the job.Job it belongs to (None in planning tests)
    timestamps: bool = False
    final: bool = True  # the item's last piece: its WAV can go once this one is read
    seq: int = 0
    future: cf.Future = field(default_factory=cf.Future)
    boost: Boost | None = None  # its item's key phrases and weight; batches mix any of these
    # A live session's unit (realtime_session; `job` is then the session): a partial decode of the
    # turn being spoken, which a newer request of the same stream supersedes while it waits, or a
    # committed turn's final, which the planner puts in the next batch.
    stream: Any = None
    partial: bool = False
    scripts: frozenset[str] | None = None  # its item's language hint's scripts (None: no mask); mixed too
    confidence: bool = False  # its job asked for confidence or logprobs (analysis.confidence)

    @property
    def duration(self) -> float:
        return self.item.duration

    @property
    def live_final(self) -> bool:
        return self.stream is not None and not self.partial


@dataclass(frozen=True)
class BatchInfo:
    """One model batch as a job sees it: which batch, how many items it held from all jobs, and
    its real and padded audio seconds."""

    id: int
    size: int
    real_sec: float
    padded_sec: float


@dataclass(frozen=True)
class UnitResult:
    out: Transcript | ItemError
    batch: BatchInfo | None


# (ready units, local attention now, model seconds served by job) -> the next batch
Plan = Callable[[Sequence[Unit], bool, Mapping[Any, float]], list[Unit]]
# (model, padded audio, lengths, timestamps, boosts, scripts, rows that want confidence) -> one result per row
Run = Callable[
    [Any, np.ndarray, list[int], bool, list[Boost | None], list[frozenset[str] | None], list[bool]],
    list[Transcript | ItemError],
]


class Scheduler:
    """The one thread that runs the model, for every job (continuous batching).

    Jobs submit units as their items become ready; whenever the model is free the thread runs
    the batch that _plan_next picks from all of them, reads the rows, deletes each finished
    item's WAV at once, and hands every unit its result through its future. A batch runs as soon
    as the model is free and anything is ready; the one wait is _gather's (50 ms at most, only
    while items decoded together are still on their way).

    The thread must not die with units waiting: a bug in planning or in a batch costs the units
    it touched (an internal_error), never the others. Should the thread end anyway, every unit
    in it and every later one is answered at once (model_failed), and the worker turns unhealthy
    (worker_healthy(): jobs' outputs carry refresh_worker, as after a GPU fault).
    """

    def __init__(self, plan: Plan, run: Run) -> None:
        self.plan, self.run_batch = plan, run
        self.cond = threading.Condition()
        self.ready: list[Unit] = []
        self.reading: list[Unit] = []  # units whose WAVs the thread is reading right now
        self.arrivals = itertools.count()
        self.batch_ids = itertools.count(1)
        self.on_the_way = 0  # decoded in an ffmpeg run that just ended, not submitted yet
        self.thread: threading.Thread | None = None
        self.fair = FairShare()
        self.running: list[Unit] = []  # the batch the model runs now

    def submit(self, unit: Unit) -> cf.Future:
        with self.cond:
            if asr.state().model_thread_died:
                _deliver(unit, UnitResult(engine.model_failed_error(), None))
                return unit.future
            unit.seq = next(self.arrivals)
            if unit.stream is not None:
                self._supersede(unit.stream)
            self.fair.arrive(unit.job, any(u.job is unit.job for u in itertools.chain(self.ready, self.running)))
            self.ready.append(unit)
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="model", daemon=True)
                self.thread.start()
            self.cond.notify_all()
        return unit.future

    def _supersede(self, stream: Any) -> None:
        """A live stream asks again: its partial still waiting here is dropped (its future
        cancelled), never run behind the newer request. Called holding the lock."""
        for unit in [u for u in self.ready if u.stream is stream and u.partial]:
            self.ready.remove(unit)
            unit.future.cancel()

    def expect(self) -> None:
        with self.cond:
            self.on_the_way += 1

    def arrived(self) -> None:
        with self.cond:
            self.on_the_way -= 1
            self.cond.notify_all()

    def _gather(self) -> None:
        """Items decoded by one ffmpeg run come out together, but their threads submit them
        one by one: wait for the rest of them (50 ms at most, and only while any is on its
        way), so that they share this batch instead of the first one running alone. Called
        holding the lock."""
        deadline = time.monotonic() + 0.05
        while self.on_the_way > 0 and (left := deadline - time.monotonic()) > 0:
            self.cond.wait(left)

    def withdraw(self, job: Any) -> None:
        """Drop a finished or stopped job's waiting units, and return once the model thread
        reads none of its files (so its temp dir can go)."""
        with self.cond:
            for unit in [u for u in self.ready if u.job is job]:
                self.ready.remove(unit)
                unit.future.cancel()
            self.fair.forget(job)
            while any(u.job is job for u in self.reading):
                self.cond.wait()

    def _loop(self) -> None:
        batch: list[Unit] = []
        try:
            while True:
                batch = []
                try:
                    batch = self._next_batch()
                    self._run(batch)
                except Exception:  # a bug outside the model call costs this batch, not the worker
                    log.exception("batch of %d failed outside the model", len(batch))
                    for unit in batch:
                        _deliver(unit, UnitResult(errors.bug("planning its batch"), None))
                finally:
                    with self.cond:
                        self.reading = self.running = []
                        self.cond.notify_all()
                    # Held while the thread waits for the next batch, the last units would keep
                    # their jobs (requests, base64 audio, results) alive after those jobs end.
                    batch = []
        except BaseException as exc:  # noqa: BLE001 - the thread ends here; _died says so, with the traceback
            self._died(exc, batch)

    def _next_batch(self) -> list[Unit]:
        """Wait for work; take the batch _plan_next picks. Should planning fail (a bug), the
        oldest ready unit runs alone: the planner's bug costs no unit its result."""
        with self.cond:
            while True:
                self.ready = [u for u in self.ready if not u.future.cancelled()]  # their askers are gone
                if self.ready:
                    break
                self.cond.wait()
            self._gather()
            try:
                batch = self.plan(self.ready, asr.state().local_attention, self.fair.served)
            except Exception:
                log.exception("planning failed; running the oldest ready item alone")
                batch = [min(self.ready, key=lambda u: u.seq)]
            self.fair.charge((u.job, u.duration) for u in batch)
            for unit in batch:
                self.ready.remove(unit)
            self.reading = self.running = batch
            return batch

    def _died(self, exc: BaseException, batch: list[Unit]) -> None:
        """The thread is ending: answer every unit it holds or would take, and mark the worker
        unhealthy, so that no job waits for ever on a thread that is gone."""
        log.critical("the model thread died; asking Runpod to replace this worker", exc_info=exc)
        with self.cond:
            asr.state().model_thread_died = f"{type(exc).__name__}: {errors.short(exc, 200)}"
            for unit in [*batch, *self.ready]:
                _deliver(unit, UnitResult(engine.model_failed_error(), None))
            self.ready, self.reading, self.running, self.thread = [], [], [], None
            self.cond.notify_all()

    def _run(self, batch: list[Unit]) -> None:
        model = asr.loaded_model()
        items = [u.item for u in batch]
        if model is None:  # dry run: nothing to read
            audio, lengths, failed = np.zeros((len(items), 1), np.float32), [p.frames for p in items], {}
        else:
            audio, lengths, failed = asr.load_rows(items)
        with self.cond:
            self.reading = []
            self.cond.notify_all()
        for unit in batch:
            if unit.final and unit.job is not None:
                unit.job.discard(unit.item.wav)  # in memory now: the WAV can go
        rows = [row for row in range(len(batch)) if row not in failed]
        outs: dict[int, Transcript | ItemError] = dict(failed)
        if rows:
            ran = self.run_batch(model, audio[rows] if failed else audio, [lengths[r] for r in rows],
                                 any(batch[r].timestamps for r in rows), [batch[r].boost for r in rows],
                                 [batch[r].scripts for r in rows], [batch[r].confidence for r in rows])  # fmt: skip
            outs.update(zip(rows, ran, strict=True))
        real = sum(items[r].duration for r in rows)
        info = BatchInfo(next(self.batch_ids), len(rows), real, len(rows) * max((items[r].duration for r in rows), default=0))
        log.debug("batch %d: %d item(s), %.1f s of audio", info.id, info.size, info.real_sec)
        for row, unit in enumerate(batch):
            _deliver(unit, UnitResult(outs[row], info if row in rows else None))


def _deliver(unit: Unit, result: UnitResult) -> None:
    with contextlib.suppress(cf.InvalidStateError):  # its job was stopped meanwhile
        unit.future.set_result(result)




class Arrival:
    """Tells the scheduler that an item decoded in a group is on its way (see _gather)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.announced = False

    def announce(self) -> None:
        if not self.announced:  # an item decoded twice (see _decode_in_budget) comes once
            self.announced = True
            self.scheduler.expect()

    def done(self) -> None:
        if self.announced:
            self.announced = False
            self.scheduler.arrived()
