"""parakeet-worker's HTTP front, for Runpod load-balancing endpoints (WORKER_MODE=http).

Only the HTTP layer lives here: routes, auth, multipart parsing, server-sent events, client
disconnects, the health port and shutdown. Every job runs through the job runner handed in
(handler.run_job), on the same scheduler as queue jobs; the OpenAI request and response shapes
are openai_api's. handler.py builds the app (handler.http_app) and serves it (main()).

    GET  /ping                      204 while the model loads, 200 ready, 503 unhealthy (no auth)
    POST /v1/audio/transcriptions   OpenAI's multipart request; stream=true: text/event-stream
    GET  /v1/models                 the model list
    POST /transcribe                the native body {"input": {...}}: a queue job's output
    GET  /v1/realtime               a WebSocket: live transcription, OpenAI's Realtime protocol (realtime_ws)

Every answer is JSON, errors included, with the status of its code (errors.CODES). What a
client may hold of the server before its request is a job is bounded (parakeet_worker.limits:
a request head's bytes and time, a body's idle deadline and minimum rate, bodies read in their
own pool so that a slow upload holds no job slot), and SIGTERM drains (parakeet_worker.drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from parakeet_worker import checks, config, errors, limits, logsafe, patches
from parakeet_worker.audio.uploads import UploadFile, Uploads
from parakeet_worker.checks import InputError
from parakeet_worker.drain import ANSWER_SEC, SHUTDOWN_CODE, SHUTDOWN_MESSAGE, Drain, draining_server, exit_now
from parakeet_worker.errors import ItemError, JobError
from parakeet_worker.openai_api import (
    TRANSLATION_MESSAGE,
    OpenAIError,
    OpenAIRequest,
    RunJob,
    job_failed,
    openai_delta,
    openai_done,
    openai_models,
    openai_request,
    openai_transcribe,
)
from parakeet_worker.realtime_ws import SessionManager, realtime_router

log = logging.getLogger("parakeet-worker.http")

FIELD_MAX_BYTES = 64 * 1024  # one form field that is not the file
# A known speaker's reference, as OpenAI's clients send it: a data: URL in a form field. 2-10 s of
# audio; a 10 s 44.1 kHz stereo WAV is 2.4 MB of base64.
REFERENCE_FIELD_MAX_BYTES = 4 * 1024 * 1024


def field_max_bytes(name: str) -> int:
    """The most one form field may hold."""
    return REFERENCE_FIELD_MAX_BYTES if name.removesuffix("[]") == "known_speaker_references" else FIELD_MAX_BYTES


FIELDS_MAX = 2000  # form fields per request (boost_phrases come one per field)
JSON_MAX_BYTES = 64 * 1024**2  # a /transcribe body (base64 audio inline)
PING_STATUS = {"loading": 204, "ready": 200, "unhealthy": 503}
INTERNAL_MESSAGE = "the worker failed on this request (a bug, logged on the worker); please report it"


def error(code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI error object with the status of `code` (errors.CODES)."""
    status = errors.status_of(code)
    return JSONResponse(OpenAIError(status, message, code, param).body(), status_code=status, headers=headers)


def retry_later(code: str, message: str) -> JSONResponse:
    """busy (429) or shutting_down (503): with Retry-After; a worker shutting down also closes
    the connection, so that the client's next try opens one to another worker."""
    headers = {"Retry-After": str(limits.RETRY_AFTER_SEC)}
    if code == SHUTDOWN_CODE:
        headers["Connection"] = "close"
    return error(code, message, headers=headers)


