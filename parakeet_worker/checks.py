"""Strict checks of request fields: each value is checked for type, range and size before any
other code touches it, and a bad one is an `InputError` that names the field.

Why a module of its own: Python's own conversions raise on hostile values in ways a route does
not expect. `float(10**400)` raises OverflowError; `int("²")` raises ValueError although
`"²".isdigit()` is true (and `int("٣")` is 3: Unicode digits pass `int()`); `int("9" * 5000)`
raises ValueError past Python's 4,300-digit limit; `json.loads("[" * 100_000)` raises
RecursionError, and so does `repr()` of a list nested that deep. Each of those became a 500
with the exception's text, or a traceback as a queue job's error. Here numbers given as text
must be ASCII digits of bounded length, numbers must be finite and in range (compared exactly,
before any conversion), containers are walked without recursion, and messages use JSON's words
for types ("a string", "a list"), never Python's (`<class 'str'>`).

Everything here is pure: no environment, no state, no I/O. Settings come in as arguments.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

MAX_DEPTH = 32  # containers inside containers: a native job needs 4 ({input: {inputs: [{boost_phrases: [...]}]}})
NUMBER_TEXT_MAX_CHARS = 64  # a number written as text (a form field): longer is not a number anyone means
INT_TEXT = re.compile(r"[+-]?[0-9]{1,18}", re.ASCII)  # ASCII digits only: not "²", "٣" or a fullwidth digit
FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?", re.ASCII)
TRUE_TEXTS, FALSE_TEXTS = ("true", "1"), ("false", "0", "")
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # C0 controls but tab, newline and CR; DEL
_SURROGATE_CHARS = re.compile("[\ud800-\udfff]")  # JSON carries them, UTF-8 cannot


class InputError(ValueError):
    """A request field that cannot be used: `field` names it as the client wrote it
    ("num_speakers", "inputs[2].source"), `problem` says what is wrong; str() is both, as one
    sentence a client can act on ("num_speakers must be an integer from 1 to 20, not "²"")."""

    def __init__(self, field: str, problem: str, message: str | None = None):
        self.field, self.problem = field, problem
        super().__init__(message or f"{field} {problem}")

    @classmethod
    def said(cls, field: str, message: str) -> InputError:
        """One for `field` from a message that already names it ("boost_phrases[3] must be ...")."""
        return cls(field, message, message)


def kind_of(value: Any) -> str:
    """A value's type in JSON's words, for messages: never a Python type name."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "a value of an unsupported type"


def shown(value: Any, limit: int = 24) -> str:
    """A short, safe rendering of a bad value for a message: short strings and numbers as JSON
    writes them (escaped), anything long or nested by its kind and size only."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value) if abs(value) < 10**limit else f"an integer of more than {limit} digits"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return repr(value) if math.isfinite(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, str):
        if len(value) > limit:
            return f"a string of {len(value)} characters"
        return json.dumps(value, ensure_ascii=not value.isprintable())
    return kind_of(value)


def _refuse(field: str, wanted: str, value: Any) -> InputError:
    return InputError(field, f"must be {wanted}, not {shown(value)}")


# --- structure ----------------------------------------------------------------------------------


def check_depth(value: Any, field: str = "the request", max_depth: int = MAX_DEPTH) -> None:
    """Refuse containers nested more than `max_depth` deep, walking without recursion (a
    recursive walk, repr() or json.dumps() of a list 100,000 deep raises RecursionError). The
    error names where: `field` and the keys below it ("inputs[0].source"; a list's index only
    where its items are objects)."""
    stack: list[tuple[Any, int, str]] = [(value, 1, field)]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, dict):
            children: Iterable[tuple[str, Any]] = ((f"{path}.{key}", child) for key, child in node.items())
        elif isinstance(node, (list, tuple)):
            children = ((f"{path}[{n}]" if isinstance(child, dict) else path, child) for n, child in enumerate(node))
        else:
            continue
        if depth > max_depth:
            raise InputError(path, f"is nested more than {max_depth} levels deep")
        stack.extend((child, depth + 1, where) for where, child in children if isinstance(child, (dict, list, tuple)))


def loads_json(data: bytes | str, field: str = "the body", max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON text: InputError for text that is not JSON, or that nests more than
    `max_depth` deep; that one names the object keys that lead there ("input.boost_phrases"),
    else `field`. NaN and Infinity (not JSON, but Python's json reads them, as Python's
    json.dumps writes them) are read as floats, so that the field holding one is refused by its
    own check, by name (as_float refuses what is not finite; no other field takes a float)."""
    try:
        parsed = json.loads(data)
        check_depth(parsed, field, max_depth)
    except RecursionError:  # json's C scanner checks its depth: nothing is left half-done
        raise _too_deep(data, field, max_depth) from None
    except InputError as exc:
        if exc.problem.startswith("is nested"):
            raise _too_deep(data, field, max_depth) from None
        raise
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(field, "is not valid JSON") from None
    return parsed


_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}:]')


def _too_deep(data: bytes | str, field: str, max_depth: int) -> InputError:
    where = deep_key(data, max_depth)
    return InputError(where or field, f"is nested more than {max_depth} levels deep")


