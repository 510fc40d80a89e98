"""Output: one result per input, in input order; subtitles rendered from segment timestamps.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Any

from parakeet_worker import config, errors
from parakeet_worker import model as asr
from parakeet_worker.analysis import confidence, speakers
from parakeet_worker.analysis.language import ItemLanguage
from parakeet_worker.audio import sources
from parakeet_worker.errors import ItemError
from parakeet_worker.job import Job
from parakeet_worker.transcript import Prepared, Span, Transcript

log = logging.getLogger("parakeet-worker")


SUB_MAX_CHARS = 42
SUB_MAX_SEC = 7.0


def _subtitle_cues(transcript: Transcript) -> list[tuple[float, float, str, str | None]]:
    """Cues of <= 42 characters and <= 7 s, cut at word boundaries, at segment ends and where
    the speaker changes; each with its speaker (None when not diarized)."""
    segment_ends = sorted(s.end for s in transcript.segments)
    cues: list[tuple[float, float, str, str | None]] = []
    line: list[Span] = []
    for word in transcript.words:
        if line:
            text = " ".join(w.text for w in [*line, word])
            new_segment = bisect.bisect_left(segment_ends, word.start) != bisect.bisect_left(segment_ends, line[-1].start)
            if new_segment or word.speaker != line[-1].speaker or len(text) > SUB_MAX_CHARS or word.end - line[0].start > SUB_MAX_SEC:
                cues.append((line[0].start, line[-1].end, " ".join(w.text for w in line), line[0].speaker))
                line = []
        line.append(word)
    if line:
        cues.append((line[0].start, line[-1].end, " ".join(w.text for w in line), line[0].speaker))
    fixed: list[tuple[float, float, str, str | None]] = []
    for start, end, text, speaker in cues:  # ordered, non-overlapping, never zero-length
        start = max(start, fixed[-1][1]) if fixed else start
        fixed.append((start, max(end, start + 0.01), text, speaker))
    return fixed


def _clock(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(transcript: Transcript) -> str:
    """SRT; a diarized cue starts with its speaker in brackets ("[SPEAKER_00] ...")."""
    blocks = [
        f"{n}\n{_clock(a, ',')} --> {_clock(b, ',')}\n{f'[{who}] ' if who else ''}{text}\n"
        for n, (a, b, text, who) in enumerate(_subtitle_cues(transcript), start=1)
    ]
    return "\n".join(blocks)


def to_vtt(transcript: Transcript) -> str:
    """WebVTT; a diarized cue carries a voice tag ("<v SPEAKER_00>...")."""
    blocks = [
        f"{_clock(a, '.')} --> {_clock(b, '.')}\n{f'<v {who}>' if who else ''}{text}\n"
        for a, b, text, who in _subtitle_cues(transcript)
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def _item_result(
    index: int, source: str, out: Any, params: dict[str, Any], prepared: Prepared | None, speech_sec: float | None = None,
    lang: ItemLanguage | None = None,
) -> dict[str, Any]:
    result: dict[str, Any] = {"index": index, "source": source}
    duration = prepared.duration if prepared is not None else getattr(out, "duration", None)
    if duration is not None:
        result["duration"] = round(duration, 3)
    if speech_sec is not None:  # VAD ran: the seconds of speech the model was given
        result["speech_sec"] = round(speech_sec, 3)
    if isinstance(out, ItemError):
        result.update(code=out.code, error=out.message)
        return result
    result["text"] = speakers.speaker_lines(out) if params["output_format"] == "text" else out.text
    if lang is not None:  # none in a dry run
        result.update(lang.item.as_fields(lang.hint))
    if out.turns is not None:
        result["turns"] = [t.as_dict() for t in out.turns]
    if params["timestamps"]:
        scores = bool(params.get("confidence"))
        segments = [s.as_dict("segment", scores) for s in out.segments]
        if lang is not None and len(lang.segments) == len(segments):
            for segment, found in zip(segments, lang.segments, strict=True):
                segment.update(found.as_fields(lang.hint))
                del segment["language_probability"]  # per item only: segments are short, it says little
        result["timestamps"] = {"word": [w.as_dict("word", scores) for w in out.words], "segment": segments}
    if params.get("confidence") and out.no_speech_prob is not None:
        result["no_speech_prob"] = out.no_speech_prob
    if params.get("logprobs") and out.tokens is not None:
        result["logprobs"] = confidence.openai_logprobs(out.tokens)
    if params["output_format"] in ("srt", "vtt"):
        result["subtitles"] = to_srt(out) if params["output_format"] == "srt" else to_vtt(out)
    notes = [w for w in (prepared.warning if prepared is not None else None, out.warning) if w]
    if notes:
        result["warning"] = "; ".join(notes)
    return result


def response(job: Job, outputs: dict[int, Transcript | ItemError], params: dict[str, Any], started: float) -> dict[str, Any]:
    """The job's answer: one result per input, in input order, and its stats."""
    results = []
    for i, item in enumerate(job.inputs):
        source = sources.source_label(item)
        out = outputs.get(i) or ItemError("internal_error", "no result was produced for this item")
        try:
            results.append(
                _item_result(i, source, out, params, job.prepared.get(i), job.speech_sec.get(i), job.languages.get(i))
            )
        except Exception:  # a rendering bug costs this item, not the job
            log.exception("could not render the result of item %d", i)
            err = errors.bug("rendering its result")
            results.append(_item_result(i, source, err, params, None))
    answer: dict[str, Any] = {"results": results}
    if params["output_format"] == "text":
        answer["text"] = "\n".join(r.get("text", "") for r in results)
    batches = [job.batches[k] for k in sorted(job.batches)]
    padded = sum(b.padded_sec for b in batches)
    answer["stats"] = {
        "model": config.model_name(config.CFG.model) if asr.loaded_model() is not None else None,
        "items": len(job.inputs),
        "failed": sum(1 for r in results if "error" in r),
        "audio_sec": round(sum(p.duration for p in job.prepared.values()), 3),
        "speech_sec": round(sum(job.speech_sec.get(i, p.duration) for i, p in job.prepared.items()), 3),
        "wall_sec": round(time.monotonic() - started, 3),
        "batches": len(batches),
        "batch_sizes": [b.size for b in batches],
        "padding_efficiency": round(sum(b.real_sec for b in batches) / padded, 4) if padded else 1.0,
    }
    if not asr.worker_healthy():
        answer["refresh_worker"] = True  # the SDK asks Runpod to replace this worker
    return answer
