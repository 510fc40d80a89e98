"""`GET /v1/realtime?intent=transcription`: OpenAI's Realtime transcription protocol over a
WebSocket (FastAPI/Starlette), for load-balancing endpoints (WORKER_MODE=http).

This is the transport only: the handshake (intent, auth, session limit, resume), frames (text
JSON in, one event per message out), the bounded outgoing queue, the timers (idle, connection
limit) and shutdown. What a session does with the events is realtime_session's; the model is
reached through the Engine handed in.

Refusals before the session starts are HTTP responses with an OpenAI error body (401 wrong key,
400 wrong intent, 404 unknown or expired session, 429 no session free, 503 shutting down).
Once open, the socket is closed with these codes:

    1000  the client's own close, or REALTIME_IDLE_SEC without a message
    1001  the worker is stopping (after each turn's `completed`), or REALTIME_MAX_CONNECTION_SEC
          passed: reconnect with &session_id=<id> to resume (the official client retries 1001)
    1003  a binary frame (events are JSON text)
    1008  more than REALTIME_MAX_BUFFER_SEC of audio not committed, or a client that does not
          read its events (its queue of REALTIME_SEND_QUEUE events is full)
    1009  a message over REALTIME_MAX_MESSAGE_BYTES
    1011  a bug in this worker (logged)
    4001  another connection resumed this session
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect

from parakeet_worker.realtime_session import BufferOverflow, Engine, LiveLimits, Session

log = logging.getLogger("parakeet-worker.realtime")

KEY_PROTOCOL = "openai-insecure-api-key."  # how a browser, which cannot set headers, sends its key
FLUSH_SEC = 5.0  # how long queued events may take to leave before a clean close
TAKEOVER_SEC = 5.0  # how long a resume waits for the connection it replaces to let go

CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_UNSUPPORTED, CLOSE_POLICY, CLOSE_TOO_BIG = 1000, 1001, 1003, 1008, 1009
CLOSE_INTERNAL = 1011
CLOSE_REPLACED = 4001


@dataclass(frozen=True)
class RealtimeSettings:
    """Everything the route needs to know (the lead wires these to Config)."""

    api_key: str | None = None  # WORKER_API_KEY
    max_sessions: int = 32  # REALTIME_MAX_SESSIONS: sessions held at once, resumable ones included
    idle_sec: float = 120.0  # REALTIME_IDLE_SEC
    resume_sec: float = 60.0  # REALTIME_RESUME_SEC
    max_connection_sec: float = 0.0  # REALTIME_MAX_CONNECTION_SEC; 0: no limit
    max_message_bytes: int = 1 << 20  # REALTIME_MAX_MESSAGE_BYTES
    send_queue: int = 256  # REALTIME_SEND_QUEUE: events waiting for a slow reader
    shutdown_grace_sec: float = 30.0  # SHUTDOWN_GRACE_SEC
    live: LiveLimits = field(default_factory=LiveLimits)

    @classmethod
    def from_config(cls, cfg: Any) -> RealtimeSettings:
        """From the worker's Config (config.CFG): each REALTIME_* variable, WORKER_API_KEY and
        SHUTDOWN_GRACE_SEC."""
        live = LiveLimits(partial_ms=cfg.realtime_partial_ms, max_turn_sec=cfg.realtime_max_turn_sec,
                          max_buffer_sec=cfg.realtime_max_buffer_sec, model_name=cfg.model)  # fmt: skip
        return cls(api_key=cfg.worker_api_key or None, max_sessions=cfg.realtime_max_sessions,
                   idle_sec=cfg.realtime_idle_sec, resume_sec=cfg.realtime_resume_sec,
                   max_connection_sec=cfg.realtime_max_connection_sec, max_message_bytes=cfg.realtime_max_message_bytes,
                   send_queue=cfg.realtime_send_queue, shutdown_grace_sec=cfg.shutdown_grace_sec, live=live)  # fmt: skip


class _Refused(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def authorized(headers: Any, subprotocols: list[str], key: str | None) -> bool:
    """With a key set: `Authorization: Bearer <key>`, or the `openai-insecure-api-key.<key>`
    subprotocol; compared in constant time."""
    if not key:
        return True
    want = key.encode()
    bearer = headers.get("authorization", "")
    if bearer.startswith("Bearer ") and hmac.compare_digest(bearer[7:].encode(), want):
        return True
    return any(p.startswith(KEY_PROTOCOL) and hmac.compare_digest(p[len(KEY_PROTOCOL):].encode(), want)
               for p in subprotocols)  # fmt: skip


def chosen_subprotocol(offered: list[str]) -> str | None:
    """A browser fails the socket unless the server picks one of the subprotocols it offered:
    `realtime` when offered (OpenAI's examples offer it), else the first one that does not carry
    the key, else the key one itself."""
    if not offered:
        return None
    if "realtime" in offered:
        return "realtime"
    return next((p for p in offered if not p.startswith(KEY_PROTOCOL)), offered[0])


class Connection:
    """One WebSocket holding one session: a reader, a sender draining a bounded queue, timers."""

    def __init__(self, ws: WebSocket, session: Session, settings: RealtimeSettings):
        self.ws, self.session, self.settings = ws, session, settings
        self.queue: asyncio.Queue[tuple[dict[str, Any], Callable[[], None] | None] | None] = asyncio.Queue(settings.send_queue)
        self.close_code: int | None = None
        self.close_reason = ""
        self.closing = asyncio.Event()
        self.finished = asyncio.Event()
        self.client_gone = False
        self.reader: asyncio.Task[None] | None = None

    # Sink
    def send(self, event: dict[str, Any], on_sent: Callable[[], None] | None = None) -> None:
        if self.closing.is_set() and self.close_code in (CLOSE_POLICY, CLOSE_REPLACED):
            return
        try:
            self.queue.put_nowait((event, on_sent))
        except asyncio.QueueFull:
            self.request_close(CLOSE_POLICY, f"the client did not read its events ({self.settings.send_queue} waiting)")

    def request_close(self, code: int, reason: str) -> None:
        if not self.closing.is_set():
            self.close_code, self.close_reason = code, reason
            self.closing.set()

    async def run(self, resume: bool, last_item_id: str | None) -> None:
        sender = asyncio.ensure_future(self._sender())
        self.reader = asyncio.ensure_future(self._read())
        self.reader.add_done_callback(self._reader_done)
        try:
            self.session.attach(self, resume, last_item_id)
            limit = self.settings.max_connection_sec or None
            try:
                await asyncio.wait_for(self.closing.wait(), limit)
            except TimeoutError:
                self.request_close(CLOSE_GOING_AWAY, f"REALTIME_MAX_CONNECTION_SEC={limit:g} reached: reconnect with "
                                   f"session_id={self.session.id} to resume")  # fmt: skip
            self.reader.cancel()
            self.session.detach(self)  # from here its events wait for a resume (a close may block on a client that reads nothing)
            await self._close(sender)
        finally:
            sender.cancel()
            self.reader.cancel()
            self.session.detach(self)
            self.finished.set()

    def _reader_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("a realtime connection's reader failed", exc_info=task.exception())
            self.request_close(CLOSE_INTERNAL, "internal error")

    async def _read(self) -> None:
        while True:
            try:
                message = await asyncio.wait_for(self.ws.receive(), self.settings.idle_sec or None)
            except TimeoutError:
                self.request_close(CLOSE_NORMAL, f"no message for REALTIME_IDLE_SEC={self.settings.idle_sec:g} s")
                return
            if message["type"] == "websocket.disconnect":
                self.client_gone = True
                self.request_close(message.get("code", CLOSE_NORMAL), "")
                return
            if message.get("bytes") is not None:
                self.request_close(CLOSE_UNSUPPORTED, "binary frames are not taken: send JSON events as text")
                return
            text = message.get("text") or ""
            if len(text) > self.settings.max_message_bytes or len(text.encode()) > self.settings.max_message_bytes:
                self.request_close(CLOSE_TOO_BIG, f"a message is over {self.settings.max_message_bytes} bytes")
                return
            try:
                self.session.handle(text)
            except BufferOverflow as exc:
                self.request_close(CLOSE_POLICY, str(exc))
                return

    async def _sender(self) -> None:
        while (entry := await self.queue.get()) is not None:
            event, on_sent = entry
            await self.ws.send_text(json.dumps(event))
            if on_sent is not None:
                on_sent()

    async def _close(self, sender: asyncio.Task[None]) -> None:
        """Let the queued events leave (unless the client is gone, reads nothing, or was
        replaced), then close with the code decided."""
        if self.client_gone:
            return
        if self.close_code not in (CLOSE_POLICY, CLOSE_REPLACED):
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(sender), FLUSH_SEC)
        with contextlib.suppress(Exception):
            await self.ws.close(self.close_code or CLOSE_NORMAL, self.close_reason[:120])

    async def shutdown(self) -> None:
        """The worker is stopping: stop reading, answer every buffered turn, then close (1001)."""
        if self.reader is not None:
            self.reader.cancel()
        await self.session.finish()
        self.request_close(CLOSE_GOING_AWAY, "the worker is shutting down")
        await self.finished.wait()


class SessionManager:
    """The sessions of this worker: at most max_sessions (attached or waiting to be resumed), each
    reachable by its id for resume_sec after its connection ends."""

    def __init__(self, settings: RealtimeSettings, engine: Engine, vad_model: Callable[[], Any],
                 refuse: Callable[[], tuple[int, str, str] | None] | None = None):  # fmt: skip
        """`refuse` says why the worker cannot take a session now, as (HTTP status, message,
        code): the model still loading, or failed, or the worker unhealthy."""
        self.settings, self.engine, self.vad_model, self.refuse = settings, engine, vad_model, refuse
        self.sessions: dict[str, Session] = {}
        self.connections: dict[str, Connection] = {}
        self.expiry: dict[str, asyncio.TimerHandle] = {}
        self.stopping = False

    def open(self, session_id: str | None) -> tuple[Session, bool]:
        """The session a connection gets: a new one, or (resume) the one named. _Refused if none."""
        if self.stopping:
            raise _Refused(503, "this worker is shutting down; connect again (to another worker)", "unavailable")
        refusal = self.refuse() if self.refuse is not None else None
        if refusal is not None:
            raise _Refused(*refusal)
        if session_id:
            session = self.sessions.get(session_id)
            if session is None:
                raise _Refused(404, f"no session {session_id!r} on this worker: it ended, expired (REALTIME_RESUME_SEC="
                               f"{self.settings.resume_sec:g}) or lives on another worker (pin with X-Runpod-Worker-Id)",
                               "session_not_found")  # fmt: skip
            return session, True
        if len(self.sessions) >= self.settings.max_sessions:
            raise _Refused(429, f"this worker holds REALTIME_MAX_SESSIONS={self.settings.max_sessions} sessions; retry "
                           "shortly or on another worker", "too_many_sessions")  # fmt: skip
        session = Session(self.engine, self.vad_model, self.settings.live)
        self.sessions[session.id] = session
        return session, False

    async def take(self, session: Session, conn: Connection) -> None:
        """`conn` becomes the session's connection; one it replaces is closed first (4001)."""
        old = self.connections.get(session.id)
        if old is not None:
            old.request_close(CLOSE_REPLACED, "another connection resumed this session")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(old.finished.wait(), TAKEOVER_SEC)
        timer = self.expiry.pop(session.id, None)  # after the wait: the old connection's end set one
        if timer is not None:
            timer.cancel()
        self.connections[session.id] = conn

    def let_go(self, session: Session, conn: Connection) -> None:
        """`conn` ended. A client that closed normally ends its session; otherwise the session
        waits resume_sec for a reconnect."""
        if self.connections.get(session.id) is not conn:
            return  # replaced: the session lives on in the new connection
        del self.connections[session.id]
        if (conn.client_gone and conn.close_code == CLOSE_NORMAL) or self.stopping:
            self.end(session.id)
        else:
            loop = asyncio.get_running_loop()
            self.expiry[session.id] = loop.call_later(self.settings.resume_sec, self.end, session.id)

    def end(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        timer = self.expiry.pop(session_id, None)
        if timer is not None:
            timer.cancel()
        if session is not None:
            session.close()

    async def drain(self) -> None:
        """SIGTERM: refuse new sessions; every connected session gets the `completed` of what it
        had buffered, then a 1001 close; within shutdown_grace_sec."""
        self.stopping = True
        connections = list(self.connections.values())
        if connections:
            _, late = await asyncio.wait([asyncio.ensure_future(c.shutdown()) for c in connections],
                                         timeout=self.settings.shutdown_grace_sec)  # fmt: skip
            for task in late:
                task.cancel()
        for session_id in list(self.sessions):
            self.end(session_id)


def realtime_router(manager: SessionManager, path: str = "/v1/realtime") -> APIRouter:
    """The route, for the HTTP server to include (`app.include_router(...)`)."""
    router = APIRouter()

    @router.websocket(path)
    async def realtime(ws: WebSocket) -> None:
        offered = list(ws.scope.get("subprotocols") or [])
        try:
            if ws.query_params.get("intent", "transcription") != "transcription":
                raise _Refused(400, "this worker serves transcription sessions: connect with ?intent=transcription",
                               "invalid_intent")  # fmt: skip
            if not authorized(ws.headers, offered, manager.settings.api_key):
                raise _Refused(401, "missing or wrong API key: send Authorization: Bearer <WORKER_API_KEY> or the "
                               "subprotocol openai-insecure-api-key.<WORKER_API_KEY>", "invalid_api_key")  # fmt: skip
            session, resume = manager.open(ws.query_params.get("session_id"))
        except _Refused as exc:
            await _deny(ws, exc)
            return
        conn = Connection(ws, session, manager.settings)
        await manager.take(session, conn)
        try:
            await ws.accept(subprotocol=chosen_subprotocol(offered))
            await conn.run(resume, ws.query_params.get("last_item_id"))
        except (WebSocketDisconnect, OSError):
            conn.client_gone = True
        finally:
            manager.let_go(session, conn)

    return router


async def _deny(ws: WebSocket, exc: _Refused) -> None:
    body = {"error": {"message": exc.message, "type": "invalid_request_error", "code": exc.code, "param": None}}
    try:
        await ws.send_denial_response(JSONResponse(body, status_code=exc.status))
    except RuntimeError:  # a server without the denial extension: a close before accept is a 403
        await ws.close(CLOSE_POLICY, exc.message[:120])

