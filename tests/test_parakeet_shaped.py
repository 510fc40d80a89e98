"""The Parakeet-shaped model (tools/make_parakeet_shaped.py): the published shape and size of
nvidia/parakeet-tdt-0.6b-v3 with random weights, and the worker loading it the way the image
loads the real one (PARAKEET_MODEL = the unpacked directory docker/fetch_model.py bakes in).

The full-size model is only built in memory to count its parameters; the tests that save,
unpack, restore and transcribe use a 2-layer copy (same layer sizes, tokenizer, features)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import soundfile as sf
import torch
from conftest import DEMO_MODEL, REPO, speech_file
from omegaconf import OmegaConf

from parakeet_worker import model as asr
from tools import make_parakeet_shaped as shaped

# The published checkpoint, parakeet-tdt-0.6b-v3.nemo, is 2,509 MB (Hugging Face's file listing);
# it is an uncompressed tar of fp32 weights plus a tokenizer and a config of well under 1 MB, so
# it holds ~627M parameters. The model card rounds this to "600-million-parameter" (0.6B).
PUBLISHED_NEMO_BYTES = 2_509_000_000
PUBLISHED_PARAMETERS = PUBLISHED_NEMO_BYTES // 4


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("parakeet-tokenizer")
    shaped.build_tokenizer(out, shaped.ARCHITECTURE["vocab_size"])
    return out


@pytest.fixture(scope="session")
def small(tmp_path_factory, tokenizer_dir):
    """A 2-layer Parakeet-shaped model: (report, model in memory, .nemo, unpacked directory)."""
    root = tmp_path_factory.mktemp("parakeet-shaped")
    nemo, unpacked = root / "p2.nemo", root / "p2"
    report, model = shaped.make(nemo, 2, unpacked=unpacked, calibration_sec=10.0, tokenizer_dir=tokenizer_dir)
    return report, model, nemo, unpacked


def test_tokenizer_is_8192_piece_sentencepiece(tokenizer_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    assert sp.get_piece_size() == 8192
    assert len((tokenizer_dir / "vocab.txt").read_text().splitlines()) == 8192
    assert sp.decode(sp.encode("the quick brown fox")) == "the quick brown fox"


def test_full_size_has_the_published_shape_and_parameter_count(worker, tokenizer_dir):
    """Built in memory only (no random init: only the shapes count here), never saved."""
    with asr.no_random_init(torch):
        model = shaped.build_model(tokenizer_dir, shaped.ARCHITECTURE["n_layers"])
    try:
        counts = shaped.parameter_counts(model)
        enc, layer = model.encoder, model.encoder.layers[0]
        lstm = model.decoder.prediction["dec_rnn"].lstm
        head = model.joint.joint_net[-1]
        shape = {
            "n_layers": len(enc.layers),
            "d_model": enc.d_model,
            "n_heads": layer.self_attn.h,
            "ff": layer.feed_forward1.linear1.out_features,
            "conv_kernel": layer.conv.depthwise_conv.kernel_size[0],
            "subsampling": (enc.pre_encode.__class__.__name__, enc.subsampling_factor, enc.pre_encode.conv[0].out_channels),
            "features": model.preprocessor.featurizer.nfilt,
            "prediction": (lstm.num_layers, lstm.hidden_size),
            "joint": (head.in_features, head.out_features),
            "durations": list(model.cfg.decoding.durations),
        }
    finally:
        del model
    assert shape == {
        "n_layers": 24, "d_model": 1024, "n_heads": 8, "ff": 4096, "conv_kernel": 9,
        "subsampling": ("ConvSubsampling", 8, 256), "features": 128, "prediction": (2, 640),
        "joint": (640, 8192 + 1 + 5), "durations": [0, 1, 2, 3, 4],
    }  # fmt: skip
    assert abs(counts["total"] - PUBLISHED_PARAMETERS) / PUBLISHED_PARAMETERS < 0.03, counts
    assert round(counts["total"] / 1e9, 1) == 0.6, counts  # the model card's "0.6B"


def test_small_copy_is_the_same_shape_with_two_layers(small):
    """Counted on the model itself: two encoder layers of the full size's width, and the full
    size's prediction network and joint (11,807,360 and 6,321,158 parameters, as counted on the
    24-layer build above)."""
    _, model, _, _ = small
    counts = shaped.parameter_counts(model)
    assert len(model.encoder.layers) == 2 and model.encoder.d_model == 1024
    assert counts["decoder"] == 11_807_360 and counts["joint"] == 6_321_158


def test_unpacked_restore_is_the_saved_model(worker, small):
    """The image's path (an unpacked directory: no extraction, the checkpoint's weights assigned, no random
    init, vocabulary rebuilt from the tokenizer) gives back exactly the model that was saved."""
    _, saved, _, unpacked = small
    restored = asr.restore_unpacked(str(unpacked))
    a, b = saved.state_dict(), restored.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = dict(saved.named_buffers()), dict(restored.named_buffers())  # persistent or not
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    on_disk = OmegaConf.to_container(OmegaConf.load(unpacked / "model_config.yaml"))
    assert OmegaConf.to_container(restored.cfg) == on_disk
    assert len(restored.cfg.labels) == 8192 and list(restored.cfg.joint.vocabulary) == list(restored.cfg.labels)

    audio, _ = sf.read(speech_file("seven three nine one two", speed=140), dtype="float32")
    batch = audio[None]
    saved.eval()
    restored.eval()
    outs = [asr.forward_decode(m, batch, [len(audio)])[0] for m in (saved, restored)]
    assert outs[0].y_sequence.tolist() == outs[1].y_sequence.tolist()
    assert outs[0].text == outs[1].text


def test_blank_bias_gives_a_speech_like_token_rate(worker, small):
    """Random weights with the calibrated blank bias emit about as many tokens per second of
    speech as a trained model (the target is 3.5/s; calibrated on noise bursts, checked on speech)."""
    report, model, _, _ = small
    assert abs(report["decoding"]["tokens_per_sec"] - 3.5) < 0.5
    texts = ["hello world stop go left right up down", "one two three four five six seven eight nine zero"]
    tokens = seconds = 0.0
    for text in texts:
        audio, _ = sf.read(speech_file(text, speed=150), dtype="float32")
        hyp = asr.forward_decode(model, audio[None], [len(audio)])[0]
        tokens += len(hyp.y_sequence)
        seconds += len(audio) / 16000
    assert 1.75 <= tokens / seconds <= 7.0, tokens / seconds


def _fetch_model():
    spec = importlib.util.spec_from_file_location("fetch_model", REPO / "docker" / "fetch_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hub_id_finds_the_unpacked_copy_the_image_bakes(worker, monkeypatch, tmp_path):
    """docker/fetch_model.py unpacks into the place handler looks first for a hub id."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    fetch = _fetch_model()
    repo = "nvidia/parakeet-tdt-0.6b-v3"
    assert asr.resolve_model_source(repo) == ("hub", repo)  # nothing baked, nothing cached
    baked = fetch.unpack(DEMO_MODEL, fetch.unpacked_dir(repo))
    assert sorted(p.name for p in baked.iterdir() if not p.name.endswith(("_tokenizer.model", "_vocab.txt", ".vocab"))) == [
        "model_config.yaml", "model_weights.ckpt"]  # fmt: skip
    assert asr.resolve_model_source(repo) == ("dir", str(baked))
    assert asr.resolve_model_source(str(baked)) == ("dir", str(baked))
    assert asr.resolve_model_source(str(DEMO_MODEL)) == ("file", str(DEMO_MODEL))
    with pytest.raises(FileNotFoundError):
        asr.resolve_model_source(str(tmp_path))  # a directory that holds no model


