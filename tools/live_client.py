"""A live client for the tests and the benchmark: audio in the Realtime API's input formats (made by
real ffmpeg), cut into frames, and a raw `websockets` client that records every server event.
The official client (openai's `realtime.connect`) is used by the tests as well; this one is for
what it cannot do (binary frames, oversized messages, subprotocols, reading nothing, resume)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import subprocess
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

# type, sample rate, ffmpeg's raw format, bytes per sample
FORMATS: dict[str, tuple[dict[str, Any], int, str, int]] = {
    "pcm24": ({"type": "audio/pcm", "rate": 24000}, 24000, "s16le", 2),
    "pcm16": ({"type": "audio/pcm", "rate": 16000}, 16000, "s16le", 2),
    "pcmu": ({"type": "audio/pcmu"}, 8000, "mulaw", 1),
    "pcma": ({"type": "audio/pcma"}, 8000, "alaw", 1),
}


def encode_input(audio: np.ndarray, name: str) -> bytes:
    """16 kHz float32 `audio` as the raw bytes of input format `name` (FORMATS), by ffmpeg."""
    _, rate, raw, _ = FORMATS[name]
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "f32le", "-ar", "16000", "-ac", "1", "-i", "-",
           "-ar", str(rate), "-f", raw, "-"]  # fmt: skip
    return subprocess.run(cmd, input=np.asarray(audio, np.float32).tobytes(), capture_output=True, check=True).stdout


def frames(data: bytes, name: str, ms: int = 20) -> list[bytes]:
    """`data` cut into frames of `ms` milliseconds."""
    _, rate, _, width = FORMATS[name]
    step = rate * ms // 1000 * width
    return [data[i : i + step] for i in range(0, len(data), step)]


def session_update(name: str = "pcm24", turn_detection: Any = "server_vad", **transcription: Any) -> dict[str, Any]:
    """A session.update for input format `name`; turn_detection "server_vad" (defaults), None
    (manual commits) or a dict."""
    if turn_detection == "server_vad":
        turn_detection = {"type": "server_vad"}
    audio_input: dict[str, Any] = {"format": FORMATS[name][0], "turn_detection": turn_detection}
    if transcription:
        audio_input["transcription"] = transcription
    return {"type": "session.update", "session": {"type": "transcription", "audio": {"input": audio_input}}}


def append(chunk: bytes) -> dict[str, Any]:
    return {"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()}


def words_of(events: Sequence[dict[str, Any]], kind: str = "conversation.item.input_audio_transcription.completed") -> list[str]:
    """The words of every `completed` event, in order (duplicates kept)."""
    return [w for e in events if e["type"] == kind for w in e["transcript"].lower().split()]


class LiveClient:
    """A raw websockets connection to /v1/realtime that records every server event (`events`)
    as it arrives, in a background task."""

    def __init__(self, base: str, query: str = "intent=transcription", **connect: Any):
        self.url = f"{base.replace('http://', 'ws://')}/v1/realtime?{query}"
        self.connect_args = {"proxy": None, "max_size": None, **connect}
        self.events: list[dict[str, Any]] = []
        self.times: list[float] = []  # when each event arrived (time.time())
        self.arrived = asyncio.Condition()
        self.ws: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.updates = 0  # session.update events sent

    async def __aenter__(self) -> LiveClient:
        from websockets.asyncio.client import connect

        self.ws = await connect(self.url, **self.connect_args)
        self.reader = asyncio.ensure_future(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        if self.reader is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self.reader, 10)

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in self.ws:
                async with self.arrived:
                    self.times.append(time.time())
                    self.events.append(json.loads(message))
                    self.arrived.notify_all()
        except ConnectionClosed:
            pass
        finally:
            rcvd = getattr(self.ws, "close_code", None)
            self.close_code, self.close_reason = rcvd, getattr(self.ws, "close_reason", "") or ""
            async with self.arrived:
                self.arrived.notify_all()

    @property
    def closed(self) -> bool:
        return self.reader is not None and self.reader.done()

    async def send(self, event: dict[str, Any] | str | bytes) -> None:
        if isinstance(event, dict) and event.get("type") == "session.update":
            self.updates += 1
        await self.ws.send(event if isinstance(event, str | bytes) else json.dumps(event))

    async def wait_for(self, kind: str, count: int = 1, timeout: float = 120) -> list[dict[str, Any]]:
        """The first `count` events of type `kind` (waiting for them); AssertionError if the
        socket closes first or `timeout` passes."""

        def found() -> list[dict[str, Any]]:
            return [e for e in self.events if e["type"] == kind]

        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(found()) >= count or self.closed), timeout)
        got = found()
        assert len(got) >= count, f"the socket closed ({self.close_code} {self.close_reason!r}) before {count} {kind}: {self.types()}"
        return got[:count]

    async def wait_closed(self, timeout: float = 120) -> int | None:
        assert self.reader is not None
        await asyncio.wait_for(asyncio.shield(self.reader), timeout)
        return self.close_code

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    async def barrier(self) -> None:
        """Round-trip a no-op session.update: every message sent before it has been handled."""
        await self.send({"type": "session.update", "session": {"type": "transcription"}})
        await self.wait_for("session.updated", self.updates)
