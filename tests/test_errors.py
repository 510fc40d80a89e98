"""The error-code table (parakeet_worker/errors.py CODES) is the one source of every code: each
code the code raises is in it, each has an HTTP status a client can act on and a meaning, the
docs list each, and a transport's status comes from the code, not from the message's words."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import parakeet_worker
from parakeet_worker import errors

REPO = Path(__file__).resolve().parent.parent


def codes_raised() -> set[str]:
    """Every code written as the first argument of ItemError(...) or JobError(...) in the worker."""
    found: set[str] = set()
    paths = [*Path(parakeet_worker.__file__).parent.rglob("*.py"), REPO / "handler.py"]
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in
                    ("ItemError", "JobError") and node.args and isinstance(node.args[0], ast.Constant)):  # fmt: skip
                found.add(node.args[0].value)
    return found


def test_every_code_raised_is_in_the_table():
    assert codes_raised() - set(errors.CODES) == set()
    assert len(codes_raised()) > 20  # the scan sees the worker's codes


# Where each transport helper takes its (status, code): argument positions; None: no status given.
ANSWER_HELPERS = {"OpenAIError": (0, 2), "error": (None, 0), "retry_later": (None, 0), "send_error": (1, 3),
                  "_refuse": (0, 2)}  # fmt: skip


def codes_answered() -> list[tuple[int | None, str]]:
    """(status, code) of every error a transport writes with a constant code: OpenAIError(status,
    message, code, ...), http_server's error(code, ...) and retry_later(code, ...), and limits'
    send_error(send, status, message, code) and _refuse(status, message, code)."""
    found: list[tuple[int | None, str]] = []
    paths = [*Path(parakeet_worker.__file__).parent.rglob("*.py"), REPO / "handler.py"]
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            where = ANSWER_HELPERS.get(name)
            if where is None or len(node.args) <= where[1] or (name == "error" and not isinstance(node.func, ast.Name)):
                continue
            code = node.args[where[1]]
            if isinstance(code, ast.Constant) and isinstance(code.value, str) and code.value:
                status = node.args[where[0]] if where[0] is not None else None
                found.append((status.value if isinstance(status, ast.Constant) else None, code.value))
    return found


def test_every_code_a_transport_answers_with_is_in_the_table_with_its_status():
    """No route invents a code: each error object's code is in the table, with the status it is
    sent with (an HTTP status for every code)."""
    answered = codes_answered()
    assert len({code for _, code in answered}) >= 8  # the scan sees the transports' codes
    for status, code in answered:
        assert code in errors.CODES, code
        assert status is None or errors.CODES[code].status == status, (code, status)


def test_every_code_has_a_status_and_a_meaning():
    for code, entry in errors.CODES.items():
        assert entry.status in (400, 401, 404, 408, 413, 429, 431, 500, 503), code
        assert entry.meaning.strip(), code
        assert entry.client_fault == (entry.status < 500), code


def test_every_code_is_documented():
    docs = (REPO / "docs" / "errors.md").read_text()
    missing = [code for code in errors.CODES if f"`{code}`" not in docs]
    assert not missing, f"docs/errors.md does not list {missing}"


def test_a_job_error_answers_with_its_codes_status(worker):
    """run_job raises JobError with a code; the queue handler answers {"error"} and the HTTP
    status would be the code's, whatever the message says."""
    try:
        asyncio.run(worker.run_job({"inputs": []}))
    except errors.JobError as exc:
        assert exc.code == "invalid_input" and errors.status_of(exc.code) == 400
        assert exc.message.startswith("invalid input")
    else:
        raise AssertionError("an empty inputs list was accepted")
    assert errors.status_of("model_unavailable") == 503 and errors.status_of("no-such-code") == 500
    assert asyncio.run(worker.handler({"id": "e", "input": {"inputs": []}})) == {
        "error": "invalid input: inputs must hold at least one item"
    }
