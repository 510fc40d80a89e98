"""Known speakers: voices a request enrols by name, found again among the speakers diarization
tells apart, so that turns, words, segments and subtitles carry "alice" instead of SPEAKER_00.

A request gives each name a reference: a 2-10 s clip of that voice alone (OpenAI's
`known_speaker_names[]` + `known_speaker_references[]`, or the native job's `known_speakers`).
Each reference becomes a voiceprint with the very model, windows and features diarization uses
(CAM++ embeddings of 1.5 s windows of its speech, averaged as a cluster's centroid is); after
clustering, each speaker's centroid is compared with every voiceprint by cosine similarity, and
the most alike pair above MATCH_THRESHOLD is named first, then the next among what is left: one
name goes to at most one speaker, a speaker gets at most one name, and a speaker like no
reference keeps its anonymous label. A voice that diarization merges with another (two voices
CAM++ hears as one) is one speaker here too.

Pure functions over NumPy arrays: the request's fields are checked here; the references are
fetched and decoded by the job like any input (handler.py), embedded by analysis.speakers (which
holds the model) and matched there, after clustering, with match() and labels_in_order().
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from parakeet_worker.audio import sources

KNOWN_SPEAKERS_MAX = 4  # as OpenAI; every reference is fetched, decoded and embedded per request
REFERENCE_MIN_SEC = 2.0
REFERENCE_MAX_SEC = 10.0
REFERENCE_SLACK_SEC = 0.05  # an encoder's padding: a "2 s" MP3 decodes to 1.98-2.03 s
REFERENCE_MIN_SPEECH_SEC = 1.0  # less speech than this (as VAD hears it) is not a voice to enrol
NAME_MAX_CHARS = 64
# Cosine similarity of a speaker's centroid and a voiceprint from which they are one voice.
# Measured by bench/known_speakers.py (docs/diarization.md, "Known speakers"): the same espeak-ng
# voice, other words, speed and pitch, scored 0.76-0.97; distinct voices 0.25-0.69.
MATCH_THRESHOLD = 0.70

# Labels diarization gives unnamed speakers (SPEAKER_00, ...) and OpenAI's diarized_json gives
# them (A, B, ...): a name like these would be taken for an anonymous speaker.
_ANONYMOUS = re.compile(r"SPEAKER_\d+|[A-Z]")
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")  # controls, line separators, lone surrogates


class KnownSpeakerError(ValueError):
    """A request's known speakers are wrong: `param` names the field ("known_speaker_names[2]",
    "known_speakers[0].source"), the message says what is wrong. A client error (400)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message


@dataclass(frozen=True)
class KnownSpeaker:
    """One enrolled voice as the request gave it: its name, and its reference as an input item
    ({"source": ...} or {"audio_base64": ...}) for the one source parser; `param` is the field
    the reference came in, for errors."""

    name: str
    item: dict[str, str]
    param: str


@dataclass(frozen=True)
class Voiceprint:
    """A reference's CAM++ embedding: the unit mean of its windows' unit embeddings."""

    name: str
    vector: np.ndarray = field(repr=False)


# --- The request's fields ----------------------------------------------------------------------


def check_name(value: Any, param: str) -> str:
    """A speaker name, stripped; KnownSpeakerError if it is not a short, printable string that
    could not be taken for an anonymous label."""
    if not isinstance(value, str):
        raise KnownSpeakerError(param, "must be a string (the speaker's name)")
    name = value.strip()
    if not name:
        raise KnownSpeakerError(param, "is empty")
    if len(name) > NAME_MAX_CHARS:
        raise KnownSpeakerError(param, f"has {len(name)} characters, more than {NAME_MAX_CHARS}")
    if _UNSAFE.search(name):
        raise KnownSpeakerError(param, "holds control characters or lone surrogates")
    if _ANONYMOUS.fullmatch(name):
        raise KnownSpeakerError(param, f"'{name}' is how an unnamed speaker is labelled (SPEAKER_00, A, B, ...)")
    return name


