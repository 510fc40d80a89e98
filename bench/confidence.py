"""How well word and segment confidence is calibrated, and what it costs: the demo model on a
labelled set of its own vocabulary, clean and degraded.

    python -m bench.confidence                  # measure; prints a table, writes bench/out/confidence.json
    python -m bench.confidence --sentences 40   # smaller, for development
    python -m bench.confidence --model M --name N --fit out.json   # fit a calibration table for model M

The set: espeak-ng sentences of 3 to 8 words of the demo vocabulary (tools/synth.py: seven voices,
120-220 words a minute, pitch 25-75), each in nine versions: clean; white noise at 20, 10, 5 and
0 dB SNR; tempo x0.8 to x1.25 (ffmpeg atempo, pitch kept); hard clipping (x3 to x10 over full
scale); G.711 telephone (ffmpeg: 300-3400 Hz band, 8 kHz mu-law and back). Built once, cached
under bench/out/ by its spec.

Each version is decoded (greedy TDT, batches of 16, as the worker decodes) with every candidate
step measure: the emitted token's own probability (NeMo's max_prob with alpha 1, inverted: see
parakeet_worker/confidence.py) and NeMo's entropy measures. Each hypothesis is aligned with its
reference (edit distance with backtrace) to mark every word right or wrong; a segment (one
sentence) is right when it has no error at all (deletions included). The sentences are split in
two halves (all versions of a sentence in the same half): the calibration table is fitted on
one half, and ECE (10 equal bins), AUROC (wrong words told from right ones) and Brier score are
measured on the other, both ways (the table stored for the worker is fitted on the whole set).
Also measured: the worker's model time (model.run_model) with every row scored or none,
timestamps on and off, same batches, alternated, and the CPU time inside the scoring functions;
the after-decoding pass against NeMo's in-loop measure; and no_speech_prob on speech and on pure
noise (VAD's, the decoder's blank rate, and the fitted decoder map). A reliability diagram is
drawn to docs/confidence-reliability.png (Pillow: matplotlib is not in the worker's
environment). Torch runs one thread: on shared cores two threads stalled each other.

The machine's cores are shared with other work while this runs: timings are noisy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from parakeet_worker.analysis import confidence as conf  # noqa: E402
from tools import synth  # noqa: E402

OUT = REPO / "bench" / "out"
DOCS = REPO / "docs"
SAMPLE_RATE = synth.SAMPLE_RATE
SPEC_VERSION = 1
TARGETS = {"word_ece": 0.05, "word_auroc": 0.85, "overhead_pct": 3.0}
VARIANTS = ("clean", "snr20", "snr10", "snr5", "snr0", "tempo", "clip", "g711")
BATCH = 16

# The candidate step measures: NeMo ConfidenceMethodConfig settings. "token_prob" is the emitted
# token's own probability (max_prob, alpha 1, inverted); the others are NeMo's entropy measures
# (tsallis/exp/0.33 is NeMo's default).
METHODS: dict[str, dict[str, Any]] = {
    "token_prob": conf.STEP_METHOD,
    "entropy_tsallis_exp_0.33": {"name": "entropy", "entropy_type": "tsallis", "alpha": 0.33, "entropy_norm": "exp"},
    "entropy_renyi_exp_0.25": {"name": "entropy", "entropy_type": "renyi", "alpha": 0.25, "entropy_norm": "exp"},
    "entropy_gibbs_lin_1": {"name": "entropy", "entropy_type": "gibbs", "alpha": 1.0, "entropy_norm": "lin"},
}
AGGREGATIONS = ("min", "mean", "prod")


# ---------------------------------------------------------------------------------------------
# The labelled set
# ---------------------------------------------------------------------------------------------


@dataclass
class Clip:
    sentence: int
    variant: str
    words: list[str]
    audio: np.ndarray


def _ffmpeg(data: bytes, args_in: Sequence[str], args_out: Sequence[str]) -> bytes:
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", *args_in, "-i", "pipe:0", *args_out, "pipe:1"]
    return subprocess.run(cmd, input=data, capture_output=True, check=True).stdout


RAW_IN = ("-f", "f32le", "-ar", str(SAMPLE_RATE), "-ac", "1")


def tempo(audio: np.ndarray, factor: float) -> np.ndarray:
    """Faster or slower at the same pitch (ffmpeg atempo)."""
    out = _ffmpeg(audio.astype(np.float32).tobytes(), RAW_IN, ("-af", f"atempo={factor:.4f}", "-f", "f32le"))
    return np.frombuffer(out, np.float32).copy()


def telephone(audio: np.ndarray) -> np.ndarray:
    """A G.711 call: 300-3400 Hz, 8 kHz mu-law, and back to 16 kHz (two real ffmpeg runs)."""
    mulaw = _ffmpeg(audio.astype(np.float32).tobytes(), RAW_IN,
                    ("-af", "highpass=f=300,lowpass=f=3400", "-ar", "8000", "-f", "mulaw"))  # fmt: skip
    out = _ffmpeg(mulaw, ("-f", "mulaw", "-ar", "8000", "-ac", "1"), ("-ar", str(SAMPLE_RATE), "-f", "f32le"))
    return np.frombuffer(out, np.float32).copy()


def with_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White noise `snr_db` below the mean power of the speech (its samples over 2% of the peak)."""
    loud = audio[np.abs(audio) > 0.02 * (np.abs(audio).max() or 1.0)]
    power = float(np.mean(loud**2)) if len(loud) else 1e-4
    noise = rng.standard_normal(len(audio)).astype(np.float32) * np.float32(math.sqrt(power / 10 ** (snr_db / 10)))
    return (audio + noise).astype(np.float32)


