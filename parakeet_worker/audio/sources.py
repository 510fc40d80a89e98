"""Sources: an item's URL, path, data: URL or base64, checked before anything is fetched; local
paths held inside ALLOWED_LOCAL_ROOTS; base64 decoded straight to a file, a chunk at a time."""

from __future__ import annotations

import base64
import binascii
import errno
import logging
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from parakeet_worker import config, errors, logsafe
from parakeet_worker.audio import disk
from parakeet_worker.audio.disk import DISK_FULL_ERRNOS
from parakeet_worker.config import APP_DIR
from parakeet_worker.errors import ItemError
from parakeet_worker.logsafe import CONTROLS, ECHO_MAX_CHARS, SURROGATES
from parakeet_worker.transcript import Upload

log = logging.getLogger("parakeet-worker")
SOURCE_KEYS = ("source", "audio_base64")
ITEM_KEYS = (*SOURCE_KEYS, "boost_phrases", "language", "languages")


def source_of(item: Any) -> tuple[str, str]:
    """Validate one input item; return (kind, value) with kind in url | path | base64 | upload."""
    if isinstance(item, Upload):
        return "upload", item.name
    if not isinstance(item, dict):
        raise ItemError("invalid_source", 'each input must be an object like {"source": "..."}')
    unknown = sorted(set(item) - set(ITEM_KEYS))
    if unknown:
        raise ItemError("invalid_source", f"unknown field(s) {unknown}; allowed: {list(ITEM_KEYS)}")
    given = [k for k in SOURCE_KEYS if k in item]
    if len(given) != 1:
        raise ItemError("invalid_source", "give exactly one of 'source' or 'audio_base64'")
    value = item[given[0]]
    if not isinstance(value, str) or not value.strip():
        raise ItemError("invalid_source", f"'{given[0]}' must be a non-empty string")
    value = value.strip()
    if logsafe.holds(value, SURROGATES):
        raise ItemError("invalid_source", f"'{given[0]}' holds a lone surrogate (\\ud800-\\udfff), which is not text")
    if given[0] == "audio_base64" or value.startswith("data:"):
        return "base64", value
    if logsafe.holds(value, CONTROLS):
        raise ItemError("invalid_source", "'source' holds control characters (a NUL byte, a newline...)")
    try:
        parsed = urlparse(value)
        scheme = parsed.scheme.lower()
        if scheme in ("http", "https"):
            _check_url(parsed)
            return "url", value
    except ValueError as exc:  # urlparse, .port and the idna codec all raise ValueError
        raise ItemError("invalid_source", f"malformed URL: {errors.short(exc)}") from None
    if scheme == "file":
        return "path", unquote(parsed.path)
    if "://" in value or (scheme and len(scheme) > 1):
        raise ItemError("invalid_source", f"unsupported source scheme {scheme!r}: use http(s), a path or base64")
    return "path", value


URL_PREFIXES = ("http://", "https://", "file://", "data:")


def item_of(value: str) -> dict[str, str]:
    """The input item that one bare string names, where a request gives audio as a string with
    no key (OpenAI's `file` in a JSON body, a known speaker's reference): one parser for every
    route. http(s)://, file:// and data: URLs and absolute paths are a `source`, checked by
    source_of like any native source (a path must lie under ALLOWED_LOCAL_ROOTS); anything else
    is base64 audio. base64's alphabet holds "/" too (an MP3 without tags encodes to "//s..."),
    so a string that starts with "/" is a path when it starts with an allowed root and "/", or
    when it is no longer than a path can be (PATH_MAX_BYTES) and has no line breaks: base64 that
    short is under 3 KB of audio (a tenth of a second of WAV), and wrapped base64 has breaks."""
    text = value.strip()
    if text[:8].lower().startswith(URL_PREFIXES) or _looks_like_path(text):
        return {"source": value}
    return {"audio_base64": value}


def _looks_like_path(text: str) -> bool:
    if not text.startswith("/"):
        return False
    roots = [root.rstrip("/") + "/" for root in config.CFG.allowed_local_roots if root.strip("/")]
    if any(text.startswith(root) for root in roots):
        return True
    return len(text.encode("utf-8", "surrogatepass")) <= PATH_MAX_BYTES and not any(c in "\r\n" for c in text)


def _check_url(parsed: Any) -> None:
    """Refuse (ValueError) what no download could fetch, before anything is sent: no host, a port
    that is not a number from 0 to 65535, or a host name the resolver cannot encode (a label over
    63 characters, an empty label)."""
    host = parsed.hostname
    if not host:
        raise ValueError("the URL has no host")
    _ = parsed.port  # ValueError: "Port out of range 0-65535", "Port could not be cast..."
    if ":" not in host:  # an IPv6 literal needs no encoding
        host.encode("idna")  # what socket.getaddrinfo does to a name; UnicodeError is a ValueError


def label_of(kind: str, value: str) -> str:
    return "base64" if kind == "base64" else value


# Linux's limits on a path and on one name in it, in bytes: longer ones fail with ENAMETOOLONG.
PATH_MAX_BYTES = 4095
NAME_MAX_BYTES = 255