def openai_error(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


# ---------------------------------------------------------------------------------------------
# The gate: shutdown, health, bodies being read (HTTP_BODY_READERS), jobs (MAX_CONCURRENT_JOBS).
# ---------------------------------------------------------------------------------------------


# What /ping says: "loading", "ready" or "unhealthy" (handler.worker_health)
Health = Callable[[], str]


class ShuttingDown(Exception):
    """A request's work was stopped because the grace period after SIGTERM is over."""


class Gate:
    """Who may start what. A request first needs the server not shutting down and healthy, and a
    place among the bodies being read (HTTP_BODY_READERS); only once its body has fully arrived
    and been checked does it take a job slot (MAX_CONCURRENT_JOBS), so a slow upload never holds
    one. It is refused at once (429) when the job slots are full already, rather than after its
    upload. Every piece of its work runs as a task the drain can stop (tracked())."""

    def __init__(self, health: Health, drain: Drain) -> None:
        self.health, self.drain = health, drain
        self.readers, self.jobs = limits.Slots(), limits.Slots()

    def refuse(self) -> JSONResponse | None:
        """Why this request cannot start (None: it holds a reader slot until readers.leave())."""
        cfg = config.CFG
        if self.drain.draining:
            return retry_later(SHUTDOWN_CODE, SHUTDOWN_MESSAGE)
        if self.health() == "unhealthy":
            return error("unavailable", "this worker is unhealthy (a GPU fault); retry on another")
        if not self.jobs.free(cfg.max_concurrent_jobs):
            return self.busy()
        if not self.readers.take(cfg.http_body_readers):
            return retry_later("busy", f"this worker is busy: HTTP_BODY_READERS={cfg.http_body_readers} request "
                               "bodies are being received; retry shortly")  # fmt: skip
        return None

    def take_job(self) -> JSONResponse | None:
        """A job slot (None: taken, held until jobs.leave()), or the 429."""
        return None if self.jobs.take(config.CFG.max_concurrent_jobs) else self.busy()

    @staticmethod
    def busy() -> JSONResponse:
        n = config.CFG.max_concurrent_jobs
        return retry_later("busy", f"this worker is busy: MAX_CONCURRENT_JOBS={n} requests are in flight; retry shortly")

    async def tracked(self, work: Awaitable[Any]) -> Any:
        """Await `work` as a task the drain can stop: ShuttingDown if it did."""
        task = self.drain.track(asyncio.ensure_future(work))
        try:
            return await task
        except asyncio.CancelledError:
            if self.drain.stopping and not _cancelling():
                raise ShuttingDown from None
            raise


# ---------------------------------------------------------------------------------------------
# Requests: the multipart form streamed to the job's temp dir; a client gone cancels its job.
# ---------------------------------------------------------------------------------------------


class FormError(Exception):
    """A body this server will not read: invalid_request (400), or body_too_large (413) past a
    limit; `param` names the form field where one is to blame."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param

    def response(self) -> JSONResponse:
        return error(self.code, str(self), self.param)


async def read_form(request: Request, uploads: Uploads) -> dict[str, Any]:
    """The multipart form's fields (strings; a field sent more than once, or named `x[]`, as a
    list), its file (the `file` field) an Upload streamed into `uploads` as it arrives.
    FormError for a form that is not one; ItemError (too_large, disk_full) from the upload."""
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in options:
        raise FormError("invalid_request", "send the request as multipart/form-data, with the audio in the 'file' field")
    fields: dict[str, Any] = {}
    part: dict[str, Any] = {}
    pending: list[Any] = []  # what the parser's (sync) callbacks found in one chunk, handled after it

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, name=b"", value=b"", data=bytearray())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["name"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["value"] += data[start:end]

    def on_header_end() -> None:
        part["headers"][part["name"].lower()] = part["value"]
        part["name"], part["value"] = b"", b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        part["field"] = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        if filename is not None:
            part["file"] = True  # its data goes to the upload, not into memory
            pending.append(("open", part["field"], filename.decode("utf-8", "replace")))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if "file" in part:
            pending.append(("data", bytes(data[start:end])))
        elif len(part["data"]) + end - start > (most := field_max_bytes(part["field"])):
            name = logsafe.echo(part["field"], 100)
            raise FormError("invalid_request", f"the form field '{name}' is over {most} bytes", name.removesuffix("[]"))
        else:
            part["data"] += data[start:end]

    def on_part_end() -> None:
        if "file" in part:
            pending.append(("end",))
        else:
            add(part["field"], part["data"].decode("utf-8", "replace"))

    def add(name: str, value: Any) -> None:
        if sum(len(v) if isinstance(v, list) else 1 for v in fields.values()) >= FIELDS_MAX:
            raise FormError("body_too_large", f"the form has more than {FIELDS_MAX} fields")
        if name in fields or name.endswith("[]"):
            old = fields.get(name, [])
            fields[name] = [*(old if isinstance(old, list) else [old]), value]
        else:
            fields[name] = value

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
                 "on_part_end": on_part_end}  # fmt: skip
    try:
        parser = MultipartParser(options[b"boundary"], callbacks)  # type: ignore[arg-type]
    except FormParserError:  # python-multipart's own limit (256 bytes; RFC 2046 allows 70)
        raise FormError("invalid_request", f"the multipart boundary is {len(options[b'boundary'])} bytes, "
                        "more than the 256 this server reads (RFC 2046 allows 70)") from None
    current: UploadFile | None = None
    async for chunk in request.stream():
        try:
            parser.write(chunk)
        except FormParserError as exc:  # the body is not a form
            raise FormError("invalid_request", f"the multipart body could not be parsed: {logsafe.echo(str(exc), 200)}") from None
        for event in pending:  # on_headers_finished marks the part as a file before its data
            if event[0] == "open":
                if current is not None or "file" in fields or event[1] != "file":
                    raise FormError("invalid_request", "send one file, in the 'file' field", "file")
                current = uploads.open(event[2] or "upload")
            elif event[0] == "data" and current is not None:
                await current.write(event[1])
            elif event[0] == "end" and current is not None:
                fields["file"] = await current.finish()
                current = None
        pending.clear()
    parser.finalize()
    if current is not None:
        raise FormError("invalid_request", "the multipart body ended inside the file", "file")
    return fields


def cancel_on_disconnect(request: Request, task: asyncio.Future[Any]) -> asyncio.Event:
    """Cancel `task` (as a Runpod stop cancels a job) if the client goes away before it is done;
    the event says that it did."""
    gone = asyncio.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    task.add_done_callback(lambda _: watcher.cancel())
    return gone


async def read_json(request: Request) -> dict[str, Any]:
    """A JSON object body, at most JSON_MAX_BYTES (FormError body_too_large), nested at most
    checks.MAX_DEPTH deep; InputError naming the field (or "the body") for one that is not."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > JSON_MAX_BYTES:
            raise FormError("body_too_large", f"the body is over {JSON_MAX_BYTES} bytes; pass audio by URL")
    parsed = checks.loads_json(bytes(body), "the body")
    if not isinstance(parsed, dict):
        raise InputError("the body", f"must be a JSON object, not {checks.kind_of(parsed)}")
    return parsed


