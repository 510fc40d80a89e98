"""How sure the model is: word and segment confidence in [0, 1], token log-probabilities (OpenAI's
`logprobs`), a segment's avg_logprob and no_speech_prob, all from what NeMo's greedy TDT decoder
computes anyway, plus a calibration map per model fitted once, offline.

Where the numbers come from. Greedy decoding emits the most probable token at each step, and
the probability it had is the confidence signal (the emitted token's own probability). The
worker recomputes it after decoding, for a whole batch at once (token_logprobs: the prediction
network teacher-forced over the emitted tokens, the joint at each token's frame), so decoding
itself is untouched: text and timestamps cannot change, confidence can be switched per batch,
and no second decoder is built. NeMo can record the same number inside its decoding loop
(`confidence_cfg` with the `max_prob` measure, alpha 1, blanks excluded: decoding_config and
step_logprobs, used by the benchmark); the two agree to 1e-7 and cost about the same on the demo
model. bench/confidence.py also measures NeMo's entropy measures: after calibration they are
no better (docs/confidence.md), and the token's own probability is what OpenAI's `logprobs` need.

Words: a word's tokens are grouped as SentencePiece marks them (a piece starting with "▁" starts
a word, as NeMo's own word confidence does). A word's raw score is the sum of its tokens'
log-probabilities (the probability the decoder gave the whole word); the model's calibration map
turns it into P(word is right). A segment's raw score is the sum over its words; its own map
gives P(segment has no error). Maps are isotonic tables (piecewise linear, non-decreasing), fitted
by bench/confidence.py --fit on a labelled set, never per request; a model without one gets the
raw probability (identity map), flagged as uncalibrated.

no_speech_prob: where VAD ran, one minus silero's median speech probability over the segment's
span; where it did not, from the decoder: its blank rate over the span (encoder frames skipped
by blank steps), mapped together with the tokens' mean log-probability by a logistic map fitted
with the word tables (the blank rate alone does not tell noise from speech for the demo model,
which emits words into pure noise; see docs/confidence.md).

Importing this module imports the standard library only (torch inside token_logprobs); nothing
here reads the environment or touches the model until handed one.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# NeMo's step measure: max_prob with alpha 1 is invertible to the emitted token's probability.
STEP_METHOD: dict[str, Any] = {"name": "max_prob", "alpha": 1.0}
WORD_MARK = "▁"  # SentencePiece's word-start marker
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
MIN_LOGPROB = -30.0  # floor for a probability that rounds to 0 in float32


def decoding_config(enabled: bool, method: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `confidence_cfg` of model.cfg.decoding: per-token step measures kept for emitted
    tokens only (blank steps excluded: nothing is recorded per blank, so decoding is not slowed),
    no token or word aggregation by NeMo (done here, from the same numbers), `method` as NeMo's
    ConfidenceMethodConfig (default STEP_METHOD). Off: NeMo's defaults, nothing kept."""
    return {
        "preserve_frame_confidence": enabled,
        "preserve_token_confidence": False,
        "preserve_word_confidence": False,
        "exclude_blank": True,
        "aggregation": "min",
        "tdt_include_duration": False,
        "method_cfg": dict(method or STEP_METHOD),
    }


# ---------------------------------------------------------------------------------------------
# Tokens: the emitted tokens' log-probabilities
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokens:
    """A transcript's emitted tokens (SentencePiece pieces, ▁ marking a word's start) and their
    log-probabilities, in order. Two tuples rather than an object per token: this is built for
    every decoded item while confidence is on, and most requests never look at single tokens."""

    pieces: tuple[str, ...] = ()
    logprobs: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.pieces) != len(self.logprobs):
            raise ValueError(f"{len(self.pieces)} tokens but {len(self.logprobs)} log-probabilities")

    def __add__(self, other: Tokens) -> Tokens:
        """Two parts of one transcript (pieces of a long item, VAD regions), in order."""
        return Tokens(self.pieces + other.pieces, self.logprobs + other.logprobs)

    def word_scores(self) -> list[float]:
        """Each word's raw score: the sum of its tokens' log-probabilities (the probability the
        model gave the whole word). Words as SentencePiece marks them (see word_groups)."""
        return [sum(self.logprobs[i] for i in group) for group in word_groups(self.pieces)]

    def openai(self, leading_space: bool = False) -> list[dict[str, Any]]:
        """OpenAI's `logprobs` entries (token, logprob, bytes): ▁ becomes a space, and the first
        token's space is kept only when `leading_space` (a streamed delta after the first), so
        that the tokens joined read as the text (or delta) they go with."""
        out = []
        for i, (piece, logprob) in enumerate(zip(self.pieces, self.logprobs, strict=True)):
            match = _BYTE_PIECE.match(piece)
            text = "" if match else piece.replace(WORD_MARK, " ")
            if i == 0 and not leading_space:
                text = text.lstrip(" ")
            data = [int(match.group(1), 16)] if match else list(text.encode("utf-8"))
            out.append({"token": text, "logprob": logprob, "bytes": data})
        return out


