"""Which language was spoken: the model's languages, hints, and detection from the transcript.

Parakeet TDT takes no language input and reports none. This module labels what it wrote, from
the text alone, with py3langid (a naive-Bayes character n-gram model shipped inside its wheel,
BSD-3-Clause), restricted to the languages the loaded model speaks. It was chosen by measurement
(docs/language.md, bench/language_libs.py): 99.2% right on the fixture transcripts of 20+
characters in the 25 languages of Parakeet v3, about 0.1 ms a call.

Text under MIN_CHARS characters, or whose best language has a probability under
MIN_PROBABILITY (too short or too mixed to tell), gets no language (None), never a guess.

Hints (`language`, one, or `languages`, several) are checked here against the model's
languages; script_mask.py turns them into the decoding mask. Importing this module loads
nothing: py3langid (and numpy) load on the first detection, or on `warm_up()`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from parakeet_worker import config

# Parakeet TDT 0.6B v3's languages (its model card), in code order.
V3_LANGUAGES = ("bg", "cs", "da", "de", "el", "en", "es", "et", "fi", "fr", "hr", "hu", "it",
                "lt", "lv", "mt", "nl", "pl", "pt", "ro", "ru", "sk", "sl", "sv", "uk")  # fmt: skip
ENGLISH = ("en",)

# Languages by model name (the last part of PARAKEET_MODEL, ".nemo" stripped). Models not listed
# have unknown languages: set MODEL_LANGUAGES for them.
MODEL_LANGUAGES: dict[str, tuple[str, ...]] = {
    "parakeet-tdt-0.6b-v3": V3_LANGUAGES,
    "parakeet-tdt-0.6b-v2": ENGLISH,
    "parakeet-tdt-1.1b": ENGLISH,
    "parakeet-tdt_ctc-1.1b": ENGLISH,
    "parakeet-tdt_ctc-110m": ENGLISH,
    "parakeet-tdt_ctc-0.6b-ja": ("ja",),
    "demo-tdt": ENGLISH,  # the bundled 20-word test model
}

# verbose_json's `language`, as whisper-1 writes it: the English name in lower case.
LANGUAGE_NAMES = {
    "bg": "bulgarian", "cs": "czech", "da": "danish", "de": "german", "el": "greek", "en": "english",
    "es": "spanish", "et": "estonian", "fi": "finnish", "fr": "french", "hr": "croatian",
    "hu": "hungarian", "it": "italian", "lt": "lithuanian", "lv": "latvian", "mt": "maltese",
    "nl": "dutch", "pl": "polish", "pt": "portuguese", "ro": "romanian", "ru": "russian",
    "sk": "slovak", "sl": "slovenian", "sv": "swedish", "uk": "ukrainian", "ja": "japanese",
    "be": "belarusian", "bs": "bosnian", "ca": "catalan", "cy": "welsh", "ga": "irish",
    "gl": "galician", "is": "icelandic", "mk": "macedonian", "no": "norwegian", "sq": "albanian",
    "sr": "serbian", "tr": "turkish", "zh": "chinese", "ko": "korean", "ar": "arabic", "hi": "hindi",
}  # fmt: skip
_CODE_BY_NAME = {name: code for code, name in LANGUAGE_NAMES.items()}

# Measured on tests/data/language_sentences.json (docs/language.md): every word-boundary prefix
# of 20+ characters is right 98.7% of the time at p >= 0.5, and wrong 0.45% of the time it
# answers; under 20 characters a fifth of the texts come out wrong, some at p 0.58.
MIN_CHARS = 20
MIN_PROBABILITY = 0.5


class HintError(ValueError):
    """A language hint the request cannot have (HTTP 400). `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Detection:
    """A detected language (ISO 639-1) and its probability among the allowed languages; both
    None when the text is too short or too mixed to tell."""

    code: str | None
    probability: float | None

    def as_fields(self, hint: Sequence[str] | None = None) -> dict[str, Any]:
        """The result fields: `language`, `language_probability`, and with a hint
        `language_mismatch`."""
        fields: dict[str, Any] = {"language": self.code, "language_probability": self.probability}
        if hint:
            fields["language_mismatch"] = language_mismatch(self.code, hint)
        return fields


UNKNOWN = Detection(None, None)


@dataclass(frozen=True)
class ItemLanguage:
    """An item's language, each of its segments' (in segment order), and the hint it had."""

    item: Detection
    segments: tuple[Detection, ...] = ()
    hint: tuple[str, ...] | None = None

    def codes(self) -> list[dict[str, str]]:
        """OpenAI's `languages`: the item's language first, then any other a segment was in."""
        found = summarize([self.item, *self.segments]) if self.item.code is None else [{"code": self.item.code}]
        if self.item.code is not None:
            found += [c for c in summarize(self.segments) if c["code"] != self.item.code]
        return found


def label(text: str, segments: Sequence[str], hint: tuple[str, ...] | None, allowed: Sequence[str]) -> ItemLanguage:
    """Detect an item's language and each segment's (off the model thread: ~0.1 ms a segment)."""
    return ItemLanguage(detect(text, allowed), tuple(detect_many(segments, allowed)), hint)


# -- which languages a model speaks ---------------------------------------------------------------


def spoken() -> tuple[str, ...]:
    """The worker's model's languages: MODEL_LANGUAGES when set, else the table entry of
    PARAKEET_MODEL; () when unknown."""
    return model_languages(config.CFG.model, config.CFG.model_languages)


def model_languages(model: str, override: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """The languages `model` (PARAKEET_MODEL: a hub id or a .nemo path) speaks: `override`
    (MODEL_LANGUAGES, "en,de" or a list) when given, else the table; () when unknown."""
    if override:
        return parse_languages(override, "MODEL_LANGUAGES")
    name = PurePath(str(model).rstrip("/")).name
    if name.endswith(".nemo"):
        name = name[: -len(".nemo")]
    return MODEL_LANGUAGES.get(name, ())


def parse_languages(value: str | Sequence[str], what: str) -> tuple[str, ...]:
    """ "en, de" or ["en", "de"] -> ("en", "de"): lower-case ISO 639-1 codes, duplicates dropped.
    ValueError names `what` for anything else."""
    items = value.split(",") if isinstance(value, str) else list(value)
    codes: list[str] = []
    for item in items:
        code = normalize_code(item) if isinstance(item, str) else None
        if code is None:
            raise ValueError(f"{what}: {str(item)[:40]!r} is not an ISO 639-1 language code such as 'en'")
        if code not in codes:
            codes.append(code)
    if not codes:
        raise ValueError(f"{what} names no language")
    return tuple(codes)


def normalize_code(value: str) -> str | None:
    """'en', 'EN', 'en-US', 'en_GB' or 'english' -> 'en'; None when it is not a language."""
    text = value.strip().lower()
    if text in _CODE_BY_NAME:
        return _CODE_BY_NAME[text]
    base = text.replace("_", "-").split("-", 1)[0]
    if len(base) == 2 and base.isascii() and base.isalpha():
        return base
    return None


def language_name(code: str | None) -> str | None:
    """whisper-1's name for `code` ('de' -> 'german'); the code itself when it has none here."""
    if code is None:
        return None
    return LANGUAGE_NAMES.get(code, code)


# -- hints ------------------------------------------------------------------------------------------


def check_hint(language: Any, languages: Any, spoken: Sequence[str]) -> tuple[str, ...] | None:
    """The hinted languages of a request or item: `language` (one code) or `languages` (a list,
    or one comma-separated string), normalized; None without a hint. HintError (400) for both
    at once, for something that is not a code, and for a language the model does not speak
    (the message lists those it does). A model of unknown languages (`spoken` empty) takes any
    well-formed hint."""
    has_one = language not in (None, "")
    has_many = languages not in (None, "", [], ())
    if has_one and has_many:
        raise HintError("'language' and 'languages' cannot both be set: give one language or a list", "languages")
    if not has_one and not has_many:
        return None
    param = "language" if has_one else "languages"
    if has_one and not isinstance(language, str):
        raise HintError("'language' must be a language code such as 'en'", param)
    if has_many and not isinstance(languages, (str, list, tuple)):
        raise HintError('\'languages\' must be a list of language codes such as ["en", "de"]', param)
    try:
        codes = parse_languages(language if has_one else languages, param)
    except ValueError as exc:
        raise HintError(str(exc), param) from None
    if len(codes) > 1 and has_one:
        raise HintError("'language' takes one language; use 'languages' for several", param)
    unknown = [c for c in codes if spoken and c not in spoken]
    if unknown:
        raise HintError(
            f"this model does not transcribe {', '.join(repr(c) for c in unknown)}; "
            f"it transcribes: {', '.join(spoken)}", param)  # fmt: skip
    return codes


def language_mismatch(detected: str | None, hint: Sequence[str]) -> bool:
    """True when the text was detected as a language outside the hint; False when it is inside,
    or when nothing could be detected (no evidence against the hint)."""
    return detected is not None and detected not in hint


# -- detection --------------------------------------------------------------------------------------


class _Identifiers:
    """py3langid's model restricted to a set of languages, one per set (the worker uses one: its
    model's). The full model (~0.6 s to load, 97 languages) is dropped once a restricted copy
    is made: of its ~75 MB, the 27 MB of per-language weights are not needed again (the copy
    keeps its columns, ~5 MB for 25 languages, and shares the 40 MB tokenizer automaton).
    classify() on a copy is read-only, so threads may share it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._labels: frozenset[str] | None = None
        self._spare: Any = None  # a full model loaded for its labels, for the next restriction
        self._by_languages: dict[tuple[str, ...], Any] = {}

    @staticmethod
    def _load_full() -> Any:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def known(self, codes: Iterable[str]) -> tuple[str, ...]:
        """`codes` py3langid can tell apart, in order (it knows 97 languages, all of v3's)."""
        with self._lock:
            if self._labels is None:
                self._spare = self._load_full()
                self._labels = frozenset(self._spare.labels)
            labels = self._labels
        return tuple(c for c in codes if c in labels)

    def restricted(self, codes: tuple[str, ...]) -> Any:
        with self._lock:
            found = self._by_languages.get(codes)
            if found is None:
                found, self._spare = self._spare or self._load_full(), None
                found.set_languages(list(codes))
                found._full_model = (found.nb_ptc, found.nb_pc, found.nb_classes)  # frees the other columns
                self._by_languages[codes] = found
            return found


_IDENTIFIERS = _Identifiers()


def warm_up(allowed: Sequence[str] | None = None) -> None:
    """Load the library and the restricted model now (~1 s), so the first job does not wait
    (default: the worker's model's languages)."""
    detect("warm up the language model", spoken() if allowed is None else allowed)


def preload() -> threading.Thread:
    """warm_up() on a thread of its own, beside the model's load (a failure is logged by the
    first detection, which tries again)."""

    def run() -> None:
        with contextlib.suppress(Exception):
            warm_up()

    thread = threading.Thread(target=run, name="language-load", daemon=True)
    thread.start()
    return thread


def _letters(text: str) -> int:
    return sum(1 for ch in text if ch.isalpha())


def detect(text: str, allowed: Sequence[str]) -> Detection:
    """The language of `text` among `allowed` (the model's languages). UNKNOWN when the text
    has under MIN_CHARS characters (whitespace collapsed) or fewer letters than half that, when
    the best language's probability is under MIN_PROBABILITY, or when no language is allowed.
    With one allowed language that language is the answer for any text long enough."""
    text = " ".join(text.split())
    if len(text) < MIN_CHARS or _letters(text) < MIN_CHARS // 2 or not allowed:
        return UNKNOWN
    codes = _IDENTIFIERS.known(allowed)
    if not codes:
        return UNKNOWN
    if len(codes) == 1:
        return Detection(codes[0], 1.0)
    code, probability = _IDENTIFIERS.restricted(tuple(sorted(codes))).classify(text)
    if probability < MIN_PROBABILITY:
        return UNKNOWN
    return Detection(code, round(float(probability), 3))


def detect_many(texts: Sequence[str], allowed: Sequence[str]) -> list[Detection]:
    """detect() for each of `texts` (an item's segments: each gets its own language, so a file
    that switches language is labelled where it switches)."""
    return [detect(t, allowed) for t in texts]


def summarize(detections: Sequence[Detection]) -> list[dict[str, str]]:
    """OpenAI's `languages`: [{"code": ...}] for each detected language, most frequent first;
    [] when none could be told (OpenAI: "no language could be reliably detected")."""
    counts: dict[str, int] = {}
    for d in detections:
        if d.code is not None:
            counts[d.code] = counts.get(d.code, 0) + 1
    return [{"code": c} for c, _ in sorted(counts.items(), key=lambda kv: -kv[1])]
