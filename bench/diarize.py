"""Diarization (handler's Speakers section) on this machine: cost per minute of audio, the
attribution scores of the tests' conversations, and peak memory for an hour.

    python -m bench.diarize                 # all three (the hour takes several minutes on 2 cores)
    python -m bench.diarize --hour-min 0    # without the long file
    python -m bench.diarize --only-hour     # only the long file, merged into the last report

Every measurement runs speakers.diarize() in a child process (the model loaded and warmed up on
a short clip first), so the peak RSS it reports is the diarization's own, and so is its CPU time.
The conversations are tools/testkit.conversation (the tests' voices and seeds); the long file is
2-minute two-voice conversations (one seed each, never a repeat: exact copies of windows would
fool the nearest-neighbour pruning of the clustering), written as a 16 kHz WAV. Prints a table and writes
bench/out/diarize.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import OUT, REPO

CHILD = r"""
import json, resource, sys, threading, time
import soundfile as sf
import handler
from tools import synth
from parakeet_worker.analysis import speakers
path, warm = sys.argv[1], sys.argv[2]
speakers.diarize(synth.write(warm, synth.speak("one two three four five six seven", "en-us")), 0,
                sf.info(warm).frames, speakers.SpeakerCount(), threading.Event())
base = resource.getrusage(resource.RUSAGE_SELF)
frames = sf.info(path).frames
t0, c0 = time.perf_counter(), time.process_time()
turns = speakers.diarize(__import__("pathlib").Path(path), 0, frames, speakers.SpeakerCount(), threading.Event()).turns
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"audio_sec": frames / 16000, "wall_sec": wall, "cpu_sec": cpu, "rss_before_mb": base.ru_maxrss / 1024,
                  "rss_peak_mb": peak / 1024, "turns": [t.as_dict() for t in turns]}))