def _check_count(count: int, param: str) -> None:
    if count > KNOWN_SPEAKERS_MAX:
        raise KnownSpeakerError(param, f"has {count} speakers, more than {KNOWN_SPEAKERS_MAX}")


def _check_unique(speakers: Sequence[KnownSpeaker], param: str) -> None:
    seen: dict[str, int] = {}
    for n, speaker in enumerate(speakers):
        key = speaker.name.casefold()
        if key in seen:
            raise KnownSpeakerError(f"{param}[{n}]", f"'{speaker.name}' is given twice (also at [{seen[key]}])")
        seen[key] = n


def _reference_item(value: Any, param: str) -> dict[str, str]:
    """A reference as an input item: anything OpenAI's `file` may be (sources.item_of)."""
    if not isinstance(value, str) or not value.strip():
        raise KnownSpeakerError(param, "must be a non-empty string: a data: URL, a URL, a path or base64 audio")
    return sources.item_of(value.strip())


def from_openai(names: Any, references: Any) -> list[KnownSpeaker]:
    """`known_speaker_names[]` and `known_speaker_references[]` (lists of strings, as the routes
    have parsed them; None when absent): the same length, each reference anything a `file` may
    be. An empty list is no known speakers."""
    names, references = names or [], references or []
    for value, param in ((names, "known_speaker_names"), (references, "known_speaker_references")):
        if not isinstance(value, list):
            raise KnownSpeakerError(param, "must be a list")
        _check_count(len(value), param)
    if len(names) != len(references):
        raise KnownSpeakerError(
            "known_speaker_references",
            f"has {len(references)} entries and known_speaker_names {len(names)}: give one reference per name",
        )
    speakers = [
        KnownSpeaker(check_name(name, f"known_speaker_names[{n}]"),
                     _reference_item(ref, f"known_speaker_references[{n}]"), f"known_speaker_references[{n}]")
        for n, (name, ref) in enumerate(zip(names, references, strict=True))
    ]  # fmt: skip
    _check_unique(speakers, "known_speaker_names")
    return speakers


