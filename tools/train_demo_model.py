"""Rebuild the demo model from nothing: espeak-ng speech -> BPE tokenizer -> a small FastConformer
TDT (the Parakeet TDT recipe, scaled down) -> trained on CPU -> models/demo-tdt.nemo.

    python -m tools.train_demo_model --out models/demo-tdt.nemo

Deterministic for a seed (data, tokenizer, initialisation and batch order), on the same machine
type. NeMo's own TDT loss is CUDA-only, so training uses tools.tdt_loss (checked against NeMo's
reference implementation in the tests). Prints parameters, training time and held-out WER.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

from tools import synth
from tools.tdt_loss import tdt_loss
from tools.testkit import encode, word_errors

DURATIONS = [0, 1, 2, 3, 4]


def make_utterance(seed: int, index: int, codec_share: float = 0.0) -> tuple[np.ndarray, str]:
    """One training or test utterance (audio, transcript), fixed by (seed, index).

    A `codec_share` of them goes through a lossy codec (mp3 or opus) and back, since the
    worker is fed compressed files far more often than clean WAV."""
    rng = np.random.default_rng([seed, index])
    voice = str(rng.choice(synth.VOICES))
    speed, pitch = int(rng.integers(120, 221)), int(rng.integers(25, 76))
    kind = rng.random()
    if kind < 0.42:
        words = list(rng.choice(synth.VOCAB, size=int(rng.integers(1, 9))))
        audio = synth.speak(" ".join(words), voice, speed, pitch)
        lead = np.zeros(int(rng.uniform(0, 0.8) * synth.SAMPLE_RATE), np.float32)
        trail = np.zeros(int(rng.uniform(0, 0.8) * synth.SAMPLE_RATE), np.float32)
        audio = np.concatenate([lead, audio, trail])
    elif kind < 0.9:
        words = list(rng.choice(synth.VOCAB, size=int(rng.integers(1, 9))))
        audio = synth.spaced_words(rng, words, voice, speed, pitch, gap=(0.03, 1.5))
    else:
        words = list(rng.choice(synth.VOCAB, size=int(rng.integers(10, 19))))
        audio = synth.spaced_words(rng, words, voice, speed, pitch, gap=(0.1, 1.2))
    peak = np.abs(audio).max() or 1.0
    audio = audio / peak * 10 ** (rng.uniform(-14, -1) / 20)
    noise_db = rng.uniform(15, 45)
    rms = np.sqrt(np.mean(audio**2)) + 1e-9
    audio = audio + rng.standard_normal(len(audio)).astype(np.float32) * rms * 10 ** (-noise_db / 20)
    if rng.random() < codec_share:
        audio = codec_round_trip(audio, str(rng.choice(["libmp3lame", "libopus"])), int(rng.integers(24, 97)))
    return audio.astype(np.float32), " ".join(words)


def codec_round_trip(audio: np.ndarray, codec: str, kbps: int) -> np.ndarray:
    """Encode with ffmpeg and decode back to 16 kHz mono float32 (length may change slightly)."""
    ext = "mp3" if codec == "libmp3lame" else "ogg"
    with tempfile.TemporaryDirectory() as tmp:
        src, enc, dec = (Path(tmp) / n for n in ("a.wav", f"a.{ext}", "b.wav"))
        synth.write(src, np.clip(audio, -1, 1))
        encode(src, enc, codec=("-c:a", codec, "-b:a", f"{kbps}k"))
        encode(enc, dec, codec=(), rate=synth.SAMPLE_RATE, channels=1)
        return sf.read(dec, dtype="float32")[0]


def make_set(seed: int, count: int, codec_share: float = 0.0, workers: int = 2) -> list[tuple[np.ndarray, str]]:
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(make_utterance, [seed] * count, range(count), [codec_share] * count, chunksize=32))


def build_tokenizer(texts: list[str], out_dir: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, bos_id=-1, eos_id=-1, num_threads=1, seed_sentencepiece_size=1000,
        shuffle_input_sentence=False,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
    (out_dir / "vocab.txt").write_text("\n".join(sp.id_to_piece(i) for i in range(sp.get_piece_size())) + "\n")
    corpus.unlink()


def model_config(tokenizer_dir: Path, d_model: int, layers: int) -> dict:
    """Parakeet TDT 0.6B's config keys, scaled down."""
    return {
        "sample_rate": synth.SAMPLE_RATE,
        "tokenizer": {"dir": str(tokenizer_dir), "type": "bpe"},
        "model_defaults": {"enc_hidden": d_model, "pred_hidden": 96, "joint_hidden": 128,
                           "tdt_durations": DURATIONS, "num_tdt_durations": len(DURATIONS)},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": synth.SAMPLE_RATE, "normalize": "per_feature", "window_size": 0.025,
            "window_stride": 0.01, "window": "hann", "features": 64, "n_fft": 512, "log": True,
            "frame_splicing": 1, "dither": 1e-5, "pad_to": 0, "pad_value": 0.0,
        },
        "spec_augment": {
            "_target_": "nemo.collections.asr.modules.SpectrogramAugmentation",
            "freq_masks": 2, "time_masks": 2, "freq_width": 8, "time_width": 0.04,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder", "feat_in": 64, "feat_out": -1,
            "n_layers": layers, "d_model": d_model, "subsampling": "dw_striding", "subsampling_factor": 8,
            "subsampling_conv_channels": 64, "causal_downsampling": False, "ff_expansion_factor": 2,
            "self_attention_model": "rel_pos", "n_heads": 4, "att_context_size": [-1, -1], "xscaling": True,
            "untie_biases": True, "pos_emb_max_len": 5000, "conv_kernel_size": 9, "conv_norm_type": "batch_norm",
            "dropout": 0.1, "dropout_pre_encoder": 0.1, "dropout_emb": 0.0, "dropout_att": 0.1,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder", "normalization_mode": None,
            "random_state_sampling": False, "blank_as_pad": True,
            "prednet": {"pred_hidden": 96, "pred_rnn_layers": 1, "t_max": None, "dropout": 0.1},
        },
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint", "log_softmax": None, "preserve_memory": False,
            "fuse_loss_wer": False, "fused_batch_size": 4, "num_extra_outputs": len(DURATIONS),
            "jointnet": {"joint_hidden": 128, "activation": "relu", "dropout": 0.1,
                         "encoder_hidden": d_model, "pred_hidden": 96},
        },
        "decoding": {"strategy": "greedy_batch", "model_type": "tdt", "durations": DURATIONS,
                     "greedy": {"max_symbols": 10}},
        "loss": {"loss_name": "tdt", "tdt_kwargs": {"fastemit_lambda": 0.0, "clamp": -1.0,
                                                    "durations": DURATIONS, "sigma": 0.02, "omega": 0.1}},
        "validation_ds": {"manifest_filepath": None, "sample_rate": synth.SAMPLE_RATE, "batch_size": 8,
                          "shuffle": False, "use_start_end_token": False, "defer_setup": True},
        "optim": {"name": "adamw", "lr": 2e-3},
    }  # fmt: skip


