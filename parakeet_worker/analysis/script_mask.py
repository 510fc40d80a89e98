"""Keep tokens of scripts the hinted languages do not write out of decoding.

A language hint cannot steer Parakeet (it has no language input), but it does say which
alphabets the transcript may use: `language=uk` never needs a Latin letter and `language=fr`
never a Cyrillic one. Here each SentencePiece piece is classed by the scripts of its letters
(Latin, Cyrillic, Greek, ...); pieces without letters (digits, punctuation, the word marker,
byte-fallback and control pieces) belong to every language. For a batch in which some rows
carry a hint, the joint network's token logits of those rows get -inf on the pieces of the other
scripts, during NeMo's batched greedy TDT decoding (label looping), before its argmax: the
decoder then takes its next choice (another token or blank) exactly as if those pieces did not
exist. Blank and the TDT duration outputs are never touched.

How it hooks in: NeMo 3.0's GreedyBatchedTDTLabelLoopingComputer.torch_impl calls
`self.joint.joint_after_projection(enc, dec)` for every row of the batch at each step, where
`self.joint` is the model's joint module. `masked_decoding()` shadows that method on the joint
instance for the duration of one model call (the caller holds the model lock) and removes it on
the way out. CUDA-graph decoding replays kernels captured without the mask, so for a masked batch
the computer's graph mode is set aside for the call (torch_impl runs, as it does with boosting
without Triton) and restored after. With no hinted row nothing is patched: decoding is
exactly today's, bit for bit.
"""

from __future__ import annotations

import contextlib
import re
import unicodedata
from collections.abc import Iterator, Sequence
from typing import Any

# The script each language is written in (ISO 639-1 -> Unicode script name prefix). Languages not
# listed: their hints mask nothing.
LANGUAGE_SCRIPTS: dict[str, str] = {
    **{code: "LATIN" for code in ("cs", "da", "de", "en", "es", "et", "fi", "fr", "hr", "hu", "it", "lt",
                                  "lv", "mt", "nl", "pl", "pt", "ro", "sk", "sl", "sv", "ca", "ga", "is",
                                  "no", "sq", "tr", "cy", "gl", "bs")},
    **{code: "CYRILLIC" for code in ("bg", "ru", "uk", "be", "mk", "sr")},
    "el": "GREEK",
}  # fmt: skip
_SPECIAL = re.compile(r"^<[^<>]*>$")  # <unk>, <0xE2> (byte fallback), <|...|>: no script


def hint_scripts(hint: Sequence[str] | None) -> frozenset[str] | None:
    """The scripts the hinted languages write; None (mask nothing) without a hint, or when any
    hinted language's script is not known here."""
    if not hint:
        return None
    scripts = set()
    for code in hint:
        script = LANGUAGE_SCRIPTS.get(code)
        if script is None:
            return None
        scripts.add(script)
    return frozenset(scripts)


# Scripts by the first word of their letters' Unicode names. A letter of none of these (MODIFIER
# LETTER APOSTROPHE, which Ukrainian writes; MICRO SIGN; the ordinal indicators) is no script's.
SCRIPTS = frozenset({
    "LATIN", "CYRILLIC", "GREEK", "ARMENIAN", "GEORGIAN", "HEBREW", "ARABIC", "SYRIAC", "THAANA",
    "DEVANAGARI", "BENGALI", "GURMUKHI", "GUJARATI", "ORIYA", "TAMIL", "TELUGU", "KANNADA", "MALAYALAM",
    "SINHALA", "THAI", "LAO", "TIBETAN", "MYANMAR", "KHMER", "MONGOLIAN", "ETHIOPIC", "CHEROKEE",
    "HANGUL", "HIRAGANA", "KATAKANA", "CJK", "BOPOMOFO", "YI",
})  # fmt: skip


def char_script(ch: str) -> str | None:
    """'LATIN', 'CYRILLIC', 'GREEK', ... for a letter (the first word of its Unicode name); None
    for anything else: digits, punctuation, and letters of no script in SCRIPTS."""
    if not ch.isalpha():
        return None
    script = unicodedata.name(ch, "").split(" ", 1)[0]
    return script if script in SCRIPTS else None


