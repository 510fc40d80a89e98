"""One live transcription session: client events in, server events out, turns to the model.

Transport-agnostic: the WebSocket layer (realtime_ws) hands each text message to `handle()` and
gives the session a `Sink` to send through; the session outlives a connection (a client that is
cut off may resume it), so every event it sends goes through whichever sink is attached now, and
the events a client must not miss (`completed`, `failed`) are kept and sent again on resume.

The model is reached through one small interface, `Engine.transcribe()`: 16 kHz float32 samples
in, a transcript (text and word timestamps) out. A partial (final=False) is a best effort: the
engine drops a waiting partial when the same stream asks again, and the session never queues
one behind another. A turn's final is awaited; `completed` events leave in commit order.

Audio is kept on one timeline per session: sample n is n / 16000 s after the session's first
audio, across connections, which is also the time base of the word timestamps it reports.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from parakeet_worker.analysis.live_vad import SpeechProbs, Started, Stopped, TurnDetector
from parakeet_worker.audio.live import InputDecoder
from parakeet_worker.config import SAMPLE_RATE
from parakeet_worker.pieces import quietest
from parakeet_worker.realtime_events import (
    ProtocolError,
    SessionConfig,
    apply_update,
    completed_event,
    delta_logprobs,
    error_event,
    event,
    failed_event,
    new_id,
)

log = logging.getLogger("parakeet-worker.realtime")

MIN_COMMIT_MS = 100  # OpenAI's floor for a commit
PARTIAL_GROWTH = 8  # a partial re-decodes the whole turn: past PARTIAL_MS x 8 they come every 1/8 of its length
QUIET_SEARCH_SEC = 2.0  # a turn cut at REALTIME_MAX_TURN_SEC is cut in the quietest 200 ms of its last 2 s


class Word(Protocol):
    text: str
    start: float
    end: float


class TranscriptLike(Protocol):
    """What the engine returns: the text, and word timestamps (seconds from the samples' start)."""

    text: str
    words: Sequence[Word]


class Engine(Protocol):
    """The model as a session sees it (realtime_engine.SchedulerEngine is the worker's)."""

    async def transcribe(self, samples: np.ndarray, *, final: bool, boost: tuple[str, ...] | None,
                         stream: object, language: tuple[str, ...] | None = None,
                         scored: bool = False) -> TranscriptLike | None:  # fmt: skip
        """Transcribe 16 kHz mono float32 `samples`, boosting the key phrases `boost`, kept to the
        hinted languages `language` (checked codes) where the model can be; `scored`: with each
        token's log-probability (the transcript's `tokens`, analysis.confidence). A partial
        (final=False) that the model has not started when another request of the same `stream`
        arrives is dropped: it returns None. A final is never dropped; it raises on failure (an
        exception with a `code` names it)."""
        ...

    def check(self, phrases: tuple[str, ...]) -> str | None:
        """Why these key phrases cannot be boosted, or None."""
        ...

    def close(self, stream: object) -> None:
        """`stream` ended: drop whatever of it still waits."""
        ...


class Sink(Protocol):
    def send(self, event: dict[str, Any], on_sent: Callable[[], None] | None = None) -> None:
        """Queue `event` for the client; `on_sent` runs once it has been written to the socket."""


class BufferOverflow(Exception):
    """More uncommitted audio than REALTIME_MAX_BUFFER_SEC: the connection is closed (1008)."""


@dataclass(frozen=True)
class LiveLimits:
    """The settings a session itself applies (the transport has its own)."""

    partial_ms: int = 500  # REALTIME_PARTIAL_MS; 0: no deltas
    max_turn_sec: float = 30.0  # REALTIME_MAX_TURN_SEC
    max_buffer_sec: float = 120.0  # REALTIME_MAX_BUFFER_SEC
    history: int = 256  # completed/failed events kept for a resume
    model_name: str | None = None  # shown as the session's transcription model until the client names one


@dataclass
class _Item:
    """The turn being spoken: its id (the one its events and its committed item carry), where its
    audio starts on the session's timeline, and the state of its partials."""

    id: str
    start: int
    asked: int = 0  # partial requests made
    applied: int = 0  # the newest partial whose result was used
    asked_at: int = -1  # the sample the newest partial request ended at (-1: its start)
    last_words: list[str] = field(default_factory=list)
    sent: int = 0  # words sent as deltas

    def __post_init__(self) -> None:
        if self.asked_at < 0:
            self.asked_at = self.start


@dataclass
class _Record:
    """A completed or failed event, kept for a client that resumes."""

    event: dict[str, Any]
    delivered: bool = False


class _Samples:
    """The session's uncommitted 16 kHz audio, addressed by sample number on its timeline."""

    def __init__(self) -> None:
        self.data = np.zeros(SAMPLE_RATE, np.float32)
        self.start = 0  # the sample number of data[0]
        self.size = 0

    @property
    def end(self) -> int:
        return self.start + self.size

    def append(self, x: np.ndarray) -> None:
        if self.size + len(x) > len(self.data):
            grown = np.zeros(max(2 * len(self.data), self.size + len(x)), np.float32)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size : self.size + len(x)] = x
        self.size += len(x)

    def slice(self, lo: int, hi: int) -> np.ndarray:
        return self.data[max(lo, self.start) - self.start : hi - self.start].copy()

    def drop_before(self, sample: int) -> None:
        cut = min(max(0, sample - self.start), self.size)
        if cut:
            self.data[: self.size - cut] = self.data[cut : self.size]
            self.size -= cut
            self.start += cut