def clipped(audio: np.ndarray, gain: float) -> np.ndarray:
    """Hard clipping: peak at 0.5, amplified `gain` times, cut at +-0.5."""
    scaled = audio / (np.abs(audio).max() or 1.0) * 0.5
    return np.clip(scaled * gain, -0.5, 0.5).astype(np.float32)


def degrade(audio: np.ndarray, variant: str, rng: np.random.Generator) -> np.ndarray:
    if variant.startswith("snr"):
        return with_noise(audio, float(variant[3:]), rng)
    if variant == "tempo":
        return tempo(audio, float(rng.choice([rng.uniform(0.8, 0.9), rng.uniform(1.1, 1.25)])))
    if variant == "clip":
        return clipped(audio, float(rng.uniform(3.0, 10.0)))
    if variant == "g711":
        return telephone(audio)
    return audio


def sentence(rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    words = [str(w) for w in rng.choice(synth.VOCAB, size=int(rng.integers(3, 9)))]
    voice = str(rng.choice(synth.VOICES))
    audio = synth.speak(" ".join(words), voice, int(rng.integers(120, 221)), int(rng.integers(25, 76)))
    lead = np.zeros(int(rng.uniform(0.1, 0.5) * SAMPLE_RATE), np.float32)
    tail = np.zeros(int(rng.uniform(0.1, 0.5) * SAMPLE_RATE), np.float32)
    return words, np.concatenate([lead, synth.trim(audio), tail])


def build_set(sentences: int, seed: int) -> list[Clip]:
    """Every sentence in every variant; cached in bench/out by the spec and tools/synth.py."""
    spec = {"v": SPEC_VERSION, "n": sentences, "seed": seed, "variants": VARIANTS}
    code = hashlib.sha256(Path(synth.__file__).read_bytes()).hexdigest()  # degrade(): bump SPEC_VERSION
    key = hashlib.sha256(json.dumps([spec, code], sort_keys=True).encode()).hexdigest()[:12]
    cache = OUT / f"confidence-set-{key}.npz"
    if cache.exists():
        data = np.load(cache, allow_pickle=False)
        meta = json.loads(str(data["meta"]))
        return [Clip(m[0], m[1], m[2], data[f"a{i}"]) for i, m in enumerate(meta)]
    rng = np.random.default_rng(seed)
    clips: list[Clip] = []
    for n in range(sentences):
        words, audio = sentence(rng)
        clips += [Clip(n, v, words, degrade(audio, v, rng)) for v in VARIANTS]
    OUT.mkdir(parents=True, exist_ok=True)
    meta = json.dumps([[c.sentence, c.variant, c.words] for c in clips])
    np.savez(cache, meta=np.array(meta), **{f"a{i}": c.audio for i, c in enumerate(clips)})
    return clips


# ---------------------------------------------------------------------------------------------
# Right and wrong: each hypothesis word aligned with the reference
# ---------------------------------------------------------------------------------------------


def align(ref: Sequence[str], hyp: Sequence[str]) -> list[bool]:
    """For each hypothesis word, whether a minimum edit-distance alignment matches it to the same
    reference word (False: a substitution or an insertion). Ties prefer a match."""
    n, m = len(ref), len(hyp)
    cost = np.zeros((n + 1, m + 1), np.int32)
    cost[:, 0] = np.arange(n + 1)
    cost[0, :] = np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i, j] = min(cost[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]), cost[i - 1, j] + 1, cost[i, j - 1] + 1)
    right = [False] * m
    i, j = n, m
    while i > 0 and j > 0:
        if cost[i, j] == cost[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]):
            right[j - 1] = ref[i - 1] == hyp[j - 1]
            i, j = i - 1, j - 1
        elif cost[i, j] == cost[i, j - 1] + 1:
            j -= 1
        else:
            i -= 1
    return right


# ---------------------------------------------------------------------------------------------
# The model, and decoding with each candidate measure
# ---------------------------------------------------------------------------------------------


