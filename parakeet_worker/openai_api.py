"""OpenAI's API: POST /v1/audio/transcriptions as OpenAI's clients speak it, over both transports
(Runpod's queue route here, the HTTP server in http_server.py). A request becomes one native job,
run by the job runner handed in (handler.run_job), and its result takes the shapes the official
`openai` client parses.
"""

from __future__ import annotations

import json
import logging
import re
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from parakeet_worker import checks, config, errors, logsafe
from parakeet_worker import model as asr
from parakeet_worker.analysis import boosting, confidence, known_speakers
from parakeet_worker.analysis import language as lang
from parakeet_worker.analysis.boosting import BOOST_WEIGHT_MAX
from parakeet_worker.analysis.known_speakers import KnownSpeaker
from parakeet_worker.analysis.speakers import DIARIZE_MAX_SPEAKERS
from parakeet_worker.audio import sources
from parakeet_worker.audio.uploads import Uploads
from parakeet_worker.checks import InputError
from parakeet_worker.errors import JobError
from parakeet_worker.job import Events
from parakeet_worker.state import shared
from parakeet_worker.transcript import Tokens, Upload

log = logging.getLogger("parakeet-worker")


# -- the request ------------------------------------------------------------------------------

OPENAI_FORMATS = ("json", "text", "srt", "vtt", "verbose_json", "diarized_json")
OPENAI_GRANULARITIES = ("word", "segment")
OPENAI_OWN_FIELDS = ("file", "model", "response_format", "timestamp_granularities", "language", "languages",
                     "prompt", "temperature", "stream", "chunking_strategy", "boost_phrases", "boost_weight", "vad",
                     "diarize", "num_speakers", "min_speakers", "max_speakers", "keywords", "known_speaker_names",
                     "known_speaker_references", "include")  # fmt: skip
# OpenAI fields for its own models: accepted and ignored, so that clients sending them still work.
OPENAI_IGNORED_FIELDS: tuple[str, ...] = ()
OPENAI_INCLUDES = ("logprobs",)  # what `include[]` may ask for (docs/confidence.md)
OPENAI_LANGUAGE_MAX_CHARS = 32
OPENAI_MODEL_MAX_CHARS = 256  # accepted whatever it names; a name longer than this is no model's
OPENAI_PROMPT_MAX_CHARS = 4096  # ignored (Parakeet takes no prompt); Whisper reads 224 tokens of it
OPENAI_LIST_MAX_ITEMS = 100_000  # any list field; each has its own, smaller cap where it is used
TRANSLATION_MESSAGE = ("Parakeet transcribes; it does not translate: /v1/audio/translations is not served. "
                       "Use /v1/audio/transcriptions.")  # fmt: skip


