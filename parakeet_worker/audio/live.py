"""Live audio in: the Realtime API's input formats, decoded to 16 kHz mono float32 as they arrive.

A live session sends its audio as many small base64 chunks (20-100 ms each). Each chunk is decoded
and resampled here, in-process, once, with numpy: PCM16 little-endian at 24 kHz (OpenAI's
`audio/pcm`), PCM16 at 16 kHz (this worker's extension: `{"type": "audio/pcm", "rate": 16000}`,
taken as is), and G.711 mu-law (`audio/pcmu`) and A-law (`audio/pcma`) at 8 kHz. The resampler
keeps its filter history between chunks, so the stream comes out exactly as if it had arrived in
one piece (no clicks at chunk edges, no drift in length).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from math import gcd
from typing import Any

import numpy as np

from parakeet_worker.config import SAMPLE_RATE

PCM, PCMU, PCMA = "audio/pcm", "audio/pcmu", "audio/pcma"
PCM_RATES = (24_000, 16_000)  # 24 kHz is OpenAI's; 16 kHz is this worker's extension
G711_RATE = 8_000
# The low-pass filter: 32 input samples either side of each output, Kaiser-windowed, cut off at 95%
# of the lower Nyquist frequency. Measured: 24 kHz in is flat (-0.3 dB) to 7 kHz and down 63 dB at
# 8.5 kHz (which would fold back to 7.5 kHz); 8 kHz in is flat to 3.5 kHz (telephone speech's band).
FILTER_HALF_WIDTH = 32
KAISER_BETA = 8.0
CUTOFF = 0.475


class FormatError(ValueError):
    """An input format this worker does not take; the message says what it does take."""


@dataclass(frozen=True)
class AudioFormat:
    """One of the session's input formats: its type and sample rate."""

    type: str = PCM
    rate: int = 24_000

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self.type == PCM else 1

    def as_dict(self) -> dict[str, Any]:
        """As the session object shows it (OpenAI's shape)."""
        return {"type": self.type, "rate": self.rate}


def parse_format(value: Any) -> AudioFormat:
    """`session.audio.input.format` as a client sends it: {"type": "audio/pcm", "rate": 24000 or
    16000} or {"type": "audio/pcmu" | "audio/pcma"} (8 kHz). FormatError for anything else."""
    if not isinstance(value, dict):
        raise FormatError("audio.input.format must be an object such as {\"type\": \"audio/pcm\", \"rate\": 24000}")
    kind = value.get("type", PCM)
    rate = value.get("rate")
    if kind == PCM:
        rate = 24_000 if rate is None else rate
        if isinstance(rate, bool) or rate not in PCM_RATES:
            raise FormatError(f"audio/pcm takes rate 24000 (OpenAI's) or 16000 (this worker's extension), not {rate!r}")
        return AudioFormat(PCM, int(rate))
    if kind in (PCMU, PCMA):
        if rate not in (None, G711_RATE):
            raise FormatError(f"{kind} is 8 kHz G.711; rate {rate!r} is not supported")
        return AudioFormat(kind, G711_RATE)
    raise FormatError(f"unsupported audio format {kind!r}: send audio/pcm (24 or 16 kHz), audio/pcmu or audio/pcma")


# --- G.711: 256-entry tables, built once ---------------------------------------------------------


@functools.cache
def g711_table(kind: str) -> np.ndarray:
    """The linear value (float32, full scale 1.0) of each of the 256 G.711 codes, as ITU-T G.711
    defines them (the classic Sun g711.c expansion)."""
    codes = np.arange(256, dtype=np.int32)
    if kind == PCMU:
        u = ~codes & 0xFF
        exponent, mantissa = (u >> 4) & 0x07, u & 0x0F
        magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
        linear = np.where(u & 0x80, -magnitude, magnitude)
    elif kind == PCMA:
        a = codes ^ 0x55
        exponent, mantissa = (a >> 4) & 0x07, (a & 0x0F) << 4
        magnitude = np.where(exponent == 0, mantissa + 8, (mantissa + 0x108) << np.maximum(exponent - 1, 0))
        linear = np.where(a & 0x80, magnitude, -magnitude)
    else:
        raise FormatError(f"not a G.711 format: {kind!r}")
    table = (linear / 32768.0).astype(np.float32)
    table.setflags(write=False)
    return table