def from_native(value: Any) -> list[KnownSpeaker]:
    """The native job's `known_speakers`: [{"name": ..., "source": ...} or {"name": ...,
    "audio_base64": ...}]; None when absent."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise KnownSpeakerError("known_speakers", 'must be a list of {"name", "source"} objects')
    _check_count(len(value), "known_speakers")
    speakers = []
    for n, entry in enumerate(value):
        param = f"known_speakers[{n}]"
        if isinstance(entry, KnownSpeaker):  # checked already (an OpenAI request's; no JSON makes one)
            speakers.append(entry)
            continue
        if not isinstance(entry, dict):
            raise KnownSpeakerError(param, 'must be an object: {"name": ..., "source": ...}')
        unknown = sorted(str(k)[:40] for k in set(entry) - {"name", "source", "audio_base64"})
        if unknown:
            raise KnownSpeakerError(param, f"unknown field(s) {unknown}; allowed: name, source, audio_base64")
        given = [k for k in ("source", "audio_base64") if k in entry]
        if len(given) != 1:
            raise KnownSpeakerError(param, "give exactly one of 'source' or 'audio_base64'")
        ref = entry[given[0]]
        if not isinstance(ref, str) or not ref.strip():
            raise KnownSpeakerError(f"{param}.{given[0]}", "must be a non-empty string")
        name = check_name(entry.get("name"), f"{param}.name")
        speakers.append(KnownSpeaker(name, {given[0]: ref.strip()}, f"{param}.{given[0]}"))
    _check_unique(speakers, "known_speakers")
    return speakers


# --- A reference's audio -----------------------------------------------------------------------


def check_reference(speaker: KnownSpeaker, duration: float, speech_sec: float) -> None:
    """KnownSpeakerError, naming the reference, unless it is 2-10 s long and holds at least
    REFERENCE_MIN_SPEECH_SEC of speech (check_length, then check_speech)."""
    check_length(speaker, duration)
    check_speech(speaker, speech_sec)


def check_length(speaker: KnownSpeaker, duration: float) -> None:
    """A reference must be 2-10 s long (as OpenAI's): a shorter clip gives too few windows for a
    voiceprint, a longer one is a recording, not a reference."""
    if not REFERENCE_MIN_SEC - REFERENCE_SLACK_SEC <= duration <= REFERENCE_MAX_SEC + REFERENCE_SLACK_SEC:
        raise KnownSpeakerError(
            speaker.param, f"the reference for '{speaker.name}' is {duration:.2f} s long; a reference must be "
            f"{REFERENCE_MIN_SEC:g}-{REFERENCE_MAX_SEC:g} s",
        )  # fmt: skip


def check_speech(speaker: KnownSpeaker, speech_sec: float) -> None:
    """A reference must hold REFERENCE_MIN_SPEECH_SEC of speech: music, noise or silence has no
    voice to enrol."""
    if speech_sec < REFERENCE_MIN_SPEECH_SEC:
        raise KnownSpeakerError(
            speaker.param, f"the reference for '{speaker.name}' holds {speech_sec:.2f} s of speech, less than "
            f"{REFERENCE_MIN_SPEECH_SEC:g} s: it must be the voice speaking (alone)",
        )  # fmt: skip


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def voiceprint(name: str, embeddings: np.ndarray) -> Voiceprint:
    """The voiceprint of one reference from its windows' CAM++ embeddings (n x 192), computed as
    a cluster's centroid is, so the two compare like for like. ValueError without windows."""
    if not len(embeddings):
        raise ValueError("a voiceprint needs at least one window")
    return Voiceprint(name, _unit(_unit(np.asarray(embeddings, np.float64)).mean(axis=0)))


# --- Matching speakers to voiceprints -------------------------------------------------------------


def centroids(embeddings: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    """Each cluster label's unit centroid: the mean of its windows' unit embeddings."""
    x = _unit(np.asarray(embeddings, np.float64))
    return {int(k): _unit(x[labels == k].mean(axis=0)) for k in np.unique(labels)}


def similarities(found: Mapping[int, np.ndarray], prints: Sequence[Voiceprint]) -> dict[tuple[int, str], float]:
    """Cosine similarity of every found speaker's centroid and every voiceprint."""
    return {(label, p.name): float(np.dot(c, p.vector)) for label, c in found.items() for p in prints}


def match(
    found: Mapping[int, np.ndarray], prints: Sequence[Voiceprint], threshold: float = MATCH_THRESHOLD
) -> dict[int, str]:
    """Names for found speakers (cluster label -> name): the most alike (speaker, voiceprint)
    pair at or above `threshold` first, then the most alike of what is left, and so on. Greedy,
    not an optimal assignment: a speaker always gets the name it is most like among those left,
    which is what a listener would say; with four names at most the two rarely differ."""
    pairs = sorted(((s, label, name) for (label, name), s in similarities(found, prints).items()), reverse=True)
    names: dict[int, str] = {}
    taken: set[str] = set()
    for score, label, name in pairs:
        if score < threshold:
            break
        if label not in names and name not in taken:
            names[label] = name
            taken.add(name)
    return names


def labels_in_order(first_seen: Sequence[int], names: Mapping[int, str]) -> dict[int, str]:
    """Every cluster label's public label: its matched name, else SPEAKER_00, SPEAKER_01, ...
    numbered among the unnamed ones in `first_seen` order (the order speakers first speak), so
    a request without known speakers is labelled as before."""
    out: dict[int, str] = {}
    unnamed = 0
    for label in first_seen:
        if label in out:
            continue
        if label in names:
            out[label] = names[label]
        else:
            out[label] = f"SPEAKER_{unnamed:02d}"
            unnamed += 1
    return out
