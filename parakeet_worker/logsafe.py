"""What results and log lines may carry of the input: bounded, escaped, and without secrets.

Every message that quotes a request (a URL, a path, a phrase) goes through `echo` before it is
shown to a client, and through `for_log` before it is logged: control characters escaped (a URL
with a newline cannot forge a log line), lone surrogates escaped (UTF-8 cannot carry them),
URL userinfo and query strings (signed URLs carry their signature there) replaced by ***.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger("parakeet-worker")


# What a result or an error may echo of the input: bounded, and always encodable as UTF-8 (JSON
# can carry a lone surrogate such as "\ud800"; UTF-8 cannot, and the SDK could then post nothing).
ECHO_MAX_CHARS = 1000
LOG_MAX_CHARS = 2000
CONTROLS = "\x00-\x1f\x7f"  # C0 controls and DEL: a NUL cuts a path short, a newline forges a log line
SURROGATES = "\ud800-\udfff"  # lone surrogates: JSON carries them, UTF-8 cannot
UNSAFE_CHARS = re.compile(f"[{CONTROLS}\x80-\x9f\u2028\u2029{SURROGATES}]")  # also C1 and line separators


def holds(text: str, chars: str) -> bool:
    """Whether `text` holds any of `chars` (a character class body: CONTROLS, SURROGATES)."""
    return re.search(f"[{chars}]", text) is not None


def echo(text: str, limit: int = ECHO_MAX_CHARS, keep: str = "") -> str:
    """`text` as a result or a log line may carry it: control characters (but those in `keep`),
    line separators and lone surrogates written as escapes (\\n, \\x00, \\ud800), and at most
    `limit` characters (then "...")."""
    head = UNSAFE_CHARS.sub(
        lambda m: m.group() if m.group() in keep else m.group().encode("unicode_escape").decode("ascii"),
        text[: limit + 1],
    )
    return head[:limit] + "..." if len(text) > limit or len(head) > limit else head


# A URL's secrets: the userinfo (user:password@) and the query string (signed URLs carry their
# signature there); also a path with a query string quoted without its scheme and host, as
# requests' connection errors do ("Max retries exceeded with url: /a.wav?X-Amz-Signature=...").
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s@]*@")
_URL_QUERY = re.compile(r"(/[^\s?#'\"]*)[?#][^\s'\")]*")


def redact(text: str) -> str:
    """`text` without URL userinfo and query strings (or fragments): "https://***@host/a.wav?***"."""
    return _URL_QUERY.sub(r"\1?***", _URL_USERINFO.sub(r"\1***@", text))


def for_log(text: str) -> str:
    """A message as it may go to the log: no URL secrets, no control characters (a URL with a
    newline cannot forge a log line), at most LOG_MAX_CHARS characters."""
    return echo(redact(text), LOG_MAX_CHARS)


class SafeLogRecords(logging.Filter):
    """Makes every record of this worker's logger safe to write (see for_log). A traceback keeps
    its lines, each redacted and escaped on its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: log what there is
            message = f"{record.msg!r} % {record.args!r}"
        record.msg, record.args = for_log(message), None
        if record.exc_info and not record.exc_text:
            trace = logging.Formatter().formatException(record.exc_info)
            record.exc_text = "\n".join(for_log(line) for line in trace.split("\n"))
        return True


def safe_lines(text: str) -> str:
    """`text` as for_log makes it, line by line (a traceback keeps its lines)."""
    return "\n".join(for_log(line) for line in text.split("\n"))