def tokens_of(hyp: Any, tokenizer: Any, logprobs: Sequence[float]) -> Tokens:
    """A decoded hypothesis's tokens, with their log-probabilities (token_logprobs)."""
    ids = hyp.y_sequence.tolist() if hasattr(hyp.y_sequence, "tolist") else list(hyp.y_sequence)
    pieces = tuple(tokenizer.ids_to_tokens([int(i) for i in ids])) if ids else ()
    return Tokens(pieces, tuple(float(x) for x in logprobs))


def step_logprobs(steps: Sequence[float], classes: int) -> list[float]:
    """Invert NeMo's max_prob (alpha 1) step measures c = (V p - 1) / (V - 1) into log p, for V
    `classes` (the decoder's token classes, blank included). Clamped to [1/V, 1]: float32
    rounding can put c a hair outside [0, 1]."""
    out = []
    for c in steps:
        p = (float(c) * (classes - 1) + 1.0) / classes
        p = min(max(p, 1.0 / classes), 1.0)
        out.append(max(math.log(p), MIN_LOGPROB) if p < 1.0 else 0.0)
    return out


def _frames_of(hyp: Any) -> list[int]:
    """The encoder frame of each emitted token: Hypothesis.timestamp is a tensor of frames, or,
    once NeMo computed word timestamps, a dict that keeps them under "timestep"."""
    stamps = hyp.timestamp.get("timestep", []) if isinstance(hyp.timestamp, dict) else hyp.timestamp
    return [int(t) for t in (stamps.tolist() if hasattr(stamps, "tolist") else stamps or [])]


def token_logprobs(model: Any, encoded: Any, encoded_len: Any, hyps: Sequence[Any]) -> list[list[float]]:
    """Each emitted token's log-probability under the model, for a decoded batch, in one pass
    after decoding: the prediction network over each hypothesis's tokens (teacher-forced, from
    the blank start symbol, as the greedy loop fed them), and the joint at each token's own
    encoder frame; log-softmax over the token classes (TDT durations left out), in float64 so that
    a sure token's log-probability stays below 0 instead of rounding to it. This is what the
    greedy loop computed when it emitted each token, recomputed with two batched calls instead of
    a few small operations at every decoding step (NeMo's preserve_frame_confidence; see
    bench/confidence.py for both costs). With key-phrase boosting it is the unboosted model's
    probability of the token actually emitted. `encoded` is model.forward's [B, D, T] output."""
    import torch

    labels = [
        [int(t) for t in (h.y_sequence.tolist() if hasattr(h.y_sequence, "tolist") else h.y_sequence)] for h in hyps
    ]
    frames = [_frames_of(h) for h in hyps]
    longest = max((len(x) for x in labels), default=0)
    if not longest:
        return [[] for _ in hyps]
    joint, device = model.joint, encoded.device
    blank = int(model.decoder.blank_idx)
    for b, (ys, ts) in enumerate(zip(labels, frames, strict=True)):
        if len(ts) != len(ys):
            raise ValueError(f"hypothesis {b}: {len(ys)} tokens but {len(ts)} frames")
    pad = [longest - len(ys) for ys in labels]
    inputs = torch.tensor(
        [[blank, *ys[:-1]] + [blank] * n if ys else [blank] * longest for ys, n in zip(labels, pad, strict=True)]
    )
    targets = torch.tensor([ys + [0] * n for ys, n in zip(labels, pad, strict=True)])
    at = torch.tensor([ts + [0] * n for ts, n in zip(frames, pad, strict=True)])
    inputs, targets, at = inputs.to(device), targets.to(device), at.to(device)
    predicted, _ = model.decoder.predict(inputs, None, add_sos=False, batch_size=len(hyps))  # [B, U, H]
    enc = joint.project_encoder(encoded.transpose(1, 2))  # [B, T, H]
    rows = torch.arange(len(hyps), device=device)[:, None]
    picked = enc[rows, at.clamp(max=enc.shape[1] - 1)]  # [B, U, H]: each token's frame
    pred = joint.project_prednet(predicted)
    flat = joint.joint_after_projection(picked.reshape(-1, 1, picked.shape[-1]), pred.reshape(-1, 1, pred.shape[-1]))
    logits = flat.reshape(len(hyps), longest, -1)
    logits = logits[..., : logits.shape[-1] - int(getattr(joint, "num_extra_outputs", 0) or 0)].double()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0].clamp(min=MIN_LOGPROB).cpu()
    return [logp[b, : len(ys)].tolist() for b, ys in enumerate(labels)]


