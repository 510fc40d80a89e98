"""The native request: {"inputs": [...], "timestamps", "output_format", "boost_phrases",
"boost_weight", "vad", "diarize", "num_speakers", "min_speakers", "max_speakers",
"known_speakers", "language", "languages", "confidence", "logprobs"} checked before anything runs, each field for its
type, range and size (parakeet_worker.checks), and the job's own boosting list resolved.

The Runpod SDK's rp_validator is not used: its messages name Python types ("timestamps should be
<class 'bool'> type, not <class 'str'>"), its float() raises OverflowError on a 400-digit
integer, and it checks no range. Here a bad field is "invalid input: <field> must be ..., not
...", in JSON's words, whatever the value: nesting is walked without recursion first, numbers
are compared exactly before any conversion.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from parakeet_worker import checks, config, logsafe
from parakeet_worker import model as asr
from parakeet_worker.analysis import boosting, known_speakers, language, speakers
from parakeet_worker.analysis.boosting import BOOST_WEIGHT_MAX, Boost
from parakeet_worker.checks import InputError

log = logging.getLogger("parakeet-worker")
OUTPUT_FORMATS = ("json", "text", "srt", "vtt")
LANGUAGE_MAX_CHARS = 64  # a code, or a few: language.check_hint says which


def _inputs(value: Any, name: str) -> list[Any]:
    items = checks.as_list(value, name, 2**62)
    if not items:
        raise InputError(name, "must hold at least one item")
    if len(items) > config.CFG.max_inputs:
        raise InputError(name, f"has {len(items)} items, more than MAX_INPUTS={config.CFG.max_inputs}")
    return items


def _phrases(value: Any, name: str) -> tuple[str, ...]:
    try:
        return boosting.clean_phrases(value, name)
    except ValueError as exc:  # its message names the field (and the phrase's index)
        raise InputError.said(name, str(exc)) from None


def _count(value: Any, name: str) -> int:
    return checks.as_int(value, name, 1, speakers.DIARIZE_MAX_SPEAKERS)


# Each field of the job, its check (value, name) -> the value to use, and its default when it is
# absent or null. Checks raise InputError naming the field.
FIELDS: dict[str, tuple[Callable[[Any, str], Any], Any]] = {
    "inputs": (_inputs, None),
    "timestamps": (checks.as_bool, False),
    "output_format": (lambda v, n: checks.as_choice(v, n, OUTPUT_FORMATS), "json"),
    "boost_phrases": (_phrases, ()),
    "boost_weight": (lambda v, n: checks.as_float(v, n, 0.0, BOOST_WEIGHT_MAX), 1.0),
    "vad": (checks.as_bool, None),  # None: CFG.vad
    "diarize": (checks.as_bool, False),
    "num_speakers": (_count, None),
    "min_speakers": (_count, None),
    "max_speakers": (_count, None),
    "known_speakers": (lambda v, n: checks.as_list(v, n, 2**62), None),  # its entries: known_speakers.from_native
    "language": (lambda v, n: checks.as_text(v, n, LANGUAGE_MAX_CHARS), None),  # a hint: the one language spoken
    "languages": (lambda v, n: checks.as_text(v, n, 1000) if isinstance(v, str) else checks.as_list(v, n, 2**62), None),
    "confidence": (checks.as_bool, None),  # None: CFG.confidence
    "logprobs": (checks.as_bool, False),
}


def check_input(job_input: Any) -> tuple[dict[str, Any] | None, str | None]:
    """Check every field of a native job; return (params, None), or (None, the error: "invalid
    input: ..." naming the field)."""
    if not isinstance(job_input, dict):
        return None, 'input must be an object like {"inputs": [{"source": "..."}]}'
    try:
        return _checked(job_input), None
    except InputError as exc:
        return None, logsafe.echo(f"invalid input: {exc}")


def _checked(job_input: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(str(key) for key in job_input if key not in FIELDS)
    if unknown:
        allowed = ", ".join(FIELDS)
        raise InputError(logsafe.echo(", ".join(unknown), 200), f"{'is not a field' if len(unknown) == 1 else 'are not fields'} "
                         f"of a job; the fields are {allowed}")  # fmt: skip
    for key, value in job_input.items():  # before anything walks a value: no recursion on any of them
        checks.check_depth(value, key)
    if "inputs" not in job_input:
        raise InputError("inputs", 'is required: a list of items like {"source": "..."}')
    params = {key: default if job_input.get(key) is None else check(job_input[key], key)
              for key, (check, default) in FIELDS.items()}  # fmt: skip
    phrases = _job_phrase_count(params)
    if phrases > config.CFG.boost_max_job_phrases:
        raise InputError.said("boost_phrases", f"the job's boost_phrases lists hold {phrases} phrases in all (each "
                              f"different list counted once), more than BOOST_MAX_JOB_PHRASES={config.CFG.boost_max_job_phrases}")  # fmt: skip
    if params["vad"] is None:  # not given (or null): the worker's VAD setting
        params["vad"] = config.CFG.vad
    if params["confidence"] is None:  # not given (or null): the worker's CONFIDENCE setting
        params["confidence"] = config.CFG.confidence
    speakers_error = speakers.check_speakers(params)  # how the counts go together; each names its fields
    if speakers_error:
        raise InputError.said("num_speakers", speakers_error)
    try:
        params["known_speakers"] = known_speakers.from_native(params.get("known_speakers"))
    except known_speakers.KnownSpeakerError as exc:
        raise InputError(exc.param, exc.message, str(exc)) from None
    if params["known_speakers"] and not params["diarize"]:
        raise InputError("known_speakers", "needs diarize: true")
    try:  # each item may carry its own hint instead (job.Job.hint_of)
        params["language_hint"] = language.check_hint(params["language"], params["languages"], language.spoken())
    except language.HintError as exc:
        raise InputError.said(exc.param, str(exc)) from None
    return params


def _job_phrase_count(params: dict[str, Any]) -> int:
    """Boosting work a job asks for: the phrases of its own list and of each different item
    list (a list repeated on many items is built once). Each new list costs a tree build
    (1,000 phrases: 0.14 s on a quiet CPU core, ~3 s on a loaded one) and a tree in memory; see BOOST_MAX_JOB_PHRASES."""
    lists = {tuple(map(repr, item["boost_phrases"])) for item in params["inputs"]
             if isinstance(item, dict) and isinstance(item.get("boost_phrases"), list)}  # fmt: skip
    return len(params["boost_phrases"]) + sum(len(phrases) for phrases in lists)


async def job_boost(params: dict[str, Any]) -> Boost | None:
    """The job's boost_phrases at boost_weight, resolved off the event loop (a new list's tree
    takes a while to build); a job without a list does not leave the loop."""
    if not params["boost_phrases"] or not params["boost_weight"]:
        return None
    return await asyncio.get_running_loop().run_in_executor(
        None, boosting.resolve_boost, asr.loaded_model(), params["boost_phrases"], params["boost_weight"]
    )
