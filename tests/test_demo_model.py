"""The bundled demo model: what it claims to be, and the CPU TDT loss that trained it."""

from __future__ import annotations

import numpy as np
from conftest import DATA_ROOT, DEMO_MODEL, run_job, word_errors

from parakeet_worker import model as asr
from tools import synth
from tools.tdt_loss import check_against_nemo


def test_cpu_tdt_loss_matches_nemo_reference():
    loss_diff, grad_diff = check_against_nemo(seed=0)
    assert loss_diff < 1e-4 and grad_diff < 1e-4
    loss_diff, grad_diff = check_against_nemo(seed=1, sigma=0.0)
    assert loss_diff < 1e-4 and grad_diff < 1e-4


def test_demo_model_is_a_small_parakeet_style_tdt(worker):
    assert DEMO_MODEL.stat().st_size <= 5 * 1024 * 1024
    model = asr.loaded_model()
    cfg = model.cfg
    assert type(model).__name__ == "EncDecRNNTBPEModel"
    assert cfg.encoder.subsampling == "dw_striding" and cfg.encoder.subsampling_factor == 8
    assert cfg.encoder.self_attention_model in ("rel_pos", "rel_pos_local_attn")
    assert list(cfg.model_defaults.tdt_durations) == [0, 1, 2, 3, 4]
    assert cfg.joint.num_extra_outputs == 5
    assert cfg.decoding.model_type == "tdt"
    assert cfg.tokenizer.type == "bpe"
    assert sum(p.numel() for p in model.parameters()) < 1_500_000


def test_demo_model_transcribes_unseen_speech(worker):
    """Held-out speech as the demo model was trained on (random words of its vocabulary, random
    espeak voices, speeds and pitches; seeded, so the same clips every run), in one real job:
    the word error rate stays near what its training run measured (0.46% on 300 utterances)."""
    rng = np.random.default_rng(18)
    refs, inputs = [], []
    for n in range(24):
        words = [str(w) for w in rng.choice(synth.VOCAB, size=int(rng.integers(3, 7)))]
        voice, speed, pitch = str(rng.choice(synth.VOICES)), int(rng.integers(130, 201)), int(rng.integers(30, 71))
        path = synth.write(DATA_ROOT / f"heldout-{n}.wav", synth.speak(" ".join(words), voice, speed, pitch))
        refs.append(words)
        inputs.append({"source": str(path)})
    results = run_job(worker, inputs)["results"]
    errors = sum(word_errors(ref, r["text"].lower().split()) for ref, r in zip(refs, results, strict=True))
    assert errors / sum(len(r) for r in refs) <= 0.03, [r["text"] for r in results]