def word_groups(pieces: Sequence[str]) -> list[list[int]]:
    """Token indices per word: a piece starting with ▁ starts a word (a bare ▁ joins the piece
    after it, as NeMo's word confidence counts them); a first piece without ▁ starts one too."""
    groups: list[list[int]] = []
    bare = False
    for i, piece in enumerate(pieces):
        if (piece.startswith(WORD_MARK) and not bare) or not groups:
            groups.append([])
        groups[-1].append(i)
        bare = piece == WORD_MARK
    return [g for g in groups if any(pieces[i].strip(WORD_MARK) for i in g)] if groups else []


# ---------------------------------------------------------------------------------------------
# Calibration: raw scores (sums of log-probabilities) to probabilities of being right
# ---------------------------------------------------------------------------------------------


def _surprise(logprob: float) -> float:
    """-ln(1 - p) for p = exp(logprob): the axis calibration tables use. Raw probabilities of a
    confident model crowd at 0.9999...; on this axis they spread out (0 at p = 0, ~13.8 at
    1 - 1e-6), so a table's linear pieces fall where the data is."""
    p = math.exp(min(logprob, 0.0))
    return -math.log(max(1.0 - p, 1e-12))


@dataclass(frozen=True)
class Table:
    """A non-decreasing piecewise-linear map from surprise (see _surprise) to a probability,
    flat past its ends. Empty: the identity (the raw probability)."""

    xs: tuple[float, ...] = ()
    ys: tuple[float, ...] = ()

    def __call__(self, logprob: float) -> float:
        if not self.xs:
            return min(max(math.exp(min(logprob, 0.0)), 0.0), 1.0)
        x = _surprise(logprob)
        k = bisect.bisect_right(self.xs, x)
        if k == 0:
            return self.ys[0]
        if k == len(self.xs):
            return self.ys[-1]
        x0, x1, y0, y1 = self.xs[k - 1], self.xs[k], self.ys[k - 1], self.ys[k]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1

    def as_dict(self) -> dict[str, list[float]]:
        return {"xs": list(self.xs), "ys": list(self.ys)}


