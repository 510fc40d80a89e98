"""Boosting (custom vocabulary): key phrases that a request asks the decoder to favour. Each list
becomes a boosting tree once (cached); each batch registers the trees its items use with the
decoder's multi-model and gives every item its own, so items with different lists, or none,
share batches. Checks of the request itself are lexical, so a dry run needs no NeMo.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from parakeet_worker import checks, config, logsafe
from parakeet_worker.logsafe import UNSAFE_CHARS
from parakeet_worker.state import shared

log = logging.getLogger("parakeet-worker")


BOOST_WEIGHT_MAX = 10.0  # far past any useful weight: from about 3, boosting unsaid words rewrites clear speech


@dataclass(frozen=True)
class Boost:
    """What one item is boosted with: its phrases (cleaned, sorted), the job's weight, and the
    built tree (None in a dry run). Items without boosting carry None instead of a Boost."""

    phrases: tuple[str, ...]
    weight: float
    tree: Any = field(default=None, compare=False, repr=False)


def clean_phrases(value: Any, field_name: str = "boost_phrases") -> tuple[str, ...]:
    """A request's phrase list, checked and normalised: each phrase's whitespace runs become one
    space (leading and trailing ones go), duplicates go, and the list is sorted, so the same set
    sent in any order or spacing hits the same cached tree. Case is kept: Parakeet is cased, and
    "Runpod" and "runpod" are different token sequences. Raises ValueError saying what is wrong."""
    if not isinstance(value, list):
        raise ValueError(f"{field_name} must be a list of strings, not {checks.kind_of(value)}")
    if len(value) > config.CFG.boost_max_phrases:
        raise ValueError(f"{field_name} has {len(value)} phrases, more than BOOST_MAX_PHRASES={config.CFG.boost_max_phrases}")
    phrases = set()
    for n, phrase in enumerate(value):
        if not isinstance(phrase, str):
            raise ValueError(f"{field_name}[{n}] must be a string, not {checks.kind_of(phrase)}")
        text = " ".join(phrase.split())
        if not text:
            raise ValueError(f"{field_name}[{n}] is empty or only whitespace")
        if len(text) > (cap := config.CFG.boost_max_phrase_chars):
            raise ValueError(f"{field_name}[{n}] has {len(text)} characters, more than BOOST_MAX_PHRASE_CHARS={cap}")
        if UNSAFE_CHARS.search(text):
            raise ValueError(f"{field_name}[{n}] '{logsafe.echo(text, 100)}' holds control characters or lone surrogates")
        phrases.add(text)
    return tuple(sorted(phrases))


def check_weight(value: float) -> str | None:
    """Why a boost_weight is refused, or None. rp_validator already made it a float (or refused it)."""
    if not math.isfinite(value) or not 0.0 <= value <= BOOST_WEIGHT_MAX:
        return f"boost_weight must be a number from 0 to {BOOST_WEIGHT_MAX:g} (0 turns boosting off), not {value!r}"
    return None


def _check_tokens(tokenizer: Any, phrases: Sequence[str]) -> None:
    """Refuse (ValueError) a phrase the model cannot spell: characters its tokenizer does not know
    become <unk>, and boosting <unk> would favour whatever the model cannot read, not the phrase."""
    unk = getattr(tokenizer, "unk_id", None)
    for phrase in phrases:
        ids = tokenizer.text_to_ids(phrase)
        if not ids:
            raise ValueError(f"boost phrase '{logsafe.echo(phrase, 100)}' has no tokens the model can emit")
        if isinstance(unk, int) and unk >= 0 and unk in ids:
            chars = sorted({c for c in phrase if not c.isspace() and unk in tokenizer.text_to_ids(c)})
            raise ValueError(
                f"boost phrase '{logsafe.echo(phrase, 100)}' holds characters the model's tokenizer does not know: "
                f"'{logsafe.echo(''.join(chars), 50)}' (phrases are used as written, case included)"
            )


def build_tree(tokenizer: Any, phrases: tuple[str, ...]) -> Any:
    """The boosting tree of `phrases` (NeMo's GPUBoostingTreeModel, with its defaults for TDT:
    context_score 1, depth_scaling 2). Pure Python and NumPy on the CPU; it stays in host memory
    and is copied into the decoder's multi-model (on the GPU, if that is where it runs) per batch."""
    from nemo.collections.asr.parts.context_biasing.boosting_graph_batched import (
        BoostingTreeModelConfig,
        GPUBoostingTreeModel,
    )

    _check_tokens(tokenizer, phrases)
    config = BoostingTreeModelConfig(key_phrases_list=list(phrases))
    return GPUBoostingTreeModel.from_config(config, tokenizer=tokenizer).eval()


