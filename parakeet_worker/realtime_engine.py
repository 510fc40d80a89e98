"""The model for live sessions: a session's partials and committed turns become units of the
worker's one scheduler, batched with every file job's (one model, one queue, one fair share).

This is the Engine realtime_session asks (see its docstring): samples in memory go in as a
Prepared without a WAV; a partial carries its session as `stream`, so that the scheduler drops
it while it waits if the same session asks again (a newer partial, or the turn's final); a final
is planned into the next batch (handler._plan_next). The session's key phrases go through the
worker's own boosting (checked and built once per list, cached like a job's), and its language
hint keeps decoding to the hinted languages' scripts, as a job's does.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

import numpy as np

from parakeet_worker import model as asr
from parakeet_worker.analysis import boosting, script_mask
from parakeet_worker.errors import ItemError
from parakeet_worker.scheduler import Scheduler, Unit, UnitResult
from parakeet_worker.transcript import Prepared, Transcript

BOOST_WEIGHT = 1.0  # a session's key phrases are boosted at a job's default boost_weight


class TurnFailed(Exception):
    """The model could not transcribe a turn: the session answers it with `failed`."""

    def __init__(self, error: ItemError):
        super().__init__(error.message)
        self.code = error.code


class SchedulerEngine:
    """realtime_session.Engine on the worker's scheduler (handed in as a getter, so that the one
    the process has is used). `batches` keeps (batch id, batch size) of the last live results,
    for the benchmark and the tests that show live turns sharing batches with file jobs."""

    def __init__(self, scheduler: Callable[[], Scheduler], weight: float = BOOST_WEIGHT):
        self.scheduler, self.weight = scheduler, weight
        self.batches: collections.deque[tuple[int, int]] = collections.deque(maxlen=10_000)
        self.asking = 0  # transcribe() calls not yet answered

    def idle(self) -> bool:
        """No session waits for the model (every answer has reached its session)."""
        return self.asking == 0

    def check(self, phrases: tuple[str, ...]) -> str | None:
        """Why these key phrases cannot be used (None: they can), as a job's boost_phrases would
        be refused; a list that passes has its tree built now, not on the first turn."""
        try:
            self._boost(phrases)
        except ValueError as exc:
            return str(exc)
        return None

    def _boost(self, phrases: tuple[str, ...] | None) -> boosting.Boost | None:
        if not phrases:
            return None
        cleaned = boosting.clean_phrases(list(phrases), "keywords")
        return boosting.resolve_boost(asr.loaded_model(), cleaned, self.weight)

    async def transcribe(self, samples: np.ndarray, *, final: bool, boost: tuple[str, ...] | None,
                         stream: object, language: tuple[str, ...] | None = None,
                         scored: bool = False) -> Transcript | None:  # fmt: skip
        scripts = script_mask.hint_scripts(language) if language and script_mask.can_mask(asr.loaded_model()) else None
        unit = Unit(Prepared.in_memory(samples), job=stream, timestamps=final, final=False, boost=self._boost(boost),
                    stream=stream, partial=not final, scripts=scripts, confidence=scored)  # fmt: skip
        self.asking += 1
        try:
            future = self.scheduler().submit(unit)
            result: UnitResult = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and not final and (task is None or not task.cancelling()):
                return None  # superseded while it waited
            raise
        finally:
            self.asking -= 1
        if result.batch is not None:
            self.batches.append((result.batch.id, result.batch.size))
        if isinstance(result.out, ItemError):
            raise TurnFailed(result.out)
        return result.out

    def close(self, stream: object) -> None:
        """The session ended: its waiting units leave the scheduler, and its fair share is
        forgotten."""
        self.scheduler().withdraw(stream)

