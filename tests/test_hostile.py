"""No input raises out of a route: a table of hostile values for every field of every route.

Each case puts one hostile value (a 400-digit integer, inf or NaN, Unicode digits such as "²",
5,000 digits, nesting 100,000 deep, a wrong type, a very long string, ...) into one field of an
otherwise valid request and sends it the way a client would:

    native      handler.handler({"input": {...}}) in-process, as the SDK awaits it
    queue       handler.handler({"input": {"openai_route": ..., "openai_input": {...}}})
    transcribe  POST /transcribe, the native body as JSON text, to the real HTTP server
    json        POST /v1/audio/transcriptions with a JSON body
    form        POST /v1/audio/transcriptions as multipart/form-data (every value a string)

and expects the answer a client can act on: a 400 that names the field (an OpenAI error object
with `param` on the OpenAI routes; `invalid input: ...` or the item's own error on the native
one), JSON, with no Python type name, no exception name, no traceback and no server path in
it, nothing logged at ERROR, no temp file left, and the worker still serving. Values are
generated per field kind (bool, integer, number, choice, string, list, file), so every field of
a kind gets every value that kind must refuse.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from conftest import TMP_ROOT, call_handler, speech_file, temp_leftovers, words_of

from tools.testkit import UvicornThread

DEEP = 100_000  # nesting of a JSON body or an in-process value
FORM_DEEP = 20_000  # nesting inside one form field (40 KB: under the form's per-field cap)
LONG = 1_000_000  # a very long string


def nested(depth: int) -> list[Any]:
    """[[[...]]] `depth` deep, built without recursion."""
    top: list[Any] = []
    inner = top
    for _ in range(depth - 1):
        deeper: list[Any] = []
        inner.append(deeper)
        inner = deeper
    return top


DEEP_VALUE = nested(DEEP)


@dataclass(frozen=True)
class Hostile:
    """One hostile value as each transport carries it: a Python value (in-process routes), JSON
    text (HTTP JSON bodies; None: same as json.dumps(value)), a form string (None: no form
    equivalent, the case is not sent as a form)."""

    name: str
    value: Any
    json_text: str | None = None
    form: str | None = None

    def as_json(self) -> str:
        return self.json_text if self.json_text is not None else json.dumps(self.value)


BIG = Hostile("int-400-digits", 10**400, "1" + "0" * 400, "1" + "0" * 400)
NEG_BIG = Hostile("neg-int-400-digits", -(10**400), "-1" + "0" * 400, "-1" + "0" * 400)
INF = Hostile("inf", float("inf"), "1e400", "inf")
NEG_INF = Hostile("neg-inf", float("-inf"), "-1e400", "-Infinity")
NAN = Hostile("nan", float("nan"), "NaN", "nan")
SUPERSCRIPT_2 = Hostile("superscript-2", "²", None, "²")
SUPERSCRIPT_1 = Hostile("superscript-1", "¹", None, "¹")
ARABIC_3 = Hostile("arabic-indic-3", "٣", None, "٣")
FULLWIDTH_5 = Hostile("fullwidth-5", "\uff15", None, "\uff15")
DIGITS_5000 = Hostile("5000-digits", "9" * 5000, None, "9" * 5000)
DEEP_LIST = Hostile("nested-100000", DEEP_VALUE, "[" * DEEP + "]" * DEEP, "[" * FORM_DEEP + "]" * FORM_DEEP)
DEEP_OBJECT = Hostile("object-nested-100000", None, '{"a":' * DEEP + "1" + "}" * DEEP, None)
OBJECT = Hostile("object", {"a": 1}, None, None)
EMPTY_LIST = Hostile("empty-list", [], None, None)
TRUE = Hostile("true", True, None, None)
TEXT = Hostile("text", "hello", None, "hello")
LONG_TEXT = Hostile("long-string", "x" * LONG, None, None)
SURROGATE = Hostile("lone-surrogate", "\ud800", '"\\ud800"', None)
NUL = Hostile("nul", "a\x00b", None, "a\x00b")
FRACTION = Hostile("fraction", 2.5, None, "2.5")
FLOAT_1E400_TEXT = Hostile("text-1e400", "1e400", None, "1e400")
INF_WORD = Hostile("text-infinity", "Infinity", None, "Infinity")

# What each kind of field must refuse, as JSON values (numbers out of range are added per field).
KINDS: dict[str, list[Hostile]] = {
    "bool": [BIG, INF, NAN, SUPERSCRIPT_2, DIGITS_5000, DEEP_LIST, OBJECT, EMPTY_LIST, TEXT, LONG_TEXT,
             Hostile("five", 5, None, "5"), FRACTION],
    "int": [BIG, NEG_BIG, INF, NAN, SUPERSCRIPT_2, SUPERSCRIPT_1, ARABIC_3, FULLWIDTH_5, DIGITS_5000, DEEP_LIST,
            OBJECT, EMPTY_LIST, TRUE, TEXT, LONG_TEXT, FRACTION, FLOAT_1E400_TEXT],
    "float": [BIG, NEG_BIG, INF, NEG_INF, NAN, SUPERSCRIPT_2, ARABIC_3, DIGITS_5000, DEEP_LIST, OBJECT, EMPTY_LIST,
              TRUE, TEXT, LONG_TEXT, FLOAT_1E400_TEXT, INF_WORD],
    "choice": [BIG, INF, DEEP_LIST, OBJECT, EMPTY_LIST, TRUE, TEXT, LONG_TEXT, SURROGATE, SUPERSCRIPT_2,
               DIGITS_5000],
    "string": [BIG, INF, NAN, DEEP_LIST, DEEP_OBJECT, OBJECT, EMPTY_LIST, TRUE, LONG_TEXT, NUL],
    "list": [BIG, INF, NAN, DEEP_LIST, DEEP_OBJECT, OBJECT, TRUE,
             Hostile("list-of-int", [5]), Hostile("list-of-null", [None]), Hostile("list-of-long-string", ["x" * LONG]),
             Hostile("list-of-surrogate", ["\ud800"], '["\\ud800"]'),
             Hostile("list-of-nested", [DEEP_VALUE], "[" + "[" * DEEP + "]" * DEEP + "]"),
             Hostile("list-of-100000", ["one"] * 100_000)],
    "file": [BIG, INF, NAN, DEEP_LIST, DEEP_OBJECT, OBJECT, EMPTY_LIST, TRUE, Hostile("empty", ""),
             SUPERSCRIPT_2, DIGITS_5000, SURROGATE, NUL],
}  # fmt: skip
# As form fields (every value a string): what each kind must refuse. A string is a valid
# model name, prompt or single boost phrase, so those kinds get only what no string field takes.
FORM_KINDS: dict[str, list[Hostile]] = {
    **{kind: [h for h in KINDS[kind] if h.form is not None] for kind in ("bool", "int", "float", "choice")},
    "string": [NUL, Hostile("escape", None, None, "a\x1bb")],
    "list": [DEEP_LIST, Hostile("json-list-of-int", None, None, "[5]"), Hostile("json-list-of-null", None, None, "[null]"),
             Hostile("json-list-of-object", None, None, '[{"a": 1}]'), Hostile("json-nan", None, None, "[NaN]"),
             Hostile("json-1e400", None, None, "[1e400]"), Hostile("json-nested", None, None, '["one", [["two"]]]'),
             Hostile("json-surrogate", None, None, '["\\ud800"]')],
}  # fmt: skip
OUT_OF_RANGE = {
    "temperature": [Hostile("minus-one", -1), Hostile("two", 2, None, "2")],
    "boost_weight": [Hostile("minus-one", -1, None, "-1"), Hostile("eleven", 11, None, "11")],
    "num_speakers": [Hostile("zero", 0, None, "0"), Hostile("twenty-one", 21, None, "21"),
                     Hostile("minus-three", -3, None, "-3")],
}  # fmt: skip
OUT_OF_RANGE["min_speakers"] = OUT_OF_RANGE["max_speakers"] = OUT_OF_RANGE["num_speakers"]

# Every field of each request, its kind, and what else a valid request needs beside it.
SPEAKERS = {"num_speakers", "min_speakers", "max_speakers"}
NATIVE_FIELDS = {
    "timestamps": "bool", "output_format": "choice", "boost_phrases": "list", "boost_weight": "float",
    "vad": "bool", "diarize": "bool", "num_speakers": "int", "min_speakers": "int", "max_speakers": "int",
    "known_speakers": "list", "language": "string", "languages": "list",
}  # fmt: skip
NATIVE_ITEM_FIELDS = {"source": "file", "audio_base64": "file", "boost_phrases": "list"}
OPENAI_FIELDS = {
    "file": "file", "model": "string", "response_format": "choice", "timestamp_granularities": "list",
    "language": "string", "prompt": "string", "temperature": "float", "stream": "bool",
    "chunking_strategy": "choice", "boost_phrases": "list", "boost_weight": "float", "vad": "bool",
    "diarize": "bool", "num_speakers": "int", "min_speakers": "int", "max_speakers": "int",
    "languages": "list", "keywords": "list", "known_speaker_names": "list", "known_speaker_references": "list",
}  # fmt: skip
# OpenAI's fields for its own models: whatever they hold is read no further than the checks
OPENAI_OTHER_FIELDS = ("include",)

LEAKS = re.compile(rf"Traceback|<class|\b[A-Z]\w*(Error|Exception)\b|{re.escape(str(TMP_ROOT))}|job-[a-z0-9_]{{8}}"
                   r"|\.src\b|File \"")
OPENAI_ITEM_CODES = {"invalid_source", "not_audio", "no_audio", "empty_audio", "forbidden_path", "not_found",
                     "invalid_boost", "too_large"}  # fmt: skip


def cases(fields: dict[str, str], form: bool = False) -> list[Any]:
    """(field, hostile value) for every field and every value its kind must refuse."""
    out = []
    for field, kind in fields.items():
        extra = [h for h in OUT_OF_RANGE.get(field, []) if h.form is not None or not form]
        for hostile in (FORM_KINDS if form else KINDS)[kind] + extra:
            out.append(pytest.param(field, hostile, id=f"{field}-{hostile.name}"))
    return out


def in_process(cases_: list[Any]) -> list[Any]:
    """Cases with a Python value (JSON-only text, an object 100,000 deep, has none)."""
    return [c for c in cases_ if c.values[1].value is not None]


# --- the routes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(worker):
    with UvicornThread(worker.http_app()) as running:
        yield running


@pytest.fixture(scope="module")
def clip():
    return speech_file("one two", "wav")


@pytest.fixture(scope="module")
def clip_b64(clip):
    return base64.b64encode(clip.read_bytes()).decode()


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture
def no_errors_logged():
    """Nothing this case sends is a bug: no logger (the worker's, uvicorn's) logs an ERROR."""
    seen = ErrorLog()
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "parakeet-worker")]
    for logger in loggers:
        logger.addHandler(seen)
    yield seen
    for logger in loggers:
        logger.removeHandler(seen)
    assert seen.records == [], seen.records[:3]


def native_base(clip) -> dict[str, Any]:
    return {"inputs": [{"source": str(clip)}], "diarize": True}


def openai_base(file: str) -> dict[str, Any]:
    return {"file": file, "model": "whisper-1", "diarize": True}


def without_conflicts(base: dict[str, Any], field: str) -> dict[str, Any]:
    """num_speakers cannot come with min/max_speakers: the base never has them; diarize is
    there so that speaker counts are checked for their values, not refused for lacking it."""
    body = dict(base)
    if field in ("diarize", "response_format"):
        body.pop("diarize", None)
    return body


def json_with(body: dict[str, Any], field: str, raw: str, inside: str | None = None) -> str:
    """JSON text of `body` with `field` set to the JSON text `raw` (too deep for json.dumps),
    inside the object at key `inside` if given."""
    if inside is not None:
        head = json.dumps({k: v for k, v in body.items() if k != inside})[:-1]
        return head + (", " if len(head) > 1 else "") + f'"{inside}": ' + json_with(body[inside], field, raw) + "}"
    head = json.dumps({k: v for k, v in body.items() if k != field})[:-1]
    return head + (", " if len(head) > 1 else "") + json.dumps(field) + ": " + raw + "}"


def assert_clean(text: str) -> None:
    assert not LEAKS.search(text), f"the answer gives something away: {LEAKS.search(text).group()!r} in {text[:300]!r}"


# Fields checked as a pair: a bad value in one may be told as the pair's mismatch, naming the other.
PAIRED = {"known_speaker_names": "known_speaker_references", "known_speaker_references": "known_speaker_names"}


def assert_openai_400(error: dict[str, Any], field: str, status: int | None = None) -> None:
    assert status in (None, 400), (status, error)
    assert error["type"] == "invalid_request_error", error
    param = error["param"] or ""
    named = [field] + ([PAIRED[field]] if field in PAIRED else [])
    assert any(param == f or param.startswith((f"{f}[", f"{f}.")) for f in named), (field, error)
    if field == "file" and error["code"] != "invalid_request":
        assert error["code"] in OPENAI_ITEM_CODES, error
    assert_clean(error["message"])


def assert_native_refused(out: dict[str, Any], field: str, item_field: bool = False) -> None:
    """The native job's refusal: `invalid input: ...` naming the field, or for an item's own
    field, that item's error with a client's code, naming it."""
    text = json.dumps(out)
    if "error" in out:
        assert_clean(out["error"])
        assert out["error"].startswith("invalid input"), out["error"][:300]
        assert field in out["error"], out["error"][:300]
        return
    assert item_field, f"{field}: accepted: {text[:300]}"
    (result,) = out["results"]
    assert_clean(result.get("error", ""))
    assert result.get("code") in OPENAI_ITEM_CODES, result
    assert field in result["error"] or result["code"] != "invalid_source", result


def alive(api) -> None:
    assert requests.get(f"{api.url}/ping", timeout=30).status_code == 200
    assert temp_leftovers() == []


# --- native job, in-process ------------------------------------------------------------------


@pytest.mark.parametrize(("field", "hostile"), in_process(cases(NATIVE_FIELDS)))
def test_native_job_field(worker, clip, no_errors_logged, field, hostile):
    job_input = without_conflicts(native_base(clip), field)
    job_input[field] = hostile.value
    out = call_handler(worker, {"id": "hostile", "input": job_input})
    assert_native_refused(out, field)
    assert temp_leftovers() == []


@pytest.mark.parametrize(("field", "hostile"), in_process(cases(NATIVE_ITEM_FIELDS)))
def test_native_item_field(worker, clip, no_errors_logged, field, hostile):
    item: dict[str, Any] = {field: hostile.value}
    if field == "boost_phrases":
        item["source"] = str(clip)
    out = call_handler(worker, {"id": "hostile", "input": {"inputs": [item]}})
    assert_native_refused(out, field, item_field=True)
    assert temp_leftovers() == []


@pytest.mark.parametrize(
    "job_input",
    [pytest.param(v.value, id=v.name) for v in (BIG, INF, NAN, SUPERSCRIPT_2, DEEP_LIST, TEXT, EMPTY_LIST, TRUE)]
    + [pytest.param({"inputs": v.value}, id=f"inputs-{v.name}")
       for v in (BIG, INF, DEEP_LIST, OBJECT, TEXT, TRUE, EMPTY_LIST, Hostile("100000-items", [{"source": "x"}] * 100_000))]
    + [pytest.param({"inputs": [{"source": "x"}], "x" * 100_000: 1}, id="unknown-long-key"),
       pytest.param({"inputs": [{"source": "x"}], "\ud800": 1}, id="unknown-surrogate-key"),
       pytest.param({"inputs": [DEEP_VALUE]}, id="item-nested-100000"),
       pytest.param({"inputs": [{"source": "x", "y" * 100_000: 1}]}, id="item-unknown-long-key")],
)  # fmt: skip
def test_native_job_shape(worker, no_errors_logged, job_input):
    out = call_handler(worker, {"id": "hostile", "input": job_input})
    text = json.dumps(out)
    if "error" in out:
        assert_clean(out["error"])
        assert out["error"].startswith(("invalid input", "input must be")), out["error"][:300]
        assert len(out["error"]) < 2000
    else:  # an item that is not a source is that item's error
        assert all(r.get("code") == "invalid_source" for r in out["results"]), text[:300]
        assert_clean(" ".join(r["error"] for r in out["results"]))
    assert temp_leftovers() == []


# --- the queue's OpenAI route, in-process ----------------------------------------------------


def queue_error(worker, body: Any, route: Any = "/v1/audio/transcriptions") -> dict[str, Any]:
    out = call_handler(worker, {"id": "hostile", "input": {"openai_route": route, "openai_input": body}})
    assert set(out) <= {"error", "refresh_worker", "code"} and "error" in out, json.dumps(out)[:300]
    assert_clean(out["error"])
    return json.loads(out["error"])["error"]


@pytest.mark.parametrize(("field", "hostile"), in_process(cases(OPENAI_FIELDS)))
def test_queue_openai_field(worker, clip_b64, no_errors_logged, field, hostile):
    body = without_conflicts(openai_base(clip_b64), field)
    body[field] = hostile.value
    assert_openai_400(queue_error(worker, body), field)
    assert temp_leftovers() == []


@pytest.mark.parametrize("field", OPENAI_OTHER_FIELDS)
def test_queue_openai_ignored_field_nested(worker, clip_b64, no_errors_logged, field):
    body = openai_base(clip_b64)
    body[field] = DEEP_VALUE
    assert_openai_400(queue_error(worker, body), field)


@pytest.mark.parametrize(
    ("route", "body"),
    [pytest.param("/v1/audio/transcriptions", v.value, id=f"body-{v.name}") for v in (BIG, DEEP_LIST, TEXT, TRUE)]
    + [pytest.param(v.value, {}, id=f"route-{v.name}") for v in (BIG, DEEP_LIST, LONG_TEXT, SURROGATE, OBJECT)],
)  # fmt: skip
def test_queue_openai_shape(worker, no_errors_logged, route, body):
    out = call_handler(worker, {"id": "hostile", "input": {"openai_route": route, "openai_input": body}})
    assert "error" in out and len(out["error"]) < 2000, json.dumps(out)[:300]
    assert_clean(out["error"])


# --- over HTTP ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "hostile"), cases(OPENAI_FIELDS))
def test_http_json_field(api, clip_b64, no_errors_logged, field, hostile):
    body = without_conflicts(openai_base(clip_b64), field)
    text = json_with(body, field, hostile.as_json())
    answer = requests.post(f"{api.url}/v1/audio/transcriptions", data=text.encode("utf-8", "surrogatepass"),
                           headers={"Content-Type": "application/json"}, timeout=60)  # fmt: skip
    assert answer.headers["content-type"].startswith("application/json"), answer.text[:300]
    assert_openai_400(answer.json()["error"], field, answer.status_code)
    alive(api)


@pytest.mark.parametrize(("field", "hostile"), cases({k: v for k, v in OPENAI_FIELDS.items() if k != "file"}, form=True))
def test_http_form_field(api, clip, no_errors_logged, field, hostile):
    fields = {k: v for k, v in without_conflicts(openai_base(""), field).items() if k != "file"}
    fields = {k: str(v).lower() if isinstance(v, bool) else v for k, v in fields.items()}
    fields[field] = hostile.form
    with open(clip, "rb") as f:
        answer = requests.post(f"{api.url}/v1/audio/transcriptions", files={"file": ("a.wav", f)},
                               data=fields, timeout=60)  # fmt: skip
    assert answer.headers["content-type"].startswith("application/json"), answer.text[:300]
    assert_openai_400(answer.json()["error"], field, answer.status_code)
    alive(api)


@pytest.mark.parametrize("hostile", [SUPERSCRIPT_2, DIGITS_5000, NUL], ids=lambda h: h.name)
def test_http_form_file_as_text(api, no_errors_logged, hostile):
    """A `file` sent as a plain form field (no filename): refused as a file, naming it."""
    answer = requests.post(f"{api.url}/v1/audio/transcriptions", files={"file": (None, hostile.form)},
                           data={"model": "whisper-1"}, timeout=60)  # fmt: skip
    assert_openai_400(answer.json()["error"], "file", answer.status_code)
    alive(api)


@pytest.mark.parametrize("field", ["prompt", "language", "boost_phrases"])
def test_http_form_field_over_the_cap_names_it(api, clip, no_errors_logged, field):
    with open(clip, "rb") as f:
        answer = requests.post(f"{api.url}/v1/audio/transcriptions", files={"file": ("a.wav", f)},
                               data={"model": "whisper-1", field: "x" * 200_000}, timeout=60)  # fmt: skip
    assert answer.status_code in (400, 413), answer.text[:300]
    assert answer.json()["error"]["param"] == field, answer.text[:300]
    assert_clean(answer.text)
    alive(api)


@pytest.mark.parametrize(
    "text",
    [pytest.param("[" * DEEP + "]" * DEEP, id="nested-list"), pytest.param('{"a":' * DEEP + "1" + "}" * DEEP, id="nested-object"),
     pytest.param("1" + "0" * 5000, id="bare-number"), pytest.param("NaN", id="nan"), pytest.param('"\\ud800"', id="surrogate"),
     pytest.param("\xff\xfe", id="not-utf8"), pytest.param("", id="empty")],
)  # fmt: skip
@pytest.mark.parametrize("route", ["/v1/audio/transcriptions", "/transcribe"])
def test_http_json_body_shape(api, no_errors_logged, route, text):
    answer = requests.post(f"{api.url}{route}", data=text.encode("latin-1"), timeout=60,
                           headers={"Content-Type": "application/json"})  # fmt: skip
    assert answer.status_code == 400, answer.text[:300]
    assert answer.headers["content-type"].startswith("application/json"), answer.text[:300]
    assert_clean(answer.text)
    alive(api)


@pytest.mark.parametrize(("field", "hostile"), cases(NATIVE_FIELDS))
def test_http_transcribe_field(api, clip, no_errors_logged, field, hostile):
    body = {"input": without_conflicts(native_base(clip), field)}
    text = json_with(body, field, hostile.as_json(), inside="input")
    answer = requests.post(f"{api.url}/transcribe", data=text.encode("utf-8", "surrogatepass"),
                           headers={"Content-Type": "application/json"}, timeout=60)  # fmt: skip
    assert answer.status_code == 400, answer.text[:300]
    assert answer.headers["content-type"].startswith("application/json"), answer.text[:300]
    assert_native_refused(answer.json(), field)
    alive(api)


def test_after_the_table_the_worker_still_transcribes(api, worker):
    """Everything above left the worker as it was: a plain request over each route works."""
    clip = speech_file("seven eight", "wav")
    with open(clip, "rb") as f:
        over_http = requests.post(f"{api.url}/v1/audio/transcriptions", files={"file": ("a.wav", f)},
                                  data={"model": "whisper-1"}, timeout=120)  # fmt: skip
    assert over_http.status_code == 200 and words_of(over_http.json()["text"]) == ["seven", "eight"]
    native = call_handler(worker, {"id": "after", "input": {"inputs": [{"source": str(clip)}]}})
    assert words_of(native["results"][0]["text"]) == ["seven", "eight"]
    assert temp_leftovers() == [] and not list(TMP_ROOT.glob("job-*"))


# --- a bug anywhere: a clean internal_error, the rest in the log ---------------------------------


def test_a_bug_is_a_clean_internal_error_on_every_route(worker, api, clip, clip_b64, monkeypatch, caplog):
    """An exception no check foresaw (here: injected into the native job's checks, with a
    server path, a Python type name and a signed URL in its text) is answered as internal_error
    (the queue: a job error; HTTP: a JSON 500) that quotes none of it; the log has the
    traceback, the URL's secret redacted."""
    from parakeet_worker import request

    def broken(job_input):
        raise RuntimeError("/srv/secret/job-abcdefgh/0.src <class 'int'> https://u:pw@host/a.wav?sig=SECRET")

    monkeypatch.setattr(request, "check_input", broken)
    caplog.set_level(logging.ERROR)
    answers = [
        json.dumps(call_handler(worker, {"id": "bug", "input": native_base(clip)})),
        json.dumps(call_handler(worker, {"id": "bug", "input": {"openai_route": "/v1/audio/transcriptions",
                                                                "openai_input": openai_base(clip_b64)}})),
    ]  # fmt: skip
    for route, body in (("/transcribe", {"input": native_base(clip)}), ("/v1/audio/transcriptions", openai_base(clip_b64))):
        answer = requests.post(f"{api.url}{route}", json=body, timeout=60)
        assert answer.status_code == 500 and answer.headers["content-type"].startswith("application/json"), answer.text
        answers.append(answer.text)
    for text in answers:
        assert "internal_error" in text, text
        for leak in ("/srv/secret", "job-abcdefgh", "<class", "RuntimeError", "SECRET", "Traceback"):
            assert leak not in text, (leak, text)
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "RuntimeError" in logged and "SECRET" not in logged and "https://***@host/a.wav?***" in logged
    monkeypatch.undo()
    alive(api)
