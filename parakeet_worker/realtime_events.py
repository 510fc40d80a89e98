"""OpenAI's Realtime transcription protocol, as data: the session object a client configures with
`session.update`, and the server events this worker sends, in the shapes of the official
client's own types (`openai/types/realtime/`).

Pure functions and frozen dataclasses: no socket, no model, no clock. A session.update is checked
whole before any of it applies, so a bad one changes nothing (the client gets an `error` event).
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from parakeet_worker.analysis import confidence, language
from parakeet_worker.analysis.live_vad import VadParams
from parakeet_worker.audio.live import AudioFormat, FormatError, parse_format
from parakeet_worker.transcript import Tokens

MAX_PHRASES = 200  # key phrases from one session's prompt and keywords
MAX_PHRASE_CHARS = 100
NOISE_REDUCTION_TYPES = ("near_field", "far_field")
LOGPROBS = "item.input_audio_transcription.logprobs"
INCLUDE_VALUES = (LOGPROBS,)


class ProtocolError(Exception):
    """A client event this worker will not act on: it becomes an `error` event, and the session
    goes on as before."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


def new_id(prefix: str) -> str:
    """An id in OpenAI's style (`event_...`, `item_...`, `sess_...`): unguessable, so a session id
    is also the key that resumes it."""
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class Transcription:
    """audio.input.transcription: which model the client named (echoed; this worker has one),
    the language and prompt it gave, and its keywords. The prompt and the keywords become the
    session's key phrases."""

    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    keywords: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()
    hint: tuple[str, ...] | None = None  # `language` or `languages`, checked: a job's language hint

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "language": self.language, "prompt": self.prompt}
        if self.keywords:
            out["keywords"] = list(self.keywords)
        if self.languages:
            out["languages"] = list(self.languages)
        return out

    @property
    def phrases(self) -> tuple[str, ...]:
        """The key phrases to boost: each keyword, and each comma-, semicolon- or line-separated
        part of the prompt (a prompt such as "Parakeet, Runpod, NeMo" lists phrases, as
        whisper-1's prompt does), cleaned, unique, in order."""
        parts = [*self.keywords, *re.split(r"[,;\n]", self.prompt or "")]
        seen: dict[str, None] = {}
        for part in parts:
            phrase = " ".join(part.split())
            if phrase:
                seen.setdefault(phrase, None)
        return tuple(seen)


@dataclass(frozen=True)
class SessionConfig:
    """The effective configuration of one transcription session (what session.updated shows)."""

    format: AudioFormat = field(default_factory=AudioFormat)
    turn_detection: VadParams | None = field(default_factory=VadParams)
    transcription: Transcription | None = field(default_factory=Transcription)
    configured: bool = False  # a session.update has been applied: audio may come
    include: tuple[str, ...] = ()  # "item.input_audio_transcription.logprobs": tokens' logprobs on delta and completed

    @property
    def logprobs(self) -> bool:
        return LOGPROBS in self.include

    def as_session(self, session_id: str, expires_at: int | None = None) -> dict[str, Any]:
        """The session object (RealtimeTranscriptionSessionCreateResponse's shape). Noise
        reduction is not offered: it shows as null whatever was asked."""
        return {
            "id": session_id,
            "object": "realtime.transcription_session",
            "type": "transcription",
            "expires_at": expires_at,
            "audio": {
                "input": {
                    "format": self.format.as_dict(),
                    "transcription": self.transcription.as_dict() if self.transcription else None,
                    "turn_detection": self.turn_detection.as_dict() if self.turn_detection else None,
                    "noise_reduction": None,
                }
            },
            "include": list(self.include),
        }


def apply_update(config: SessionConfig, session: Any, default_model: str | None = None) -> SessionConfig:
    """`config` with a session.update's `session` applied: only the fields present change (as
    OpenAI's update does); ProtocolError, naming the field, for a value this worker does not take."""
    if not isinstance(session, dict):
        raise ProtocolError("session.update needs a `session` object", param="session")
    kind = session.get("type", "transcription")
    if kind != "transcription":
        raise ProtocolError(f"this worker serves transcription sessions only (session.type \"transcription\"), not {kind!r}",
                            param="session.type")  # fmt: skip
    _check_include(session.get("include"))
    audio = session.get("audio", {})
    if not isinstance(audio, dict):
        raise ProtocolError("session.audio must be an object", param="session.audio")
    given = audio.get("input", {})
    if not isinstance(given, dict):
        raise ProtocolError("session.audio.input must be an object", param="session.audio.input")
    changes: dict[str, Any] = {"configured": True}
    if "include" in session:
        changes["include"] = tuple(dict.fromkeys(session["include"] or ()))
    if "format" in given:
        try:
            changes["format"] = parse_format(given["format"])
        except FormatError as exc:
            raise ProtocolError(str(exc), "invalid_value", "session.audio.input.format") from None
    if "turn_detection" in given:
        changes["turn_detection"] = parse_turn_detection(given["turn_detection"])
    if "transcription" in given:
        changes["transcription"] = parse_transcription(given["transcription"], default_model)
    elif config.transcription is not None and config.transcription.model is None and default_model:
        changes["transcription"] = dataclasses.replace(config.transcription, model=default_model)
    _check_noise_reduction(given.get("noise_reduction"))
    return dataclasses.replace(config, **changes)