def piece_scripts(piece: str) -> frozenset[str]:
    """The scripts of a SentencePiece piece's letters (empty: a piece every language may use)."""
    if _SPECIAL.match(piece):
        return frozenset()
    return frozenset(s for s in map(char_script, piece.replace("\u2581", "")) if s is not None)


def _pieces(tokenizer: Any) -> list[str]:
    """Every piece of a NeMo tokenizer, by id."""
    size = int(tokenizer.vocab_size)
    return [str(p) for p in tokenizer.ids_to_tokens(list(range(size)))]


def banned_ids(tokenizer: Any, allowed: frozenset[str]) -> list[int]:
    """Token ids holding a letter of a script outside `allowed`."""
    return [i for i, piece in enumerate(_pieces(tokenizer)) if not piece_scripts(piece) <= allowed]


def _banned_tensor(model: Any, allowed: frozenset[str]) -> Any:
    """A bool row over the joint's outputs (tokens, blank, durations): True on banned tokens.
    Cached on the model, one per set of scripts (the vocabulary is read once per set)."""
    import torch

    cache = model.__dict__.setdefault("_pw_script_masks", {})
    found = cache.get(allowed)
    if found is None:
        joint = model.joint
        width = int(joint.num_classes_with_blank)  # NeMo counts the TDT durations in it too
        found = torch.zeros(width, dtype=torch.bool)
        ids = banned_ids(model.tokenizer, allowed)
        if ids:
            found[torch.tensor(ids, dtype=torch.long)] = True
        cache[allowed] = found
    return found


def _computer(model: Any) -> Any:
    """NeMo's batched label-looping decoding computer (greedy_batch TDT or RNN-T), or None."""
    return getattr(getattr(model.decoding, "decoding", None), "decoding_computer", None)


def can_mask(model: Any) -> bool:
    """Whether this model's decoding can take a script mask (greedy_batch label looping)."""
    return model is not None and _computer(model) is not None


@contextlib.contextmanager
def masked_decoding(model: Any, rows: Sequence[frozenset[str] | None] | None) -> Iterator[None]:
    """For one model call on a batch: rows whose entry is a set of scripts decode without the
    tokens of other scripts; rows with None decode as they always do. With no masked row, or
    when the model has no piece of another script (an English hint on an English model), this
    does nothing at all. Call it holding the model lock, around the encoder+decoder call."""
    if not rows or not any(r is not None for r in rows):
        yield
        return
    import torch

    computer = _computer(model)
    if computer is None:
        raise RuntimeError("this model's decoder cannot mask scripts (needs greedy_batch label-looping decoding)")
    joint = model.joint
    masks = [_banned_tensor(model, allowed) if allowed is not None else None for allowed in rows]
    if not any(m is not None and bool(m.any()) for m in masks):  # e.g. English on an English model
        yield
        return
    width = next(m for m in masks if m is not None).shape[0]
    batch = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, mask in enumerate(masks):
        if mask is not None:
            batch[row] = mask
    device_masks: dict[Any, Any] = {}
    original = type(joint).joint_after_projection.__get__(joint)

    def joint_after_projection(f: Any, g: Any) -> Any:
        out = original(f, g)
        if out.shape[0] != batch.shape[0] or out.shape[-1] != width:
            raise RuntimeError(f"script mask: joint output {tuple(out.shape)} does not match the batch mask "
                               f"{tuple(batch.shape)}")  # fmt: skip
        mask = device_masks.get(out.device)
        if mask is None:
            mask = device_masks[out.device] = batch.to(out.device).view(out.shape[0], 1, 1, width)
        return out.masked_fill(mask, float("-inf"))

    graphs_mode = getattr(computer, "cuda_graphs_mode", None)
    joint.__dict__["joint_after_projection"] = joint_after_projection
    computer.cuda_graphs_mode = None
    try:
        yield
    finally:
        joint.__dict__.pop("joint_after_projection", None)
        computer.cuda_graphs_mode = graphs_mode
