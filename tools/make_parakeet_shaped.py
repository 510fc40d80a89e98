"""Build a model with the published shape of nvidia/parakeet-tdt-0.6b-v3, with random weights, no download.

    python -m tools.make_parakeet_shaped --out .cache/parakeet-shaped.nemo             # full size, ~2.5 GB
    python -m tools.make_parakeet_shaped --out .cache/p2.nemo --layers 2               # 2 encoder layers, for tests
    python -m tools.make_parakeet_shaped --out .cache/p.nemo --unpacked .cache/p-dir   # also the unpacked directory

Cost follows shape, not weights: a FastConformer-TDT with Parakeet's layer sizes, feature count, tokenizer
size and TDT durations costs what Parakeet costs to restore, to hold in memory and to run. The worker loads
the result through PARAKEET_MODEL exactly as it loads the real model (`restore_from` on the .nemo, or the
unpacked directory the image bakes in).

Figures (ARCHITECTURE below) were checked against the model card of nvidia/parakeet-tdt-0.6b-v3 and the
model_config.yaml inside its .nemo (as quoted by public ports of it); docs/performance.md ("Parakeet-sized") lists
each one and where this copy differs.

The tokenizer: SentencePiece BPE with 8192 pieces, trained on the text of this Python's own standard
library (comments, docstrings and code lines of its .py files), since nothing can be downloaded here.

Random weights emit random tokens. So that decoding costs what it costs on a trained model, the joint's
blank logit gets a bias, found by bisection on calibration audio, that makes greedy TDT decoding emit about
--tokens-per-sec tokens per second of audio (default 3.5: 150 words a minute, a typical speaking rate, times
~1.4 BPE pieces per English word). The rate reached is printed and written next to the model (.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000
DURATIONS = [0, 1, 2, 3, 4]
PUBLISHED_PARAMETERS = 600_000_000  # model card: "a 600-million-parameter multilingual ASR model"

# The published architecture of nvidia/parakeet-tdt-0.6b-v3 (model card + the .nemo's model_config.yaml).
ARCHITECTURE: dict[str, Any] = {
    "n_layers": 24,
    "d_model": 1024,
    "n_heads": 8,
    "ff_expansion_factor": 4,  # feed-forward 4096
    "conv_kernel_size": 9,
    "subsampling": "dw_striding",
    "subsampling_factor": 8,
    "subsampling_conv_channels": 256,
    "features": 128,
    "pred_hidden": 640,
    "pred_rnn_layers": 2,
    "joint_hidden": 640,
    "vocab_size": 8192,
    "durations": DURATIONS,
}
DEFAULT_TOKENS_PER_SEC = 3.5


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def corpus_lines(max_chars: int = 12_000_000) -> list[str]:
    """Text from this Python's standard library: every line of its .py files (tests and
    site-packages left out) longer than 20 characters, comment marks stripped, in sorted file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    size = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if "site-packages" in rel or "test" in rel or "tests" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for line in text.splitlines():
            line = line.strip().lstrip("#").strip()
            if len(line) > 20:
                lines.append(line)
                size += len(line)
        if size >= max_chars:
            break
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int) -> dict[str, Any]:
    """SentencePiece BPE in `out_dir` (tokenizer.model, vocab.txt: what NeMo's "bpe" type reads)."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = corpus_lines()
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, bos_id=-1, eos_id=-1, num_threads=2, input_sentence_size=len(lines) + 1,
        shuffle_input_sentence=False, minloglevel=2,
    )  # fmt: skip
    corpus.unlink()
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    (out_dir / "vocab.txt").write_text("\n".join(pieces) + "\n")
    return {"corpus_lines": len(lines), "corpus_chars": sum(len(s) for s in lines), "pieces": len(pieces)}


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def model_config(tokenizer_dir: Path, layers: int) -> dict[str, Any]:
    """Parakeet TDT 0.6B v3's model config (NeMo keys), with `layers` encoder layers."""
    a = ARCHITECTURE
    d, pred, joint, feats = a["d_model"], a["pred_hidden"], a["joint_hidden"], a["features"]
    return {
        "sample_rate": SAMPLE_RATE,
        "tokenizer": {"dir": str(tokenizer_dir), "type": "bpe"},
        "model_defaults": {"enc_hidden": d, "pred_hidden": pred, "joint_hidden": joint,
                           "tdt_durations": DURATIONS, "num_tdt_durations": len(DURATIONS)},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": SAMPLE_RATE, "normalize": "per_feature", "window_size": 0.025, "window_stride": 0.01,
            "window": "hann", "features": feats, "n_fft": 512, "log": True, "frame_splicing": 1, "dither": 1e-5,
            "pad_to": 0, "pad_value": 0.0,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder", "feat_in": feats, "feat_out": -1,
            "n_layers": layers, "d_model": d, "subsampling": a["subsampling"],
            "subsampling_factor": a["subsampling_factor"], "subsampling_conv_channels": a["subsampling_conv_channels"],
            "causal_downsampling": False, "ff_expansion_factor": a["ff_expansion_factor"],
            "self_attention_model": "rel_pos", "n_heads": a["n_heads"], "att_context_size": [-1, -1],
            "att_context_style": "regular", "xscaling": True, "untie_biases": True, "pos_emb_max_len": 5000,
            "conv_kernel_size": a["conv_kernel_size"], "conv_norm_type": "batch_norm", "conv_context_size": None,
            "dropout": 0.1, "dropout_pre_encoder": 0.1, "dropout_emb": 0.0, "dropout_att": 0.1,
            "stochastic_depth_drop_prob": 0.0, "stochastic_depth_mode": "linear", "stochastic_depth_start_layer": 1,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder", "normalization_mode": None,
            "random_state_sampling": False, "blank_as_pad": True,
            "prednet": {"pred_hidden": pred, "pred_rnn_layers": a["pred_rnn_layers"], "t_max": None, "dropout": 0.2},
        },
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint", "log_softmax": None, "preserve_memory": False,
            "fuse_loss_wer": False, "fused_batch_size": 4, "num_extra_outputs": len(DURATIONS),
            "jointnet": {"joint_hidden": joint, "activation": "relu", "dropout": 0.2, "encoder_hidden": d,
                         "pred_hidden": pred},
        },
        "decoding": {"strategy": "greedy_batch", "model_type": "tdt", "durations": DURATIONS,
                     "greedy": {"max_symbols": 10}},
        "loss": {"loss_name": "tdt", "tdt_kwargs": {"fastemit_lambda": 0.0, "clamp": -1.0, "durations": DURATIONS,
                                                    "sigma": 0.02, "omega": 0.1}},
        "validation_ds": {"manifest_filepath": None, "sample_rate": SAMPLE_RATE, "batch_size": 16, "shuffle": False,
                          "use_start_end_token": False, "defer_setup": True},
        "optim": {"name": "adamw", "lr": 1e-4},
    }  # fmt: skip