def tree_bytes(tree: Any) -> int:
    """What a built tree holds: its tensors (NeMo keeps the whole trie in them; the Python
    trie it was built from is gone once it is built)."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(tree.buffers(), tree.parameters()))


class TreeCache:
    """Built trees by (tokenizer, phrase list), least recently used out past BOOST_CACHE_SIZE
    entries or BOOST_CACHE_BYTES of trees, so a client that sends the same list with every
    request builds it once. Safe from any thread; a list being built is built once, however
    many items ask for it at the same time. The weight is not in the key: it is applied when the
    tree is registered. An entry keeps its tokenizer alive, so the id in the key cannot be
    reused by another tokenizer while the entry exists.

    Trees are built one at a time on a thread of their own ("boost-build"), never on a job's
    thread: NeMo's builder raises and catches OmegaConf exceptions, whose reference cycles hold
    every frame up the stack, and a job's frames would keep that job (its request, base64 audio
    included) alive until a full garbage collection (~2 s with NeMo loaded; see docs/boosting.md)."""

    @dataclass(eq=False)
    class _Entry:
        tokenizer: Any
        phrases: tuple[str, ...]
        done: threading.Event = field(default_factory=threading.Event)
        tree: Any = None
        nbytes: int = 0
        error: BaseException | None = None

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: dict[tuple[int, tuple[str, ...]], TreeCache._Entry] = {}  # in use order, oldest first
        self.hits = self.misses = 0
        self.todo: queue.SimpleQueue[TreeCache._Entry] = queue.SimpleQueue()
        self.builder: threading.Thread | None = None

    def get(self, tokenizer: Any, phrases: tuple[str, ...]) -> Any:
        key = (id(tokenizer), phrases)
        with self.lock:
            entry = self.entries.pop(key, None)
            if entry is None:
                entry = self._Entry(tokenizer, phrases)
                self.misses += 1
                self.todo.put(entry)
                if self.builder is None:
                    self.builder = threading.Thread(target=self._build_loop, name="boost-build", daemon=True)
                    self.builder.start()
            else:
                self.hits += 1
            self.entries[key] = entry  # now the most recently used
            self._trim()
        entry.done.wait()
        if entry.error is not None:
            raise copy.copy(entry.error)  # a fresh one for each thread that asked, with no traceback
        return entry.tree

    def _trim(self) -> None:
        """Drop the least recently used trees past either bound (holding the lock). One tree over
        BOOST_CACHE_BYTES alone is still used by the items that asked for it, then not kept."""
        total = sum(e.nbytes for e in self.entries.values())
        while self.entries and (len(self.entries) > config.CFG.boost_cache_size or total > config.CFG.boost_cache_bytes):
            oldest = next(iter(self.entries))
            total -= self.entries.pop(oldest).nbytes

    def _build_loop(self) -> None:
        while True:
            self._build(self.todo.get())

    def _build(self, entry: TreeCache._Entry) -> None:
        try:
            entry.tree = build_tree(entry.tokenizer, entry.phrases)
            entry.nbytes = tree_bytes(entry.tree)
        except Exception as exc:  # noqa: BLE001 - raised in every thread that asked; not kept
            entry.error = exc.with_traceback(None)
        with self.lock:
            key = (id(entry.tokenizer), entry.phrases)
            if entry.error is not None and self.entries.get(key) is entry:
                del self.entries[key]
            self._trim()
        entry.done.set()

    def info(self) -> dict[str, int]:
        with self.lock:
            return {"hits": self.hits, "misses": self.misses, "size": len(self.entries), "limit": config.CFG.boost_cache_size,
                    "bytes": sum(e.nbytes for e in self.entries.values()), "limit_bytes": config.CFG.boost_cache_bytes}  # fmt: skip


@shared
def trees() -> TreeCache:
    """The worker's cache of built boosting trees."""
    return TreeCache()


