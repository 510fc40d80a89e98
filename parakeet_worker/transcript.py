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
    """A word or a segment, in seconds from the start of its item. The scores are set only when
    its job asked for confidence (analysis.confidence): P(right) for a word, P(no error) for a
    segment; the sum of its tokens' log-probabilities and how many tokens; for a segment, the
    probability that it holds no speech."""

    text: str
    start: float
    end: float
    speaker: str | None = None  # set by diarization (see Speakers)
    confidence: float | None = None
    logprob: float | None = None
    tokens: int = 0
    no_speech_prob: float | None = None

    def shifted(self, seconds: float) -> Span:
        return dataclasses.replace(self, start=self.start + seconds, end=self.end + seconds)

    @property
    def avg_logprob(self) -> float | None:
        """Whisper's avg_logprob: the mean log-probability of the span's tokens."""
        if self.logprob is None or not self.tokens:
            return None
        return float(f"{self.logprob / self.tokens:.6g}")

    def as_dict(self, key: str, scores: bool = True) -> dict[str, Any]:
        """The span as a result shows it (`key`: "word" or "segment"), with its scores if it has
        them and `scores` (the job asked for confidence)."""
        out: dict[str, Any] = {key: self.text, "start": round(self.start, 3), "end": round(self.end, 3)}
        if self.speaker is not None:
            out["speaker"] = self.speaker
        if not scores:
            return out
        if self.confidence is not None:
            out["confidence"] = self.confidence
        if key == "segment" and self.avg_logprob is not None:
            out["avg_logprob"] = self.avg_logprob
        if self.no_speech_prob is not None:
            out["no_speech_prob"] = self.no_speech_prob
        return out


@dataclass(frozen=True)
class Tokens:
    """A transcript's emitted tokens (SentencePiece pieces, ▁ marking a word's start) and their
    log-probabilities, in order. Two tuples rather than an object per token: this is built for
    every scored item, and most requests never look at single tokens."""

    pieces: tuple[str, ...] = ()
    logprobs: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.pieces) != len(self.logprobs):
            raise ValueError(f"{len(self.pieces)} tokens but {len(self.logprobs)} log-probabilities")

    def __add__(self, other: Tokens) -> Tokens:
        """Two parts of one transcript (pieces of a long item), in order."""
        return Tokens(self.pieces + other.pieces, self.logprobs + other.logprobs)


@dataclass
class Transcript:
    """What the model said about one item (and, when diarized, who said it). `tokens` and
    `no_speech_prob` (the whole item's) are set when its job asked for confidence."""

    text: str
    words: list[Span] = field(default_factory=list)
    segments: list[Span] = field(default_factory=list)
    turns: list[Turn] | None = None  # None: not diarized
    warning: str | None = None
    tokens: Tokens | None = None
    no_speech_prob: float | None = None


@dataclass(frozen=True)
class Turn:
    """One speaker's stretch of speech, in seconds from the start of its item."""

    speaker: str
    start: float
    end: float

    def as_dict(self) -> dict[str, Any]:
        return {"speaker": self.speaker, "start": round(self.start, 3), "end": round(self.end, 3)}
