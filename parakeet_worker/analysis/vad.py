"""Voice activity: with `vad` on, silero-vad (its ONNX "sequence" model, from the installed wheel)
finds each decoded item's speech, and only that reaches the model: the padded regions are read
back to back as one speech-only clip (one unit, batched as any other), and the clip's words and
segments are mapped back to the item's own timeline. The same model finds the pauses where a
long item is cut. It runs in prepare threads, PREPARE_WORKERS at a time, never on the event
loop or the model thread; a failure costs the item nothing but a warning.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import soundfile as sf

from parakeet_worker import config, errors, privacy
from parakeet_worker.audio.ffmpeg import STOP_POLL_SEC
from parakeet_worker.config import SAMPLE_RATE
from parakeet_worker.state import LoadOnce, shared
from parakeet_worker.transcript import Prepared, Span, Transcript

log = logging.getLogger("parakeet-worker")


VAD_THRESHOLD = 0.5  # silero's speech probability threshold (its default)
VAD_MIN_SPEECH_MS = 100  # a shorter blip is not speech (silero's default is 250; 100 keeps short words)
VAD_MIN_SILENCE_MS = 100  # a shorter dip does not end a region (silero's default)
# Each region grows this much either side (then out to the frame grid: 0.15 to 0.23 s): silero
# marks a word's onset up to ~0.1 s late where it begins with a fricative ("seven", "six").
# bench/vad.py, 10 minutes of calls: pads of 0.1, 0.15 and 0.2 s gave about the same word errors
# (18 to 20 of 587) and the model 1.08, 1.10 and 1.12 times the speech (0.15 on the hour: 1.09);
# 0.15 keeps a margin over silero's late onsets.
VAD_PAD_SEC = 0.15
VAD_BRIDGE_SEC = 0.6  # a gap this short between padded regions is kept, not cut out
# Regions start and end on the encoder's 80 ms frame grid (8x subsampling of 10 ms features, in
# Parakeet TDT and the demo model alike), so that the clip's frames are the item's frames and
# word times come out as they would without VAD, not up to a frame off.
VAD_GRID = 1280
VAD_FRAME, VAD_CONTEXT = 512, 64  # silero's frame at 16 kHz, and the samples of context before it
VAD_BLOCK_FRAMES = 512  # frames per ONNX call (~16 s): a stop is seen within one call
VAD_MIN_PAUSE_SEC = 0.2  # the shortest stretch without speech that a long item may be cut in

# --- The model: silero's ONNX sequence model, from the wheel, once per process ---

def _load_silero() -> Any:
    privacy.telemetry_off()  # onnxruntime's own telemetry starts with its first session
    import_silero()
    from silero_vad import load_silero_vad

    return load_silero_vad(onnx=True, sequence=True)


SILERO: LoadOnce[Any] = LoadOnce(_load_silero, lambda exc: f"{type(exc).__name__}: {errors.short(exc, 200)}")


def ensure_vad() -> Any:
    """silero-vad's ONNX sequence model, loaded once per process (thread-safe); None after a
    failure, kept in SILERO.error."""
    return SILERO.get()


def import_silero() -> None:
    """Import silero_vad (0.01 s; onnxruntime comes later, with the model). Its import sets
    torch's thread count to 1 for the whole process; the worker's count is put back. ensure_model
    does this right after the ASR model loads, so no model call ever runs with one thread."""
    if "silero_vad" in sys.modules:
        return
    import torch

    threads = torch.get_num_threads()
    try:
        import silero_vad  # noqa: F401
    finally:
        torch.set_num_threads(threads)


# --- Finding speech: frame probabilities, silero's regions, padded and bridged ---


@shared
def vad_slots() -> threading.BoundedSemaphore:
    """VAD is CPU-bound like ffmpeg (one core per run): PREPARE_WORKERS runs at a time."""
    return threading.BoundedSemaphore(config.CFG.prepare_workers)


@contextlib.contextmanager
def vad_slot(stop: threading.Event | None = None) -> Iterator[None]:
    """Hold one of the PREPARE_WORKERS VAD slots; the wait for one ends once `stop` is set."""
    slots = vad_slots()
    while not slots.acquire(timeout=STOP_POLL_SEC):
        if stop is not None and stop.is_set():
            raise errors.cancelled()
    try:
        yield
    finally:
        slots.release()


def vad_probs(samples: Callable[[int], np.ndarray], frames: int, stop: threading.Event | None = None) -> np.ndarray:
    """Speech probability of every 32 ms frame of `frames` samples, which `samples(n)` hands
    over in order (from a file or an array), one ONNX call per ~16 s block: what silero's
    audio_forward computes, with a stop check between calls and one block in memory."""
    model = ensure_vad()
    if model is None:
        raise RuntimeError(f"the voice activity model could not be loaded: {SILERO.error}")
    hidden = cell = np.zeros((1, 1, 128), np.float32)
    context = np.zeros(VAD_CONTEXT, np.float32)
    block = VAD_BLOCK_FRAMES * VAD_FRAME
    probs: list[np.ndarray] = []
    for done in range(0, frames, block):
        if stop is not None and stop.is_set():
            raise errors.cancelled()
        chunk = samples(min(block, frames - done))
        n = -(-len(chunk) // VAD_FRAME)
        grid = np.zeros((n, VAD_FRAME), np.float32)
        grid.reshape(-1)[: len(chunk)] = chunk
        out, context, hidden, cell = score_frames(model, grid, context, hidden, cell)
        probs.append(out)
    return np.concatenate(probs) if probs else np.zeros(0, np.float32)


def score_frames(model: Any, grid: np.ndarray, context: np.ndarray, hidden: np.ndarray,
                 cell: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """One ONNX call: the speech probability of each row of `grid` (frames of VAD_FRAME samples,
    in order), given the VAD_CONTEXT samples before the first and the LSTM state; returns them
    with the context and state that the next frame needs (a file's next block, a live stream's
    next chunk)."""
    contexts = np.concatenate([context[None], grid[:-1, -VAD_CONTEXT:]])
    out, hidden, cell = model.session.run(
        ["speech_probs", "hn", "cn"], {"input": np.concatenate([contexts, grid], axis=1), "h": hidden, "c": cell}
    )
    return np.asarray(out, np.float32).reshape(-1), grid[-1, -VAD_CONTEXT:].copy(), hidden, cell


def raw_regions(probs: np.ndarray, frames: int) -> list[tuple[int, int]]:
    """Silero's own state machine (threshold with hysteresis, minimum speech and silence),
    unpadded: sample ranges of speech."""
    from silero_vad import get_speech_timestamps_from_probs

    found = get_speech_timestamps_from_probs(
        probs, threshold=VAD_THRESHOLD, min_speech_duration_ms=VAD_MIN_SPEECH_MS,
        min_silence_duration_ms=VAD_MIN_SILENCE_MS, speech_pad_ms=0, audio_length_samples=frames,
    )  # fmt: skip
    return [(int(r["start"]), int(r["end"])) for r in found]


def pad_and_bridge(regions: Sequence[tuple[int, int]], frames: int, pad: float | None = None,
                    bridge: float | None = None) -> list[tuple[int, int]]:  # fmt: skip
    """Grow each region by `pad` s either side (out to the VAD_GRID, within [0, frames)) and
    join regions whose gap is then under `bridge` s, so that no word's edge is cut and no short
    pause is."""
    pad, bridge = VAD_PAD_SEC if pad is None else pad, VAD_BRIDGE_SEC if bridge is None else bridge
    grow, join = int(pad * SAMPLE_RATE), int(bridge * SAMPLE_RATE)
    out: list[tuple[int, int]] = []
    for lo, hi in regions:
        lo, hi = max(0, lo - grow) // VAD_GRID * VAD_GRID, min(frames, -(-(hi + grow) // VAD_GRID) * VAD_GRID)
        if out and lo - out[-1][1] < join:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def speech_regions(item: Prepared, stop: threading.Event | None = None) -> list[tuple[int, int]]:
    """The item's speech as padded, bridged frame ranges of its WAV, on a VAD slot (waiting for
    one ends if `stop` is set). Raises ItemError("cancelled") once stopped; any other exception
    means VAD failed."""
    return speech_and_probs(item, stop)[0]


def speech_and_probs(item: Prepared, stop: threading.Event | None = None) -> tuple[list[tuple[int, int]], np.ndarray]:
    """speech_regions, and the speech probability of each VAD_FRAME of the item on the way
    (a segment's no_speech_prob is read from them: analysis.confidence.with_vad)."""
    with vad_slot(stop), sf.SoundFile(str(item.wav)) as f:
        f.seek(item.start)
        probs = vad_probs(lambda n: f.read(n, dtype="float32"), item.frames, stop)
    regions = pad_and_bridge(raw_regions(probs, item.frames), item.frames)
    return [(item.start + lo, item.start + hi) for lo, hi in regions], probs


# --- The speech-only clip, and its times back on the item's timeline ---


def speech_clip(item: Prepared, regions: Sequence[tuple[int, int]]) -> Prepared:
    """The unit the model is given for a VAD'd item: its speech regions, back to back."""
    return dataclasses.replace(item, regions=tuple(regions), frames=sum(hi - lo for lo, hi in regions))


def on_timeline(clip: Prepared, transcript: Transcript) -> Transcript:
    """A speech-only clip's transcript with its times mapped back to the item's timeline: a
    time in the k-th region moves by where that region starts in the item less where it
    starts in the clip. A word ends in the region it starts in (the model often ends a word
    where the next begins, past a join); a segment ends where its last word does."""
    sizes = [hi - lo for lo, hi in clip.regions]
    at = [float(x) / SAMPLE_RATE for x in np.cumsum([0, *sizes])]  # region k: [at[k], at[k+1]) in the clip
    origin = [(lo - clip.start) / SAMPLE_RATE for lo, _ in clip.regions]  # ...and from origin[k] in the item

    def region(t: float) -> int:
        return min(max(bisect.bisect_right(at, t) - 1, 0), len(sizes) - 1)

    def word(s: Span) -> Span:  # (its scores, if any, go along)
        k = region(s.start)
        end = min(s.end, at[k + 1])
        return dataclasses.replace(s, start=origin[k] + s.start - at[k], end=origin[k] + max(end, s.start) - at[k])

    words = [word(w) for w in transcript.words]

    def segment(s: Span) -> Span:
        inside = [m for w, m in zip(transcript.words, words, strict=True) if s.start <= w.start < s.end]
        start = word(s).start
        return dataclasses.replace(s, start=start, end=inside[-1].end if inside else word(s).end)

    return dataclasses.replace(transcript, words=words, segments=[segment(s) for s in transcript.segments])


# --- Pauses where a long item is cut ---


def reader(samples: np.ndarray) -> Callable[[int], np.ndarray]:
    """`samples` handed over n at a time, as vad_probs takes them."""
    pos = 0

    def read(n: int) -> np.ndarray:
        nonlocal pos
        pos += n
        return samples[pos - n : pos]

    return read


def pause_cut(samples: np.ndarray) -> int | None:
    """The middle of the longest stretch without speech in `samples` (a window before a cut
    boundary), as an index into it; None when VAD finds no pause of VAD_MIN_PAUSE_SEC or fails.
    A 60 s window costs silero about 0.1 s of one core."""
    try:
        with vad_slot():
            probs = vad_probs(reader(samples), len(samples))
        speech = raw_regions(probs, len(samples))
    except Exception as exc:  # noqa: BLE001 - the energy rule still cuts well enough
        log.warning("voice activity detection failed on a cut window (%s); cutting by energy", errors.short(exc))
        return None
    edges = [0, *itertools.chain.from_iterable(speech), len(samples)]
    gaps = zip(edges[::2], edges[1::2], strict=True)
    pauses = [(hi - lo, lo, hi) for lo, hi in gaps if hi - lo >= VAD_MIN_PAUSE_SEC * SAMPLE_RATE]
    if not pauses:
        return None
    _, lo, hi = max(pauses)
    return (lo + hi) // 2
