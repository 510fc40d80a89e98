"""Speech with known words, from espeak-ng: the training data of the demo model, and the test
and benchmark audio. Everything is 16 kHz mono float32 numpy, and deterministic for a seed."""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

SAMPLE_RATE = 16_000
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = ("hello", "world", "yes", "no", "stop", "go", "left", "right", "up", "down")
VOCAB = DIGITS + WORDS
VOICES = ("en-us", "en-gb", "en-us+f3", "en-us+m3", "en-gb-x-rp+f2", "en-gb-scotland", "en-029+m1")


@functools.lru_cache(maxsize=4096)
def _speak_cached(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text]
        subprocess.run(cmd, check=True, capture_output=True)
        audio, rate = sf.read(wav, dtype="float32")
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    g = gcd(rate, SAMPLE_RATE)
    out = resample_poly(audio, SAMPLE_RATE // g, rate // g).astype(np.float32)
    out.setflags(write=False)
    return out


def speak(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50) -> np.ndarray:
    """`text` spoken by espeak-ng, as 16 kHz mono float32 (espeak's own leading/trailing silence kept)."""
    return _speak_cached(text, voice, int(speed), int(pitch)).copy()


def trim(audio: np.ndarray, rel: float = 0.02) -> np.ndarray:
    """Cut leading and trailing silence (samples under `rel` of the peak)."""
    loud = np.flatnonzero(np.abs(audio) > rel * (np.abs(audio).max() or 1.0))
    return audio[loud[0] : loud[-1] + 1] if len(loud) else audio[:0]


def place_words(
    words: list[str], offsets: list[float], voice: str = "en-us", speed: int = 160, tail: float = 0.8
) -> np.ndarray:
    """Each word spoken alone, trimmed, and placed so that its speech starts at its offset (s)."""
    clips = [trim(speak(w, voice, speed)) for w in words]
    total = int((offsets[-1] + tail) * SAMPLE_RATE) + len(clips[-1])
    out = np.zeros(total, np.float32)
    for clip, offset in zip(clips, offsets, strict=True):
        start = round(offset * SAMPLE_RATE)
        out[start : start + len(clip)] += clip
    return out


def spaced_words(rng: np.random.Generator, words: list[str], voice: str, speed: int, pitch: int, gap: tuple[float, float]) -> np.ndarray:
    """Words spoken one by one with random silences between them."""
    parts = [np.zeros(int(rng.uniform(0.0, 0.6) * SAMPLE_RATE), np.float32)]
    for i, word in enumerate(words):
        parts.append(trim(speak(word, voice, speed, pitch)))
        if i < len(words) - 1:
            parts.append(np.zeros(int(rng.uniform(*gap) * SAMPLE_RATE), np.float32))
    parts.append(np.zeros(int(rng.uniform(0.1, 0.6) * SAMPLE_RATE), np.float32))
    return np.concatenate(parts)


def noisy_word(
    word: str, voice: str = "en-us", speed: int = 450, snr_db: float = 5.0, seed: int = 0,
    peak: float = 0.3, pad: float = 0.3,
) -> np.ndarray:  # fmt: skip
    """`word` spoken very fast, trimmed, scaled to `peak`, with `pad` s of silence either side, all
    in white noise `snr_db` dB below the word's mean power (numpy's default_rng(seed)): a word the
    demo model can mishear, for the boosting tests. "seven" this way (en-us, 450 wpm, 5 dB) it
    hears as "two"; "yes" (en-gb, 450 wpm, 10 dB, seed 1) as "left"."""
    speech = trim(speak(word, voice, speed))
    speech = speech / np.abs(speech).max() * peak
    lead = int(pad * SAMPLE_RATE)
    out = np.zeros(2 * lead + len(speech), np.float32)
    out[lead : lead + len(speech)] = speech
    noise = np.random.default_rng(seed).standard_normal(len(out)).astype(np.float32)
    return out + noise * np.float32(np.sqrt(np.mean(speech**2) / 10 ** (snr_db / 10)))


def write(path: str | os.PathLike, audio: np.ndarray) -> Path:
    sf.write(str(path), audio, SAMPLE_RATE, subtype="PCM_16")
    return Path(path)