def parse_turn_detection(value: Any) -> VadParams | None:
    """null (the client commits) or {"type": "server_vad", threshold, prefix_padding_ms,
    silence_duration_ms}, each defaulting as OpenAI's does."""
    param = "session.audio.input.turn_detection"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError("turn_detection must be null or {\"type\": \"server_vad\", ...}", param=param)
    kind = value.get("type", "server_vad")
    if kind != "server_vad":
        raise ProtocolError(f"turn_detection type {kind!r} is not supported here: use \"server_vad\" or null",
                            "invalid_value", f"{param}.type")  # fmt: skip
    base = VadParams()
    threshold = _number(value, "threshold", base.threshold, 0.0, 1.0, param)
    prefix = _number(value, "prefix_padding_ms", base.prefix_padding_ms, 0, 5000, param)
    silence = _number(value, "silence_duration_ms", base.silence_duration_ms, 32, 10_000, param)
    return VadParams(float(threshold), int(prefix), int(silence))


def _number(obj: dict[str, Any], key: str, default: float, low: float, high: float, param: str) -> float:
    value = obj.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ProtocolError(f"{key} must be a number from {low} to {high}, not {value!r}", "invalid_value", f"{param}.{key}")
    return value


def parse_transcription(value: Any, default_model: str | None) -> Transcription | None:
    param = "session.audio.input.transcription"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError("transcription must be null or an object", param=param)
    for key in ("model", "language", "prompt"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise ProtocolError(f"{key} must be a string", "invalid_value", f"{param}.{key}")
    keywords = value.get("keywords") or []
    if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
        raise ProtocolError("keywords must be a list of strings", "invalid_value", f"{param}.keywords")
    languages = value.get("languages") or []
    if not isinstance(languages, list) or not all(isinstance(k, str) for k in languages):
        raise ProtocolError("languages must be a list of language codes", "invalid_value", f"{param}.languages")
    try:  # a job's language hint (docs/language.md): decoding kept to the hinted languages' scripts
        hint = language.check_hint(value.get("language"), languages, language.spoken())
    except language.HintError as exc:
        raise ProtocolError(str(exc), "invalid_value", f"{param}.{exc.param}") from None
    out = Transcription(value.get("model") or default_model, value.get("language"), value.get("prompt"), tuple(keywords),
                        tuple(languages), hint)  # fmt: skip
    phrases = out.phrases
    if len(phrases) > MAX_PHRASES or any(len(p) > MAX_PHRASE_CHARS for p in phrases):
        raise ProtocolError(f"at most {MAX_PHRASES} key phrases (keywords and prompt parts) of at most "
                            f"{MAX_PHRASE_CHARS} characters each", "invalid_value", f"{param}.keywords")  # fmt: skip
    return out


def _check_include(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, list) or any(v not in INCLUDE_VALUES for v in value):
        raise ProtocolError(f"include takes a list of {list(INCLUDE_VALUES)}", "invalid_value", "session.include")


def _check_noise_reduction(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or value.get("type", "near_field") not in NOISE_REDUCTION_TYPES:
        raise ProtocolError("noise_reduction must be null or {\"type\": \"near_field\" | \"far_field\"}",
                            "invalid_value", "session.audio.input.noise_reduction")  # fmt: skip


# --- Server events -------------------------------------------------------------------------------


def event(kind: str, **fields: Any) -> dict[str, Any]:
    """A server event: its type, a fresh event_id, then its fields."""
    return {"type": kind, "event_id": new_id("event"), **fields}


def error_event(message: str, code: str, param: str | None = None, client_event_id: str | None = None,
                kind: str = "invalid_request_error") -> dict[str, Any]:  # fmt: skip
    """OpenAI's `error` event; `client_event_id` is the event_id of the client event it answers."""
    return event("error", error={"type": kind, "code": code, "message": message, "param": param,
                                 "event_id": client_event_id})  # fmt: skip


def words_json(words: Any, offset: float) -> list[dict[str, Any]]:
    """Word timestamps on the session's timeline (seconds since its first audio), from a
    transcript's words timed from the start of their turn."""
    return [{"word": w.text, "start": round(w.start + offset, 3), "end": round(w.end + offset, 3)} for w in words]


def completed_event(item_id: str, transcript: Any, start: float, seconds: float, logprobs: bool = False) -> dict[str, Any]:
    """conversation.item.input_audio_transcription.completed, with usage by duration and, as this
    worker's extra fields, the turn's word timestamps and its place on the session's timeline;
    with `logprobs` (the session's include), every token's (analysis.confidence)."""
    extra: dict[str, Any] = {}
    if logprobs:
        tokens = getattr(transcript, "tokens", None)
        extra["logprobs"] = confidence.openai_logprobs(tokens) if tokens is not None else []
    return event("conversation.item.input_audio_transcription.completed", item_id=item_id, content_index=0,
                 transcript=transcript.text, usage={"type": "duration", "seconds": round(seconds, 3)},
                 words=words_json(transcript.words, start), start=round(start, 3),
                 end=round(start + seconds, 3), **extra)  # fmt: skip


def delta_logprobs(transcript: Any, first: int, last: int) -> list[dict[str, Any]]:
    """The tokens of words [first, last) of a partial transcript, as a delta's `logprobs` (the
    first token's space kept after the first delta, so that they join to the delta); [] where
    the tokens do not line up with the words."""
    tokens = getattr(transcript, "tokens", None)
    if tokens is None:
        return []
    groups = confidence.word_groups(tokens.pieces)
    if len(groups) != len(transcript.text.split()) or last > len(groups):
        return []
    picked = [i for g in groups[first:last] for i in g]
    part = Tokens(tuple(tokens.pieces[i] for i in picked), tuple(tokens.logprobs[i] for i in picked))
    return confidence.openai_logprobs(part, leading_space=first > 0)


def failed_event(item_id: str, message: str, code: str = "transcription_failed") -> dict[str, Any]:
    return event("conversation.item.input_audio_transcription.failed", item_id=item_id, content_index=0,
                 error={"type": "server_error", "code": code, "message": message, "param": None})  # fmt: skip
