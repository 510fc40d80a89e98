"""parakeet_worker.checks on its own: what each helper takes and what it refuses, and that the
refusal names the field in JSON's words. The routes' use of them is tests/test_hostile.py's."""

from __future__ import annotations

import pytest

from parakeet_worker import checks
from parakeet_worker.checks import InputError


def refused(fn, *args, **kwargs) -> InputError:
    with pytest.raises(InputError) as caught:
        fn(*args, **kwargs)
    return caught.value


@pytest.mark.parametrize("text", ["2", " 7 ", "+3", "20"])
def test_integers_as_ascii_text(text):
    assert checks.as_int(text, "n", 1, 20, text=True) == int(text)


@pytest.mark.parametrize("value", ["²", "٣", "\uff15", "9" * 5000, "2.0", "0x2", "", "1_0", 10**400, -(10**400), True,
                                   2.0, float("nan"), [], {}, None])  # fmt: skip
def test_integers_refused(value):
    error = refused(checks.as_int, value, "num_speakers", 1, 20, text=True)
    assert error.field == "num_speakers" and str(error).startswith("num_speakers must be an integer from 1 to 20, not ")
    assert "<class" not in str(error) and len(str(error)) < 120


@pytest.mark.parametrize(("value", "number"), [("0.5", 0.5), (" 1 ", 1.0), ("1e-1", 0.1), (0, 0.0), (1, 1.0), (0.25, 0.25)])
def test_numbers(value, number):
    assert checks.as_float(value, "t", 0.0, 1.0, text=True) == number


@pytest.mark.parametrize("value", [10**400, "1" + "0" * 400, float("inf"), "inf", "Infinity", "nan", float("nan"),
                                   "1e400", "²", "٣", "9" * 100, True, "0.5.1", [0.5], 2, -1])  # fmt: skip
def test_numbers_refused(value):
    error = refused(checks.as_float, value, "temperature", 0.0, 1.0, text=True)
    assert str(error).startswith("temperature must be a number from 0 to 1, not ")


def test_json_text_is_not_a_number_outside_forms():
    """A JSON string is not a number unless the field comes from a form (text=True)."""
    assert "not \"0.5\"" in str(refused(checks.as_float, "0.5", "boost_weight", 0.0, 10.0))
    assert "not \"true\"" in str(refused(checks.as_bool, "true", "vad"))
    assert checks.as_bool("TRUE", "vad", text=True) is True and checks.as_bool("0", "vad", text=True) is False


def test_text_caps_and_characters():
    assert checks.as_text("line one\nline two", "prompt", 100, lines=True) == "line one\nline two"
    assert "at most 5 characters, not 6" in str(refused(checks.as_text, "abcdef", "model", 5))
    assert "control characters" in str(refused(checks.as_text, "a\x00b", "model", 5))
    assert "control characters" in str(refused(checks.as_text, "a\nb", "language", 5))
    assert "lone surrogate" in str(refused(checks.as_text, "\ud800", "model", 5))
    assert str(refused(checks.as_text, 5, "model", 5)) == "model must be a string, not 5"


def test_lists_from_forms():
    assert checks.as_list("one", "boost_phrases", 3, text=True) == ["one"]
    assert checks.as_list('["one", "two"]', "boost_phrases", 3, text=True) == ["one", "two"]
    assert "at most 1 items, not 2" in str(refused(checks.as_list, ["a", "b"], "x", 1))
    assert checks.as_text_list(["a"], "keywords", 2, 10) == ["a"]
    assert refused(checks.as_text_list, ["a", 7], "keywords", 2, 10).field == "keywords[1]"


def deep_list(depth: int) -> list:
    top: list = []
    inner = top
    for _ in range(depth - 1):
        inner.append([])
        inner = inner[0]
    return top


def test_depth_is_walked_without_recursion_and_named():
    checks.check_depth(deep_list(32), "boost_phrases")
    error = refused(checks.check_depth, {"inputs": [{"source": deep_list(100_000)}]}, "input")
    assert error.field == "input.inputs[0].source" and "nested more than 32 levels" in str(error)


def test_json_too_deep_names_the_key_that_holds_it():
    text = '{"input": {"inputs": [{"source": "a"}], "boost_weight": ' + "[" * 100_000 + "]" * 100_000 + "}}"
    assert refused(checks.loads_json, text).field == "input.boost_weight"
    shallow_but_over = '{"a": "x\\"[[", "temperature": ' + "[" * 40 + "]" * 40 + "}"
    assert refused(checks.loads_json, shallow_but_over).field == "temperature"
    assert refused(checks.loads_json, "[" * 100_000).field == "the body"
    assert str(refused(checks.loads_json, b"\xff\xfe")) == "the body is not valid JSON"


def test_nan_and_infinity_reach_the_fields_check():
    """Python's json reads NaN and Infinity; the field holding one refuses it by name."""
    parsed = checks.loads_json('{"temperature": NaN, "boost_weight": Infinity}')
    assert str(refused(checks.as_float, parsed["temperature"], "temperature", 0, 1)).endswith("not NaN")
    assert str(refused(checks.as_float, parsed["boost_weight"], "boost_weight", 0, 10)).endswith("not Infinity")


def test_kinds_are_jsons_words():
    assert [checks.kind_of(v) for v in (None, True, 1, 1.5, "s", [], {}, object())] == [
        "null", "true or false", "an integer", "a number", "a string", "a list", "an object",
        "a value of an unsupported type",
    ]  # fmt: skip