@dataclass(frozen=True)
class Calibration:
    """One model's maps: word and segment raw scores to probabilities, and where they came
    from (`fitted_on` empty: not fitted, the raw probabilities are returned)."""

    model: str
    word: Table = Table()
    segment: Table = Table()
    fitted_on: str = ""
    no_speech: tuple[float, ...] = ()  # (bias, blank, logprob) of the logistic map; (): none

    def no_speech_prob(self, blank_rate: float, mean_logprob: float) -> float:
        """P(no speech) of a segment from the decoder alone: the fitted logistic map of its blank
        rate and its tokens' mean log-probability; the blank rate itself without a map."""
        if not self.no_speech:
            return round(blank_rate, 4)
        z = sum(w * x for w, x in zip(self.no_speech, no_speech_inputs(blank_rate, mean_logprob), strict=True))
        return round(1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0))), 4)

    @property
    def calibrated(self) -> bool:
        return bool(self.word.xs)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "fitted_on": self.fitted_on, "word": self.word.as_dict(),
                "segment": self.segment.as_dict(), "no_speech": list(self.no_speech)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        def table(t: dict[str, Any] | None) -> Table:
            t = t or {}
            xs, ys = tuple(float(x) for x in t.get("xs", ())), tuple(float(y) for y in t.get("ys", ()))
            if (
                len(xs) != len(ys)
                or any(b < a for a, b in itertools.pairwise(xs))
                or any(not 0.0 <= y <= 1.0 for y in ys)
            ):
                raise ValueError("a calibration table needs ascending xs and as many ys in [0, 1]")
            return Table(xs, ys)

        no_speech = tuple(float(w) for w in data.get("no_speech") or ())
        if no_speech and len(no_speech) != 3:
            raise ValueError("no_speech needs three weights: bias, blank rate, log-probability")
        return cls(str(data.get("model", "")), table(data.get("word")), table(data.get("segment")),
                   str(data.get("fitted_on", "")), no_speech)  # fmt: skip


def fit_table(logprobs: Sequence[float], right: Sequence[bool], min_block: int = 20) -> Table:
    """Isotonic regression (pool adjacent violators) of right/wrong on surprise, with blocks of
    at least `min_block` samples (fewer knots, less noise), as knots at each block's mean
    surprise. Offline only: bench/confidence.py fits, the worker applies."""
    pairs = sorted(zip((_surprise(lp) for lp in logprobs), (float(r) for r in right), strict=True))
    blocks: list[list[float]] = []  # [sum x, sum y, count]
    for x, y in pairs:
        blocks.append([x, y, 1.0])
        while len(blocks) > 1 and (
            blocks[-2][1] / blocks[-2][2] >= blocks[-1][1] / blocks[-1][2] or blocks[-2][2] < min_block
        ):
            sx, sy, n = blocks.pop()
            blocks[-1] = [blocks[-1][0] + sx, blocks[-1][1] + sy, blocks[-1][2] + n]
    while len(blocks) > 1 and blocks[-1][2] < min_block:  # a short last block joins its neighbour
        sx, sy, n = blocks.pop()
        blocks[-1] = [blocks[-1][0] + sx, blocks[-1][1] + sy, blocks[-1][2] + n]
    xs = tuple(round(b[0] / b[2], 4) for b in blocks)
    ys = tuple(round(b[1] / b[2], 4) for b in blocks)
    return Table(xs, ys)


# Fitted by `python -m bench.confidence --fit` (see docs/confidence.md); keyed by the model's file
# stem or Hugging Face name. Parakeet's published models have no table yet: no labelled set was
# run through them here (no download in this project), so they get raw probabilities.
CALIBRATIONS: dict[str, dict[str, Any]] = {
    "demo-tdt": {
        "model": "demo-tdt",
        "fitted_on": "bench/confidence.py: 1200 clips (150 sentences x 8 versions, seed 29) and 48 noise clips; 7128 words, 1200 segments",
        "word": {
            "xs": [0.3779, 0.4673, 0.5665, 0.6732, 0.7294, 0.777, 0.8829, 1.0868, 1.3717, 1.607, 1.7424, 1.9517,
                   2.1298, 2.1956, 2.3561, 2.5434, 2.6444, 2.9553, 3.574, 4.3108, 4.6408, 4.7742,
                   4.9429, 5.2252, 5.4667, 5.636, 6.4543, 7.2253, 7.3922, 7.8474, 8.4164, 8.6157,
                   8.9276, 9.82, 10.6889, 11.0261, 11.4698, 12.431, 14.7257],
            "ys": [0.0769, 0.1739, 0.2029, 0.3286, 0.3333, 0.3699, 0.3885, 0.4123, 0.4198, 0.4722, 0.4737, 0.4743,
                   0.4878, 0.5, 0.5357, 0.537, 0.566, 0.5816, 0.6058, 0.6951, 0.7097, 0.7471,
                   0.7547, 0.7697, 0.8065, 0.8151, 0.8512, 0.8621, 0.8932, 0.9167, 0.9451, 0.95,
                   0.9672, 0.9765, 0.9807, 0.9926, 0.9972, 0.9983, 1],
        },
        "segment": {
            "xs": [0.1562, 0.3465, 0.4416, 0.5982, 0.7825, 0.9763, 1.1783, 1.3293, 1.6971, 2.098, 2.477, 2.7823,
                   3.1265, 3.5769, 4.2752, 5.1832, 6.865, 8.5748, 9.2559, 10.3577],
            "ys": [0, 0.0645, 0.08, 0.1293, 0.3043, 0.3158, 0.3704, 0.4375, 0.4535, 0.5455, 0.5882, 0.7, 0.8, 0.8065,
                   0.8657, 0.873, 0.9272, 0.95, 0.96, 1],
        },
        "no_speech": [8.817, -7.6365, 10.6475],
    },
}  # fmt: skip