async def until_disconnect(request: Request, job: Awaitable[Any], drain: Drain) -> tuple[bool, Any]:
    """Await `job`, stopped if the client goes away first: (False, its result), or (True, None)
    once it was stopped for that; ShuttingDown once the drain stopped it."""
    task = drain.track(asyncio.ensure_future(job))
    gone = cancel_on_disconnect(request, task)
    try:
        return False, await task
    except asyncio.CancelledError:
        if _cancelling():
            raise
        if gone.is_set():
            return True, None
        if drain.stopping:
            raise ShuttingDown from None
        raise


def _cancelling() -> bool:
    """Whether this task itself is being cancelled (server shutdown), not just its job."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


class BearerAuth:
    """With WORKER_API_KEY set, every route but /ping needs `Authorization: Bearer <key>`
    (compared in constant time). A plain ASGI middleware: it leaves receive() alone, so a
    client's disconnect still reaches the routes."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        key = config.CFG.worker_api_key
        if scope["type"] == "http" and key and scope["path"] != "/ping":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {key}".encode()):
                response = error("invalid_api_key", "missing or wrong API key: send Authorization: Bearer <WORKER_API_KEY>")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


ROUTES = "POST /v1/audio/transcriptions, GET /v1/models, POST /transcribe, GET /v1/realtime (a WebSocket) and GET /ping"


