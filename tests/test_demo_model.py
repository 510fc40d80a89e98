"""The bundled demo model: what it claims to be, and the CPU TDT loss that trained it."""

from __future__ import annotations

import json

from conftest import DEMO_MODEL, REPO

from tools.tdt_loss import check_against_nemo


def test_cpu_tdt_loss_matches_nemo_reference():
    loss_diff, grad_diff = check_against_nemo(seed=0)
    assert loss_diff < 1e-4 and grad_diff < 1e-4
    loss_diff, grad_diff = check_against_nemo(seed=1, sigma=0.0)
    assert loss_diff < 1e-4 and grad_diff < 1e-4


def test_demo_model_is_a_small_parakeet_style_tdt(worker):
    assert DEMO_MODEL.stat().st_size <= 5 * 1024 * 1024
    model = worker._MODEL
    cfg = model.cfg
    assert type(model).__name__ == "EncDecRNNTBPEModel"
    assert cfg.encoder.subsampling == "dw_striding" and cfg.encoder.subsampling_factor == 8
    assert cfg.encoder.self_attention_model in ("rel_pos", "rel_pos_local_attn")
    assert list(cfg.model_defaults.tdt_durations) == [0, 1, 2, 3, 4]
    assert cfg.joint.num_extra_outputs == 5
    assert cfg.decoding.model_type == "tdt"
    assert cfg.tokenizer.type == "bpe"
    assert sum(p.numel() for p in model.parameters()) < 1_500_000


def test_reported_training_numbers_are_the_shipped_ones():
    """models/demo-tdt.json is written by the training run that wrote the .nemo."""
    report = json.loads((REPO / "models" / "demo-tdt.json").read_text())
    assert report["nemo_bytes"] == (REPO / "models" / "demo-tdt.nemo").stat().st_size
    assert report["heldout_wer"] <= 0.02
