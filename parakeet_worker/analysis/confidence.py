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

no_speech_prob: where VAD ran, from silero's speech probabilities: one minus the median of the
segment's words' peaks (over the whole span for a segment or item without words). Where it did
not, from the decoder: its blank rate over the segment (encoder frames skipped by blank steps)
and its tokens' mean log-probability, through a logistic map fitted with the tables (the blank
rate alone hardly tells noise from speech for the demo model, which emits words into pure
noise; see docs/confidence.md).

Who uses what: model.forward_decode runs token_logprobs on the rows that asked (a job's
`confidence` or `logprobs`), model.to_transcript calls scored(), handler.py with_vad() where
VAD ran, speakers.with_speakers segment_of() for segments cut by speaker, and the OpenAI shapes
openai_logprobs().

Importing this module imports the standard library and the package's base only (torch inside
token_logprobs); nothing here reads the environment (configured() reads config.CFG when called)
or touches the model until handed one.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parakeet_worker import config
from parakeet_worker.transcript import Span, Tokens, Transcript

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


def word_scores(tokens: Tokens) -> list[tuple[float, int]]:
    """Each word's raw score and token count: the sum of its tokens' log-probabilities (the
    probability the model gave the whole word). Words as SentencePiece marks them (word_groups)."""
    return [(sum(tokens.logprobs[i] for i in group), len(group)) for group in word_groups(tokens.pieces)]


def openai_logprobs(tokens: Tokens, leading_space: bool = False) -> list[dict[str, Any]]:
    """OpenAI's `logprobs` entries (token, logprob, bytes): ▁ becomes a space, and the first
    token's space is kept only when `leading_space` (a streamed delta after the first), so that
    the tokens joined read as the text (or delta) they go with."""
    out = []
    for i, (piece, logprob) in enumerate(zip(tokens.pieces, tokens.logprobs, strict=True)):
        match = _BYTE_PIECE.match(piece)
        text = "" if match else piece.replace(WORD_MARK, " ")
        if i == 0 and not leading_space:
            text = text.lstrip(" ")
        data = [int(match.group(1), 16)] if match else list(text.encode("utf-8"))
        out.append({"token": text, "logprob": logprob, "bytes": data})
    return out


def tokens_of(hyp: Any, tokenizer: Any, logprobs: Sequence[float]) -> Tokens:
    """A decoded hypothesis's tokens, with their log-probabilities (token_logprobs)."""
    ids = _ids(hyp)
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


def frames_of(hyp: Any) -> list[int]:
    """The encoder frame of each emitted token: Hypothesis.timestamp is a tensor of frames, or,
    once NeMo computed word timestamps, a dict that keeps them under "timestep"."""
    stamps = hyp.timestamp.get("timestep", []) if isinstance(hyp.timestamp, dict) else hyp.timestamp
    return [int(t) for t in (stamps.tolist() if hasattr(stamps, "tolist") else stamps or [])]


JOINT_CHUNK = 4096  # tokens per joint call in token_logprobs: bounds its memory on long audio


def token_logprobs(
    model: Any, encoded: Any, encoded_len: Any, hyps: Sequence[Any], rows: Sequence[int] | None = None
) -> list[list[float]]:
    """Each emitted token's log-probability under the model, for the hypotheses of a decoded
    batch (`rows` of it; None: all), in one pass after decoding: the prediction network over each
    hypothesis's tokens (teacher-forced from the blank start symbol, as the greedy loop fed them)
    and the joint at each token's own encoder frame, log-softmaxed over the token classes (TDT
    durations left out). This is what the greedy loop computed when it emitted each token,
    recomputed in a few batched calls instead of small operations at every decoding step (NeMo's
    preserve_frame_confidence; bench/confidence.py measures both). With key-phrase boosting it
    is the unboosted model's probability of the token actually emitted. `encoded` is
    model.forward's [B, D, T] output; only each token's frame of it is read (no copy of it), and
    the joint runs JOINT_CHUNK tokens at a time. `encoded_len` is unused (kept for symmetry with
    NeMo's decoding calls)."""
    import torch

    rows = list(range(len(hyps))) if rows is None else list(rows)
    labels = [[int(t) for t in _ids(hyps[r])] for r in rows]
    frames = [frames_of(hyps[r]) for r in rows]
    for r, ys, ts in zip(rows, labels, frames, strict=True):
        if len(ts) != len(ys):
            raise ValueError(f"hypothesis {r}: {len(ys)} tokens but {len(ts)} frames")
    longest = max((len(ys) for ys in labels), default=0)
    if not longest:
        return [[] for _ in rows]
    joint, device = model.joint, encoded.device
    blank = int(model.decoder.blank_idx)
    inputs = torch.tensor([[blank, *ys[:-1], *[blank] * (longest - len(ys))] if ys else [blank] * longest
                           for ys in labels], device=device)  # fmt: skip
    predicted, _ = model.decoder.predict(inputs, None, add_sos=False, batch_size=len(rows))  # [R, U, H]
    real = torch.tensor([[u < len(ys) for u in range(longest)] for ys in labels], device=device)
    pred = predicted[real]  # [N, H]: the real tokens, in order
    which = torch.tensor([r for r, ys in zip(rows, labels, strict=True) for _ in ys], device=device)
    at = torch.tensor([min(t, encoded.shape[2] - 1) for ts in frames for t in ts], device=device)
    targets = torch.tensor([y for ys in labels for y in ys], device=device)
    extra = int(getattr(joint, "num_extra_outputs", 0) or 0)
    out = []
    for lo in range(0, len(targets), JOINT_CHUNK):
        part = slice(lo, lo + JOINT_CHUNK)
        f = joint.project_encoder(encoded[which[part], :, at[part]])  # [n, H]
        g = joint.project_prednet(pred[part])
        logits = joint.joint_after_projection(f[:, None], g[:, None])[:, 0, 0]
        out.append(_log_softmax_at(logits[:, : logits.shape[-1] - extra].float(), targets[part]))
    logp = torch.cat(out).clamp(min=MIN_LOGPROB).cpu().tolist()
    result, at_ = [], 0
    for ys in labels:
        result.append(logp[at_ : at_ + len(ys)])
        at_ += len(ys)
    return result