def calibration_for(model: str, path: str | Path | None = None) -> Calibration:
    """The map for `model` (a path or a Hugging Face name): the JSON file at `path` when given
    (bench/confidence.py --fit writes one), else the stored table for the model's name or file
    stem, else the identity (uncalibrated)."""
    if path:
        return Calibration.from_dict(json.loads(Path(path).read_text()))
    for key in (model, Path(model).name, Path(model).stem):
        if key in CALIBRATIONS:
            return Calibration.from_dict(CALIBRATIONS[key])
    return Calibration(model)


# ---------------------------------------------------------------------------------------------
# Words and segments
# ---------------------------------------------------------------------------------------------


def word_confidences(tokens: Tokens, calibration: Calibration) -> list[float]:
    """P(right) for each word of a transcript, through the model's word map."""
    return [round(calibration.word(score), 4) for score in tokens.word_scores()]


def segment_confidence(word_scores: Iterable[float], calibration: Calibration) -> float:
    """P(no error in the segment) from its words' raw scores (sum of log-probabilities)."""
    return round(calibration.segment(sum(word_scores)), 4)


def avg_logprob(token_logprobs: Sequence[float]) -> float:
    """Whisper's avg_logprob: the mean log-probability of a segment's tokens (0.0 for none), to
    6 significant digits (a sure segment's is tiny but still below 0)."""
    return float(f"{sum(token_logprobs) / len(token_logprobs):.6g}") if token_logprobs else 0.0


def no_speech_from_vad(probs: Sequence[float], frame_sec: float, start: float, end: float) -> float:
    """1 - silero's median speech probability over [start, end) s (its frames every `frame_sec`);
    1.0 when the span holds no frame. The median, not the mean: the pauses between words inside
    a segment pull a mean down (bench/confidence.py: on clean speech the mean put a third of the
    segments above 0.1; the median none)."""
    lo = max(int(start / frame_sec), 0)
    hi = min(max(math.ceil(end / frame_sec), lo + 1), len(probs))
    if hi <= lo:
        return 1.0
    window = sorted(float(p) for p in probs[lo:hi])
    mid = len(window) // 2
    median = window[mid] if len(window) % 2 else (window[mid - 1] + window[mid]) / 2
    return round(1.0 - median, 4)


def no_speech_inputs(blank_rate: float, mean_logprob: float) -> tuple[float, float, float]:
    """The decoder's no-speech evidence as the logistic map takes it: 1 (bias), the blank rate,
    and log10 of the mean token surprise (-mean log-probability, floored at 1e-6)."""
    return (1.0, float(blank_rate), math.log10(max(-float(mean_logprob), 1e-6)))


def no_speech_from_blanks(timesteps: Sequence[int], durations: Sequence[int], start: int, end: int) -> float:
    """The decoder's blank rate over encoder frames [start, end): the share of frames no emitted
    token covers (a TDT token at frame t with duration d covers t..t+d-1; the frames between are
    skipped by blank steps). 1.0 for an empty span."""
    if end <= start:
        return 1.0
    covered = [False] * (end - start)
    for t, d in zip(timesteps, durations, strict=False):
        for f in range(max(t, start), min(t + max(d, 1), end)):
            covered[f - start] = True
    return round(1.0 - sum(covered) / (end - start), 4)
