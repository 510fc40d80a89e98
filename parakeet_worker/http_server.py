"""parakeet-worker's HTTP front, for Runpod load-balancing endpoints (WORKER_MODE=http).

Only the HTTP layer lives here: routes, auth, multipart parsing, server-sent events, client
disconnects, the health port and shutdown. Every job runs through the job runner handed in
(handler.run_job), on the same scheduler as queue jobs; the OpenAI request and response shapes
are openai_api's. handler.py builds the app (handler.http_app) and serves it (main()).

    GET  /ping                      204 while the model loads, 200 ready, 503 unhealthy (no auth)
    POST /v1/audio/transcriptions   OpenAI's multipart request; stream=true: text/event-stream
    GET  /v1/models                 the model list
    POST /transcribe                the native body {"input": {...}}: a queue job's output
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

from parakeet_worker import config, errors
from parakeet_worker.audio.uploads import UploadFile, Uploads
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

log = logging.getLogger("parakeet-worker.http")

FIELD_MAX_BYTES = 64 * 1024  # one form field that is not the file
FIELDS_MAX = 2000  # form fields per request (boost_phrases come one per field)
JSON_MAX_BYTES = 64 * 1024**2  # a /transcribe body (base64 audio inline)
PING_STATUS = {"loading": 204, "ready": 200, "unhealthy": 503}


def error(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(OpenAIError(status, message, code, param).body(), status_code=status)


def openai_error(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


# ---------------------------------------------------------------------------------------------
# Admission: at most MAX_CONCURRENT_JOBS requests hold jobs; beyond that a client gets 429.
# ---------------------------------------------------------------------------------------------


# What /ping says: "loading", "ready" or "unhealthy" (handler.worker_health)
Health = Callable[[], str]


class Admission:
    def __init__(self, health: Health) -> None:
        self.health = health
        self.in_flight = 0

    def refuse(self) -> JSONResponse | None:
        """Why this request cannot be taken now (None: taken, and counted until leave())."""
        health = self.health()
        if health == "unhealthy":
            return error(503, "this worker is unhealthy (a GPU fault); retry on another", "unavailable")
        if self.in_flight >= config.CFG.max_concurrent_jobs:
            return error(429, f"this worker is busy: MAX_CONCURRENT_JOBS={config.CFG.max_concurrent_jobs} "
                         "requests are in flight; retry shortly", "busy")  # fmt: skip
        self.in_flight += 1
        return None

    def leave(self) -> None:
        self.in_flight -= 1


# ---------------------------------------------------------------------------------------------
# Requests: the multipart form streamed to the job's temp dir; a client gone cancels its job.
# ---------------------------------------------------------------------------------------------


class FormError(Exception):
    """A form this server will not read: 400, or 413 past a limit."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_form(request: Request, uploads: Uploads) -> dict[str, Any]:
    """The multipart form's fields (strings; a field sent more than once, or named `x[]`, as a
    list), its file (the `file` field) an Upload streamed into `uploads` as it arrives.
    FormError for a form that is not one; ItemError (too_large, disk_full) from the upload."""
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in options:
        raise FormError(400, "send the request as multipart/form-data, with the audio in the 'file' field")
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
        elif len(part["data"]) + end - start > FIELD_MAX_BYTES:
            raise FormError(413, f"a form field is over {FIELD_MAX_BYTES} bytes")
        else:
            part["data"] += data[start:end]

    def on_part_end() -> None:
        if "file" in part:
            pending.append(("end",))
        else:
            add(part["field"], part["data"].decode("utf-8", "replace"))

    def add(name: str, value: Any) -> None:
        if sum(len(v) if isinstance(v, list) else 1 for v in fields.values()) >= FIELDS_MAX:
            raise FormError(413, f"the form has more than {FIELDS_MAX} fields")
        if name in fields or name.endswith("[]"):
            old = fields.get(name, [])
            fields[name] = [*(old if isinstance(old, list) else [old]), value]
        else:
            fields[name] = value

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
                 "on_part_end": on_part_end}  # fmt: skip
    parser = MultipartParser(options[b"boundary"], callbacks)  # type: ignore[arg-type]
    current: UploadFile | None = None
    async for chunk in request.stream():
        try:
            parser.write(chunk)
        except FormParserError as exc:  # the body is not a form
            raise FormError(400, f"the multipart body could not be parsed: {exc}") from None
        for event in pending:  # on_headers_finished marks the part as a file before its data
            if event[0] == "open":
                if current is not None or "file" in fields or event[1] != "file":
                    raise FormError(400, "send one file, in the 'file' field")
                current = uploads.open(event[2] or "upload")
            elif event[0] == "data" and current is not None:
                await current.write(event[1])
            elif event[0] == "end" and current is not None:
                fields["file"] = await current.finish()
                current = None
        pending.clear()
    parser.finalize()
    if current is not None:
        raise FormError(400, "the multipart body ended inside the file")
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
    """A JSON object body, at most JSON_MAX_BYTES (FormError 413), else FormError 400."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > JSON_MAX_BYTES:
            raise FormError(413, f"the body is over {JSON_MAX_BYTES} bytes; pass audio by URL")
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise FormError(400, "the body must be a JSON object")
    return parsed


async def until_disconnect(request: Request, job: Awaitable[Any]) -> tuple[bool, Any]:
    """Await `job`, stopped if the client goes away first: (False, its result), or (True, None)
    once it was stopped for that."""
    task = asyncio.ensure_future(job)
    gone = cancel_on_disconnect(request, task)
    try:
        return False, await task
    except asyncio.CancelledError:
        if gone.is_set() and not _cancelling():
            return True, None
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
                response = error(401, "missing or wrong API key: send Authorization: Bearer <WORKER_API_KEY>",
                                 "invalid_api_key")  # fmt: skip
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(run_job: RunJob, health: Health, start: Callable[[], object] | None = None) -> FastAPI:
    """The HTTP API over `run_job`. `start` (the model load) runs in a background thread started
    at the lifespan's startup, just before uvicorn binds its sockets, so /ping answers (204)
    while it loads."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start is not None:
            threading.Thread(target=start, name="model-load", daemon=True).start()
        yield

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    admission = Admission(health)

    app.add_middleware(BearerAuth)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error(404, f"unknown route {request.method} {request.url.path}: this worker serves "
                         "POST /v1/audio/transcriptions, GET /v1/models, POST /transcribe and GET /ping",
                         "unknown_url")  # fmt: skip
        return error(exc.status_code, str(exc.detail))

    @app.get("/ping")
    async def ping() -> Response:
        return Response(status_code=PING_STATUS[health()])

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(openai_models())

    @app.post("/v1/audio/translations")
    async def translations() -> JSONResponse:
        return error(404, TRANSLATION_MESSAGE, "unknown_url")

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        refused = admission.refuse()
        if refused is not None:
            return refused
        streaming = False
        uploads: Uploads | None = None
        try:
            uploads = Uploads()
            if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
                fields = await read_json(request)  # as the queue route's openai_input: file by URL or base64
            else:
                fields = await read_form(request, uploads)
            req = openai_request(fields)
            if req.stream:
                streaming = True
                return StreamingResponse(stream(request, req, run_job, uploads, admission), media_type="text/event-stream")
            gone, answer = await until_disconnect(request, openai_transcribe(req, run_job, None, uploads))
            if gone:
                return Response(status_code=499)
            if isinstance(answer, str):
                return PlainTextResponse(answer)
            return JSONResponse(answer)
        except OpenAIError as exc:
            return openai_error(exc)
        except ItemError as exc:
            return error(errors.status_of(exc.code), exc.message, exc.code, "file")
        except JobError as exc:  # no temp dir for the upload
            return openai_error(job_failed(exc))
        except FormError as exc:
            return error(exc.status, str(exc), "invalid_request")
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception as exc:  # a bug: 500, as an OpenAI error
            log.exception("a request failed")
            return error(500, f"{type(exc).__name__}: {exc}", "internal_error")
        finally:
            if not streaming:
                if uploads is not None:
                    uploads.discard()  # run_job took what it kept; this is what a failed request left
                admission.leave()

    @app.post("/transcribe")
    async def transcribe(request: Request) -> Response:
        refused = admission.refuse()
        if refused is not None:
            return refused
        try:
            try:
                job = await read_json(request)
            except FormError as exc:
                return error(exc.status, str(exc), "invalid_request")
            job_input = job.get("input")
            try:
                gone, out = await until_disconnect(request, run_job(job_input, None, None))
            except JobError as exc:
                return JSONResponse({"error": exc.message}, status_code=errors.status_of(exc.code))
            if gone:
                return Response(status_code=499)
            return JSONResponse(out)
        except ClientDisconnect:
            return Response(status_code=499)
        finally:
            admission.leave()

    return app