def batches_by_length(lengths: list[int], max_samples: int, rng: random.Random) -> list[list[int]]:
    """Length-sorted batches of at most `max_samples` padded samples, in shuffled order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out, cur = [], []
    for i in order:
        if cur and lengths[i] * (len(cur) + 1) > max_samples:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


def evaluate(model, data: list[tuple[np.ndarray, str]]) -> tuple[float, int]:
    model.eval()
    hyps = model.transcribe([a for a, _ in data], batch_size=16, verbose=False)
    texts = [h.text if hasattr(h, "text") else h for h in hyps]
    errors = sum(word_errors(t.split(), h.split()) for (_, t), h in zip(data, texts, strict=True))
    words = sum(len(t.split()) for _, t in data)
    return errors / words, words


def train(args: argparse.Namespace) -> None:
    import torch
    from nemo.collections.asr.models import EncDecRNNTBPEModel
    from omegaconf import OmegaConf

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="demo-model-"))
    print(f"synthesizing {args.train} training + {args.test} held-out utterances ...", flush=True)
    train_set = make_set(args.seed, args.train, args.codec_share)
    test_set = make_set(args.seed + 1000, args.test)
    print(f"  {time.time() - started:.0f} s; {sum(len(a) for a, _ in train_set) / 16000 / 3600:.2f} h of audio", flush=True)
    if args.init:  # a second stage: continue from a trained model, keep its tokenizer
        model = EncDecRNNTBPEModel.restore_from(args.init, map_location="cpu")
    else:
        build_tokenizer([t for _, t in train_set], work / "tokenizer", args.vocab)
        model = EncDecRNNTBPEModel(cfg=OmegaConf.create(model_config(work / "tokenizer", args.d_model, args.layers)))
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters, vocab {model.tokenizer.vocab_size}", flush=True)
    blank = model.tokenizer.vocab_size
    tokens = [model.tokenizer.text_to_ids(t) for _, t in train_set]
    lengths = [len(a) for a, _ in train_set]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-3, betas=(0.9, 0.98))
    rng = random.Random(args.seed)
    epoch_batches = batches_by_length(lengths, args.batch_samples, rng)
    total_steps = args.epochs * len(epoch_batches)
    warmup = max(1, total_steps // 15)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total_steps - warmup))))

    step = 0
    train_started = time.time()
    for epoch in range(args.epochs):
        model.train()
        run_loss = 0.0
        for batch in batches_by_length(lengths, args.batch_samples, rng):
            n = max(lengths[i] for i in batch)
            audio = torch.zeros(len(batch), n)
            for row, i in enumerate(batch):
                audio[row, : lengths[i]] = torch.from_numpy(train_set[i][0])
            alen = torch.tensor([lengths[i] for i in batch])
            u = max(len(tokens[i]) for i in batch)
            labels = torch.full((len(batch), u), 0, dtype=torch.long)
            for row, i in enumerate(batch):
                labels[row, : len(tokens[i])] = torch.tensor(tokens[i])
            llen = torch.tensor([len(tokens[i]) for i in batch])
            enc, enc_len = model.forward(input_signal=audio, input_signal_length=alen)
            dec, _, _ = model.decoder(targets=labels, target_length=llen)
            joint = model.joint.joint(enc.transpose(1, 2), dec.transpose(1, 2))
            losses = tdt_loss(joint, labels, enc_len, llen, blank, DURATIONS, sigma=args.sigma)
            loss = losses.sum() / llen.sum()
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            run_loss += loss.item()
            step += 1
        print(f"epoch {epoch + 1}/{args.epochs}: loss {run_loss / len(epoch_batches):.4f} "
              f"({time.time() - train_started:.0f} s)", flush=True)  # fmt: skip
        if args.eval_every and (epoch + 1) % args.eval_every == 0 and epoch + 1 < args.epochs:
            wer, _ = evaluate(model, test_set[:100])
            print(f"  held-out WER (first 100): {wer:.2%}", flush=True)
    train_sec = time.time() - train_started
    wer, words = evaluate(model, test_set)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.train(False)
    model.save_to(str(out))
    shutil.rmtree(work, ignore_errors=True)
    report = {
        "parameters": params, "nemo_bytes": out.stat().st_size, "train_utterances": args.train,
        "train_audio_hours": round(sum(lengths) / 16000 / 3600, 3), "epochs": args.epochs, "steps": step,
        "init": args.init and Path(args.init).name, "seed": args.seed, "codec_share": args.codec_share,
        "train_seconds": round(train_sec), "total_seconds": round(time.time() - started),
        "heldout_utterances": args.test, "heldout_words": words, "heldout_wer": round(wer, 4),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/demo-tdt.nemo")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--train", type=int, default=4000, help="training utterances")
    p.add_argument("--test", type=int, default=300, help="held-out utterances")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--sigma", type=float, default=0.02, help="TDT logit under-normalisation")
    p.add_argument("--d-model", type=int, default=112)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--vocab", type=int, default=48)
    p.add_argument("--batch-samples", type=int, default=16000 * 80, help="padded samples per batch")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--init", help="continue training this .nemo (second stage) instead of a new model")
    p.add_argument("--codec-share", type=float, default=0.0, help="share of utterances sent through mp3/opus")
    train(p.parse_args())


if __name__ == "__main__":
    main()
