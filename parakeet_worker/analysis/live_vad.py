"""Turn detection for a live stream: silero's speech probabilities frame by frame, and OpenAI's
`server_vad` rules (threshold, prefix_padding_ms, silence_duration_ms) over them.

The model is the silero-vad ONNX sequence model the worker already loads for files (vad.ensure_vad,
handed in); a live stream keeps its own LSTM state and 64-sample context between chunks, and is
scored by the same code as a file (vad.score_frames), so its probabilities are those of the whole
stream run at once. The turn rules are a pure state
machine over (frame, probability): no clock, no I/O, testable with any probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from parakeet_worker.analysis.vad import VAD_CONTEXT, VAD_FRAME, score_frames
from parakeet_worker.config import SAMPLE_RATE

FRAME = VAD_FRAME  # silero's frame at 16 kHz (32 ms)
HYSTERESIS = 0.15  # speech goes on until the probability falls this far under the threshold (silero's rule)
MIN_SPEECH_FRAMES = 2  # one loud 32 ms frame (a click, a breath) does not start a turn


class SpeechProbs:
    """silero's speech probability of each 32 ms frame of one live 16 kHz stream, fed in chunks
    of any size; the frames a chunk completes are scored in one ONNX call."""

    def __init__(self, model: Any):
        self.model = model  # silero's OnnxWrapper, loaded with sequence=True
        self.hidden = np.zeros((1, 1, 128), np.float32)
        self.cell = np.zeros((1, 1, 128), np.float32)
        self.context = np.zeros(VAD_CONTEXT, np.float32)
        self.pending = np.zeros(0, np.float32)

    def push(self, samples: np.ndarray) -> np.ndarray:
        """The probabilities of the frames completed by `samples` (possibly none)."""
        self.pending = np.concatenate([self.pending, samples.astype(np.float32, copy=False)])
        n = len(self.pending) // FRAME
        if n == 0:
            return np.zeros(0, np.float32)
        grid = self.pending[: n * FRAME].reshape(n, FRAME)
        self.pending = self.pending[n * FRAME :].copy()
        probs, self.context, self.hidden, self.cell = score_frames(self.model, grid, self.context, self.hidden, self.cell)
        return probs


@dataclass(frozen=True)
class VadParams:
    """OpenAI's server_vad settings, with OpenAI's defaults."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500

    def as_dict(self) -> dict[str, Any]:
        return {"type": "server_vad", "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms}  # fmt: skip


@dataclass(frozen=True)
class Started:
    """Speech began at `sample` (the first speech frame; the turn's audio starts prefix_padding
    before it)."""

    sample: int


@dataclass(frozen=True)
class Stopped:
    """`silence_duration_ms` of silence followed the speech: the turn ends at `sample` (the end
    of that silence, as OpenAI's audio_end_ms counts it)."""

    sample: int


class TurnDetector:
    """server_vad over frame probabilities. Speech starts at MIN_SPEECH_FRAMES frames in a row at
    or over the threshold; it stops once the probability has stayed under threshold - HYSTERESIS
    for silence_duration_ms. Frame k starts at sample origin + k * FRAME of the stream."""

    def __init__(self, params: VadParams, origin: int = 0):
        self.params = params
        self.origin = origin
        self.in_speech = False
        self.run = 0  # frames in a row over the threshold (before speech), or under it (during)
        self.frame = 0  # the next frame's number

    def reset(self) -> None:
        """Forget the current turn (the buffer was cleared or committed by the client)."""
        self.in_speech, self.run = False, 0

    def feed(self, probs: np.ndarray) -> list[Started | Stopped]:
        events: list[Started | Stopped] = []
        silence_frames = max(1, round(self.params.silence_duration_ms * SAMPLE_RATE / 1000 / FRAME))
        low = max(0.01, self.params.threshold - HYSTERESIS)
        for p in probs:
            if not self.in_speech:
                self.run = self.run + 1 if p >= self.params.threshold else 0
                if self.run >= MIN_SPEECH_FRAMES:
                    self.in_speech, self.run = True, 0
                    first = self.frame - MIN_SPEECH_FRAMES + 1
                    events.append(Started(self.origin + first * FRAME))
            else:
                self.run = self.run + 1 if p < low else 0
                if self.run >= silence_frames:
                    self.in_speech, self.run = False, 0
                    events.append(Stopped(self.origin + (self.frame + 1) * FRAME))
            self.frame += 1
        return events

    @property
    def next_sample(self) -> int:
        """Where the next frame starts: a detector that replaces this one starts there."""
        return self.origin + self.frame * FRAME

