"""The shapes every stage shares: an item as decoded (Prepared), an uploaded input (Upload), what
the model said (Transcript of Spans) and who said it (Turn). Data only: no I/O, no model."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parakeet_worker.config import SAMPLE_RATE

log = logging.getLogger("parakeet-worker")


# --- Sources: an item's URL, path or base64, checked before anything is fetched --------------


@dataclass
class Prepared:
    """One decoded item (or one piece of a long item): frames [start, start+frames) of `wav`."""

    index: int
    source: str
    wav: Path
    frames: int
    start: int = 0
    warning: str | None = None
    # A speech-only clip (see Voice activity): these WAV frame ranges, read back to back, in
    # place of [start, start+frames); `frames` is then their total.
    regions: tuple[tuple[int, int], ...] = ()
    # A live turn's audio (realtime_session): 16 kHz float32 already in memory, read in place of
    # any WAV (`wav` is then unused).
    samples: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def in_memory(cls, samples: Any, source: str = "live") -> Prepared:
        """An item whose audio is `samples` (a live turn), not a WAV."""
        return cls(index=0, source=source, wav=Path(), frames=len(samples), samples=samples)

    @property
    def duration(self) -> float:
        return self.frames / SAMPLE_RATE


@dataclass(frozen=True)
class Upload:
    """An input that a request brought along (an HTTP multipart upload), already written to
    <job dir>/<index>.src by Uploads. Only server code makes one: no JSON input can."""

    name: str  # the client's file name, echoed as the result's source


# ---------------------------------------------------------------------------------------------
# Transcription: one scheduler thread owns the model and runs every job's units; each job
# awaits its own units' futures.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """A word or a segment, in seconds from the start of its item."""

    text: str
    start: float
    end: float
    speaker: str | None = None  # set by diarization (see Speakers)

    def shifted(self, seconds: float) -> Span:
        return dataclasses.replace(self, start=self.start + seconds, end=self.end + seconds)

    def as_dict(self, key: str) -> dict[str, Any]:
        out: dict[str, Any] = {key: self.text, "start": round(self.start, 3), "end": round(self.end, 3)}
        if self.speaker is not None:
            out["speaker"] = self.speaker
        return out


@dataclass
class Transcript:
    """What the model said about one item (and, when diarized, who said it)."""

    text: str
    words: list[Span] = field(default_factory=list)
    segments: list[Span] = field(default_factory=list)
    turns: list[Turn] | None = None  # None: not diarized
    warning: str | None = None


@dataclass(frozen=True)
class Turn:
    """One speaker's stretch of speech, in seconds from the start of its item."""

    speaker: str
    start: float
    end: float

    def as_dict(self) -> dict[str, Any]:
        return {"speaker": self.speaker, "start": round(self.start, 3), "end": round(self.end, 3)}
