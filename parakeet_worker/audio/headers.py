"""What an audio file's header declares (length, channels), read by bounded code of our own
(never libsndfile on untrusted bytes), and what decoding it should cost ffmpeg."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("parakeet-worker")


# --- Headers: what a file declares (length, channels), read by bounded code of our own -------


# ffmpeg's CPU cost on one core (Debian's ffmpeg 5.1, measured on this project's benchmark
# workload): ~55 ms to start, then milliseconds per MB of input by container. Only an estimate,
# used to order and group the work.
FFMPEG_START_MS = 55.0
DECODE_MS_PER_MB = {b"RIFF": 3.0, b"RF64": 3.0, b"FORM": 3.0, b"fLaC": 22.0, b"OggS": 300.0}
DECODE_MS_PER_MB_OTHER = 75.0  # mp3, m4a/mp4 (58), webm, anything else


# The size says little where silence compresses to nearly nothing: a 50 KB FLAC can hold two
# minutes of 7-channel 192 kHz audio, a second of ffmpeg. Where the header says how many samples
# there are (FLAC, Ogg), those count too: ~4 ms per million samples decoded (all channels,
# resampling included) plus ~0.23 ms per second of 16 kHz WAV written. bench/decode_cost.py fits
# these to Debian's ffmpeg 5.1 decoding FLAC silence from 16 kHz mono to 192 kHz 7.0: two runs on
# this project's 2-core machine (load average ~6) gave 3.9 and 4.7 ms, 0.21 and 0.28 ms.
DECODE_MS_PER_MSAMPLE = 4.0
DECODE_MS_PER_OUT_SEC = 0.23


def decode_cost_ms(src: Path) -> float:
    """Estimated ffmpeg decode time of `src`, without its start-up: its size times its format's
    rate, or what its header's sample count says, whichever is more."""
    if not src.is_file():  # a FIFO would block this open; ffmpeg's timeout deals with it
        return 0.0
    with open(src, "rb") as f:
        head = f.read(4096)
        by_size = src.stat().st_size / 1e6 * DECODE_MS_PER_MB.get(head[:4], DECODE_MS_PER_MB_OTHER)
        try:
            declared = declared_length(f, head)
        except (OSError, ValueError, IndexError):
            declared = None
    if declared is None:
        return by_size
    samples, seconds = declared
    return max(by_size, samples / 1e6 * DECODE_MS_PER_MSAMPLE + seconds * DECODE_MS_PER_OUT_SEC)


def declared_length(f: Any, head: bytes) -> tuple[float, float] | None:
    """(samples in all channels, seconds) as the file's header declares them: FLAC's STREAMINFO,
    or an Ogg Opus/Vorbis stream's channels and rate with its last page's granule position. None
    for other formats, or a header that does not say."""
    if head[:4] == b"fLaC" and head[4] & 0x7F == 0:  # STREAMINFO, always the first block
        bits = int.from_bytes(head[18:26], "big")
        rate, channels, frames = bits >> 44, ((bits >> 41) & 7) + 1, bits & (2**36 - 1)
        return (frames * channels, frames / rate) if rate and frames else None
    if head[:4] != b"OggS":
        return None
    packet = head[27 + head[26] :]
    if packet[:8] == b"OpusHead":
        channels, rate = packet[9], 48000  # Opus granule positions count 48 kHz samples
    elif packet[:7] == b"\x01vorbis":
        channels, rate = packet[11], int.from_bytes(packet[12:16], "little")
    else:
        return None
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 65536))  # an Ogg page is at most 65,307 bytes
    tail = f.read()
    at = tail.rfind(b"OggS")
    while at >= 0:  # the last page that ends a packet (granule position != -1)
        granule = int.from_bytes(tail[at + 6 : at + 14], "little", signed=True)
        if tail[at + 4] == 0 and granule > 0:
            return (granule * channels, granule / rate) if rate and channels else None
        at = tail.rfind(b"OggS", 0, at)
    return None


# A WAV's fmt and data chunks come within its first few chunks; a file with more before its data
# is sized by its bytes instead (see wav_bytes_estimate).
RIFF_MAX_CHUNKS = 64


def riff_header(f: Any, size: int) -> tuple[float | None, int | None]:
    """(seconds, channels) a RIFF or RF64 WAV of `size` bytes declares, None for what its header
    does not say. Seconds: its data chunk's bytes (at most what the file holds past the chunk's
    start) over its fmt chunk's byte rate. The project's own reader, not libsndfile: a LIST chunk sized
    0xFFFFFFF0 holding another chunk of that size made sf.info() spin for ever in the worker's
    process. This reads at most RIFF_MAX_CHUNKS chunk headers, each further into the file than
    the last, and stops at the first one that claims more bytes than the file has."""
    f.seek(0)
    head = f.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
        return None, None
    pos, byte_rate, channels, ds64_data = 12, 0, None, None
    for _ in range(RIFF_MAX_CHUNKS):
        f.seek(pos)
        chunk = f.read(8)
        if len(chunk) < 8:
            break
        cid, csize, body = chunk[:4], int.from_bytes(chunk[4:8], "little"), pos + 8
        if cid == b"data":
            if head[:4] == b"RF64" and csize == 0xFFFFFFFF and ds64_data is not None:
                csize = ds64_data
            left = size - body
            data_bytes = left if csize == 0 or csize > left else csize  # 0: written while streaming
            return (data_bytes / byte_rate if byte_rate else None), channels
        fields = f.read(min(csize, 16))
        if cid == b"fmt " and len(fields) >= 12:
            channels, byte_rate = int.from_bytes(fields[2:4], "little"), int.from_bytes(fields[8:12], "little")
        elif cid == b"ds64" and len(fields) >= 16:  # RF64: riff size, then data size, 64 bits each
            ds64_data = int.from_bytes(fields[8:16], "little")
        pos = body + csize + (csize & 1)
        if pos + 8 > size:
            break
    return None, channels


def declared_channels(src: Path) -> int | None:
    """How many channels the header of `src` declares (WAV, Ogg Vorbis or Opus; FLAC has at most
    8), read as riff_header reads, bounded; None where it does not say or cannot be read."""
    if not src.is_file():  # a FIFO would block this open; ffmpeg's timeout deals with it
        return None
    try:
        with open(src, "rb") as f:
            head = f.read(4096)
            if head[:4] in (b"RIFF", b"RF64"):
                return riff_header(f, os.fstat(f.fileno()).st_size)[1]
    except (OSError, ValueError):
        return None
    if head[:4] == b"OggS" and len(head) > 27:
        packet = head[27 + head[26] :]
        if packet[:8] == b"OpusHead" and len(packet) > 9:
            return packet[9]
        if packet[:7] == b"\x01vorbis" and len(packet) > 11:
            return packet[11]
    return None