def _ids(hyp: Any) -> list[int]:
    return hyp.y_sequence.tolist() if hasattr(hyp.y_sequence, "tolist") else list(hyp.y_sequence)


def _log_softmax_at(logits: Any, targets: Any) -> Any:
    """log softmax(logits)[target] per row, exact for a sure token too: with m the row's max,
    log p = (x_t - m) - log1p(sum of exp(x_i - m) over every i but the max), so a probability of
    1 - 1e-9 comes out as -1e-9 in float32 instead of rounding to 0 (log_softmax would)."""
    import torch

    top, arg = logits.max(dim=-1, keepdim=True)
    shifted = (logits - top).exp()
    shifted.scatter_(-1, arg, 0.0)
    rest = shifted.sum(dim=-1)
    return (logits.gather(-1, targets[:, None])[:, 0] - top[:, 0]) - torch.log1p(rest)

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
        "no_speech": [8.4947, -6.6252, 10.8095],
    },
}  # fmt: skip


@functools.lru_cache(maxsize=8)
def calibration_for(model: str, path: str | Path | None = None) -> Calibration:
    """The map for `model` (a path or a Hugging Face name): the JSON file at `path` when given
    (bench/confidence.py --fit writes one), else the stored table for the model's name or file
    stem, else the identity (uncalibrated). Remembered: a file is read once per process."""
    if path:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError("a calibration file holds one JSON object (bench/confidence.py --fit writes one)")
        return Calibration.from_dict(data)
    for key in (model, Path(model).name, Path(model).stem):
        if key in CALIBRATIONS:
            return Calibration.from_dict(CALIBRATIONS[key])
    return Calibration(model)


# ---------------------------------------------------------------------------------------------
# Words and segments
# ---------------------------------------------------------------------------------------------


def configured() -> Calibration:
    """The serving model's map: CONFIDENCE_CALIBRATION's file, else the stored table for
    PARAKEET_MODEL, else none (raw probabilities). Raises OSError or ValueError for a file that
    cannot be read (model.confidence_calibration says so at load)."""
    return calibration_for(config.CFG.model, config.CFG.confidence_calibration or None)


def word_confidences(tokens: Tokens, calibration: Calibration) -> list[float]:
    """P(right) for each word of a transcript, through the model's word map."""
    return [round(calibration.word(score), 4) for score, _ in word_scores(tokens)]


def segment_confidence(scores: Iterable[float], calibration: Calibration) -> float:
    """P(no error in the segment) from its words' raw scores (sums of log-probabilities)."""
    return round(calibration.segment(sum(scores)), 4)


def avg_logprob(token_logprobs: Sequence[float]) -> float:
    """Whisper's avg_logprob: the mean log-probability of a segment's tokens (0.0 for none), to
    6 significant digits (a sure segment's is tiny but still below 0)."""
    return float(f"{sum(token_logprobs) / len(token_logprobs):.6g}") if token_logprobs else 0.0


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _frames(probs: Sequence[float], frame_sec: float, start: float, end: float) -> list[float]:
    lo = max(int(start / frame_sec), 0)
    hi = min(max(math.ceil(end / frame_sec), lo + 1), len(probs))
    return [float(p) for p in probs[lo:hi]]


def no_speech_from_vad(
    probs: Sequence[float], frame_sec: float, words: Sequence[tuple[float, float]], span: tuple[float, float]
) -> float:
    """From silero's speech probabilities (`probs`, one every `frame_sec` s): 1 - the median,
    over a segment's `words` ([start, end) s), of each word's peak probability; for a segment
    or item without words, 1 - the median over its `span`. A word's peak, not its mean: the
    model ends a word where the next begins, so a word's span often holds the pause after it;
    the median over words, not the mean over the segment: a segment of words spoken one by one
    has more pause than speech (bench/confidence.py: the mean over a segment's span put a third
    of clean segments above 0.1). 1.0 where there is no frame."""
    if words:
        peaks = [max(frames) for frames in (_frames(probs, frame_sec, a, b) for a, b in words) if frames]
        return round(1.0 - _median(peaks), 4) if peaks else 1.0
    frames = _frames(probs, frame_sec, *span)
    return round(1.0 - _median(frames), 4) if frames else 1.0


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