def deep_key(data: bytes | str, max_depth: int = MAX_DEPTH) -> str | None:
    """The object keys ("input.boost_phrases") leading to where JSON text `data` first nests
    deeper than `max_depth`, by a scan of its tokens (strings, brackets, colons) without
    parsing, so text too deep for json.loads can still say which field it was."""
    text = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else data
    keys: list[str | None] = []  # per open container: the key being read in an object
    last = ""
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token[0] == '"':
            last = token
        elif token == ":" and keys and last:
            try:
                keys[-1] = json.loads(last)
            except ValueError:
                keys[-1] = last.strip('"')
        elif token in "[{":
            keys.append(None)
            if len(keys) > max_depth:
                named = [str(k) for k in keys if k]
                return ".".join(named) if named else None
        elif keys:
            keys.pop()
    return None


# --- scalars ------------------------------------------------------------------------------------


def as_int(value: Any, field: str, low: int, high: int, *, text: bool = False) -> int:
    """A whole number from `low` to `high`: a JSON integer, or, with `text` (form fields), ASCII
    digits. True and false are not numbers, nor is 2.0 an integer."""
    wanted = f"an integer from {low} to {high}"
    if isinstance(value, str) and text:
        stripped = value.strip()
        if not INT_TEXT.fullmatch(stripped):
            raise _refuse(field, wanted, value)
        number: Any = int(stripped)
    else:
        number = value
    if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
        raise _refuse(field, wanted, value)
    return number


def as_float(value: Any, field: str, low: float, high: float, *, text: bool = False) -> float:
    """A finite number from `low` to `high`: a JSON number, or with `text`, one written in ASCII
    (no "inf", "nan", "1e400" or Unicode digits). Range is checked before float() (which raises
    OverflowError on a 400-digit integer)."""
    wanted = f"a number from {low:g} to {high:g}"
    number: Any = value
    if isinstance(value, str) and text:
        stripped = value.strip()
        if len(stripped) > NUMBER_TEXT_MAX_CHARS or not FLOAT_TEXT.fullmatch(stripped):
            raise _refuse(field, wanted, value)
        number = float(stripped)  # ASCII decimal: at worst inf (caught below), never an exception
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise _refuse(field, wanted, value)
    if isinstance(number, float) and not math.isfinite(number):
        raise _refuse(field, wanted, value)
    if not low <= number <= high:  # int against float compares exactly, whatever the int's size
        raise _refuse(field, wanted, value)
    return float(number)


def as_bool(value: Any, field: str, *, text: bool = False) -> bool:
    """true or false; with `text`, also "true"/"false"/"1"/"0" (any case) and "" (false)."""
    if isinstance(value, bool):
        return value
    if text and isinstance(value, str) and len(value) <= 8:
        word = value.strip().lower()
        if word in TRUE_TEXTS or word in FALSE_TEXTS:
            return word in TRUE_TEXTS
    raise _refuse(field, "true or false", value)


def as_text(value: Any, field: str, max_chars: int, *, empty: bool = True, lines: bool = False) -> str:
    """A string of at most `max_chars` characters, without lone surrogates or control
    characters (tab, newline and CR only with `lines`); empty only with `empty`."""
    if not isinstance(value, str):
        raise _refuse(field, "a string", value)
    if len(value) > max_chars:
        raise InputError(field, f"must be at most {max_chars} characters, not {len(value)}")
    if not empty and not value.strip():
        raise InputError(field, "must not be empty")
    if _SURROGATE_CHARS.search(value):
        raise InputError(field, "holds a lone surrogate (\\ud800-\\udfff), which is not text")
    if _CONTROL_CHARS.search(value) or (not lines and re.search("[\t\n\r]", value)):
        raise InputError(field, "holds control characters")
    return value


def as_choice(value: Any, field: str, choices: Sequence[str]) -> str:
    """One of `choices`, exactly."""
    if not isinstance(value, str) or value not in choices:
        raise _refuse(field, "one of " + ", ".join(json.dumps(c) for c in choices), value)
    return value


def as_list(value: Any, field: str, max_items: int, *, text: bool = False, max_depth: int = MAX_DEPTH) -> list[Any]:
    """A list of at most `max_items` items. With `text` (form fields) a string is one item, or
    a list written as one JSON array ("[...]"), parsed with the depth limit."""
    if text and isinstance(value, str):
        if value.lstrip().startswith("["):
            value = loads_json(value, field, max_depth)
            if not isinstance(value, list):  # pragma: no cover - "[" starts only a JSON array
                raise _refuse(field, "a list", value)
        else:
            value = [value]
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise _refuse(field, "a list", value)
    if len(value) > max_items:
        raise InputError(field, f"must hold at most {max_items} items, not {len(value)}")
    return value


def as_text_list(value: Any, field: str, max_items: int, max_chars: int, *, text: bool = False) -> list[str]:
    """A list of strings (see as_list, as_text); each item's error names it: field[3]."""
    items = as_list(value, field, max_items, text=text)
    return [as_text(item, f"{field}[{n}]", max_chars) for n, item in enumerate(items)]