class Session:
    """One transcription session (see the module docstring). Runs on the event loop; `handle()`
    is synchronous (decoding and VAD are a few hundred microseconds per chunk) and starts model
    calls as tasks."""

    def __init__(self, engine: Engine, vad_model: Callable[[], Any], limits: LiveLimits,
                 session_id: str | None = None) -> None:  # fmt: skip
        self.id = session_id or new_id("sess")
        self.engine, self.vad_model, self.limits = engine, vad_model, limits
        self.config = SessionConfig()
        if limits.model_name and self.config.transcription is not None:
            self.config = dataclasses.replace(self.config, transcription=dataclasses.replace(
                self.config.transcription, model=limits.model_name))  # fmt: skip
        self.decoder = InputDecoder(self.config.format)
        self.audio = _Samples()
        self.item: _Item | None = None
        self.previous_item: str | None = None
        self.probs: SpeechProbs | None = None
        self.turns: TurnDetector | None = None
        self.history: deque[_Record] = deque(maxlen=limits.history)
        self.sink: Sink | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.last_final: asyncio.Task[Any] | None = None
        self.bytes_before = 0  # audio bytes taken by earlier decoders (before a format change)

    # --- connection ------------------------------------------------------------------------------

    @property
    def received_bytes(self) -> int:
        """Audio bytes (decoded from base64, in the formats they came in) taken so far."""
        return self.decoder.bytes_in + self.bytes_before

    def attach(self, sink: Sink, resume: bool = False, last_item_id: str | None = None) -> None:
        """A connection took this session: session.created, then (on a resume) every completed or
        failed event it may have missed: those after `last_item_id` if the client names the last
        item it has, else those not yet written to a socket."""
        self.sink = sink
        created = event("session.created", session=self.config.as_session(self.id))
        if resume:
            created["resumed"] = {"audio_bytes_received": self.received_bytes,
                                  "audio_ms_received": self.audio.end * 1000 // SAMPLE_RATE,
                                  "open_item_id": self.item.id if self.item else None}  # fmt: skip
        sink.send(created)
        if not resume:
            return
        ids = [r.event["item_id"] for r in self.history]
        after = ids.index(last_item_id) + 1 if last_item_id in ids else None
        for n, record in enumerate(self.history):
            if (after is not None and n >= after) or (after is None and not record.delivered):
                self._send(record.event, record)

    def detach(self, sink: Sink) -> None:
        """`sink`'s connection ended (if it is still the one attached)."""
        if self.sink is sink:
            self.sink = None

    def _send(self, ev: dict[str, Any], record: _Record | None = None) -> None:
        if self.sink is None:
            return

        def sent() -> None:
            if record is not None:
                record.delivered = True

        self.sink.send(ev, sent)

    def _keep(self, ev: dict[str, Any]) -> None:
        record = _Record(ev)
        self.history.append(record)
        self._send(ev, record)

    # --- client events ---------------------------------------------------------------------------

    def handle(self, text: str) -> None:
        """One client message. A bad one gets an `error` event; the session goes on. Raises
        BufferOverflow (the connection must close)."""
        client_id = None
        try:
            try:
                message = json.loads(text)
            except ValueError:
                raise ProtocolError("the message is not JSON: send one JSON event per text message", "invalid_json") from None
            if not isinstance(message, dict) or not isinstance(message.get("type"), str):
                raise ProtocolError("an event is a JSON object with a string `type`", "invalid_event")
            client_id = message.get("event_id") if isinstance(message.get("event_id"), str) else None
            self._dispatch(message)
        except ProtocolError as exc:
            self._send(error_event(exc.message, exc.code, exc.param, client_id))
        except BufferOverflow:
            raise
        except Exception as exc:  # a bug: this event fails, the session goes on
            log.exception("a realtime event failed")
            self._send(error_event(f"{type(exc).__name__}: {exc}", "internal_error", None, client_id, "server_error"))

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "session.update":
            self._update(message.get("session"))
        elif kind == "input_audio_buffer.append":
            self._append(message.get("audio"))
        elif kind == "input_audio_buffer.commit":
            self._commit_by_client()
        elif kind == "input_audio_buffer.clear":
            self._clear()
        else:
            raise ProtocolError(f"unknown or unsupported event type {kind!r}: a transcription session takes "
                                "session.update and input_audio_buffer.append, commit and clear", "unknown_event",
                                "type")  # fmt: skip

    def _update(self, session: Any) -> None:
        new = apply_update(self.config, session, self.limits.model_name)
        phrases = new.transcription.phrases if new.transcription else ()
        if phrases and phrases != (self.config.transcription.phrases if self.config.transcription else ()):
            refused = self.engine.check(phrases)
            if refused:
                raise ProtocolError(f"these key phrases cannot be used: {refused}", "invalid_value",
                                    "session.audio.input.transcription.keywords")  # fmt: skip
        if new.turn_detection != self.config.turn_detection:
            self._set_turn_detection(new)  # first: it may refuse (no VAD model), and then nothing changed
        if new.format != self.config.format:
            self.bytes_before += self.decoder.bytes_in
            self.decoder = InputDecoder(new.format)
        self.config = new
        self._send(event("session.updated", session=new.as_session(self.id)))

    def _set_turn_detection(self, new: SessionConfig) -> None:
        """Switching VAD on, off or to new settings: the new detector starts at the audio's end
        (the stream's LSTM state and any open turn are kept when it stays on)."""
        if new.turn_detection is None:
            self.probs = self.turns = None
            return
        if self.probs is None:
            self.probs = SpeechProbs(self._vad())
            origin = self.audio.end
            self.item = None  # audio appended without VAD is not a turn: VAD finds the next one
        else:
            origin = self.turns.next_sample if self.turns else self.audio.end
        old = self.turns
        self.turns = TurnDetector(new.turn_detection, origin)
        if old is not None and old.in_speech:
            self.turns.in_speech = True

    def _vad(self) -> Any:
        model = self.vad_model()
        if model is None:
            raise ProtocolError("server_vad is unavailable: the voice activity model could not be loaded; "
                                "set turn_detection to null and commit yourself", "vad_unavailable",
                                "session.audio.input.turn_detection")  # fmt: skip
        return model

    # --- audio -----------------------------------------------------------------------------------

    def _append(self, audio: Any) -> None:
        if not self.config.configured:
            raise ProtocolError("send session.update (the audio format, turn detection) before any audio",
                                "session_not_configured")  # fmt: skip
        if not isinstance(audio, str):
            raise ProtocolError("input_audio_buffer.append needs `audio`, base64 text", "invalid_value", "audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("`audio` is not valid base64", "invalid_base64", "audio") from None
        if self.config.turn_detection is not None and self.turns is None:
            self._set_turn_detection(self.config)  # the default session (server_vad), first audio
        samples = self.decoder.decode(data)
        before = self.audio.end
        self.audio.append(samples)
        if self.turns is not None and self.probs is not None:
            self._detect(self.probs.push(samples))
        else:
            self._manual_audio(before)
        self._maybe_partial()

    def _manual_audio(self, before: int) -> None:
        if self.item is None and self.audio.end > before:
            self.item = _Item(new_id("item"), self.audio.start)
        if self.audio.size > self.limits.max_buffer_sec * SAMPLE_RATE:
            raise BufferOverflow(f"more than REALTIME_MAX_BUFFER_SEC={self.limits.max_buffer_sec:g} s of audio "
                                 "was appended without a commit")  # fmt: skip

    def _detect(self, probs: np.ndarray) -> None:
        assert self.turns is not None and self.config.turn_detection is not None
        prefix = self.config.turn_detection.prefix_padding_ms * SAMPLE_RATE // 1000
        for change in self.turns.feed(probs):
            if isinstance(change, Started):
                self._open_turn(max(self.audio.start, change.sample - prefix))
            elif isinstance(change, Stopped) and self.item is not None:
                self._send(event("input_audio_buffer.speech_stopped", audio_end_ms=_ms(change.sample),
                                 item_id=self.item.id))  # fmt: skip
                self._commit(change.sample)
        if self.item is None:
            self.audio.drop_before(self.audio.end - prefix)
        elif self.audio.end - self.item.start >= self.limits.max_turn_sec * SAMPLE_RATE:
            self._cut_long_turn()

    def _open_turn(self, start: int) -> None:
        self.item = _Item(new_id("item"), start)
        self._send(event("input_audio_buffer.speech_started", audio_start_ms=_ms(start), item_id=self.item.id))

    def _cut_long_turn(self) -> None:
        """A turn that has not paused for REALTIME_MAX_TURN_SEC is committed in the quietest 200 ms
        of its last QUIET_SEARCH_SEC (a pause between words), and the next turn starts there."""
        assert self.item is not None
        end = self.audio.end
        lo = max(self.item.start + SAMPLE_RATE // 2, end - int(QUIET_SEARCH_SEC * SAMPLE_RATE))
        cut = lo + quietest(self.audio.slice(lo, end))
        self._send(event("input_audio_buffer.speech_stopped", audio_end_ms=_ms(cut), item_id=self.item.id))
        self._commit(cut)
        self._open_turn(cut)

    def _commit_by_client(self) -> None:
        held = self.audio.end - (self.item.start if self.item else self.audio.start)
        if held * 1000 < MIN_COMMIT_MS * SAMPLE_RATE:
            raise ProtocolError(f"the buffer holds {held * 1000 // SAMPLE_RATE} ms of audio: commit needs at "
                                f"least {MIN_COMMIT_MS} ms", "input_audio_buffer_commit_empty")  # fmt: skip
        if self.item is None:
            self.item = _Item(new_id("item"), self.audio.start)
        self._commit(self.audio.end)
        if self.turns is not None:
            self.turns.reset()

    def _clear(self) -> None:
        self.audio.drop_before(self.audio.end)
        self.item = None
        if self.turns is not None:
            self.turns.reset()
        self._send(event("input_audio_buffer.cleared"))

    def _commit(self, end: int) -> None:
        """The open item's audio up to `end` becomes a committed item, transcribed as a whole."""
        item = self.item
        assert item is not None
        self._send(event("input_audio_buffer.committed", item_id=item.id, previous_item_id=self.previous_item))
        self.previous_item, self.item = item.id, None
        samples = self.audio.slice(item.start, end)
        self.audio.drop_before(end)
        if self.config.transcription is not None:
            self.last_final = self._spawn(self._final(item, samples, self.last_final))

    # --- the model -------------------------------------------------------------------------------

    @property
    def _boost(self) -> tuple[str, ...] | None:
        return (self.config.transcription.phrases or None) if self.config.transcription else None

    @property
    def _hint(self) -> tuple[str, ...] | None:
        return self.config.transcription.hint if self.config.transcription else None

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _maybe_partial(self) -> None:
        item = self.item
        if item is None or self.limits.partial_ms <= 0 or self.config.transcription is None:
            return
        grown = self.audio.end - item.asked_at
        step = max(self.limits.partial_ms * SAMPLE_RATE // 1000, (self.audio.end - item.start) // PARTIAL_GROWTH)
        if grown < step:
            return
        item.asked += 1
        item.asked_at = self.audio.end
        self._spawn(self._partial(item, item.asked, self.audio.slice(item.start, self.audio.end)))

    async def _partial(self, item: _Item, seq: int, samples: np.ndarray) -> None:
        """Decode the turn so far; send as a delta the words that this decode and the previous
        one agree on (their common prefix) beyond those already sent."""
        try:
            out = await self.engine.transcribe(samples, final=False, boost=self._boost, stream=self, language=self._hint,
                                               scored=self.config.logprobs)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a partial is a best effort; the final still comes
            log.warning("a partial transcription failed: %s", exc)
            return
        if out is None or self.item is not item or seq <= item.applied:
            return  # dropped, or its turn was committed or cleared meanwhile, or a newer one was used
        item.applied = seq
        words = out.text.split()
        agreed = 0
        while agreed < min(len(words), len(item.last_words)) and words[agreed] == item.last_words[agreed]:
            agreed += 1
        item.last_words = words
        if agreed > item.sent:
            text = " ".join(words[item.sent : agreed])
            extra = {"logprobs": delta_logprobs(out, item.sent, agreed)} if self.config.logprobs else {}
            self._send(event("conversation.item.input_audio_transcription.delta", item_id=item.id, content_index=0,
                             delta=text if item.sent == 0 else " " + text, **extra))  # fmt: skip
            item.sent = agreed

    async def _final(self, item: _Item, samples: np.ndarray, before: asyncio.Task[Any] | None) -> None:
        """The authoritative transcript of a committed turn; sent after the turn before it."""
        start, seconds = item.start / SAMPLE_RATE, len(samples) / SAMPLE_RATE
        try:
            logprobs = self.config.logprobs
            out = await self.engine.transcribe(samples, final=True, boost=self._boost, stream=self, language=self._hint,
                                               scored=logprobs)  # fmt: skip
            result = completed_event(item.id, out, start, seconds, logprobs) if out is not None else None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the client gets `failed` for this turn; the session goes on
            log.warning("a turn could not be transcribed: %s", exc)
            result = failed_event(item.id, f"the turn could not be transcribed: {exc}",
                                  getattr(exc, "code", "transcription_failed"))  # fmt: skip
        if result is None:
            result = failed_event(item.id, "the model did not take the turn", "dropped")
        if before is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await before
        self._keep(result)

    # --- the end ---------------------------------------------------------------------------------

    async def finish(self) -> None:
        """The worker is stopping: commit what is buffered (a turn in progress, or in manual mode
        at least MIN_COMMIT_MS of audio), and wait until every committed turn is answered."""
        item = self.item
        if item is not None and (self.audio.end - item.start) * 1000 >= MIN_COMMIT_MS * SAMPLE_RATE:
            if self.turns is not None:
                self._send(event("input_audio_buffer.speech_stopped", audio_end_ms=_ms(self.audio.end),
                                 item_id=item.id))  # fmt: skip
            self._commit(self.audio.end)
        if self.last_final is not None:
            with contextlib.suppress(Exception):
                await self.last_final

    def close(self) -> None:
        """The session ends: its model calls are cancelled (a waiting partial or final is then
        withdrawn by the engine)."""
        for task in list(self.tasks):
            task.cancel()
        self.engine.close(self)


def _ms(sample: int) -> int:
    return sample * 1000 // SAMPLE_RATE
