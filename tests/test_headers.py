"""Hostile audio headers cannot hang the worker: the worker reads RIFF/RF64/FLAC/Ogg headers with
code of its own that is bounded (no libsndfile call on untrusted bytes in its process). A seeded
fuzz over the four containers, with the eight headers that made libsndfile spin for ever as
fixed cases, and those eight in a real job next to a good item."""

from __future__ import annotations

import base64
import io
import random
import struct
import threading

import numpy as np
import soundfile as sf
from conftest import DATA_ROOT, run_job, speech_file, words_of

from parakeet_worker.audio import disk, headers

# A RIFF header whose LIST chunk (0xFFFFFFF0 or 0xFFFFFFFF bytes) holds an INFO list with a
# sub-chunk claiming 0xFFFFFFF0 bytes: sf.info() on any of these never returned (libsndfile 1.2).
HANG_HEADERS = [
    b"RIFF" + struct.pack("<I", 0x18C) + b"WAVE" + b"LIST" + struct.pack("<I", outer) + b"INFOINAM\0\0\0\0"
    + inner + struct.pack("<I", 0xFFFFFFF0) + b" \x1c"
    for outer in (0xFFFFFFF0, 0xFFFFFFFF) for inner in (b"LIST", b"bext", b"fact", b"cue ")
]  # fmt: skip
assert HANG_HEADERS[1].hex() == "524946468c010000574156454c495354f0ffffff494e464f494e414d0000000062657874f0ffffff201c"

FUZZ_CASES = 1500
FUZZ_BUDGET_SEC = 120.0  # the cases take well under a second; a hang fails the test instead of holding it


def _chunk(cid: bytes, size: int, body: bytes = b"") -> bytes:
    return cid + struct.pack("<I", size) + body


def _fuzzed_riff(rng: random.Random) -> bytes:
    """A RIFF or RF64 header of random chunks with edge-case sizes, cut short at random."""
    sizes = [0, 1, 3, 16, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFE, 0xFFFFFFFF]
    out = rng.choice([b"RIFF", b"RF64"]) + struct.pack("<I", rng.choice([*sizes, rng.getrandbits(32)])) + b"WAVE"
    for _ in range(rng.randint(0, 6)):
        cid = rng.choice([b"LIST", b"bext", b"fact", b"cue ", b"fmt ", b"data", b"ds64", b"JUNK", b"INFO"])
        size = rng.choice([*sizes, rng.getrandbits(32), rng.randint(0, 64)])
        out += _chunk(cid, size, rng.randbytes(rng.choice([0, 4, 12, 16, 28])))
    return out[: rng.randint(12, len(out))] if rng.random() < 0.3 else out


def _mutated(good: bytes, rng: random.Random) -> bytes:
    """A real file's first bytes with a few flipped, maybe cut short."""
    data = bytearray(good[:4096])
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(min(len(data), 96))] = rng.getrandbits(8)
    return bytes(data[: rng.randint(4, len(data))] if rng.random() < 0.3 else data)


def _encoded(fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000, np.float32), 16000, format=fmt, subtype=subtype)
    return buf.getvalue()


def test_fuzzed_headers_are_read_in_bounded_time(worker):
    rng = random.Random(18)
    seeds = [_encoded("WAV"), _encoded("RF64"), _encoded("FLAC"), _encoded("OGG", "VORBIS")]
    cases = list(HANG_HEADERS)
    while len(cases) < FUZZ_CASES:
        cases.append(_fuzzed_riff(rng) if rng.random() < 0.5 else _mutated(rng.choice(seeds), rng))
    path = DATA_ROOT / "fuzzed.bin"
    estimates: list[int] = []
    failures: list[BaseException] = []

    def read_all() -> None:
        try:
            for data in cases:
                path.write_bytes(data)
                estimates.append(disk.wav_bytes_estimate(path))
                headers.decode_cost_ms(path)
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            failures.append(exc)

    reader = threading.Thread(target=read_all, daemon=True)  # a hung libsndfile call cannot be killed
    reader.start()
    reader.join(FUZZ_BUDGET_SEC)
    assert not reader.is_alive(), f"header reading hung at case {len(estimates)} of {len(cases)}"
    assert not failures, failures
    cap = disk.max_wav_bytes()
    assert all(0 < e <= cap for e in estimates)


def test_wav_estimate_reads_real_headers(worker, tmp_path):
    """The reader gets real WAVs right: extra chunks before the data, RF64, several channels."""
    rng = np.random.default_rng(0)
    for n, (fmt, rate, channels, seconds) in enumerate([("WAV", 44100, 2, 3.0), ("RF64", 8000, 1, 5.5), ("WAV", 48000, 9, 1.25)]):
        path = tmp_path / f"{n}.wav"
        sf.write(path, 0.1 * rng.standard_normal((int(rate * seconds), channels)), rate, format=fmt)
        data = path.read_bytes()
        if fmt == "WAV":  # a LIST and a junk chunk (odd size, padded) between the fmt and data chunks
            at = data.index(b"data")
            extra = _chunk(b"LIST", 16, b"INFOINAM\4\0\0\0abc\0") + _chunk(b"JUNK", 3, b"xyz\0")
            data = data[:4] + struct.pack("<I", len(data) - 8 + len(extra)) + data[8:at] + extra + data[at:]
            path.write_bytes(data)
        assert abs(sf.info(str(path)).duration - seconds) < 1e-3
        expected = seconds * disk.WAV_BYTES_PER_SEC * 1.01 + 65536
        assert abs(disk.wav_bytes_estimate(path) - expected) < 64, (fmt, channels)


def test_hostile_headers_next_to_a_good_item(worker):
    good = speech_file("one two three", "wav")
    inputs = [{"audio_base64": base64.b64encode(h).decode()} for h in HANG_HEADERS] + [{"source": str(good)}]
    outcome: list = []
    runner = threading.Thread(target=lambda: outcome.append(run_job(worker, inputs)), daemon=True)
    runner.start()
    runner.join(180)
    assert not runner.is_alive(), "the job hung"
    assert outcome, "the job raised"
    results = outcome[0]["results"]
    for result in results[:-1]:
        assert result.get("code") in ("not_audio", "empty_audio"), result
    assert words_of(results[-1]["text"]) == ["one", "two", "three"]
