"""A stand-in for the worker's scheduler, for the live-transcription tests and benchmark of phase 1:
one thread runs the real model (handler's `_run_model`, the demo model) on batches of whatever the
sessions have asked for, finals first; a partial still waiting when its session asks again is
dropped (answered None), as the Engine interface says. The worker itself routes live turns
through its one scheduler, with file jobs; this exists so that the session and the WebSocket
layer can be tested and measured against the real model before that wiring.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

RunBatch = Callable[[list[np.ndarray], list[tuple[str, ...] | None]], Sequence[Any]]


@dataclass(eq=False)
class _Request:
    samples: np.ndarray
    final: bool
    boost: tuple[str, ...] | None
    stream: object
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    at: float = field(default_factory=time.monotonic)

    def resolve(self, value: Any) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if isinstance(value, BaseException):
                self.future.set_exception(value)
            else:
                self.future.set_result(value)

        with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(settle)


class ThreadEngine:
    """Engine (see parakeet_worker.realtime_session) on one model thread. `stats` counts model
    batches, rows and dropped partials."""

    def __init__(self, run_batch: RunBatch, max_batch: int = 16):
        self.run_batch, self.max_batch = run_batch, max_batch
        self.cond = threading.Condition()
        self.waiting: list[_Request] = []
        self.thread: threading.Thread | None = None
        self.stats = {"batches": 0, "rows": 0, "finals": 0, "partials": 0, "dropped": 0, "busy_sec": 0.0}
        self.batch_sizes: list[int] = []
        self.open = 0  # transcribe() calls not yet returned to their session

    def idle(self) -> bool:
        """Every transcribe() call has returned to its session (and the session has acted on it
        in the same step of its event loop): tests wait for this between chunks, so that which
        partials run does not depend on timing."""
        return self.open == 0

    async def transcribe(self, samples: np.ndarray, *, final: bool, boost: tuple[str, ...] | None,
                         stream: object) -> Any:  # fmt: skip
        self.open += 1
        try:
            return await self._transcribe(samples, final, boost, stream)
        finally:
            self.open -= 1

    async def _transcribe(self, samples: np.ndarray, final: bool, boost: tuple[str, ...] | None, stream: object) -> Any:
        loop = asyncio.get_running_loop()
        request = _Request(samples, final, boost, stream, loop.create_future(), loop)
        with self.cond:
            for old in [r for r in self.waiting if r.stream is stream and not r.final]:
                self.waiting.remove(old)
                self.stats["dropped"] += 1
                old.resolve(None)
            self.waiting.append(request)
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="live-model", daemon=True)
                self.thread.start()
            self.cond.notify_all()
        try:
            return await request.future
        except asyncio.CancelledError:
            with self.cond:
                if request in self.waiting:
                    self.waiting.remove(request)
            raise

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting:
                    self.cond.wait()
                ordered = sorted(self.waiting, key=lambda r: (not r.final, r.at))
                batch = ordered[: self.max_batch]
                for request in batch:
                    self.waiting.remove(request)
            began = time.perf_counter()
            try:
                outs: Sequence[Any] = self.run_batch([r.samples for r in batch], [r.boost for r in batch])
            except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error
                outs = [exc] * len(batch)
            self.stats["busy_sec"] += time.perf_counter() - began
            self.stats["batches"] += 1
            self.stats["rows"] += len(batch)
            self.stats["finals"] += sum(r.final for r in batch)
            self.stats["partials"] += sum(not r.final for r in batch)
            self.batch_sizes.append(len(batch))
            for request, out in zip(batch, outs, strict=True):
                request.resolve(out)


def handler_batches(worker: Any, weight: float = 1.0) -> RunBatch:
    """A RunBatch on today's handler module (`worker`, with its model loaded): one padded batch
    through `_run_model` with word timestamps, each row boosted with its own phrases."""

    def run(rows: list[np.ndarray], boosts: list[tuple[str, ...] | None]) -> Sequence[Any]:
        lengths = [max(1, len(r)) for r in rows]
        audio = np.zeros((len(rows), max(lengths)), np.float32)
        for n, row in enumerate(rows):
            audio[n, : len(row)] = row
        resolved = [worker._resolve_boost(tuple(sorted(b)), weight) if b else None for b in boosts]
        return worker._run_model(worker._MODEL, audio, lengths, True, resolved)

    return run


def handler_vad(worker: Any) -> Callable[[], Any]:
    """The silero model getter (the worker's ensure_vad), with torch's thread count kept."""
    return worker.ensure_vad