def test_bench_gpu_reduced_form(small):
    """`make bench-gpu` keeps working without a GPU: its reduced form, on the 2-layer model, in a
    fresh process: the worker, NeMo from paths and the floor on 3 short files, and one cold start
    of a worker process with PARAKEET_MODEL=<unpacked dir> (imports, restore, warm-up, first job)."""
    report, _, nemo, unpacked = small
    cmd = [sys.executable, "-m", "bench.gpu", "--nemo", str(nemo), "--unpacked", str(unpacked), "--files", "3",
           "--max-sec", "6", "--bank", "12", "--cold-repeats", "1", "--page-cache", "warm",
           "--cold-variants", "unpacked", "--out", "gpu-test.json"]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    out = json.loads((REPO / "bench" / "out" / "gpu-test.json").read_text())
    assert out["device"] == "cpu" and out["model"]["layers"] == 2
    assert out["model_memory"]["parameters"] == report["parameters"]["total"]
    for method in ("handler", "nemo_paths", "floor"):
        assert out["end_to_end"][method]["wall_sec"] > 0, out["end_to_end"][method]
    assert out["handler_equals_floor"] is not None
    run = out["cold_start"]["warm"]["runs"]["unpacked"][0]
    phases = run["phases"]
    assert set(phases) == {"imports", "restore", "to_device", "warm_up", "first_job", "total"}
    assert all(v >= 0 for v in phases.values())
    assert phases["total"] >= phases["restore"] + phases["warm_up"] + phases["first_job"]
    assert run["device"] == "cpu" and isinstance(run["text"], str) and run["text"]
