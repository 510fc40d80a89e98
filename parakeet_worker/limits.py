"""HTTP limits: what a client may hold of the server before its request is a job.

uvicorn bounds none of these by itself with its default parser (httptools, chosen whenever it
is installed; h11's 16 KiB `h11_max_incomplete_event_size` applies only to h11):

- a request head (request line and headers) of any size, at any speed: a 16 MiB header was read
  into memory, a 512 MiB one kept the event loop at 80% CPU for minutes (and /ping at 4-7 s),
  and a head sent at a byte a second was never cut off. `guarded_protocol` caps the head's bytes
  (431 past the cap) and gives it a deadline (408), for both of uvicorn's HTTP/1.1 parsers;
- a body at any speed: `BodyDeadline` ends a body that stops arriving (an idle deadline) or
  arrives slower than a minimum rate after a grace period, with a 408 and a closed connection;
- who may read a body: `Slots` is a small counter the routes use twice, once for bodies being
  read and once for jobs, so that a slow upload never holds a job slot (64 uploads at a byte
  every two seconds held every job slot, and every other client got 429).

Every answer here is JSON ({"error": {...}} as OpenAI shapes errors), with `Retry-After` where
retrying helps. Nothing here reads the environment: settings are arguments.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

log = logging.getLogger("parakeet-worker.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HEAD_MAX_BYTES = 64 * 1024  # request line + headers; browsers send ~1-2 KiB, Runpod's proxy adds a few headers
HEAD_TIMEOUT_SEC = 10.0  # from a connection's first byte (or its opening) to its head's end
BODY_IDLE_SEC = 20.0  # longest wait for the next piece of a body
BODY_MIN_RATE = 4096  # bytes per second a body must average once BODY_GRACE_SEC have passed (32 kbit/s)
BODY_GRACE_SEC = 10.0
RETRY_AFTER_SEC = 2


def error_body(status: int, message: str, code: str, param: str | None = None) -> bytes:
    """An OpenAI-shaped error object as JSON bytes."""
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(status)
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def raw_response(status: int, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 error response, JSON, for where no ASGI app runs (a head refused
    before it was parsed); it closes the connection."""
    body = error_body(status, message, code)
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")  # fmt: skip
    return head.encode("ascii") + body