def load_model(path: str, threads: int | None = None) -> Any:
    """The model as the worker loads it (model.load_model: placed, dither off, its own greedy
    decoding configured, warmed up); `threads`: torch's thread count for this process (the
    benchmark uses 1: on shared cores two threads stalled each other in the decoder's loop, ~20x
    slower)."""
    import torch

    from parakeet_worker import model as asr

    if threads:
        torch.set_num_threads(threads)
    return asr.load_model(path)


def decoder_for(model: Any, method: dict[str, Any] | None, timestamps: bool = True) -> Any:
    """A greedy_batch decoding object with `method` as its step measure (None: confidence off),
    built once; the model's own decoding is left as it was."""
    from omegaconf import open_dict

    saved_cfg = model.cfg.decoding
    cfg = saved_cfg.copy()
    with open_dict(cfg):
        cfg.strategy = "greedy_batch"
        cfg.compute_timestamps = timestamps
        cfg.confidence_cfg = conf.decoding_config(method is not None, method or conf.STEP_METHOD)
    saved = model.decoding, model.wer
    model.change_decoding_strategy(cfg, verbose=False)
    built = model.decoding
    model.decoding, model.wer = saved
    model.cfg.decoding = saved_cfg
    if model.joint.fuse_loss_wer:
        model.joint.set_wer(model.wer)
    return built


@dataclass
class Decoded:
    clip: Clip
    text: str
    pieces: list[str]
    steps: dict[str, list[float]] = field(default_factory=dict)  # method -> per-token measure
    words: list[tuple[str, int, int]] = field(default_factory=list)  # (word, start, end frame)
    timesteps: list[int] = field(default_factory=list)
    durations: list[int] = field(default_factory=list)
    frames: int = 0


def batches(model: Any, clips: Sequence[Clip], encode: bool = True) -> Any:
    """The clips in batches of BATCH by length, each through the encoder (unless not
    `encode`): (rows, encoded, lengths, encoder seconds wall, encoder seconds CPU)."""
    import torch

    order = sorted(range(len(clips)), key=lambda i: len(clips[i].audio))
    for lo in range(0, len(order), BATCH):
        rows = order[lo : lo + BATCH]
        lengths = [len(clips[i].audio) for i in rows]
        audio = np.zeros((len(rows), max(lengths)), np.float32)
        for r, i in enumerate(rows):
            audio[r, : lengths[r]] = clips[i].audio
        if not encode:
            yield rows, None, lengths, 0.0, 0.0
            continue
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            enc, enc_len = model.forward(
                input_signal=torch.from_numpy(audio), input_signal_length=torch.tensor(lengths)
            )
        yield rows, enc, enc_len, time.perf_counter() - wall, time.process_time() - cpu


def decode_all(model: Any, clips: Sequence[Clip], methods: dict[str, dict[str, Any]]) -> list[Decoded]:
    """Every clip through the encoder once and each decoder, and a decoder with confidence off:
    all must give the same text and word times."""
    import torch

    decoders = {"off": decoder_for(model, None), **{name: decoder_for(model, m) for name, m in methods.items()}}
    out: dict[int, Decoded] = {}
    for rows, enc, enc_len, _, _ in batches(model, clips):
        with torch.inference_mode():
            for name, decoder in decoders.items():
                hyps = decoder.rnnt_decoder_predictions_tensor(enc, enc_len, return_hypotheses=True)
                for r, i in enumerate(rows):
                    _collect(out, i, clips[i], hyps[r], name, model, int(enc_len[r]))
    return [out[i] for i in range(len(clips))]


def overhead(model: Any, clips: Sequence[Clip], rounds: int = 3) -> dict[str, Any]:
    """The worker's model time (model.run_model: encoder, decoding, transcripts) with confidence
    off and on (every row scored: the pass after decoding and the words' and segments' scores),
    timestamps on and off, on the same batches in a rotating order, after one warm-up batch.
    Wall and CPU seconds (all threads), each the least of `rounds` passes over the clips."""
    from parakeet_worker import model as asr

    variants = [(ts, on) for ts in (True, False) for on in (False, True)]
    inside = _timed_scoring()
    rows = []
    for batch, _, _, _, _ in batches(model, clips, encode=False):
        lengths = [len(clips[i].audio) for i in batch]
        audio = np.zeros((len(batch), max(lengths)), np.float32)
        for r, i in enumerate(batch):
            audio[r, : lengths[r]] = clips[i].audio
        rows.append((audio, lengths))
    passes: list[dict[str, float]] = []
    for round_ in range(rounds + 1):
        sums: dict[str, float] = {}
        for n, (audio, lengths) in enumerate(rows[:1] if round_ == 0 else rows):
            for ts, on in variants[n % len(variants) :] + variants[: n % len(variants)]:
                name = f"{'ts' if ts else 'text'}_{'on' if on else 'off'}"
                inside[0] = 0.0
                began, began_cpu = time.perf_counter(), time.process_time()
                asr.run_model(model, audio, lengths, ts, scored=[on] * len(lengths))
                sums[f"{name}_wall"] = sums.get(f"{name}_wall", 0.0) + time.perf_counter() - began
                sums[f"{name}_cpu"] = sums.get(f"{name}_cpu", 0.0) + time.process_time() - began_cpu
                sums[f"{name}_scoring_cpu"] = sums.get(f"{name}_scoring_cpu", 0.0) + inside[0]
        if round_:  # round 0 warms every variant up on one batch
            passes.append(sums)
    best = {k: round(min(p[k] for p in passes), 3) for k in passes[0]}
    result: dict[str, Any] = {"seconds": best, "rounds": rounds, "clips": len(clips)}
    for mode in ("ts", "text"):
        for clock in ("wall", "cpu"):
            off, on = best[f"{mode}_off_{clock}"], best[f"{mode}_on_{clock}"]
            result[f"{mode}_{clock}_pct"] = round(100 * (on - off) / off, 2)
        # the scoring functions' own CPU seconds over the model time without them: less noisy
        # than a difference of two noisy totals, but blind to any effect outside them
        result[f"{mode}_scoring_pct"] = round(100 * best[f"{mode}_on_scoring_cpu"] / best[f"{mode}_off_cpu"], 2)
    _timed_scoring(undo=True)
    return result