def stream(request: Request, req: OpenAIRequest, run_job: RunJob, uploads: Uploads,
           admission: Admission) -> AsyncIterator[bytes]:  # fmt: skip
    """stream=true: a transcript.text.delta event as each part of the transcript becomes final
    (each item, each piece of a split file), then one transcript.text.done with the whole text;
    an error mid-way is an error event. The job starts here, not in the generator, so that its
    end (done, failed, or cancelled when the client goes away) cleans up even if the response
    never gets to run the generator."""
    texts: asyncio.Queue[str] = asyncio.Queue()

    async def events(kind: str, payload: dict[str, Any]) -> None:
        if kind == "text" and payload["text"]:
            texts.put_nowait(payload["text"])

    as_json = dataclasses.replace(req, response_format="json")
    job = asyncio.ensure_future(openai_transcribe(as_json, run_job, events, uploads))
    cancel_on_disconnect(request, job)  # Starlette may not notice before its next send

    def ended(_: asyncio.Future[Any]) -> None:
        uploads.discard()  # run_job took them over; this covers a job cancelled before it did
        admission.leave()

    job.add_done_callback(ended)
    return sse_events(job, texts)


async def sse_events(job: asyncio.Future[Any], texts: asyncio.Queue[str]) -> AsyncIterator[bytes]:
    first = True
    try:
        while not (job.done() and texts.empty()):
            getter = asyncio.ensure_future(texts.get())
            await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            yield sse(openai_delta(getter.result(), first))
            first = False
        if job.cancelled():  # the client went away
            return
        try:
            answer = job.result()
        except OpenAIError as exc:
            yield sse(exc.body())
            return
        except Exception as exc:  # a bug: the client still gets an error event
            log.exception("a streamed request failed")
            yield sse(OpenAIError(500, f"{type(exc).__name__}: {exc}", "internal_error").body())
            return
        yield sse(openai_done(answer["text"]))
    finally:
        job.cancel()  # the client is gone (or the job is done already): its own task cleans up


def sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


# ---------------------------------------------------------------------------------------------
# Serving: HOST:PORT, /ping also on PORT_HEALTH when that differs; SIGTERM drains.
# ---------------------------------------------------------------------------------------------


def health_app(health: Health) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/ping")
    async def ping() -> Response:
        return Response(status_code=PING_STATUS[health()])

    return app


class _QuietServer(uvicorn.Server):
    """The health listener: the main server owns the signals and ends it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


def server_config(app: Any, port: int) -> uvicorn.Config:
    """On SIGTERM uvicorn stops accepting connections and lets requests in flight finish for
    SHUTDOWN_GRACE_SEC; then it cancels them, which stops their jobs (temp dirs gone)."""
    return uvicorn.Config(app, host=config.CFG.host, port=port, log_level="warning", access_log=False,
                          timeout_graceful_shutdown=int(config.CFG.shutdown_grace_sec), lifespan="on")  # fmt: skip


def serve(run_job: RunJob, health: Health, start: Callable[[], object]) -> None:
    """`WORKER_MODE=http python handler.py`: serve until SIGTERM (or SIGINT)."""
    cfg = config.CFG
    main = uvicorn.Server(server_config(create_app(run_job, health, start), cfg.port))
    health_port = cfg.port_health or cfg.port
    log.warning("serving on %s:%d (health: /ping on port %d)", cfg.host, cfg.port, health_port)

    async def run() -> None:
        if health_port == cfg.port:
            await main.serve()
            return
        health_server = _QuietServer(server_config(health_app(health), health_port))
        health_task = asyncio.ensure_future(health_server.serve())
        try:
            await main.serve()
        finally:
            health_server.should_exit = True
            await health_task

    # uvicorn raises the signal it caught once it has drained; let that end serve() (exit 0)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    asyncio.run(run())