"""

# The tests' conversations (tests/test_speakers.py) and a few more seeds.
CONVERSATIONS = [
    ("two voices (test)", (0, 1) * 6, 11), ("two voices", (0, 1) * 6, 12),
    ("three voices (test)", (0, 1, 2) * 4, 21), ("three voices", (0, 1, 2) * 4, 22),
    ("one voice (test)", (0,) * 10, 31), ("two voices, short (test)", (0, 1, 0, 1), 41),
]  # fmt: skip


def run_child(path: Path, tmp: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(tmp / "warm.wav")],
        cwd=REPO, capture_output=True, text=True, check=False, env={**os.environ, "LOG_LEVEL": "WARNING"},
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cost-min", type=float, default=2.0, help="minutes of two-voice audio for the cost")
    parser.add_argument("--hour-min", type=float, default=60.0, help="minutes of the long file (0: skip)")
    parser.add_argument("--only-hour", action="store_true", help="only the long file (merged into diarize.json)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from tools import synth
    from tools.testkit import attribution, conversation

    out_file = OUT / "diarize.json"
    report: dict[str, Any] = json.loads(out_file.read_text()) if args.only_hour and out_file.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="bench-diarize-") as tmp_name:
        tmp = Path(tmp_name)
        for name, speakers, seed in [] if args.only_hour else CONVERSATIONS:
            audio, truth, _ = conversation(list(speakers), seed)
            got = run_child(synth.write(tmp / "c.wav", audio), tmp)
            score = attribution(truth, got["turns"])
            found = len({t["speaker"] for t in got["turns"]})
            report.setdefault("conversations", []).append(
                {"name": name, "seed": seed, "true_speakers": len(set(speakers)), "found": found,
                 "audio_sec": round(got["audio_sec"], 1), "attribution": round(score, 4)}
            )  # fmt: skip
            print(f"{name:28s} seed {seed}: {found} of {len(set(speakers))} speakers, attribution {score:.3f}", flush=True)
            save(out_file, report)

        # Cost: a two-voice conversation of --cost-min minutes (turns of 4-8 words).
        turns = int(args.cost_min * 60 / 2.9)
        audio, truth, _ = conversation([i % 2 for i in range(turns)], 7)
        if not args.only_hour:
            cost(report, run_child(synth.write(tmp / "cost.wav", audio), tmp))
            clustering(report)
            save(out_file, report)

        if args.hour_min > 0:  # 2-minute conversations of the same two voices, each of its own seed
            import soundfile as sf

            long, at, long_truth = tmp / "hour.wav", 0.0, []
            with sf.SoundFile(str(long), "w", 16000, 1, "PCM_16") as f:
                for seed in itertools.count(100):
                    if at >= args.hour_min * 60:
                        break
                    part, part_truth, _ = conversation([i % 2 for i in range(turns)], seed)
                    f.write(part)
                    long_truth += [(w, a + at, b + at) for w, a, b in part_truth]
                    at += len(part) / 16000
            got = run_child(long, tmp)
            report["hour"] = {
                "audio_sec": round(got["audio_sec"], 1), "wall_sec": round(got["wall_sec"], 1), "cpu_sec": round(got["cpu_sec"], 1),
                "rss_before_mb": round(got["rss_before_mb"]), "rss_peak_mb": round(got["rss_peak_mb"]),
                "speakers_found": len({t["speaker"] for t in got["turns"]}), "turns": len(got["turns"]),
                "attribution": round(attribution(long_truth, got["turns"]), 4),
            }  # fmt: skip
            print(f"long file: {got['audio_sec'] / 60:.0f} min in {got['wall_sec']:.0f} s wall; peak RSS "
                  f"{got['rss_peak_mb']:.0f} MB (after model load and warm-up {got['rss_before_mb']:.0f} MB); "
                  f"{report['hour']['speakers_found']} speakers, attribution {report['hour']['attribution']}", flush=True)  # fmt: skip
    save(out_file, report)
    print(f"wrote {out_file}")


def save(out_file: Path, report: dict[str, Any]) -> None:
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(report, indent=2))


def clustering(report: dict[str, Any]) -> None:
    """The one step that grows faster than the audio: clustering an hour's windows (4,800, one
    per 0.75 s) of two speakers, here synthetic 192-dim embeddings around two random centres
    (0.5 cosine apart, as the test voices are); time and peak memory (numpy's, by tracemalloc)."""
    import time
    import tracemalloc

    from parakeet_worker.analysis import speakers

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 192))
    b = 0.5 * a / np.linalg.norm(a) * np.linalg.norm(b) + np.sqrt(0.75) * b
    who = rng.integers(0, 2, 4800)
    emb = np.where(who[:, None] == 0, a, b) + 0.6 * np.linalg.norm(a) / np.sqrt(192) * rng.standard_normal((4800, 192))
    tracemalloc.start()
    t0 = time.perf_counter()
    labels = speakers.cluster(emb.astype(np.float32), speakers.SpeakerCount())
    wall = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    agree = max(np.mean(labels == who), np.mean(labels == 1 - who)) if len(set(labels)) == 2 else 0.0
    report["cluster_hour"] = {"windows": 4800, "wall_sec": round(wall, 2), "peak_mb": round(peak / 2**20, 1),
                              "clusters": len(set(labels)), "agreement": round(float(agree), 4)}  # fmt: skip
    print(f"clustering 4,800 windows (an hour): {wall:.2f} s, peak {peak / 2**20:.0f} MB, "
          f"{len(set(labels))} clusters", flush=True)  # fmt: skip


def cost(report: dict[str, Any], got: dict[str, Any]) -> None:
    minutes = got["audio_sec"] / 60
    report["cost"] = {
        "audio_sec": round(got["audio_sec"], 1), "wall_sec": round(got["wall_sec"], 2), "cpu_sec": round(got["cpu_sec"], 2),
        "wall_sec_per_audio_min": round(got["wall_sec"] / minutes, 2), "cpu_sec_per_audio_min": round(got["cpu_sec"] / minutes, 2),
        "rss_before_mb": round(got["rss_before_mb"]), "rss_peak_mb": round(got["rss_peak_mb"]),
    }  # fmt: skip
    print(f"cost: {got['audio_sec']:.0f} s of audio in {got['wall_sec']:.1f} s wall, {got['cpu_sec']:.1f} s CPU: "
          f"{report['cost']['wall_sec_per_audio_min']} s wall per audio minute", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