def resolve_boost(model: Any, phrases: tuple[str, ...], weight: float) -> Boost | None:
    """The Boost for cleaned `phrases` at `weight` (building or finding the tree), or None when
    nothing is boosted (no phrases, or weight 0): such an item is decoded exactly as without
    boosting. Raises ValueError for a list the model cannot use, or when boosting is off."""
    if not phrases or weight == 0:
        return None
    if not config.CFG.boosting:
        raise ValueError("key-phrase boosting is off on this worker (BOOSTING=off)")
    if model is None:  # dry run: the request was checked lexically; there is no tokenizer
        return Boost(phrases, weight)
    if multi_model(model) is None:
        raise ValueError("this model's decoder cannot boost key phrases (needs greedy_batch TDT or RNN-T decoding)")
    return Boost(phrases, weight, trees().get(model.tokenizer, phrases))


def multi_model(model: Any) -> Any:
    """The decoder's biasing multi-model (NeMo's GPUBiasingMultiModel), or None. It exists only
    for label-looping greedy_batch decoding with greedy.enable_per_stream_biasing, and every
    change_decoding_strategy makes a new one: registrations do not outlive a batch."""
    computer = getattr(getattr(model.decoding, "decoding", None), "decoding_computer", None)
    return getattr(computer, "biasing_multi_model", None)


@shared
def _seed_class() -> type:
    """A NeMo Hypothesis that starts an item's decoding empty, with a biasing request.

    NeMo's batched greedy decoder reads each partial hypothesis's biasing_cfg, decodes, then
    merges what it found into the partial one. NeMo 3.0's Hypothesis.merge_ drops
    token_duration (TDT timestamps then fail) and turns token tensors into lists; an empty seed
    has nothing to merge, so this one adopts the result whole and keeps only its request. Built
    on first use: a dry run never imports NeMo."""
    from nemo.collections.asr.parts.utils.rnnt_utils import Hypothesis

    class BoostSeed(Hypothesis):
        def merge_(self, other: Any) -> Any:
            request = self.biasing_cfg
            self.__dict__.update(other.__dict__)
            self.biasing_cfg = request
            return self

    return BoostSeed


@contextlib.contextmanager
def registered(model: Any, boosts: Sequence[Boost | None] | None) -> Iterator[list[Any] | None]:
    """Register the trees a batch uses with the decoder's multi-model, once per distinct (list,
    weight), and yield one partial hypothesis per row (None for a row without boosting), or None
    when no row is boosted; the trees are removed again on the way out. Called holding
    _MODEL_LOCK, outside inference mode (the multi-model's buffers are updated in place). Per
    batch, because the timestamps switch swaps the decoder (each has its own); a registration costs a copy of
    the tree's arrays (~0.3 ms on a CPU for a short list)."""
    if not boosts or not any(boosts):
        yield None
        return
    from nemo.collections.asr.parts.context_biasing.biasing_multi_model import BiasingRequestItemConfig

    multi = multi_model(model)
    if multi is None:
        raise RuntimeError("boosting was requested but the decoder has no biasing multi-model")
    ids: dict[tuple[tuple[str, ...], float], int] = {}
    try:
        seeds: list[Any] = []
        for boost in boosts:
            if boost is None:
                seeds.append(None)
                continue
            key = (boost.phrases, boost.weight)
            if key not in ids:
                ids[key] = multi.add_model(boost.tree, alpha=boost.weight)
            request = BiasingRequestItemConfig(multi_model_id=ids[key], auto_manage_multi_model=False)
            seeds.append(_seed_class()(score=0.0, y_sequence=[], biasing_cfg=request))
        yield seeds
    finally:
        for model_id in ids.values():
            multi.remove_model(model_id)
