"""Live audio in, without the model: the input formats against real ffmpeg, the streaming
resampler against scipy and against itself in one piece, and the live VAD against the worker's
file VAD on the same audio."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import synth
from scipy.signal import resample_poly

from parakeet_worker.analysis import vad
from parakeet_worker.analysis.live_vad import FRAME, SpeechProbs, Started, Stopped, TurnDetector, VadParams
from parakeet_worker.audio.live import (
    FILTER_HALF_WIDTH,
    PCMA,
    PCMU,
    AudioFormat,
    FormatError,
    InputDecoder,
    StreamResampler,
    g711_table,
    parse_format,
)
from tools.live_client import encode_input


def chunked(push, x: np.ndarray, seed: int = 0, most: int = 900) -> np.ndarray:
    """`x` pushed through `push` in chunks of random sizes (1 to `most` samples)."""
    rng = np.random.default_rng(seed)
    out, at = [], 0
    while at < len(x):
        n = int(rng.integers(1, most))
        out.append(push(x[at : at + n]))
        at += n
    return np.concatenate(out)


@pytest.mark.parametrize("rate", [24_000, 8_000])
def test_resampler_streams_as_one_piece_and_matches_scipy(rate):
    t = np.arange(2 * rate) / rate
    x = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 2500 * t)).astype(np.float32)
    whole = StreamResampler(rate).push(x)
    pieces = chunked(StreamResampler(rate).push, x)
    assert np.array_equal(whole, pieces)  # chunk edges change nothing
    held = FILTER_HALF_WIDTH * 16_000 // rate + 1  # the last input samples' outputs wait for the next chunk
    assert 2 * 16_000 - held <= len(whole) <= 2 * 16_000
    g = np.gcd(rate, 16_000)
    reference = resample_poly(x, 16_000 // g, rate // g)
    inner = slice(200, len(whole) - 200)
    assert np.abs(whole[inner] - reference[: len(whole)][inner]).max() < 0.01


def test_resampler_cuts_what_24k_would_alias():
    """A 10 kHz tone at 24 kHz lies above 16 kHz's Nyquist frequency: it must not fold back."""
    t = np.arange(24_000) / 24_000
    out = StreamResampler(24_000).push(np.sin(2 * np.pi * 10_000 * t).astype(np.float32))
    assert np.sqrt(np.mean(out[100:-100] ** 2)) < 0.01


@pytest.mark.parametrize("kind,raw", [(PCMU, "mulaw"), (PCMA, "alaw")])
def test_g711_tables_decode_as_ffmpeg_does(kind, raw, tmp_path):
    import subprocess

    codes = bytes(range(256))
    done = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", raw, "-ar", "8000", "-ac", "1", "-i", "-",
                           "-f", "s16le", "-"], input=codes, capture_output=True, check=True)  # fmt: skip
    expected = np.frombuffer(done.stdout, "<i2").astype(np.float32) / 32768.0
    assert np.array_equal(g711_table(kind), expected)


def test_formats_give_the_same_16k_signal():
    """Speech through each input format (encoded by ffmpeg) comes out as nearly the same 16 kHz
    signal; G.711's 8 kHz band and companding cost some accuracy, not the shape."""
    speech = synth.speak("hello world")
    out = {}
    for name, fmt in [("pcm24", AudioFormat("audio/pcm", 24000)), ("pcm16", AudioFormat("audio/pcm", 16000)),
                      ("pcmu", AudioFormat(PCMU, 8000)), ("pcma", AudioFormat(PCMA, 8000))]:  # fmt: skip
        data = encode_input(speech, name)
        decoder = InputDecoder(fmt)
        step = 333  # odd: PCM16 chunks end inside a sample
        out[name] = np.concatenate([decoder.decode(data[i : i + step]) for i in range(0, len(data), step)])
        assert decoder.bytes_in == len(data)
    n = min(len(v) for v in out.values()) - 200
    for name, got in out.items():
        ref = speech[:n]  # the resampler is centred: no delay, sample n is at n / 16000 s
        err = got[:n] - ref
        assert np.sqrt(np.mean(err**2)) < 0.25 * np.sqrt(np.mean(ref**2)), name


def test_parse_format_takes_what_it_documents():
    assert parse_format({"type": "audio/pcm"}) == AudioFormat("audio/pcm", 24000)
    assert parse_format({"type": "audio/pcm", "rate": 16000}).rate == 16000
    assert parse_format({"type": "audio/pcmu"}) == AudioFormat(PCMU, 8000)
    for bad in [{"type": "audio/pcm", "rate": 44100}, {"type": "audio/opus"}, {"type": "audio/pcmu", "rate": 16000},
                "pcm16", {"type": "audio/pcm", "rate": True}]:  # fmt: skip
        with pytest.raises(FormatError):
            parse_format(bad)


def test_turn_detector_rules():
    params = VadParams(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500)  # 16 frames of silence
    det = TurnDetector(params, origin=1000)
    probs = np.array([0.1] * 5 + [0.9] + [0.1] + [0.9] * 10 + [0.4] * 20 + [0.2] * 16 + [0.1] * 3, np.float32)
    events = det.feed(probs[:30]) + det.feed(probs[30:])
    # a single loud frame starts nothing; two in a row do, at the first of them; 0.4 is still
    # speech (hysteresis down to 0.35); 16 frames under it end the turn at the end of the 16th
    assert events == [Started(1000 + 7 * FRAME), Stopped(1000 + (17 + 20 + 16) * FRAME)]
    assert not det.in_speech


def test_live_vad_equals_the_file_vad():
    """The live stream's probabilities, fed in 20 ms chunks, are the worker's file VAD's on the
    whole array (same model, same context handling)."""
    audio = np.concatenate([np.zeros(8000, np.float32), synth.speak("one two three"), np.zeros(8000, np.float32)])
    live = chunked(SpeechProbs(vad.ensure_vad()).push, audio, most=321)
    whole = vad.vad_probs(vad.reader(audio), len(audio))
    n = len(audio) // FRAME
    assert len(live) == n
    assert np.allclose(live, whole[:n], atol=1e-5)
    assert live.max() > 0.9 and live[:10].max() < 0.5
