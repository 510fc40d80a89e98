"""Error codes: one table of every code the worker answers with, and the two exceptions.

An item's problem is an `ItemError` (it costs that item, never the job); a problem that stops a
whole job before any item starts is a `JobError`. Both carry a code from `CODES`, and every
transport takes the HTTP status from the code, never from the wording of the message.
docs/errors.md is written from this table (a test checks that each code is documented).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from parakeet_worker import logsafe


@dataclass(frozen=True)
class Code:
    """What a code means, the HTTP status a client expects for it, and whose fault it is."""

    status: int
    meaning: str
    client_fault: bool


CODES: dict[str, Code] = {
    # the item, as the client sent it
    "invalid_source": Code(400, "the item's shape or source is wrong (see docs/errors.md)", True),
    "invalid_boost": Code(400, "the item's own boost_phrases cannot be used", True),
    "invalid_language": Code(400, "the item's own language or languages hint is malformed, or names a language "
                             "the model does not transcribe (the message lists those it does)", True),
    "forbidden_path": Code(400, "a local path outside ALLOWED_LOCAL_ROOTS, or one that cannot be resolved", True),
    "not_found": Code(400, "a local path inside a root, but no such regular file", True),
    "forbidden_url": Code(400, "a URL that resolves to a private, loopback or link-local address", True),
    "download_failed": Code(400, "the download failed (HTTP error, refused connection, unknown host, bad redirect)", True),
    "download_timeout": Code(400, "the download stalled or took longer than allowed", True),
    "too_large": Code(413, "the download, base64 or upload is over its byte cap", True),
    "not_audio": Code(400, "ffmpeg cannot decode it as audio", True),
    "no_audio": Code(400, "the container has no audio stream", True),
    "empty_audio": Code(400, "an empty file, or audio with no samples", True),
    "too_long": Code(400, "longer than MAX_AUDIO_SEC", True),
    "decode_timeout": Code(400, "ffmpeg ran past FFMPEG_TIMEOUT_SEC", True),
    # the worker, not the item: retry
    "disk_full": Code(503, "the worker ran out of temp disk while writing this item; retry it", False),
    "temp_not_writable": Code(503, "the job's temp dir turned read-only; retry the item", False),
    "temp_dir_gone": Code(503, "the job's temp dir was removed while the job ran; retry the item", False),
    "out_of_memory": Code(503, "not enough memory for this item, even in the smallest pieces (run out of, or planned)", False),
    "transcription_failed": Code(503, "the model failed on this item alone", False),
    "gpu_failed": Code(503, "the GPU hit a fault no later call survives; the worker is being replaced", False),
    "model_failed": Code(503, "the worker's model thread died; the worker is being replaced", False),
    "cancelled": Code(503, "the job was stopped while this item ran (seen in logs only)", False),
    "internal_error": Code(500, "a bug; please report it", False),
    # not an item's result: why an item has no speaker labels (its `warning` says so)
    "diarize_failed": Code(503, "the speaker model could not label this item", False),
    "dry_run": Code(503, "SKIP_MODEL_LOAD=1: no model is loaded, nothing is transcribed", False),
    # a whole job
    "invalid_input": Code(400, "the job's input is not a valid request (the message names the field)", True),
    "model_unavailable": Code(503, "the model could not be loaded on this worker", False),
    "temp_dir_failed": Code(503, "the worker cannot make this job's temp dir (WORKER_TMP_DIR)", False),
    "unknown_route": Code(404, "an openai_route this worker does not serve", True),
    # a request over HTTP or the OpenAI routes, before it is a job
    "invalid_request": Code(400, "an OpenAI request field, the body or the form is not valid (`param` names the field)", True),
    "invalid_api_key": Code(401, "WORKER_API_KEY is set and the request's bearer token is missing or wrong", True),
    "unknown_url": Code(404, "a route (or method) the HTTP server does not serve; /v1/audio/translations", True),
    "request_timeout": Code(408, "the request's head or body stopped arriving, or arrived too slowly", True),
    "body_too_large": Code(413, "a JSON body, a form field or the form's field count is over its cap", True),
    "busy": Code(429, "MAX_CONCURRENT_JOBS requests (or HTTP_BODY_READERS bodies) are in flight; see Retry-After", True),
    "headers_too_large": Code(431, "the request line and headers are over HTTP_HEAD_MAX_BYTES", True),
    "unavailable": Code(503, "the worker cannot take the request now (a GPU fault, no temp dir); retry", False),
    "shutting_down": Code(503, "the worker got SIGTERM: a new request, or one still running after SHUTDOWN_GRACE_SEC", False),
}


def status_of(code: str | None) -> int:
    """The HTTP status of a code: 500 for a code missing from the table (a bug)."""
    known = CODES.get(code or "")
    return known.status if known is not None else 500


class ItemError(Exception):
    """A problem with one input item: reported on that item, never fails the job. The message
    may quote the input, so it is made safe to echo (see logsafe.echo)."""

    def __init__(self, code: str, message: str, duration: float | None = None):
        message = logsafe.echo(message, keep="\n\t")
        super().__init__(message)
        self.code = code
        self.message = message
        self.duration = duration  # known when the audio was decoded (e.g. too_long)


def bug(where: str) -> ItemError:
    """An item's internal_error: a bug `where` ("in its path", "rendering its result"), logged in
    full on the worker (redacted); the client's message carries neither the exception's type nor
    its text, which may hold server paths."""
    return ItemError("internal_error", f"the worker failed on this item ({where}): a bug, logged on the worker")


def cancelled(when: str = "") -> ItemError:
    """The item's job was stopped (Runpod's /cancel, a timeout, or the job's end) `when`: the
    item is dropped. A stopped job posts no result, so this is seen in logs only."""
    return ItemError("cancelled", f"the job was stopped {when}".strip())


class JobError(Exception):
    """A problem that stops the whole job before any item starts: the answer is
    {"error": message, "code": code} (see job_error)."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param  # the request field at fault, where one is (OpenAI's error `param`)


def job_error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """A job's answer when it cannot run at all."""
    return {"error": message, "code": code, **extra}


def job_status(out: dict[str, Any]) -> int:
    """The HTTP status of a job's answer: 200, else its code's."""
    return status_of(out.get("code")) if out.get("error") else 200


def invalid_input(message: str) -> dict[str, Any]:
    """A job refused for its input: the message starts "invalid input: " and names the field."""
    text = message if message.startswith(("invalid input", "input must be")) else f"invalid input: {message}"
    return job_error("invalid_input", text)


def short(exc: BaseException, limit: int = 300) -> str:
    """An exception's text, at most `limit` characters."""
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."