class OpenAIError(Exception):
    """An error as OpenAI's API reports it: an HTTP status and {"error": {message, type, param,
    code}}; `code` is the worker's item code where one item failed."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(self.status)
        kind = kind or ("invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class OpenAIRequest:
    """A transcription request, checked: the native job it becomes and how to shape its answer."""

    job: dict[str, Any]
    response_format: str
    words: bool
    segments: bool
    hint: tuple[str, ...] | None  # `language` or `languages`, checked against the model's languages
    stream: bool
    logprobs: bool = False  # include[]=logprobs: on json and on the stream's events


def form_field(fields: dict[str, Any], name: str) -> Any:
    """A field by its name or as a form sends a list (`name[]`)."""
    return fields[name] if name in fields else fields.get(f"{name}[]")


def _as_list(value: Any, name: str) -> list[Any]:
    """A list field: a list, one form value, or a JSON array in one form value (depth-limited)."""
    return [] if value is None else checks.as_list(value, name, OPENAI_LIST_MAX_ITEMS, text=True)


def _as_bool(value: Any, name: str) -> bool:
    """true/false (a form's "true", "false", "1", "0"); absent or empty: false."""
    return False if value is None or value == "" else checks.as_bool(value, name, text=True)


def _as_count(value: Any, name: str) -> int | None:
    """A speaker count (a JSON integer or a form's ASCII digits), 1 to DIARIZE_MAX_SPEAKERS; None
    when absent. How the counts go together is the native job's check (check_speakers)."""
    if value is None or value == "":
        return None
    return checks.as_int(value, name, 1, DIARIZE_MAX_SPEAKERS, text=True)


def _wants_vad(fields: dict[str, Any]) -> bool | None:
    """`vad` as given, else OpenAI's `chunking_strategy` ("auto" or {"type": "server_vad", ...}:
    its own voice activity chunking) as VAD on; None: the worker's VAD setting."""
    if fields.get("vad") not in (None, ""):
        return _as_bool(fields["vad"], "vad")
    strategy = fields.get("chunking_strategy")
    if strategy in (None, ""):
        return None
    if isinstance(strategy, str) and strategy.lstrip().startswith("{"):  # a form's JSON object
        strategy = checks.loads_json(strategy, "chunking_strategy")
    if strategy == "auto" or (isinstance(strategy, dict) and strategy.get("type") == "server_vad"):
        return True
    raise InputError("chunking_strategy", f'must be "auto" or {{"type": "server_vad"}}, not {checks.shown(strategy)}')


def _as_float(value: Any, name: str, low: float, high: float, default: float) -> float:
    return default if value is None or value == "" else checks.as_float(value, name, low, high, text=True)


def _as_text(fields: dict[str, Any], name: str, max_chars: int, lines: bool = False) -> str:
    value = fields.get(name)
    return "" if value is None else checks.as_text(value, name, max_chars, lines=lines)


def _file_item(file: Any) -> Any:
    """The request's `file` as the native job's item: an Upload (multipart), or what a native
    source may be (sources.item_of)."""
    if isinstance(file, Upload):
        return file
    if file is None or file == "":
        raise InputError("file", "is required: a URL, a data: URL, a path under ALLOWED_LOCAL_ROOTS or base64 "
                         "audio (or an upload over HTTP)")  # fmt: skip
    if not isinstance(file, str):
        raise InputError("file", f"must be a URL, a data: URL, a path or base64 audio, not {checks.kind_of(file)}")
    return sources.item_of(file)  # what a native source may be, or base64


def openai_request(fields: dict[str, Any]) -> OpenAIRequest:
    """Check an OpenAI transcription request (a JSON body, or form fields as strings) and turn it
    into one native job; OpenAIError (400, `param` naming the field) for a field that cannot be
    used. Every field is checked for type, range and size first (parakeet_worker.checks): a
    400-digit number, inf, Unicode digits or nesting 100,000 deep are that field's 400, never a
    500. `file` is what a native source may be (an http(s), file:// or data: URL, a path under
    ALLOWED_LOCAL_ROOTS) or base64 (sources.item_of: the queue route's JSON and JSON bodies over
    HTTP), or an Upload (the HTTP server's multipart). `model` may be any string (clients send
    whisper-1); `language` or `languages` (not both, as OpenAI) is a hint: checked against the
    model's languages, it keeps other scripts out of decoding and flags a mismatch
    (docs/language.md); `prompt` and `temperature` are checked and otherwise unused (docs/openai.md)."""
    base = {k[:-2] if isinstance(k, str) and k.endswith("[]") else str(k) for k in fields}
    unknown = sorted(base - set(OPENAI_OWN_FIELDS) - set(OPENAI_IGNORED_FIELDS))
    if unknown:
        raise OpenAIError(400, f"unrecognized request argument(s): {logsafe.echo(', '.join(unknown), 300)}",
                          "invalid_request", logsafe.echo(unknown[0], 100))  # fmt: skip
    try:
        return _request(fields)
    except InputError as exc:
        raise OpenAIError(400, logsafe.echo(str(exc)), "invalid_request", exc.field.split("[", 1)[0]) from None


def _request(fields: dict[str, Any]) -> OpenAIRequest:
    for name, value in fields.items():  # before anything walks a value: no recursion on any of them
        checks.check_depth(value, name[:-2] if name.endswith("[]") else name)
    item = _file_item(fields.get("file"))
    fmt = fields.get("response_format")
    fmt = "json" if fmt is None or fmt == "" else checks.as_choice(fmt, "response_format", OPENAI_FORMATS)
    granularities = _as_list(form_field(fields, "timestamp_granularities"), "timestamp_granularities") or ["segment"]
    if len(granularities) > len(OPENAI_GRANULARITIES) * 2:
        raise InputError("timestamp_granularities", f"may hold {list(OPENAI_GRANULARITIES)}, not {len(granularities)} items")
    for n, granularity in enumerate(granularities):
        checks.as_choice(granularity, f"timestamp_granularities[{n}]", OPENAI_GRANULARITIES)
    hint = _hint(fields)
    _as_text(fields, "model", OPENAI_MODEL_MAX_CHARS)
    _as_text(fields, "prompt", OPENAI_PROMPT_MAX_CHARS, lines=True)
    _as_float(fields.get("temperature"), "temperature", 0.0, 1.0, 0.0)
    weight = _as_float(fields.get("boost_weight"), "boost_weight", 0.0, BOOST_WEIGHT_MAX, 1.0)
    include = _as_list(form_field(fields, "include"), "include")
    if any(value not in OPENAI_INCLUDES for value in include):
        raise OpenAIError(400, f"'include' may hold {list(OPENAI_INCLUDES)}", "invalid_request", "include")
    stream = _as_bool(fields.get("stream"), "stream")
    logprobs = "logprobs" in include and (fmt == "json" or stream)  # where OpenAI's shapes have them
    verbose = fmt == "verbose_json"
    diarize = _wants_diarize(fields, fmt)
    known = _known_speakers(fields, diarize)
    job: dict[str, Any] = {
        "inputs": [item],
        "timestamps": verbose or fmt in ("srt", "vtt", "diarized_json"),
        # text with speakers is one "SPEAKER_00: ..." line per turn, as the native text output
        "output_format": fmt if fmt in ("srt", "vtt") else "text" if fmt == "text" and diarize else "json",
        "boost_phrases": _boost_phrases(fields),
        "boost_weight": weight,
        "vad": _wants_vad(fields),
    }
    if diarize:
        job["diarize"] = True
    if known:
        job["known_speakers"] = known
    if hint:
        job["languages"] = list(hint)
    if verbose:  # its segments' avg_logprob and no_speech_prob, its words' and segments' confidence
        job["confidence"] = True
    if logprobs:
        job["logprobs"] = True
    for name in ("num_speakers", "min_speakers", "max_speakers"):  # refused without diarize, as natively
        count = _as_count(fields.get(name), name)
        if count is not None:
            job[name] = count
    return OpenAIRequest(job, fmt, verbose and "word" in granularities, verbose and "segment" in granularities,
                         hint, stream, logprobs)  # fmt: skip


def _hint(fields: dict[str, Any]) -> tuple[str, ...] | None:
    """`language` (one code) or `languages` (a list: JSON, repeated form fields, or one JSON
    array in a form field), checked: 400 for both together, for a malformed code and for a
    language the model does not transcribe (the message lists those it does)."""
    language = fields.get("language")
    if language is not None:
        checks.as_text(language, "language", OPENAI_LANGUAGE_MAX_CHARS)
    languages = form_field(fields, "languages")
    if languages is not None and not isinstance(languages, (list, tuple)):
        languages = _as_list(languages, "languages")
    try:
        return lang.check_hint(language, languages, lang.spoken())
    except lang.HintError as exc:
        raise OpenAIError(400, str(exc), "invalid_request", exc.param) from None


def _wants_diarize(fields: dict[str, Any], fmt: str) -> bool:
    """`diarize`, or response_format diarized_json, which turns it on (it is a diarization's
    shape); diarize: false with diarized_json is a contradiction, refused."""
    given = fields.get("diarize")
    if fmt != "diarized_json":
        return _as_bool(given, "diarize")
    if given not in (None, "") and not _as_bool(given, "diarize"):
        raise OpenAIError(400, "response_format 'diarized_json' labels speakers: it needs diarization, and "
                          "'diarize' is false (leave it out, or set it true)", "invalid_request", "diarize")  # fmt: skip
    return True


def _boost_phrases(fields: dict[str, Any]) -> list[Any]:
    """boost_phrases and OpenAI's `keywords` (words to favour) as one list: keywords are key
    phrases at the request's boost_weight (1.0 unless given), under the same caps. Keywords are
    checked here so that an error names `keywords`; the native job checks the whole list again."""
    phrases = _as_list(form_field(fields, "boost_phrases"), "boost_phrases")
    try:  # here, so that an error names boost_phrases (the native job would say the same, unnamed)
        boosting.clean_phrases(phrases, "boost_phrases")
    except ValueError as exc:
        raise InputError.said("boost_phrases", str(exc)) from None
    keywords = form_field(fields, "keywords")
    if keywords in (None, ""):
        return phrases
    if not isinstance(keywords, (str, list)):
        raise OpenAIError(400, "'keywords' must be a list of strings", "invalid_request", "keywords")
    try:
        cleaned = boosting.clean_phrases(_as_list(keywords, "keywords"), "keywords")
    except ValueError as exc:
        raise OpenAIError(400, str(exc), "invalid_request", "keywords") from None
    merged = [*phrases, *(k for k in cleaned if k not in phrases)]
    if len(merged) > config.CFG.boost_max_phrases:
        raise OpenAIError(400, f"keywords and boost_phrases hold {len(merged)} phrases together, more than "
                          f"BOOST_MAX_PHRASES={config.CFG.boost_max_phrases}", "invalid_request", "keywords")  # fmt: skip
    return merged


def _known_speakers(fields: dict[str, Any], diarize: bool) -> list[KnownSpeaker]:
    """known_speaker_names[] and known_speaker_references[] (each reference a data: URL, or
    anything `file` may be), checked; they name speakers a diarization finds, so they need one."""
    names = form_field(fields, "known_speaker_names")
    references = form_field(fields, "known_speaker_references")
    try:
        known = known_speakers.from_openai(None if names in (None, "") else _as_list(names, "known_speaker_names"),
                                           None if references in (None, "") else
                                           _as_list(references, "known_speaker_references"))  # fmt: skip
    except known_speakers.KnownSpeakerError as exc:
        raise OpenAIError(400, str(exc), "invalid_request", exc.param) from None
    if known and not diarize:
        raise OpenAIError(400, "known_speaker_names needs diarization: set 'diarize' true or response_format "
                          "'diarized_json'", "invalid_request", "known_speaker_names")  # fmt: skip
    return known


# -- the answer -------------------------------------------------------------------------------


def _compression_ratio(text: str) -> float:
    """Whisper's measure of repetition: UTF-8 bytes over their zlib-compressed bytes."""
    data = text.encode()
    return round(len(data) / len(zlib.compress(data)), 4) if data else 0.0


def _verbose(result: dict[str, Any], req: OpenAIRequest) -> dict[str, Any]:
    """verbose_json: each segment's avg_logprob (its tokens' mean log-probability) and
    no_speech_prob (VAD's where VAD ran, else the decoder's), and each word's and segment's
    `confidence` (docs/confidence.md); no token ids ([]), temperature 0 (greedy decoding). Audio
    with no words at all gets one empty segment over all of it, as Whisper answers silence, so
    that its no_speech_prob can say how sure that is."""
    stamps = result.get("timestamps", {})
    body: dict[str, Any] = {"task": "transcribe", "language": _language_name(result, req),
                            "duration": result.get("duration", 0.0), "text": result["text"]}  # fmt: skip
    if req.segments:
        segments = stamps.get("segment", [])
        if not segments and not result["text"] and result.get("no_speech_prob") is not None:
            segments = [{"segment": "", "start": 0.0, "end": result.get("duration", 0.0),
                         "no_speech_prob": result["no_speech_prob"]}]  # fmt: skip
        body["segments"] = [openai_segment(n, s) for n, s in enumerate(segments)]
    if req.words:
        body["words"] = [{k: w[k] for k in ("word", "start", "end", "confidence") if k in w} for w in stamps.get("word", [])]
    body["usage"] = {"type": "duration", "seconds": result.get("duration", 0.0)}
    return body


def _language_name(result: dict[str, Any], req: OpenAIRequest) -> str:
    """verbose_json's `language` as whisper-1 writes it ("english"): the detected language; when
    none could be told, the one language the request named; else "unknown"."""
    code = result.get("language") or (req.hint[0] if req.hint and len(req.hint) == 1 else None)
    return lang.language_name(code) or "unknown"


def _languages(result: dict[str, Any]) -> list[dict[str, str]]:
    """`languages` as OpenAI's json answer and final stream event carry it: [{"code": ...}] for
    the item's language and any other a segment was detected in; [] when none could be told."""
    codes = [result["language"]] if result.get("language") else []
    for segment in (result.get("timestamps") or {}).get("segment", []):
        if segment.get("language") and segment["language"] not in codes:
            codes.append(segment["language"])
    return [{"code": c} for c in codes]


def openai_segment(n: int, s: dict[str, Any]) -> dict[str, Any]:
    """One verbose_json segment from a native one (its scores where it has them, else 0)."""
    out = {
        "id": n, "seek": int(s["start"] * 100), "start": s["start"], "end": s["end"], "text": s["segment"],
        "tokens": [], "temperature": 0.0, "avg_logprob": s.get("avg_logprob", 0.0),
        "compression_ratio": _compression_ratio(s["segment"]), "no_speech_prob": s.get("no_speech_prob", 0.0),
    }  # fmt: skip
    if "confidence" in s:
        out["confidence"] = s["confidence"]
    return out


def openai_result(out: dict[str, Any], req: OpenAIRequest) -> dict[str, Any] | str:
    """The native job's answer in the requested response_format (text, srt, vtt: a string), or
    OpenAIError: the job's error (400 or 503), or the item's, with its code."""
    (result,) = out["results"]
    if "error" in result:
        raise OpenAIError(errors.status_of(result["code"]), result["error"], result["code"], "file")
    if req.response_format == "text":
        return result["text"]
    if req.response_format in ("srt", "vtt"):
        return result["subtitles"]
    if req.response_format == "verbose_json":
        body = _verbose(result, req)
    elif req.response_format == "diarized_json":
        body = {**openai_diarized_json(result), "usage": {"type": "duration", "seconds": result.get("duration", 0.0)}}
    else:
        body = {"text": result["text"], "languages": _languages(result)}
        if req.logprobs:
            body["logprobs"] = result.get("logprobs", [])
        body["usage"] = {"type": "duration", "seconds": result.get("duration", 0.0)}
    if result.get("warning"):  # what the request asked for and did not get as asked (a JSON body has room to say so)
        body["warning"] = result["warning"]
    return body


# The job runner (handler.run_job): (native job input, events, uploads) -> the job's answer;
# raises JobError when the job cannot run at all.
RunJob = Callable[[Any, Events | None, Uploads | None], Awaitable[dict[str, Any]]]


def job_failed(exc: JobError) -> OpenAIError:
    """A job that could not run, as OpenAI reports it: the status of its code, and the field at
    fault where the job names one, or where an invalid input's message starts with a field of
    the request's own ("invalid input: num_speakers needs diarize: true")."""
    status = errors.status_of(exc.code)
    if status != 400:
        return OpenAIError(status, exc.message, "unavailable", exc.param)
    named = exc.message.removeprefix("invalid input:").split()
    field = named[0].split("[", 1)[0] if named else ""
    return OpenAIError(400, exc.message, "invalid_request", exc.param or (field if field in OPENAI_OWN_FIELDS else None))


async def openai_transcribe(req: OpenAIRequest, run: RunJob, events: Events | None = None,
                            uploads: Uploads | None = None) -> Any:  # fmt: skip
    """Run one OpenAI request as a native job and shape its answer (OpenAIError on failure)."""
    try:
        out = await run(req.job, events, uploads)
    except JobError as exc:
        raise job_failed(exc) from None
    return openai_result(out, req)


def openai_models() -> dict[str, Any]:
    """GET /v1/models: the one model this worker serves (any name is accepted in a request)."""
    model = {"id": config.model_name(config.CFG.model), "object": "model", "created": started_at(), "owned_by": "nvidia"}
    return {"object": "list", "data": [model]}


@shared
def started_at() -> int:
    """When this worker started serving (Unix seconds): /v1/models' `created`."""
    return int(time.time())


ANONYMOUS_LABEL = re.compile(r"SPEAKER_(\d\d)")


def openai_diarized_json(result: dict[str, Any]) -> dict[str, Any]:
    """One diarized item result (diarize and timestamps on) in OpenAI's diarized_json shape:
    {"task": "transcribe", "duration", "text", "segments": [{"type": "transcript.text.segment",
    "id", "start", "end", "text", "speaker"}]}. OpenAI names speakers "A", "B", ... in order of
    appearance, and a known speaker by its name: SPEAKER_00 is "A", "alice" stays "alice". A
    segment without a speaker (diarization failed) is "A"."""

    def letter(label: str | None) -> str:  # at most DIARIZE_MAX_SPEAKERS (20) letters
        anonymous = ANONYMOUS_LABEL.fullmatch(label or "SPEAKER_00")
        return chr(ord("A") + int(anonymous.group(1))) if anonymous else str(label)

    segments = (result.get("timestamps") or {}).get("segment", [])
    return {
        "task": "transcribe",
        "duration": result.get("duration", 0.0),
        "text": " ".join(s["segment"] for s in segments) if segments else result.get("text", ""),
        "segments": [
            {
                "type": "transcript.text.segment",
                "id": f"seg_{i}",
                "start": s["start"],
                "end": s["end"],
                "text": s["segment"],
                "speaker": letter(s.get("speaker")),
                **({"language": s["language"]} if s.get("language") else {}),
            }
            for i, s in enumerate(segments)
        ],
    }


# -- streaming: server-sent events as OpenAI sends them -----------------------------------------


def openai_delta(text: str, first: bool, tokens: Tokens | None = None) -> dict[str, Any]:
    """transcript.text.delta: the next final part of the transcript (deltas joined = the text),
    with its tokens' `logprobs` when given (their texts joined = the delta)."""
    event: dict[str, Any] = {"type": "transcript.text.delta", "delta": text if first else f" {text}"}
    if tokens is not None:
        event["logprobs"] = confidence.openai_logprobs(tokens, leading_space=not first)
    return event


def openai_done(
    text: str, languages: list[dict[str, str]] | None = None, logprobs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """transcript.text.done: the whole text, the languages detected (see _languages), and every
    token's `logprobs` when given (include[]=logprobs)."""
    event: dict[str, Any] = {"type": "transcript.text.done", "text": text, "languages": languages or []}
    if logprobs is not None:
        event["logprobs"] = logprobs
    return event


# -- Runpod's OpenAI route on a queue endpoint --------------------------------------------------


async def openai_queue_job(job_input: dict[str, Any], run: RunJob, events: Events | None = None) -> Any:
    """{"openai_route": "/v1/...", "openai_input": {<JSON body>}}: the OpenAI response as the
    job's output (a string for text, srt and vtt). An OpenAI error is the job's error, as the
    JSON of the error object; an unknown route is a job error that names it. The queue
    handler does not stream: stream=true is refused (the HTTP server streams)."""
    route, body = job_input.get("openai_route"), job_input.get("openai_input") or {}
    try:
        if route in ("/v1/models", "/models"):
            return openai_models()
        if route in ("/v1/audio/translations", "/audio/translations"):
            raise OpenAIError(404, TRANSLATION_MESSAGE, "unknown_url")
        if route not in ("/v1/audio/transcriptions", "/audio/transcriptions"):
            served = "/v1/audio/transcriptions and /v1/models"
            shown = logsafe.echo(route, 200) if isinstance(route, str) else checks.shown(route)
            raise JobError("unknown_route", f"unknown openai_route {shown}: this worker serves {served}")
        if not isinstance(body, dict):
            raise OpenAIError(400, "openai_input must be an object (the request's JSON body)", "invalid_request")
        req = openai_request(body)
        if req.stream:
            raise OpenAIError(400, "stream=true needs the worker's HTTP server (a load-balancing endpoint); "
                              "the queue route answers once", "invalid_request", "stream")  # fmt: skip
        return await openai_transcribe(req, run, events)
    except OpenAIError as exc:
        answer: dict[str, Any] = {"error": json.dumps(exc.body())}
        if asr.state().unhealthy:
            answer["refresh_worker"] = True
        return answer
