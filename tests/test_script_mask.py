"""The language hint's script mask (parakeet_worker/script_mask.py) on a model built here: a small
FastConformer-TDT with random weights whose SentencePiece tokenizer holds Latin and Cyrillic
pieces (trained on the Latin- and Cyrillic-script fixture sentences). Random weights emit random
tokens of both scripts, which is what the mask must stop: with a hint, no token of the other
script over many decodes; without one, output identical to decoding without the mask code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf

from parakeet_worker.analysis import script_mask
from tools import train_demo_model

FIXTURES = REPO / "tests" / "data" / "language_sentences.json"
SEEDS = range(5)  # 5 decodes of a 4-row batch per setting: several hundred tokens


def _tokenizer(out_dir: Path) -> None:
    import sentencepiece as spm

    data = json.loads(FIXTURES.read_text(encoding="utf-8"))
    lines = [s for code in ("en", "de", "fr", "pl", "ru", "uk", "bg") for s in data["long"][code]]
    out_dir.mkdir(parents=True)
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(lines * 3) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_dir / "tokenizer"), vocab_size=160, model_type="bpe",
        character_coverage=1.0, bos_id=-1, eos_id=-1, num_threads=1, minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
    (out_dir / "vocab.txt").write_text("\n".join(sp.id_to_piece(i) for i in range(sp.get_piece_size())) + "\n")
    corpus.unlink()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from nemo.collections.asr.models import EncDecRNNTBPEModel

    tok = tmp_path_factory.mktemp("mixed-script") / "tokenizer"
    _tokenizer(tok)
    torch.manual_seed(0)
    cfg = train_demo_model.model_config(tok, d_model=64, layers=1)
    m = EncDecRNNTBPEModel(cfg=OmegaConf.create(cfg))
    m.eval()
    return m


class Row(NamedTuple):
    """One row's hypothesis: token ids, score and the frame of each token."""

    ids: list[int]
    score: float
    frames: list[int]


def _decode(model, seed: int, hints=None) -> list[Row]:
    """One batch of 4 rows of random encoder output (15-30 frames: 1.2-2.4 s of audio at 80 ms
    a frame, fixed by `seed`) through the model's batched greedy TDT decoding; token ids per row.
    Random frames rather than noise through the random encoder: that encoder's frames are all
    alike, and the decoder then writes one token over and over. `hints` given: decoded inside
    masked_decoding (None rows unmasked)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(15, 31, (4,), generator=gen)
    encoded = torch.randn(4, model.cfg.encoder.d_model, int(lengths.max()), generator=gen) * 3.0

    def run():
        with torch.inference_mode():
            hyps = model.decoding.rnnt_decoder_predictions_tensor(encoded, lengths, return_hypotheses=True)
        return [Row([int(t) for t in h.y_sequence], float(h.score), [int(t) for t in h.timestamp]) for h in hyps]

    if hints is None:
        return run()
    with script_mask.masked_decoding(model, hints):
        return run()


_PLAIN: dict[int, list[Row]] = {}


def _plain(model, seed: int) -> list[Row]:
    """_decode without any mask code, once per seed (the CPU is shared and decoding is slow)."""
    if seed not in _PLAIN:
        _PLAIN[seed] = _decode(model, seed)
    return _PLAIN[seed]


def _scripts(model, ids: list[int]) -> set[str]:
    pieces = model.tokenizer.ids_to_tokens(ids) if ids else []
    return set().union(*(script_mask.piece_scripts(p) for p in pieces)) if pieces else set()


def test_the_tokenizer_holds_both_scripts(model):
    pieces = model.tokenizer.ids_to_tokens(list(range(model.tokenizer.vocab_size)))
    kinds = [script_mask.piece_scripts(p) for p in pieces]
    assert sum(k == {"LATIN"} for k in kinds) > 20
    assert sum(k == {"CYRILLIC"} for k in kinds) > 20


def test_without_a_mask_the_random_model_writes_both_scripts(model):
    """The premise of the tests below: unmasked, both scripts come out (else they prove nothing)."""
    seen = set()
    for seed in SEEDS:
        for row in _plain(model, seed):
            seen |= _scripts(model, row.ids)
    assert {"LATIN", "CYRILLIC"} <= seen


@pytest.mark.parametrize(("hint", "banned"), [(["uk"], "LATIN"), (["fr"], "CYRILLIC"), (["de", "pl"], "CYRILLIC")])
def test_a_hint_keeps_the_other_script_out(model, hint, banned):
    allowed = script_mask.hint_scripts(hint)
    total = 0
    for seed in SEEDS:
        for row in _decode(model, seed, [allowed] * 4):
            total += len(row.ids)
            assert banned not in _scripts(model, row.ids)
    assert total > 100  # it still decodes: tokens of the allowed script and neutral ones


def test_hinted_and_unhinted_rows_share_a_batch(model):
    """Rows 0 and 2 hinted Ukrainian, rows 1 and 3 not: the hinted rows lose their Latin, the
    others come out exactly as in a batch with no mask at all."""
    allowed = script_mask.hint_scripts(["uk"])
    for seed in SEEDS:
        plain = _plain(model, seed)
        mixed = _decode(model, seed, [allowed, None, allowed, None])
        assert mixed[1] == plain[1]
        assert mixed[3] == plain[3]
        assert "LATIN" not in _scripts(model, mixed[0].ids) | _scripts(model, mixed[2].ids)


def test_no_hint_is_bit_identical(model):
    """No hinted row: masked_decoding patches nothing, and hypotheses (tokens, scores, durations)
    equal those of decoding without the mask code path."""
    for seed in SEEDS:
        assert _decode(model, seed, [None] * 4) == _plain(model, seed)
    assert "joint_after_projection" not in model.joint.__dict__


def test_the_patch_is_removed_after_a_failure(model):
    allowed = script_mask.hint_scripts(["ru"])
    with pytest.raises(ValueError), script_mask.masked_decoding(model, [allowed]):
        raise ValueError("the model call failed")
    assert "joint_after_projection" not in model.joint.__dict__


def test_hint_scripts():
    assert script_mask.hint_scripts(["uk"]) == {"CYRILLIC"}
    assert script_mask.hint_scripts(["el", "en"]) == {"GREEK", "LATIN"}
    assert script_mask.hint_scripts(None) is None
    assert script_mask.hint_scripts(["ja"]) is None  # script not known here: no mask


def test_piece_scripts():
    assert script_mask.piece_scripts("\u2581\u043f\u0440\u0438") == {"CYRILLIC"}
    assert script_mask.piece_scripts("ing") == {"LATIN"}
    assert script_mask.piece_scripts("\u2581") == set()
    assert script_mask.piece_scripts("12,") == set()
    assert script_mask.piece_scripts("<0xE2>") == set()  # byte fallback serves every script
    assert script_mask.piece_scripts("<unk>") == set()
    assert script_mask.piece_scripts("αβ") == {"GREEK"}
    assert script_mask.piece_scripts("\u2581\u02bc") == set()  # Ukrainian's modifier-letter apostrophe
    assert script_mask.piece_scripts("\u00b5") == set()  # micro sign: a letter of no script
    assert script_mask.piece_scripts("ħa") == {"LATIN"}  # Maltese
