"""Long items in pieces: where an item longer than MAX_SINGLE_PASS_SEC is cut (at a pause: the
quietest 200 ms by energy, or with VAD the longest pause silero hears), so that no piece is longer
than a piece may be and no word is cut in two."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import soundfile as sf

from parakeet_worker.analysis import vad
from parakeet_worker.config import SAMPLE_RATE
from parakeet_worker.transcript import Prepared

log = logging.getLogger("parakeet-worker")


# A pause finder: (item, boundary, window) -> the frame offset (from the item's start) where to
# cut, in [boundary - window, boundary]. split_points takes any; the energy rule is the default.
PauseFinder = Callable[[Prepared, int, int], int]


def quietest(chunk: np.ndarray) -> int:
    """The middle of the quietest 200 ms of `chunk` (energy in 10 ms frames, smoothed), as an index
    into it: a pause between words rather than inside one; len(chunk) when it is too short to
    tell. The rule long files are cut by, and live turns that do not pause (realtime_session)."""
    hop = SAMPLE_RATE // 100  # 10 ms energy frames
    energy = np.add.reduceat(chunk**2, np.arange(0, len(chunk), hop)) if len(chunk) else np.zeros(0)
    if len(energy) <= 20:
        return len(chunk)
    smooth = np.convolve(energy, np.ones(20), mode="same")  # 200 ms
    return int(np.argmin(smooth[10:-10]) + 10) * hop


def quietest_pause(item: Prepared, boundary: int, window: int) -> int:
    """The quietest 200 ms (see quietest) in the `window` frames before `boundary`. Reads only
    that window."""
    lo = max(0, boundary - window)
    with sf.SoundFile(str(item.wav)) as f:
        f.seek(item.start + lo)
        chunk = f.read(boundary - lo, dtype="float32")
    return lo + quietest(chunk)


def split_points(item: Prepared, piece_sec: float, find_pause: PauseFinder = quietest_pause) -> list[int]:
    """Frame offsets where a too-long item is cut, the first 0: a pause found by `find_pause`
    looking back from each boundary over min(60 s, a quarter piece), so no piece is longer
    than `piece_sec`."""
    piece = int(piece_sec * SAMPLE_RATE)
    window = int(min(60.0, piece_sec / 4) * SAMPLE_RATE)
    cuts, pos = [0], 0
    while item.frames - pos > piece:
        cut = find_pause(item, pos + piece, window)
        pos = cut if pos < cut <= pos + piece else pos + piece  # a finder's odd answer cannot loop
        cuts.append(pos)
    return cuts


def vad_pause(item: Prepared, boundary: int, window: int) -> int:
    """A PauseFinder for jobs with VAD: the middle of the longest pause silero hears in the
    `window` frames before `boundary` (see pause_cut), or the energy rule where it hears none."""
    lo = max(0, boundary - window)
    with sf.SoundFile(str(item.wav)) as f:
        f.seek(item.start + lo)
        chunk = f.read(boundary - lo, dtype="float32")
    cut = vad.pause_cut(chunk)
    return lo + cut if cut is not None else quietest_pause(item, boundary, window)


RESPLIT_FRACTION = 0.6  # of the piece that ran out of memory: two pieces, cut at a pause near the middle