def local_path(raw: str) -> Path:
    """Resolve a local path, refusing anything (`..`, symlinks) that ends outside the roots, and
    anything that is not a regular file (a FIFO would hold ffmpeg for ever)."""
    if logsafe.holds(raw, CONTROLS):  # a file:// URL can unquote to one
        raise ItemError("invalid_source", "the 'source' path holds control characters (a NUL byte, a newline...)")
    encoded = os.fsencode(raw)
    if len(encoded) > PATH_MAX_BYTES or any(len(part) > NAME_MAX_BYTES for part in encoded.split(b"/")):
        raise ItemError(
            "invalid_source", f"the 'source' path is too long (over {PATH_MAX_BYTES} bytes, or a name over {NAME_MAX_BYTES})"
        )
    path = Path(raw) if os.path.isabs(raw) else APP_DIR / raw
    try:
        real = Path(os.path.realpath(path))
    except OSError as exc:  # /proc/1/root, /proc/1/cwd: resolving them is refused (EACCES)
        if exc.errno == errno.ENAMETOOLONG:
            raise ItemError("invalid_source", f"cannot use {raw}: {exc.strerror}") from None
        code = "forbidden_path" if exc.errno in (errno.EACCES, errno.EPERM) else "not_found"
        raise ItemError(code, f"cannot resolve {raw}: {exc.strerror or exc}") from None
    for root in config.CFG.allowed_local_roots:
        real_root = Path(os.path.realpath(root))
        if real == real_root or real_root in real.parents:
            break
    else:
        raise ItemError("forbidden_path", f"{raw} is outside the allowed roots {list(config.CFG.allowed_local_roots)}")
    try:
        if not real.is_file():
            raise ItemError("not_found", f"no file at {raw}")
    except OSError as exc:  # resolved, it can still be too long (ENAMETOOLONG) or unreadable
        code = "invalid_source" if exc.errno == errno.ENAMETOOLONG else "not_found"
        raise ItemError(code, f"cannot use {raw}: {exc.strerror or exc}") from None
    return real


_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


BASE64_CHUNK_CHARS = 1 << 20  # decoded and written 1 MiB of text at a time


def decode_base64(value: str, dest: Path) -> Path:
    """Decode base64 (or a data: URL) to a file, with the MAX_BASE64_BYTES cap on the decoded
    size. The standard and the URL-safe alphabet are both accepted, padded or not, with
    whitespace anywhere. Streamed: the text is cleaned and decoded a chunk at a time straight
    into the file, so a 15 MB string costs a few MiB of copies, not four 15 MB ones (whitespace
    removed, padding stripped, alphabet translated, decoded bytes)."""
    start = 0
    if value.startswith("data:"):
        comma = value.find(",")
        if comma < 0:
            raise ItemError("invalid_source", "a data: URL ('source' or 'audio_base64') needs a comma before its payload")
        if ";base64" not in value[:comma].lower():
            raise ItemError("invalid_source", "data: URLs ('source' or 'audio_base64') must be base64-encoded")
        start = comma + 1
    end = len(value)
    while end > start and (value[end - 1] == "=" or value[end - 1].isspace()):
        end -= 1  # trailing padding and whitespace: the padding is recomputed below
    try:
        with open(dest, "wb") as out:
            written, carry = 0, ""
            for pos in range(start, end, BASE64_CHUNK_CHARS):
                text = carry + re.sub(r"\s+", "", value[pos : min(pos + BASE64_CHUNK_CHARS, end)])
                whole = len(text) - len(text) % 4
                carry = text[whole:]
                written += _write_base64(out, text[:whole], written)
            if carry:
                _write_base64(out, carry + "=" * (-len(carry) % 4), written)
    except ItemError:
        dest.unlink(missing_ok=True)
        raise
    except OSError as exc:
        dest.unlink(missing_ok=True)
        if exc.errno in DISK_FULL_ERRNOS:
            raise disk.disk_full("writing the decoded base64 audio") from None
        raise
    return dest


def _write_base64(out: Any, text: str, written: int) -> int:
    """Decode one chunk of cleaned base64 text into `out`, within MAX_BASE64_BYTES in all
    (`written` so far); the bytes written."""
    decoded_size = len(text.rstrip("=")) * 3 // 4  # exactly the decoded size
    if written + decoded_size > config.CFG.max_base64_bytes:
        raise ItemError("too_large", f"base64 audio is over the {config.CFG.max_base64_bytes}-byte cap")
    try:
        data = base64.b64decode(text.translate(_URLSAFE_TO_STANDARD), validate=True)
    except (binascii.Error, ValueError):
        raise ItemError("invalid_source", "audio_base64 is not valid base64") from None
    out.write(data)
    return len(data)


def source_label(item: Any) -> str:
    """What a result echoes as its source: the URL or path, "base64" for inline audio (never
    the payload), or a short repr of an item that is not a valid source at all; never more than
    ECHO_MAX_CHARS characters, and always encodable (see echo). It cannot raise: one item's
    label must not cost the job."""
    try:
        return logsafe.echo(label_of(*source_of(item)))
    except Exception:  # noqa: BLE001 - source_of raises ItemError; anything else is a bug, still one item's
        source = item.get("source") if isinstance(item, dict) else None
        return logsafe.echo(source if isinstance(source, str) else repr(item)[: ECHO_MAX_CHARS + 1], 200)