# ---------------------------------------------------------------------------------------------
# A transcript scored: what the worker puts on its words, segments and item
# ---------------------------------------------------------------------------------------------


def scored(
    transcript: Transcript, tokens: Tokens, frames: Sequence[int], durations: Sequence[int], frame_sec: float | None,
    calibration: Calibration,
) -> Transcript:  # fmt: skip
    """`transcript` with its tokens and their scores: each word's confidence (and its summed
    log-probability and token count), each segment's confidence, log-probability and
    no_speech_prob from the decoder (its blank rate over the segment and its tokens' mean
    log-probability; see Calibration.no_speech_prob), and the item's no_speech_prob (the lowest
    of its segments', 1.0 when the model emitted nothing). `frames` and `durations` are each
    token's encoder frame and TDT duration; `frame_sec` the encoder's frame (None: no
    timestamps, so no words or segments to score). Words the token groups do not line up with
    are left unscored rather than guessed."""
    words = list(transcript.words)
    per_word = word_scores(tokens)
    if words and len(per_word) == len(words):
        words = [dataclasses.replace(w, confidence=round(calibration.word(lp), 4), logprob=lp, tokens=n)
                 for w, (lp, n) in zip(words, per_word, strict=True)]  # fmt: skip
    segments = []
    for seg, inside in zip(transcript.segments, words_by_segment(transcript.segments, words), strict=True):
        seg = segment_of(inside, seg, calibration)
        if frame_sec and seg.logprob is not None and durations:
            lo, hi = round(seg.start / frame_sec), max(round(seg.end / frame_sec), round(seg.start / frame_sec) + 1)
            blanks = no_speech_from_blanks(frames, durations, lo, hi)
            seg = dataclasses.replace(
                seg, no_speech_prob=calibration.no_speech_prob(blanks, seg.logprob / max(seg.tokens, 1))
            )
        segments.append(seg)
    return dataclasses.replace(transcript, words=words, segments=segments, tokens=tokens,
                               no_speech_prob=item_no_speech(segments, tokens))  # fmt: skip


def words_by_segment(segments: Sequence[Span], words: Sequence[Span]) -> list[list[Span]]:
    """The words of each segment: NeMo (and diarization) build segments from the words in
    order, so each takes as many as its text has; where the counts do not add up, by time."""
    counts = [len(s.text.split()) for s in segments]
    if sum(counts) == len(words):
        bounds = list(itertools.accumulate(counts, initial=0))
        return [list(words[a:b]) for a, b in itertools.pairwise(bounds)]
    return [[w for w in words if s.start - 1e-6 <= w.start < s.end] for s in segments]


def segment_of(words: Sequence[Span], template: Span, calibration: Calibration) -> Span:
    """`template` (a segment) scored from its words: P(no error) through the segment map, the
    words' summed log-probability and token count; unscored when any word is. Its
    no_speech_prob is kept."""
    if not words or any(w.logprob is None for w in words):
        return template
    logprob = sum(w.logprob for w in words if w.logprob is not None)
    return dataclasses.replace(template, confidence=round(calibration.segment(logprob), 4), logprob=logprob,
                               tokens=sum(w.tokens for w in words))  # fmt: skip


def item_no_speech(segments: Sequence[Span], tokens: Tokens | None) -> float | None:
    """The item's no_speech_prob: its most speech-like segment's; 1.0 when the model emitted no
    token; None when it emitted some but there are no segments (no timestamps) to tell by."""
    found = [s.no_speech_prob for s in segments if s.no_speech_prob is not None]
    if found:
        return min(found)
    return 1.0 if tokens is not None and not tokens.pieces else None


def with_vad(transcript: Transcript, probs: Sequence[float], frame_sec: float) -> Transcript:
    """A scored transcript's no_speech_prob from VAD instead of the decoder, where VAD ran: each
    segment's from silero's speech probabilities (`probs`, one per `frame_sec` from the item's
    start) at its words (no_speech_from_vad); the item's the lowest of its segments', or over the
    whole item when it has none (VAD heard no speech, or the model said nothing)."""
    by_segment = words_by_segment(transcript.segments, transcript.words)
    segments = [
        dataclasses.replace(seg, no_speech_prob=no_speech_from_vad(probs, frame_sec, [(w.start, w.end) for w in words],
                                                                   (seg.start, seg.end)))
        for seg, words in zip(transcript.segments, by_segment, strict=True)
    ]  # fmt: skip
    found = [s.no_speech_prob for s in segments if s.no_speech_prob is not None]
    item = min(found) if found else no_speech_from_vad(probs, frame_sec, [], (0.0, len(probs) * frame_sec))
    return dataclasses.replace(transcript, segments=segments, no_speech_prob=item)