# --- Resampling: a streaming polyphase FIR -------------------------------------------------------


@functools.cache
def _polyphase(up: int, down: int) -> np.ndarray:
    """The low-pass filter for resampling by up/down, cut into `up` phases: row p holds the taps
    that weigh input samples i_lo, i_lo+1, ... for an output whose phase is p. Kaiser-windowed
    sinc, gain `up` (zero stuffing divides the level by up)."""
    half = FILTER_HALF_WIDTH * up  # the filter's centre, in upsampled samples
    n = 2 * half + 1
    fc = CUTOFF / max(up, down)  # cycles per upsampled sample
    t = np.arange(n) - half
    h = up * 2 * fc * np.sinc(2 * fc * t) * np.kaiser(n, KAISER_BETA)
    taps = 2 * FILTER_HALF_WIDTH + 1
    table = np.zeros((up, taps), np.float64)
    for phase in range(up):
        j = 2 * half - phase - up * np.arange(taps)
        table[phase] = np.where(j >= 0, h[np.clip(j, 0, n - 1)], 0.0)
    return table.astype(np.float32)


class StreamResampler:
    """Resample one stream chunk by chunk, carrying the filter's history, so that the chunks come
    out sample for sample as the whole stream would. The filter is centred (output sample n is at
    n / rate_out s, no delay), so the outputs of the last FILTER_HALF_WIDTH input samples (1.3 ms
    at 24 kHz, 4 ms at 8 kHz) wait for the next chunk."""

    def __init__(self, rate_in: int, rate_out: int = SAMPLE_RATE):
        g = gcd(rate_in, rate_out)
        self.up, self.down = rate_out // g, rate_in // g
        self.table = _polyphase(self.up, self.down) if (self.up, self.down) != (1, 1) else None
        self.taps = 2 * FILTER_HALF_WIDTH + 1
        self.history = np.zeros(self.taps, np.float32)  # input before the chunk, from index hist_start
        self.hist_start = -self.taps
        self.received = 0  # input samples so far
        self.produced = 0  # output samples so far

    def push(self, x: np.ndarray) -> np.ndarray:
        """The output samples that `x` (float32) completes."""
        if self.table is None:
            return x.astype(np.float32, copy=False)
        buf = np.concatenate([self.history, x.astype(np.float32, copy=False)])
        self.received += len(x)
        up, down, c = self.up, self.down, FILTER_HALF_WIDTH * self.up
        last = self.received - 1  # the newest input index
        n_hi = (last * up - c) // down  # the newest output whose taps have all arrived
        n = np.arange(self.produced, n_hi + 1, dtype=np.int64)
        out = np.zeros(0, np.float32)
        if len(n):
            q = n * down - c
            i_lo = -((-q) // up)  # ceil(q / up): the first input each output weighs
            phase = i_lo * up - q
            rows = buf[(i_lo - self.hist_start)[:, None] + np.arange(self.taps)[None, :]]
            out = np.einsum("ij,ij->i", rows, self.table[phase]).astype(np.float32)
            self.produced = int(n_hi) + 1
        keep_from = -((-(self.produced * down - c)) // up)  # the next output's first input
        cut = max(0, min(len(buf), keep_from - self.hist_start))
        self.history, self.hist_start = buf[cut:].copy(), self.hist_start + cut
        return out


# --- One session's input: bytes in the declared format -> 16 kHz float32 ---------------------------


class InputDecoder:
    """Turns the session's appended audio (bytes, in its declared format) into 16 kHz mono float32.
    A chunk that ends inside a 16-bit sample keeps that byte for the next one."""

    def __init__(self, fmt: AudioFormat):
        self.format = fmt
        self.resampler = StreamResampler(fmt.rate)
        self.carry = b""
        self.bytes_in = 0

    def decode(self, data: bytes) -> np.ndarray:
        self.bytes_in += len(data)
        if self.format.type == PCM:
            data = self.carry + data
            whole = len(data) - len(data) % 2
            self.carry = data[whole:]
            samples = np.frombuffer(data[:whole], dtype="<i2").astype(np.float32) / 32768.0
        else:
            samples = g711_table(self.format.type)[np.frombuffer(data, dtype=np.uint8)]
        return self.resampler.push(samples)