def create_app(run_job: RunJob, health: Health, start: Callable[[], object] | None = None,
               realtime: SessionManager | None = None, drain: Drain | None = None) -> FastAPI:  # fmt: skip
    """The HTTP API over `run_job`. `start` (the model load) runs in a background thread started
    at the lifespan's startup, just before uvicorn binds its sockets, so /ping answers (204)
    while it loads. `realtime` (live sessions) serves GET /v1/realtime. `drain` is the shutdown
    state SIGTERM sets (serve() makes one)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start is not None:
            threading.Thread(target=start, name="model-load", daemon=True).start()
        yield

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    gate = Gate(health, drain or Drain(config.CFG.shutdown_grace_sec))
    cfg = config.CFG
    app.add_middleware(BearerAuth)
    if realtime is not None:
        app.include_router(realtime_router(realtime))  # its own auth: a browser cannot send a header
    app.add_middleware(limits.BodyDeadline, idle_sec=cfg.http_body_idle_sec, min_rate=cfg.http_body_min_rate,
                       grace_sec=cfg.http_body_grace_sec)  # fmt: skip

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code in (404, 405):
            return error("unknown_url", f"unknown route {request.method} {logsafe.echo(request.url.path, 200)}: "
                         f"this worker serves {ROUTES}")  # fmt: skip
        code = {400: "invalid_request", 401: "invalid_api_key", 413: "body_too_large"}.get(exc.status_code)
        return error(code or "internal_error", logsafe.echo(str(exc.detail), 300))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:  # logged by Starlette and uvicorn (redacted)
        return error("internal_error", INTERNAL_MESSAGE)

    @app.get("/ping")
    async def ping() -> Response:
        return Response(status_code=503 if gate.drain.draining else PING_STATUS[health()])

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(openai_models())

    @app.post("/v1/audio/translations")
    async def translations() -> JSONResponse:
        return error("unknown_url", TRANSLATION_MESSAGE)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        refused = gate.refuse()
        if refused is not None:
            return refused
        streaming = holds_job = False
        uploads: Uploads | None = None
        try:
            try:
                uploads = Uploads()
                fields = await gate.tracked(read_request(request, uploads))
            finally:
                gate.readers.leave()
            req = openai_request(fields)
            busy = gate.take_job()
            if busy is not None:
                return busy
            holds_job = True
            if req.stream:
                streaming = True
                return StreamingResponse(stream(request, req, run_job, uploads, gate), media_type="text/event-stream")
            gone, answer = await until_disconnect(request, openai_transcribe(req, run_job, None, uploads), gate.drain)
            if gone:
                return Response(status_code=499)
            if isinstance(answer, str):
                return PlainTextResponse(answer)
            return JSONResponse(answer)
        except OpenAIError as exc:
            return openai_error(exc)
        except InputError as exc:  # the JSON body: not JSON, or nested too deep
            return error("invalid_request", logsafe.echo(str(exc)), _param(exc.field))
        except ItemError as exc:
            return error(exc.code, exc.message, "file")
        except JobError as exc:  # no temp dir for the upload
            return openai_error(job_failed(exc))
        except FormError as exc:
            return exc.response()
        except ShuttingDown:
            return retry_later(SHUTDOWN_CODE, SHUTDOWN_MESSAGE)
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception:  # a bug: logged in full (redacted), answered without its text
            log.exception("a request failed")
            return error("internal_error", INTERNAL_MESSAGE)
        finally:
            if not streaming:
                if uploads is not None:
                    uploads.discard()  # run_job took what it kept; this is what a failed request left
                if holds_job:
                    gate.jobs.leave()

    @app.post("/transcribe")
    async def transcribe(request: Request) -> Response:
        refused = gate.refuse()
        if refused is not None:
            return refused
        holds_job = False
        try:
            try:
                job = await gate.tracked(read_json(request))
            finally:
                gate.readers.leave()
            busy = gate.take_job()
            if busy is not None:
                return busy
            holds_job = True
            gone, out = await until_disconnect(request, run_job(job.get("input"), None, None), gate.drain)
            if gone:
                return Response(status_code=499)
            return JSONResponse(out)
        except InputError as exc:  # the body, as the native job's input: {"error": "invalid input: ..."}
            field = exc.field.removeprefix("input.") if exc.field.startswith("input.") else exc.field
            message = logsafe.echo(f"invalid input: {field} {exc.problem}")
            return JSONResponse({"error": message}, status_code=errors.status_of("invalid_input"))
        except JobError as exc:
            return JSONResponse({"error": exc.message}, status_code=errors.status_of(exc.code))
        except FormError as exc:
            return JSONResponse({"error": str(exc)}, status_code=errors.status_of(exc.code))
        except ShuttingDown:
            return retry_later(SHUTDOWN_CODE, SHUTDOWN_MESSAGE)
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception:  # a bug: logged in full (redacted), answered without its text
            log.exception("a /transcribe request failed")
            return JSONResponse({"error": f"internal_error: {INTERNAL_MESSAGE}"}, status_code=500)
        finally:
            if holds_job:
                gate.jobs.leave()

    app.state.gate = gate
    return app


def _param(field: str) -> str | None:
    """The OpenAI `param` for a checks.InputError's field: its first key ("temperature" of
    "temperature", "boost_phrases" of "boost_phrases[3]"); None for the body as a whole."""
    head = field.split(".", 1)[0].split("[", 1)[0]
    return None if head.startswith("the ") else head


async def read_request(request: Request, uploads: Uploads) -> dict[str, Any]:
    """The request's fields: a JSON body (as the queue route's openai_input: file by URL or
    base64), or a multipart form whose file streams into `uploads`."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        return await read_json(request)
    return await read_form(request, uploads)