def build_model(tokenizer_dir: Path, layers: int, seed: int = 0) -> Any:
    """The model, in memory, with random weights (fixed by `seed`), in eval mode."""
    import torch
    from nemo.collections.asr.models import EncDecRNNTBPEModel
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    model = EncDecRNNTBPEModel(cfg=OmegaConf.create(model_config(tokenizer_dir, layers)))
    model.eval()
    return model


def parameter_counts(model: Any) -> dict[str, int]:
    parts = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("encoder", "decoder", "joint")}
    return {**parts, "total": sum(p.numel() for p in model.parameters())}


# ---------------------------------------------------------------------------------------------
# Blank bias: a realistic number of tokens per second
# ---------------------------------------------------------------------------------------------


def calibration_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-like noise: white noise shaped into syllable-rate bursts (4 Hz) with pauses, so the
    features vary the way speech features do. Random weights see no words in real speech anyway."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    envelope = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6.3)), 0, None) ** 2
    envelope *= np.repeat(rng.random(int(seconds) + 1) > 0.2, SAMPLE_RATE)[:n]  # a pause now and then
    return (0.1 * envelope * rng.standard_normal(n) + 1e-3 * rng.standard_normal(n)).astype(np.float32)


def blank_output(model: Any) -> Any:
    """The last Linear of the joint network and the blank's row in it (blank = the vocabulary size)."""
    head = model.joint.joint_net[-1]
    return head, model.joint.num_classes_with_blank - 1


def emitted_tokens(model: Any, encoded: Any, lengths: Any) -> int:
    import torch

    with torch.inference_mode():
        hyps = model.decoding.rnnt_decoder_predictions_tensor(encoded, lengths, return_hypotheses=True)
    return sum(len(h.y_sequence) for h in hyps)


