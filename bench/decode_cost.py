"""Measure what ffmpeg's decode to 16 kHz mono WAV costs per sample, for handler.py's
DECODE_MS_PER_MSAMPLE and DECODE_MS_PER_OUT_SEC (the cost estimate of files whose header gives
their sample count).

    python -m bench.decode_cost

FLAC digital silence of several rates and channel counts (a few KB each, so the file size says
nothing) is decoded the way the worker does (ffmpeg.ffmpeg_cmd); each run's user+sys CPU time,
the best of --repeat, minus an empty run's (ffmpeg's start-up), is fitted by least squares as
a * million input samples (all channels) + b * seconds of audio. CPU time, not wall time: on a
shared machine it moves far less with the neighbours' load.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.common import REPO, markdown_table
from parakeet_worker.audio import ffmpeg

# (sample rate, channel layout, channels, seconds)
CASES = ((16000, "mono", 1, 600), (48000, "stereo", 2, 300), (44100, "stereo", 2, 300),
         (96000, "5.1", 6, 120), (192000, "7.0", 7, 120))  # fmt: skip


def child_cpu(cmd: list[str]) -> float:
    """user+sys CPU seconds of one run of `cmd` (its children's rusage delta)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ["SKIP_MODEL_LOAD"] = "1"
    sys.path.insert(0, str(REPO))

    with tempfile.TemporaryDirectory(prefix="decode-cost-") as tmp:
        work = Path(tmp)
        out = work / "out.wav"
        empty = work / "empty.flac"
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                        "anullsrc=r=16000:cl=mono", "-t", "0.01", "-c:a", "flac", str(empty)], check=True)  # fmt: skip
        start = min(child_cpu(ffmpeg.ffmpeg_cmd([(empty, out)])) for _ in range(args.repeat))
        rows, x, y = [], [], []
        for rate, layout, channels, seconds in CASES:
            src = work / f"{rate}-{channels}.flac"
            subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                            f"anullsrc=r={rate}:cl={layout}", "-t", str(seconds), "-c:a", "flac", str(src)],
                           check=True)  # fmt: skip
            cpu = min(child_cpu(ffmpeg.ffmpeg_cmd([(src, out)])) for _ in range(args.repeat)) - start
            msamples = rate * channels * seconds / 1e6
            x.append((msamples, seconds))
            y.append(cpu * 1000)
            rows.append((f"{rate} Hz x {channels}", seconds, src.stat().st_size, round(msamples, 1), round(cpu * 1000)))
        (a, b), *_ = np.linalg.lstsq(np.array(x), np.array(y), rcond=None)
        fit = [round(a * m + b * s) for m, s in x]
        print(f"ffmpeg start-up: {start * 1000:.0f} ms CPU (best of {args.repeat})")
        print(markdown_table(["FLAC silence", "seconds", "bytes", "M samples", "CPU ms", "fit ms"],
                             [(*r, f) for r, f in zip(rows, fit, strict=True)]))  # fmt: skip
        print(f"fit: {a:.2f} ms per million input samples + {b:.3f} ms per second of audio")


if __name__ == "__main__":
    main()