def stream(request: Request, req: OpenAIRequest, run_job: RunJob, uploads: Uploads, gate: Gate) -> AsyncIterator[bytes]:
    """stream=true: a transcript.text.delta event as each part of the transcript becomes final
    (each item, each piece of a split file), then one transcript.text.done with the whole text;
    an error mid-way is an error event, and so is a shutdown that stops it. The job starts here,
    not in the generator, so that its end (done, failed, or cancelled when the client goes away)
    cleans up even if the response never gets to run the generator. With include[]=logprobs each
    event carries its tokens'."""
    texts: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def events(kind: str, payload: dict[str, Any]) -> None:
        if kind == "text" and payload["text"]:
            texts.put_nowait(payload)

    as_json = dataclasses.replace(req, response_format="json")
    job = gate.drain.track(asyncio.ensure_future(openai_transcribe(as_json, run_job, events, uploads)))
    cancel_on_disconnect(request, job)  # Starlette may not notice before its next send

    def ended(_: asyncio.Future[Any]) -> None:
        uploads.discard()  # run_job took them over; this covers a job cancelled before it did
        gate.jobs.leave()

    job.add_done_callback(ended)
    return sse_events(job, texts, gate.drain)


async def sse_events(job: asyncio.Future[Any], texts: asyncio.Queue[dict[str, Any]], drain: Drain) -> AsyncIterator[bytes]:
    """Each part's delta as it comes ({"text", "tokens" with logprobs}), then done or an error."""
    first = True
    try:
        while not (job.done() and texts.empty()):
            getter = asyncio.ensure_future(texts.get())
            await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            part = getter.result()
            yield sse(openai_delta(part["text"], first, part.get("tokens")))
            first = False
        if job.cancelled():  # the client went away, or the worker is shutting down
            if drain.stopping:
                yield sse(OpenAIError(503, SHUTDOWN_MESSAGE, SHUTDOWN_CODE).body())
            return
        try:
            answer = job.result()
        except OpenAIError as exc:
            yield sse(exc.body())
            return
        except Exception:  # a bug: the client still gets an error event
            log.exception("a streamed request failed")
            yield sse(OpenAIError(500, INTERNAL_MESSAGE, "internal_error").body())
            return
        yield sse(openai_done(answer["text"], answer.get("languages"), answer.get("logprobs")))
    finally:
        job.cancel()  # the client is gone (or the job is done already): its own task cleans up


def sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


# ---------------------------------------------------------------------------------------------
# Serving: HOST:PORT, /ping also on PORT_HEALTH when that differs; SIGTERM drains.
# ---------------------------------------------------------------------------------------------


def health_app(health: Health, drain: Drain) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/ping")
    async def ping() -> Response:
        return Response(status_code=503 if drain.draining else PING_STATUS[health()])

    return app


class _QuietServer(uvicorn.Server):
    """The health listener: the main server owns the signals and ends it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


def server_config(app: Any, port: int) -> uvicorn.Config:
    """uvicorn's settings: the request head capped in bytes and time (limits.guarded_protocol,
    for httptools or h11 alike); no log config of its own, so uvicorn's loggers reach the root
    logger and its redaction (patches.configure_logging), and no access log; no `server` header; no
    limit_concurrency (its plain-text 503 would answer /ping too). After SIGTERM the drain has
    answered everything before uvicorn's own shutdown starts: its grace only covers stragglers. A
    WebSocket message over 4x REALTIME_MAX_MESSAGE_BYTES is refused by uvicorn before it is
    whole; one over the cap itself by realtime_ws, with its reason."""
    cfg = config.CFG
    protocol = limits.guarded_protocol(limits.default_protocol(), cfg.http_head_max_bytes, cfg.http_head_timeout_sec)
    settings = uvicorn.Config(app, host=cfg.host, port=port, log_level="warning", access_log=False, log_config=None,
                              http=protocol, h11_max_incomplete_event_size=cfg.http_head_max_bytes,
                              server_header=False, timeout_graceful_shutdown=int(ANSWER_SEC), lifespan="on",
                              ws_max_size=4 * cfg.realtime_max_message_bytes)  # fmt: skip
    for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi"):  # whatever configured them before: the root's handlers
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # no handler, no propagation: Python's last resort would print it
    return settings


def serve(run_job: RunJob, health: Health, start: Callable[[], object], realtime: SessionManager | None = None) -> None:
    """`WORKER_MODE=http python handler.py`: serve until SIGTERM (or SIGINT), drain (requests and
    live sessions, SessionManager.drain, at once, within SHUTDOWN_GRACE_SEC), and end the
    process (exit 0) without Python's finalization (drain.exit_now says why)."""
    cfg = config.CFG
    patches.configure_logging()  # before uvicorn logs anything: its loggers reach the root's redaction
    drain = Drain(cfg.shutdown_grace_sec)
    app = create_app(run_job, health, start, realtime, drain)
    main = draining_server(server_config(app, cfg.port), drain, realtime.drain if realtime is not None else None)
    health_port = cfg.port_health or cfg.port
    log.warning("serving on %s:%d (health: /ping on port %d)", cfg.host, cfg.port, health_port)

    async def run() -> None:
        if health_port == cfg.port:
            await main.serve()
            return
        health_server = _QuietServer(server_config(health_app(health, drain), health_port))
        health_task = asyncio.ensure_future(health_server.serve())
        try:
            await main.serve()
        finally:
            health_server.should_exit = True
            await health_task

    # uvicorn raises a signal it handled itself (a second one) once it has shut down: ignore it
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    asyncio.run(run())
    log.warning("shut down")
    exit_now(0)
