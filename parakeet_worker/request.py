"""The native request: {"inputs": [...], "timestamps", "output_format", "boost_phrases",
"boost_weight", "vad", "diarize", "num_speakers", "min_speakers", "max_speakers"} checked before
anything runs (the Runpod SDK's rp_validator, then the checks it skips), and the job's own
boosting list resolved.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from runpod.serverless.utils.rp_validator import validate

from parakeet_worker import config, errors, logsafe
from parakeet_worker import model as asr
from parakeet_worker.analysis import boosting, speakers
from parakeet_worker.analysis.boosting import Boost

log = logging.getLogger("parakeet-worker")
OUTPUT_FORMATS = ("json", "text", "srt", "vtt")

# The job schema, checked by the Runpod SDK's rp_validator. The validator skips `constraints`
# when a default exists, so enums and ranges are also checked in _check_input().
INPUT_SCHEMA: dict[str, dict[str, Any]] = {
    "inputs": {"type": list, "required": True},
    "timestamps": {"type": bool, "required": False, "default": False},
    "output_format": {"type": str, "required": False, "default": "json"},
    "boost_phrases": {"type": list, "required": False, "default": []},
    "boost_weight": {"type": float, "required": False, "default": 1.0},
    "vad": {"type": bool, "required": False, "default": None},  # None: CFG.vad
    "diarize": {"type": bool, "required": False, "default": False},
    "num_speakers": {"type": int, "required": False, "default": None},
    "min_speakers": {"type": int, "required": False, "default": None},
    "max_speakers": {"type": int, "required": False, "default": None},
}


def check_input(job_input: Any) -> tuple[dict[str, Any] | None, str | None]:
    """Validate the job with rp_validator plus the checks it skips; return (params, error)."""
    if not isinstance(job_input, dict):
        return None, 'input must be an object like {"inputs": [{"source": "..."}]}'
    for key, rule in INPUT_SCHEMA.items():  # the validator's float() raises OverflowError on 1e400 written out
        value = job_input.get(key)
        if rule["type"] is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                float(value)
            except OverflowError:
                return None, f"invalid input: {key} is too large a number"
    try:
        checked = validate(job_input, INPUT_SCHEMA)
    except Exception as exc:  # noqa: BLE001 - the SDK's validator failing on odd input is still the input's fault
        log.warning("the input validator raised on a job's input: %s", errors.short(exc))
        return None, f"invalid input: the validator could not check it ({type(exc).__name__})"
    if "errors" in checked:  # they quote unknown keys as given: echo them safely
        return None, logsafe.echo("invalid input: " + " ".join(checked["errors"]))
    params = checked["validated_input"]
    if not params["inputs"]:
        return None, "invalid input: inputs must hold at least one item"
    if len(params["inputs"]) > config.CFG.max_inputs:
        return None, f"invalid input: inputs has {len(params['inputs'])} items, more than MAX_INPUTS={config.CFG.max_inputs}"
    if params["output_format"] not in OUTPUT_FORMATS:
        return None, f"invalid input: output_format must be one of {list(OUTPUT_FORMATS)}"
    try:
        params["boost_phrases"] = boosting.clean_phrases(params["boost_phrases"])
    except ValueError as exc:
        return None, f"invalid input: {exc}"
    weight_error = boosting.check_weight(params["boost_weight"])
    if weight_error:
        return None, f"invalid input: {weight_error}"
    phrases = _job_phrase_count(params)
    if phrases > config.CFG.boost_max_job_phrases:
        return None, (f"invalid input: the job's boost_phrases lists hold {phrases} phrases in all (each different "
                      f"list counted once), more than BOOST_MAX_JOB_PHRASES={config.CFG.boost_max_job_phrases}")  # fmt: skip
    if params["vad"] is None:  # not given (or null): the worker's VAD setting
        params["vad"] = config.CFG.vad
    speakers_error = speakers.check_speakers(params)
    if speakers_error:
        return None, f"invalid input: {speakers_error}"
    return params, None


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