_REAL: dict[str, Any] = {}


def _timed_scoring(undo: bool = False) -> list[float]:
    """Wrap the three functions the worker adds when a row is scored (conf.token_logprobs,
    tokens_of, scored) to sum their CPU seconds into the returned cell; undo puts them back."""
    if undo:
        for name, fn in _REAL.items():
            setattr(conf, name, fn)
        _REAL.clear()
        return [0.0]
    cell = [0.0]
    for name in ("token_logprobs", "tokens_of", "scored"):
        _REAL[name] = real = getattr(conf, name)

        def timed(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            began = time.process_time()
            try:
                return _real(*args, **kwargs)
            finally:
                cell[0] += time.process_time() - began

        setattr(conf, name, timed)
    return cell


def pass_matches_nemo(model: Any, clips: Sequence[Clip]) -> float:
    """The largest difference between the worker's after-decoding log-probabilities and NeMo's
    in-loop max_prob measure inverted, over `clips` (they should agree to float precision)."""
    import torch

    decoder, classes, worst = decoder_for(model, conf.STEP_METHOD), int(model.decoding.blank_id) + 1, 0.0
    for _, enc, enc_len, _, _ in batches(model, clips):
        with torch.inference_mode():
            hyps = decoder.rnnt_decoder_predictions_tensor(enc, enc_len, return_hypotheses=True)
            mine = conf.token_logprobs(model, enc, enc_len, hyps)
        for h, lps in zip(hyps, mine, strict=True):
            ref = conf.step_logprobs(h.non_blank_step_confidence_precomputed or [], classes)
            worst = max([worst, *(abs(a - b) for a, b in zip(ref, lps, strict=True))])
    return worst


def _collect(out: dict[int, Decoded], i: int, clip: Clip, h: Any, name: str, model: Any, frames: int) -> None:
    """Keep a hypothesis's text, pieces and timing once, and each decoder's step measures; every
    decoder must give the same text and word times (confidence changes nothing else)."""
    words = [(w["word"], w["start_offset"], w["end_offset"]) for w in h.timestamp["word"]]
    if i not in out:
        ids = [int(t) for t in h.y_sequence]
        out[i] = Decoded(clip, h.text, model.tokenizer.ids_to_tokens(ids) if ids else [], words=words,
                         timesteps=[int(t) for t in h.timestamp["timestep"]],
                         durations=[int(d) for d in (h.token_duration or [])], frames=frames)  # fmt: skip
    elif (h.text, words) != (out[i].text, out[i].words):
        raise AssertionError(f"{name} changed the text or word times: {h.text!r} vs {out[i].text!r}")
    if name != "off":
        out[i].steps[name] = list(h.non_blank_step_confidence_precomputed or [])


# ---------------------------------------------------------------------------------------------
# Scores: what each measure says about each word and segment
# ---------------------------------------------------------------------------------------------


@dataclass
class Labelled:
    """Per word or per segment: the sentence it came from, its variant, right or wrong, and each
    candidate's raw score as a log-probability-like number (higher: surer)."""

    sentence: list[int] = field(default_factory=list)
    variant: list[str] = field(default_factory=list)
    right: list[bool] = field(default_factory=list)
    scores: dict[str, list[float]] = field(default_factory=dict)

    def add(self, sentence: int, variant: str, right: bool, scores: dict[str, float]) -> None:
        self.sentence.append(sentence)
        self.variant.append(variant)
        self.right.append(right)
        for k, v in scores.items():
            self.scores.setdefault(k, []).append(v)


def _aggregate(values: Sequence[float], how: str, logs: bool) -> float:
    """A word's (or segment's) score from its tokens' measures, as a log-probability: for token
    probabilities `values` are log p already; for entropy measures (in [0, 1]) their log."""
    logv = list(values) if logs else [math.log(min(max(v, 1e-12), 1.0)) for v in values]
    if how == "min":
        return min(logv)
    if how == "mean":
        return sum(logv) / len(logv)
    return sum(logv)


def label(decoded: Sequence[Decoded], classes: int) -> tuple[Labelled, Labelled]:
    """Words and segments (one per clip that has words), each with every candidate's score."""
    words, segments = Labelled(), Labelled()
    for d in decoded:
        hyp = d.text.split()
        groups = conf.word_groups(d.pieces)
        if len(groups) != len(hyp):
            raise AssertionError(f"{len(groups)} token groups for {len(hyp)} words in {d.text!r}")
        right = align(d.clip.words, hyp)
        per_word: list[dict[str, float]] = [{} for _ in hyp]
        seg: dict[str, float] = {}
        for name, steps in d.steps.items():
            logs = name == "token_prob"
            values = conf.step_logprobs(steps, classes) if logs else steps
            for how in AGGREGATIONS:
                scores = [_aggregate([values[i] for i in g], how, logs) for g in groups]
                for w, s in zip(per_word, scores, strict=True):
                    w[f"{name}/{how}"] = s
                if scores:
                    seg[f"{name}/{how}/sum"] = sum(scores)
                    seg[f"{name}/{how}/min"] = min(scores)
        for w, r in zip(per_word, right, strict=True):
            words.add(d.clip.sentence, d.clip.variant, r, w)
        if hyp:
            segments.add(d.clip.sentence, d.clip.variant, hyp == d.clip.words, seg)
    return words, segments


def ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: |accuracy - mean confidence| per equal-width bin, weighted by
    the bin's share."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(y[inside].mean() - p[inside].mean())
    return float(total)


def auroc(score: np.ndarray, right: np.ndarray) -> float:
    """P(a right word scores above a wrong one), ties counting half (Mann-Whitney)."""
    pos, neg = score[right], score[~right]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    i = 0
    while i < len(values):  # average ranks over ties
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def evaluate(data: Labelled, key: str, fit_half: np.ndarray) -> dict[str, Any]:
    """Fit a table on the sentences in `fit_half`, score the others: raw and calibrated ECE,
    AUROC, Brier score."""
    scores = np.array(data.scores[key])
    right = np.array(data.right)
    fit, test = fit_half, ~fit_half
    table = conf.fit_table(scores[fit].tolist(), right[fit].tolist())
    raw = np.exp(np.minimum(scores[test], 0.0))
    cal = np.array([table(s) for s in scores[test]])
    return {
        "n_fit": int(fit.sum()), "n_test": int(test.sum()), "wrong_share_test": round(float(1 - right[test].mean()), 4),
        "raw_ece": round(ece(raw, right[test]), 4), "ece": round(ece(cal, right[test]), 4),
        "auroc": round(auroc(scores[test], right[test]), 4), "brier": round(float(np.mean((cal - right[test]) ** 2)), 4),
        "table": table,
    }  # fmt: skip


def bootstrap_ece(p: np.ndarray, y: np.ndarray, rounds: int = 200, seed: int = 0) -> list[float]:
    """A 95% interval of ECE over resamples of the scored half (how much of it is sampling)."""
    rng = np.random.default_rng(seed)
    values = sorted(ece(p[idx], y[idx]) for idx in (rng.integers(0, len(p), len(p)) for _ in range(rounds)))
    return [round(values[int(0.025 * rounds)], 4), round(values[int(0.975 * rounds) - 1], 4)]


def cross_fit(data: Labelled, key: str) -> dict[str, Any]:
    """Two folds by sentence parity: fit on one half, score the other, both ways; the scores of
    both scored halves pooled (every item scored once, by a table that never saw it)."""
    scores, right = np.array(data.scores[key]), np.array(data.right)
    even = np.array(data.sentence) % 2 == 0
    cal = np.zeros(len(scores))
    for fit in (even, ~even):
        table = conf.fit_table(scores[fit].tolist(), right[fit].tolist())
        cal[~fit] = [table(s) for s in scores[~fit]]
    raw = np.exp(np.minimum(scores, 0.0))
    return {
        "n": len(scores), "wrong_share": round(float(1 - right.mean()), 4),
        "raw_ece": round(ece(raw, right), 4), "ece": round(ece(cal, right), 4), "ece_95": bootstrap_ece(cal, right),
        "auroc": round(auroc(scores, right), 4), "brier": round(float(np.mean((cal - right) ** 2)), 4),
        "calibrated": cal, "raw": raw,
    }  # fmt: skip


def by_variant(data: Labelled, cal: np.ndarray) -> dict[str, dict[str, float]]:
    """Per condition: how many are wrong, and what the calibrated confidence says on average."""
    out = {}
    variants, right = np.array(data.variant), np.array(data.right)
    for v in VARIANTS:
        sel = variants == v
        if sel.any():
            out[v] = {"n": int(sel.sum()), "accuracy": round(float(right[sel].mean()), 4),
                      "mean_confidence": round(float(cal[sel].mean()), 4)}  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# no_speech_prob: speech against pure noise, with VAD and from the decoder
# ---------------------------------------------------------------------------------------------


def noise_clips(count: int, seed: int) -> list[Clip]:
    """Pure noise, no speech: white, pink, brown and mains hum, 2-4 s, levels 0.001 to 0.2 RMS."""
    rng = np.random.default_rng(seed)
    clips = []
    for k in range(count):
        n = int(rng.uniform(2.0, 4.0) * SAMPLE_RATE)
        kind = ("white", "pink", "brown", "hum")[k % 4]
        white = rng.standard_normal(n)
        if kind == "pink":
            spectrum = np.fft.rfft(white) / np.sqrt(np.arange(1, n // 2 + 2))
            x = np.fft.irfft(spectrum, n)
        elif kind == "brown":
            x = np.cumsum(white)
            x -= np.convolve(x, np.ones(801) / 801, mode="same")
        elif kind == "hum":
            t = np.arange(n) / SAMPLE_RATE
            x = sum(np.sin(2 * np.pi * 50 * h * t) / h for h in (1, 2, 3, 5)) + 0.05 * white
        else:
            x = white
        level = 10 ** rng.uniform(-3, math.log10(0.2))
        clips.append(Clip(-1, f"noise-{kind}", [], (x / (np.sqrt(np.mean(x**2)) or 1) * level).astype(np.float32)))
    return clips


def vad_probs(audio: np.ndarray) -> np.ndarray:
    """silero's speech probability per 32 ms frame (its ONNX model, as the worker uses it)."""
    import torch
    from silero_vad import load_silero_vad

    global _SILERO
    if _SILERO is None:
        threads = torch.get_num_threads()
        _SILERO = load_silero_vad(onnx=True)
        torch.set_num_threads(threads)
    _SILERO.reset_states()
    return _SILERO.audio_forward(torch.from_numpy(audio), sr=SAMPLE_RATE).reshape(-1).numpy()


_SILERO: Any = None
VAD_FRAME_SEC = 512 / SAMPLE_RATE


def speech_features(d: Decoded, classes: int, frame_sec: float) -> dict[str, float]:
    """One clip's no-speech evidence: over its words' span (the whole clip when it has none) the
    decoder's blank rate, its tokens' mean log-probability; and VAD's no_speech_prob at its
    words (as the worker computes them: conf.no_speech_from_vad)."""
    if d.words:
        start, end = d.words[0][1], d.words[-1][2]
    else:
        start, end = 0, d.frames
    logprobs = conf.step_logprobs(d.steps.get("token_prob", []), classes)
    probs = vad_probs(d.clip.audio)
    return {
        "blank_rate": conf.no_speech_from_blanks(d.timesteps, d.durations, start, end) if d.words else 1.0,
        "mean_logprob": conf.avg_logprob(logprobs) if logprobs else 0.0,
        "vad": conf.no_speech_from_vad(
            probs.tolist(),
            VAD_FRAME_SEC,
            [(a * frame_sec, b * frame_sec) for _, a, b in d.words],
            (start * frame_sec, end * frame_sec),
        ),
        "words": len(d.words),
    }


def fit_logistic(x: np.ndarray, y: np.ndarray, steps: int = 50, ridge: float = 1e-3) -> np.ndarray:
    """Logistic regression by Newton steps (x with a bias column), a touch of ridge for separable
    data. Offline only."""
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + ridge * w
        hess = (x.T * (p * (1 - p))) @ x + ridge * np.eye(x.shape[1])
        w -= np.linalg.solve(hess, grad)
    return w


def no_speech(decoded: Sequence[Decoded], classes: int, frame_sec: float) -> tuple[dict[str, Any], dict[str, float]]:
    """How well each no_speech_prob tells pure noise from speech: VAD, blank rate, and a logistic
    map of the decoder's blank rate and mean token log-probability fitted on one half of the clips
    (by index parity) and scored on the other. Returns the numbers and the map fitted on all."""
    feats = [speech_features(d, classes, frame_sec) for d in decoded]
    noise = np.array([d.clip.sentence < 0 for d in decoded])
    clean = np.array([d.clip.variant == "clean" for d in decoded])
    x = np.array([conf.no_speech_inputs(f["blank_rate"], f["mean_logprob"]) for f in feats])
    half = np.arange(len(decoded)) % 2 == 0
    fitted = np.zeros(len(decoded))
    for fit in (half, ~half):
        w = fit_logistic(x[fit], noise[fit].astype(float))
        fitted[~fit] = 1 / (1 + np.exp(-(x[~fit] @ w)))
    w_all = fit_logistic(x, noise.astype(float))
    out: dict[str, Any] = {"noise_clips": int(noise.sum()), "speech_clips": int((~noise).sum()),
                           "noise_clips_with_words": int(sum(f["words"] > 0 for f, n in zip(feats, noise, strict=True) if n))}  # fmt: skip
    for name, values in (("vad", [f["vad"] for f in feats]), ("blank_rate", [f["blank_rate"] for f in feats]),
                         ("decoder_fitted", fitted.tolist())):  # fmt: skip
        v = np.array(values)
        out[name] = {
            "auroc_noise_vs_speech": round(auroc(v, noise), 4),
            "noise_above_0.9": round(float((v[noise] > 0.9).mean()), 4),
            "clean_speech_below_0.1": round(float((v[clean] < 0.1).mean()), 4),
            "median_noise": round(float(np.median(v[noise])), 4), "median_clean": round(float(np.median(v[clean])), 4),
        }  # fmt: skip
    return out, {
        "bias": round(float(w_all[0]), 4),
        "blank": round(float(w_all[1]), 4),
        "logprob": round(float(w_all[2]), 4),
    }


# ---------------------------------------------------------------------------------------------
# The reliability diagram (Pillow: no plotting library in the worker's environment)
# ---------------------------------------------------------------------------------------------


def reliability_png(
    path: Path, panels: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], bins: int = 10
) -> None:
    """One panel per (title, raw, calibrated, right): accuracy per confidence bin against the
    diagonal, raw in grey and calibrated in blue, each bin's share as a bar along the bottom."""
    from PIL import Image, ImageDraw

    w, h, pad = 420, 420, 50
    img = Image.new("RGB", (w * len(panels), h + 30), "white")
    draw = ImageDraw.Draw(img)
    for k, (title, raw, cal, right) in enumerate(panels):
        x0, y0, side = k * w + pad, 30, w - pad - 20

        def at(px: float, py: float, x0: int = x0, y0: int = y0, side: int = side) -> tuple[float, float]:
            return x0 + px * side, y0 + (1 - py) * side

        draw.rectangle([at(0, 1), at(1, 0)], outline="black")
        for t in range(0, 11, 2):
            draw.line([at(t / 10, 0), (at(t / 10, 0)[0], at(t / 10, 0)[1] + 4)], fill="black")
            draw.text((at(t / 10, 0)[0] - 8, at(0, 0)[1] + 6), f"{t / 10:.1f}", fill="black")
            draw.text((x0 - 30, at(0, t / 10)[1] - 6), f"{t / 10:.1f}", fill="black")
        draw.line([at(0, 0), at(1, 1)], fill=(170, 170, 170))
        draw.text((x0, 8), title, fill="black")
        draw.text((x0 + side / 2 - 40, at(0, 0)[1] + 20), "confidence", fill="black")
        edges = np.linspace(0, 1, bins + 1)
        for values, colour, dx in ((raw, (150, 150, 150), -0.012), (cal, (31, 119, 180), 0.012)):
            which = np.clip(np.digitize(values, edges[1:-1]), 0, bins - 1)
            for b in range(bins):
                sel = which == b
                if not sel.any():
                    continue
                cx, cy = at(values[sel].mean() + dx, right[sel].mean())
                r = 3 + 6 * math.sqrt(sel.mean())
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
                if colour != (150, 150, 150):
                    bar = sel.mean() * 0.25
                    draw.rectangle([at(edges[b] + 0.01, bar), at(edges[b + 1] - 0.01, 0)], outline=colour)
        draw.text((x0 + 6, y0 + 6), "grey: raw   blue: calibrated", fill="black")
        draw.text((x0 + 6, y0 + 20), "bars: share of items per bin", fill="black")
        draw.text((x0 - 45, y0 + side / 2), "acc.", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sentences", type=int, default=150, help=f"sentences, each in {len(VARIANTS)} versions")
    p.add_argument("--noise", type=int, default=48, help="pure-noise clips for no_speech_prob")
    p.add_argument("--cost-sentences", type=int, default=100, help="sentences (all versions) timed on and off")
    p.add_argument("--cost-rounds", type=int, default=3, help="passes over them (the least counts)")
    p.add_argument("--seed", type=int, default=29)
    p.add_argument("--model", default=str(REPO / "models" / "demo-tdt.nemo"), help="a .nemo file")
    p.add_argument("--name", default="demo-tdt", help="the key the fitted table is stored under")
    p.add_argument("--fit", type=Path, default=None, help="write the calibration fitted on the whole set here")
    p.add_argument("--png", type=Path, default=DOCS / "confidence-reliability.png")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    began = time.perf_counter()
    clips = build_set(args.sentences, args.seed)
    noise = noise_clips(args.noise, args.seed + 1)
    built = time.perf_counter() - began
    os.environ["PARAKEET_MODEL"] = args.model  # the worker's config, read on first use (calibration)
    model = load_model(args.model, threads=1)
    classes = int(model.decoding.blank_id) + 1
    frame_sec = model.encoder.subsampling_factor * float(model.cfg.preprocessor.window_stride)
    timed = [c for c in clips if c.sentence < args.cost_sentences]
    cost = overhead(model, timed, args.cost_rounds)  # first: the worker's own decoders, as it built them
    decoded = decode_all(model, [*clips, *noise], METHODS)
    agreement = pass_matches_nemo(model, timed)
    speech = [d for d in decoded if d.clip.sentence >= 0]
    words, segments = label(speech, classes)

    results: dict[str, Any] = {"words": {}, "segments": {}}
    for key in sorted(words.scores):
        results["words"][key] = cross_fit(words, key)
    for key in sorted(segments.scores):
        results["segments"][key] = cross_fit(segments, key)
    chosen_word, chosen_segment = "token_prob/prod", "token_prob/prod/sum"
    ns, ns_map = no_speech(decoded, classes, frame_sec)
    calibration = conf.Calibration(
        args.name,
        conf.fit_table(words.scores[chosen_word], words.right),
        conf.fit_table(segments.scores[chosen_segment], segments.right),
        f"bench/confidence.py: {len(clips)} clips ({args.sentences} sentences x {len(VARIANTS)} versions, seed "
        f"{args.seed}) and {len(noise)} noise clips; {len(words.right)} words, {len(segments.right)} segments",
        (ns_map["bias"], ns_map["blank"], ns_map["logprob"]),
    )
    w, s = results["words"][chosen_word], results["segments"][chosen_segment]
    reliability_png(args.png, [("words (token_prob, sum of log-probs)", w["raw"], w["calibrated"], np.array(words.right)),
                               ("segments (sum over the segment)", s["raw"], s["calibrated"], np.array(segments.right))])  # fmt: skip
    out = {
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": 1, "shared_cores": True},
        "set": {"clips": len(clips), "sentences": args.sentences, "variants": list(VARIANTS), "noise_clips": len(noise),
                "audio_min": round(sum(len(c.audio) for c in [*clips, *noise]) / SAMPLE_RATE / 60, 2),
                "words": len(words.right), "segments": len(segments.right), "build_sec": round(built, 1)},
        "chosen": {"word": chosen_word, "segment": chosen_segment},
        "words": {k: {x: y for x, y in v.items() if x not in ("calibrated", "raw")} for k, v in results["words"].items()},
        "segments": {k: {x: y for x, y in v.items() if x not in ("calibrated", "raw")} for k, v in results["segments"].items()},
        "by_variant": {"words": by_variant(words, w["calibrated"]), "segments": by_variant(segments, s["calibrated"])},
        "no_speech": ns,
        "overhead": cost,
        "pass_vs_nemo_max_abs_logprob_diff": agreement,
        "calibration": calibration.as_dict(),
        "targets": TARGETS,
        "total_sec": round(time.perf_counter() - began, 1),
    }  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "confidence.json").write_text(json.dumps(out, indent=2))
    if args.fit:
        args.fit.write_text(json.dumps(calibration.as_dict(), indent=2))
    report(out)
    return out


def report(out: dict[str, Any]) -> None:
    print(f"set: {out['set']}")
    print(f"{'':36} {'n':>5} {'wrong':>6} {'rawECE':>7} {'ECE':>6} {'ECE 95%':>14} {'AUROC':>6} {'Brier':>6}")
    for level in ("words", "segments"):
        for key, r in out[level].items():
            mark = "*" if key == out["chosen"][level[:-1] if level == "words" else "segment"] else " "
            print(f"{mark}{level[:4]} {key:30} {r['n']:5} {r['wrong_share']:6.3f} {r['raw_ece']:7.3f} {r['ece']:6.3f} "
                  f"{r['ece_95']!s:>14} {r['auroc']:6.3f} {r['brier']:6.3f}")  # fmt: skip
    print("by variant (words):", json.dumps(out["by_variant"]["words"]))
    print("no_speech:", json.dumps(out["no_speech"]))
    cost = out["overhead"]
    print(
        f"confidence's cost, % of the worker's model time (model.run_model; least of {cost['rounds']} passes, "
        f"cores shared; target <= {TARGETS['overhead_pct']}%): timestamps on: CPU {cost['ts_cpu_pct']}%, wall "
        f"{cost['ts_wall_pct']}%, inside the scoring functions {cost['ts_scoring_pct']}%; text only: CPU "
        f"{cost['text_cpu_pct']}%, wall {cost['text_wall_pct']}%, inside {cost['text_scoring_pct']}%"
    )
    print(
        f"after-decoding pass vs NeMo's in-loop measure: max |log p| difference {out['pass_vs_nemo_max_abs_logprob_diff']:.2e}"
    )
    print(f"seconds: {cost['seconds']}")
    print(f"total {out['total_sec']} s; wrote bench/out/confidence.json")


if __name__ == "__main__":
    main()