async def send_error(send: Send, status: int, message: str, code: str, *, close: bool = False,
                     retry_after: int | None = None) -> None:  # fmt: skip
    """Send a JSON error response through ASGI `send`."""
    body = error_body(status, message, code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------
# The request head: a protocol class for uvicorn's Config(http=...)
# ---------------------------------------------------------------------------------------------


LINGER_SEC = 2.0  # after an answer sent while the client was still sending: how long its bytes are read and dropped
LINGER_MAX_BYTES = 16 * 1024**2  # and how many at most: over loopback's socket buffers; a flood gets its reset sooner


class _LingeringTransport:
    """A connection's transport whose close() lingers when the client may still be sending (a
    body not yet fully received, a head refused half-way): a plain close() with unread bytes
    in the kernel makes it send a reset instead of a FIN, and the client's kernel then drops
    the answer it had not read yet (the 408, the 431, a shutdown's 503), so the client sees
    "connection reset" instead of JSON. Here the answer is flushed and the sending side shut
    (FIN), the client's further bytes are read and dropped, and the connection closes once the
    client closes its side, after LINGER_SEC or after LINGER_MAX_BYTES, as nginx's
    lingering_close does. Everything else is the real transport's."""

    def __init__(self, real: Any, wants_linger: Any):
        self._real, self._wants_linger = real, wants_linger
        self.lingering = False
        self.dropped = 0
        self._timer: asyncio.TimerHandle | None = None

    def drop(self, data: bytes) -> None:
        """Bytes that came while lingering: dropped, and past LINGER_MAX_BYTES the end."""
        self.dropped += len(data)
        if self.dropped > LINGER_MAX_BYTES:
            self.end()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def is_closing(self) -> bool:
        return self.lingering or self._real.is_closing()

    def close(self) -> None:
        if self.lingering or self._real.is_closing() or not self._wants_linger() or not self._real.can_write_eof():
            self.end()
            return
        self.lingering = True
        self._real.write_eof()  # after what is buffered: the answer goes out whole, then a FIN
        self._real.resume_reading()
        self._timer = asyncio.get_running_loop().call_later(LINGER_SEC, self.end)

    def end(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._real.close()


def guarded_protocol(base: type[asyncio.Protocol], max_bytes: int = HEAD_MAX_BYTES,
                     timeout_sec: float = HEAD_TIMEOUT_SEC) -> type[asyncio.Protocol]:  # fmt: skip
    """uvicorn's HTTP/1.1 protocol class `base` (HttpToolsProtocol or H11Protocol) with a cap on
    each request head's bytes and a deadline for it. A head is what arrives while no request
    is being read: on a new connection, and after a request's body has fully arrived (the next
    request on a keep-alive connection). Its bytes are counted as they arrive; past `max_bytes`
    without the head's end the connection gets a JSON 431 and is closed (at most one read past
    the cap is held). The deadline runs from the head's first byte (a new connection: from its
    opening, so a connection that sends nothing is closed too); past it, a 408. A response in
    progress is never cut: the deadline waits for it. Both parsers' own 400 ("Invalid HTTP
    request received.", plain text) becomes JSON too. A connection closed while its client may
    still be sending (these refusals; a 408, 413 or 503 sent before the body's end) lingers
    (_LingeringTransport), so that the client reads its answer instead of a reset.

    It relies on what both of uvicorn's HTTP/1.1 protocols have (uvicorn 0.30-0.54):
    `self.cycle`, a new object once a head has been parsed, whose `more_body` turns False
    once its body has arrived and `response_complete` True once answered; `self.transport`
    (handed to each cycle); `on_response_complete()`; `eof_received()`; and
    `send_400_response(msg)`. tests/test_http_limits.py fails if that changes."""

    class GuardedProtocol(base):  # type: ignore[valid-type, misc]
        head_max_bytes = max_bytes
        head_timeout_sec = timeout_sec

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            self._head_bytes = 0
            self._head_timer: asyncio.TimerHandle | None = None
            self._refused = False
            self._lingering = _LingeringTransport(transport, self._client_may_be_sending)
            super().connection_made(self._lingering)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self._lingering.end()
            super().connection_lost(exc)

        def eof_received(self) -> bool | None:
            if self._lingering.lingering:
                self._lingering.end()
                return None
            return super().eof_received()

        def on_response_complete(self) -> None:
            """An answer sent before its request's body ended (413, 429, 408, 503): the
            connection closes (lingering), rather than reading the rest of a body nobody wants,
            for as long as the client cares to send it."""
            cycle = self.cycle
            if cycle is not None and cycle.more_body and not self.transport.is_closing():
                self.transport.close()
            super().on_response_complete()

        def _client_may_be_sending(self) -> bool:
            cycle = self.cycle
            return self._refused or (cycle is not None and cycle.more_body)

        def data_received(self, data: bytes) -> None:
            if self._lingering.lingering:
                self._lingering.drop(data)  # an answer went out and the connection is closing
                return
            in_head = self._awaiting_head()
            if in_head:
                self._head_bytes += len(data)
                if self._head_timer is None:
                    self._arm()
            before = self.cycle
            super().data_received(data)
            if self.cycle is not before:  # a head was parsed: its request now runs
                self._head_bytes = 0
                self._disarm()
            elif in_head and self._head_bytes > self.head_max_bytes and self._owns_transport():
                log.warning("a request head over %d bytes: refused (431)", self.head_max_bytes)
                self._refuse(431, f"the request line and headers are over {self.head_max_bytes} bytes",
                             "headers_too_large")  # fmt: skip

        def send_400_response(self, msg: str) -> None:
            self._refuse(400, "the request is not valid HTTP/1.1", "invalid_request")

        def _awaiting_head(self) -> bool:
            cycle = self.cycle
            return cycle is None or not cycle.more_body

        def _owns_transport(self) -> bool:
            """False once the connection was handed on (a WebSocket upgrade) or is closing."""
            transport = self.transport
            return transport is not None and not transport.is_closing() and transport.get_protocol() is self

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = asyncio.get_running_loop().call_later(self.head_timeout_sec, self._head_late)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if not self._owns_transport():
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:  # answering: the next head waits
                self._arm()
                return
            if self._awaiting_head():
                log.warning("a request head took over %g s: refused (408)", self.head_timeout_sec)
                self._refuse(408, f"the request line and headers took more than {self.head_timeout_sec:g} s",
                             "request_timeout")  # fmt: skip

        def _refuse(self, status: int, message: str, code: str) -> None:
            self._disarm()
            self._refused = True
            if self._owns_transport():
                self.transport.write(raw_response(status, message, code))
                self.transport.close()

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def default_protocol() -> type[asyncio.Protocol]:
    """The HTTP/1.1 protocol class uvicorn's http="auto" picks: httptools when installed, else h11."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return AutoHTTPProtocol


# ---------------------------------------------------------------------------------------------
# The request body: an ASGI middleware
# ---------------------------------------------------------------------------------------------


class BodyDeadline:
    """A body must keep arriving: the app's receive() waits at most `idle_sec` for the next
    piece, and once `grace_sec` have passed the body must average `min_rate` bytes a second
    (the wait is cut where that would fail). Past either, the client gets a JSON 408 and the
    connection closes; the app sees the client as gone (http.disconnect), so a route cleans up
    as for any client that left, and whatever it answers then is dropped. Only the body is
    timed: once it has fully arrived, receive() is the app's own (a disconnect watcher may wait
    on it for as long as a job runs)."""

    def __init__(self, app: Any, idle_sec: float = BODY_IDLE_SEC, min_rate: float = BODY_MIN_RATE,
                 grace_sec: float = BODY_GRACE_SEC):  # fmt: skip
        self.app = app
        self.idle_sec, self.min_rate, self.grace_sec = idle_sec, min_rate, grace_sec

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _TimedBody(self, receive, send)
        await self.app(scope, body.receive, body.send)


class _TimedBody:
    """One request's body under BodyDeadline's rules."""

    def __init__(self, rules: BodyDeadline, receive: Receive, send: Send):
        self.rules, self._receive, self._send = rules, receive, send
        self.started = self.last = time.monotonic()
        self.received = 0
        self.complete = False  # the whole body has arrived
        self.timed_out = False
        self.responding = False  # the app has started its response
        self.answered = False  # the 408 was sent in the app's place

    def deadline(self) -> float:
        rules = self.rules
        idle = self.last + rules.idle_sec
        if rules.min_rate <= 0:
            return idle
        return min(idle, self.started + max(rules.grace_sec, self.received / rules.min_rate))

    async def receive(self) -> Message:
        if self.timed_out:
            return {"type": "http.disconnect"}
        if self.complete:
            return await self._receive()
        try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation (gh-86296)
            async with asyncio.timeout(max(0.0, self.deadline() - time.monotonic())):
                message = await self._receive()
        except TimeoutError:
            return await self._late()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.last = time.monotonic()
            self.complete = not message.get("more_body", False)
        return message

    async def _late(self) -> Message:
        self.timed_out = True
        log.warning("a request body stalled (%d bytes in %.1f s): refused (408)", self.received,
                    time.monotonic() - self.started)  # fmt: skip
        if not self.responding:
            self.answered = True
            rules = self.rules
            await send_error(self._send, 408, f"the request body stopped arriving: each part must come within "
                             f"{rules.idle_sec:g} s, and after {rules.grace_sec:g} s the body must average "
                             f"{rules.min_rate:g} bytes/s", "request_timeout", close=True)  # fmt: skip
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.answered:
            return  # the 408 went out: the app's own answer to the "disconnect" is dropped
        if message["type"] == "http.response.start":
            self.responding = True
        await self._send(message)


# ---------------------------------------------------------------------------------------------
# Slots: bodies being read, jobs running
# ---------------------------------------------------------------------------------------------


class Slots:
    """Places held at once (used on the event loop only), up to a size given at each call (read
    from the config then, so that a test's change is seen): take() says whether one was free
    and took it; leave() gives it back. The HTTP routes keep two: bodies being read (uploads
    streaming to disk, JSON bodies) and jobs running (MAX_CONCURRENT_JOBS), and a request holds
    a job slot only once its body has fully arrived."""

    def __init__(self) -> None:
        self.held = 0

    def free(self, size: int) -> bool:
        return self.held < size

    def take(self, size: int) -> bool:
        if self.held >= size:
            return False
        self.held += 1
        return True

    def leave(self) -> None:
        self.held = max(0, self.held - 1)