def calibrate_blank_bias(model: Any, tokens_per_sec: float, seconds: float = 30.0, steps: int = 12) -> dict[str, Any]:
    """Bisect the blank logit's bias until greedy TDT decoding of `seconds` of calibration audio
    (in 10 s pieces, one batch) emits `tokens_per_sec` tokens per second. The encoder runs once;
    only the decoding is repeated. Sets the bias and returns what was reached."""
    import torch

    pieces = max(1, round(seconds / 10))
    audio = np.stack([calibration_audio(10.0, seed=i) for i in range(pieces)])
    signal = torch.from_numpy(audio)
    length = torch.full((pieces,), audio.shape[1], dtype=torch.int64)
    with torch.inference_mode():
        encoded, encoded_len = model.forward(input_signal=signal, input_signal_length=length)
    head, blank = blank_output(model)
    base = float(head.bias.detach()[blank])
    target = tokens_per_sec * pieces * 10.0

    def rate_at(offset: float) -> float:
        with torch.no_grad():
            head.bias[blank] = base + offset
        return emitted_tokens(model, encoded, encoded_len)

    # A low bias makes every step emit (up to max_symbols per frame): slow to decode, so the
    # bracket starts narrow and widens only if it must.
    lo, hi = -1.0, 2.0
    while rate_at(hi) > target and hi < 1e3:  # more bias on blank: fewer tokens
        lo, hi = hi, hi * 2
    while rate_at(lo) < target and lo > -1e3:
        lo, hi = lo * 2, lo
    for _ in range(steps):
        mid = (lo + hi) / 2
        if rate_at(mid) > target:
            lo = mid
        else:
            hi = mid
    offset = (lo + hi) / 2
    reached = rate_at(offset) / (pieces * 10.0)
    return {"blank_bias_offset": round(offset, 4), "tokens_per_sec": round(reached, 3),
            "target_tokens_per_sec": tokens_per_sec, "calibration_sec": pieces * 10.0}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def unpack(nemo_path: Path, out_dir: Path) -> Path:
    """The .nemo's files in `out_dir`, unpacked by the image's own build step (docker/fetch_model.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fetch_model", Path(__file__).resolve().parent.parent / "docker" / "fetch_model.py")
    assert spec and spec.loader
    fetch_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch_model)
    return fetch_model.unpack(nemo_path, out_dir)


def make(
    out: Path,
    layers: int,
    tokens_per_sec: float = DEFAULT_TOKENS_PER_SEC,
    seed: int = 0,
    unpacked: Path | None = None,
    calibration_sec: float = 30.0,
    tokenizer_dir: Path | None = None,
) -> tuple[dict[str, Any], Any]:
    """Tokenizer (trained, or taken from `tokenizer_dir`), model, blank bias, .nemo, and the
    unpacked directory if asked. Returns the report (also written next to `out` as .json) and
    the model, still in memory."""
    started = time.perf_counter()
    report: dict[str, Any] = {"layers": layers, "seed": seed, "architecture": {**ARCHITECTURE, "n_layers": layers}}
    with tempfile.TemporaryDirectory(prefix="parakeet-shaped-") as tmp:
        t = time.perf_counter()
        if tokenizer_dir is None:
            tokenizer_dir = Path(tmp) / "tokenizer"
            report["tokenizer"] = build_tokenizer(tokenizer_dir, ARCHITECTURE["vocab_size"])
        report["tokenizer_sec"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        model = build_model(tokenizer_dir, layers, seed)
        report["build_sec"] = round(time.perf_counter() - t, 2)
        report["parameters"] = parameter_counts(model)
        t = time.perf_counter()
        report["decoding"] = calibrate_blank_bias(model, tokens_per_sec, calibration_sec)
        report["calibrate_sec"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        out.parent.mkdir(parents=True, exist_ok=True)
        model.save_to(str(out))
        report["save_sec"] = round(time.perf_counter() - t, 2)
    report["nemo_bytes"] = out.stat().st_size
    if unpacked is not None:
        t = time.perf_counter()
        unpack(out, unpacked)
        report["unpack_sec"] = round(time.perf_counter() - t, 2)
    report["total_sec"] = round(time.perf_counter() - started, 2)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report, model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the .nemo to write (a .json report goes next to it)")
    p.add_argument("--layers", type=int, default=ARCHITECTURE["n_layers"], help="encoder layers (24 = full size)")
    p.add_argument("--tokens-per-sec", type=float, default=DEFAULT_TOKENS_PER_SEC)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration-sec", type=float, default=30.0, help="audio the blank bias is calibrated on")
    p.add_argument("--unpacked", help="also unpack the .nemo into this directory (what the image does)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    unpacked = Path(args.unpacked) if args.unpacked else None
    report, _ = make(out, args.layers, args.tokens_per_sec, args.seed, unpacked, args.calibration_sec)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
