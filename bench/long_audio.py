"""Hours of audio through handler(): wall time, RTFx, peak memory, WER and word timestamps.

    make bench-long                                  # 3 hours: python -m bench.long_audio
    python -m bench.long_audio --minutes 30          # shorter, for development
    python -m bench.long_audio --split               # MAX_SINGLE_PASS_SEC=3600: the splitting path
    python -m bench.long_audio --minutes 60 --piece 1800   # pieces of 30 min (long_audio-piece1800.json)
    python -m bench.long_audio --wait-quiet 900      # on a shared machine: start once it is idle

The audio is speech in the demo vocabulary with pauses, streamed to a 16 kHz WAV (the generator
never holds it whole), encoded to --format, and cached in bench/out/ by its spec. The handler runs
in a child process, so the peak RSS read through RUSAGE_CHILDREN is the worker's, not the
generator's; the config keeps LOCAL_ATTENTION_AFTER_SEC=1440 and MAX_SINGLE_PASS_SEC=10800 (3600
with --split, --piece's value otherwise), so a 3-hour file takes the real local-attention path. Note that between 10 and 24
minutes the item runs alone with full attention, whose memory grows with the square of the
length (~25 GB at 20 minutes for the demo model on CPU): develop with --minutes 30 or more.

Prints a table and writes bench/out/long_audio.json (long_audio-split.json with --split; the
transcript goes to long_audio.hyp.txt).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import common
from bench.common import OUT, REPO, SAMPLE_RATE, timed
from parakeet_worker import config, pieces
from parakeet_worker import model as asr
from tools import testkit

SPEC_VERSION = 1
CODECS = {"wav": ("-c:a", "pcm_s16le"), "flac": ("-c:a", "flac"), "mp3": ("-c:a", "libmp3lame", "-b:a", "64k")}
PINNED = ("LOCAL_ATTENTION_AFTER_SEC", "MAX_SINGLE_PASS_SEC", "SHORT_MAX_SEC", "MAX_AUDIO_SEC")


# ---------------------------------------------------------------------------------------------
# The audio and its script
# ---------------------------------------------------------------------------------------------


def build_audio(spec: dict[str, Any]) -> tuple[Path, list[str]]:
    """The long file and its script, made once per spec (streamed: hours cost no memory)."""
    stem = OUT / f"long-{common.spec_key(spec)}"
    audio, script_file = stem.with_suffix("." + spec["format"]), stem.with_suffix(".words.txt")
    if audio.is_file() and script_file.is_file():
        return audio, script_file.read_text().split()
    OUT.mkdir(parents=True, exist_ok=True)
    bank = common.utterance_bank(spec["seed"], spec["bank"])
    wav = stem.with_suffix(".partial.wav")
    script = common.write_speech(wav, spec["minutes"] * 60, spec["seed"], bank)
    if spec["format"] == "wav":
        wav.rename(audio)
    else:
        partial = stem.with_suffix(".partial." + spec["format"])
        testkit.encode(wav, partial, "-map_metadata", "-1", codec=CODECS[spec["format"]], rate=SAMPLE_RATE, channels=1)
        partial.rename(audio)
        wav.unlink()
    script_file.write_text(" ".join(script) + "\n")
    return audio, script


# ---------------------------------------------------------------------------------------------
# The child: imports handler (loads the model), runs one job, writes what it saw.
# ---------------------------------------------------------------------------------------------


def run_child(request_file: Path) -> None:
    request = json.loads(request_file.read_text())
    started = time.perf_counter()
    handler = testkit.load_worker()
    load_sec = time.perf_counter() - started
    spent = common.instrument()
    cuts = record_split_points(handler)
    job = {"id": "bench-long", "input": {"inputs": [{"source": request["source"]}], "timestamps": True}}
    phases: dict[str, Any] = {}
    with common.phase(phases, "handler"):
        out, wall = timed(lambda: asyncio.run(handler.handler(job)))
    Path(request["transcript"]).write_text(json.dumps(out))
    summary = {
        "load_sec": load_sec,
        "wall_sec": wall,
        "phase_sec": spent,
        "split_cuts_sec": [c / SAMPLE_RATE for c in cuts],
        "local_attention_at_end": asr.state().local_attention,
        "config": {k: getattr(config.CFG, k) for k in ("local_attention_after_sec", "local_attention_context",
                                                        "max_single_pass_sec", "short_max_sec", "prepare_workers")},
        "peak_rss_mb": {"handler_phase": phases["handler"]["peak_rss_mb"], "process": common.process_peak_mb(),
                        "ffmpeg": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024},
    }  # fmt: skip
    Path(request["result"]).write_text(json.dumps(summary, default=str))


def record_split_points(worker: Any) -> list[int]:
    """Wrap pieces.split_points to keep the frame offsets where the long item was cut."""
    cuts: list[int] = []
    original = pieces.split_points

    def wrapped(item: Any, piece_sec: float, *rest: Any) -> list[int]:
        found = original(item, piece_sec, *rest)
        cuts.extend(found)
        return found

    pieces.split_points = wrapped
    return cuts


def run_in_child(source: Path, env: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any], float]:
    """(child summary, handler response, child peak RSS in MB from RUSAGE_CHILDREN)."""
    request = {"source": str(source), "result": str(OUT / "long_audio.child.json"),
               "transcript": str(OUT / "long_audio.response.json")}  # fmt: skip
    request_file = OUT / "long_audio.request.json"
    request_file.write_text(json.dumps(request))
    subprocess.run(
        [sys.executable, "-m", "bench.long_audio", "--child", str(request_file)], env=env, cwd=REPO, check=True
    )
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    summary = json.loads(Path(request["result"]).read_text())
    response = json.loads(Path(request["transcript"]).read_text())
    return summary, response, child_peak


# ---------------------------------------------------------------------------------------------
# Checks and report
# ---------------------------------------------------------------------------------------------


def timestamp_checks(result: dict[str, Any], duration: float) -> dict[str, Any]:
    """Word timestamps: how many, whether starts and ends only move forward, and whether they
    stay inside the audio and match the text word for word."""
    words = result.get("timestamps", {}).get("word", [])
    starts, ends = [w["start"] for w in words], [w["end"] for w in words]
    return {
        "words": len(words),
        "text_words": len(result.get("text", "").split()),
        "same_words_as_text": [w["word"] for w in words] == result.get("text", "").split(),
        "monotonic": _monotonic(starts, ends),
        "backward_steps": sum(1 for a, b in itertools.pairwise(starts) if b < a),
        "within_audio": not words or (starts[0] >= 0 and ends[-1] <= duration + 0.5),
        "segments": len(result.get("timestamps", {}).get("segment", [])),
    }


def _monotonic(starts: list[float], ends: list[float]) -> bool:
    ordered = starts == sorted(starts) and ends == sorted(ends)
    return ordered and all(s <= e for s, e in zip(starts, ends, strict=True))


def path_taken(duration: float, config: dict[str, Any]) -> str:
    if duration > config["max_single_pass_sec"]:
        return f"split at MAX_SINGLE_PASS_SEC={config['max_single_pass_sec']:g}, pieces with local attention"
    if duration > config["local_attention_after_sec"]:
        return "one pass, local attention"
    return "one pass, full attention" if duration > config["short_max_sec"] else "batched (short)"


def report(r: dict[str, Any]) -> str:
    ts, mem = r["timestamps"], r["peak_rss_mb"]
    rows = [
        ("audio", f"{r['audio_sec'] / 3600:.2f} h ({r['format']})"),
        ("path", r["path"]),
        ("pieces (cut at, s)", f"{len(r['split_cuts_sec']) + 1} ({', '.join(f'{c:.0f}' for c in r['split_cuts_sec'])})"
         if r["split_cuts_sec"] else "1"),
        ("model load (child import), s", r["load_sec"]),
        ("handler wall, s", r["wall_sec"]),
        ("RTFx (audio s / wall s)", r["rtfx"]),
        ("time in ffmpeg decode / model forward+decode, s",
         f"{r['phase_sec'].get('_run_ffmpeg', 0):.1f} / {r['phase_sec'].get('_forward_decode', 0):.1f}"),
        ("peak RSS, handler child (RUSAGE_CHILDREN), MB", mem["child"]),
        ("peak RSS, handler phase only, MB", mem["handler_phase"]),
        ("WER (words)", f"{r['wer']:.4f} ({r['word_errors']} errors / {r['script_words']} words)"),
        ("timestamp words (text words)", f"{ts['words']} ({ts['text_words']})"),
        ("timestamps monotonic", ts["monotonic"]),
        ("timestamp words == text words", ts["same_words_as_text"]),
        ("other processes' CPU %, mean / max (want ~0)", f"{r['other_processes']['mean_cpu_percent']:.0f} / "
         f"{r['other_processes']['max_cpu_percent']:.0f}"),
    ]  # fmt: skip
    return common.markdown_table(("metric", "value"), rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=180.0, help="length of the audio (default 3 hours)")
    p.add_argument("--split", action="store_true", help="MAX_SINGLE_PASS_SEC=3600: exercise the splitting path")
    p.add_argument("--piece", type=float, help="MAX_SINGLE_PASS_SEC=PIECE: pieces of this many seconds")
    p.add_argument("--format", choices=sorted(CODECS), default="flac", help="container the worker decodes")
    p.add_argument("--seed", type=int, default=7)
    common.add_model_args(p)
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child_env(args: argparse.Namespace) -> dict[str, str]:
    """The worker's env, with the long-audio thresholds at their defaults (or --split's)."""
    base = {k: v for k, v in os.environ.items() if k not in PINNED}
    piece = args.piece or (3600 if args.split else 10800)  # 10800: one pass up to 3 hours
    extra = {"MAX_SINGLE_PASS_SEC": f"{piece:g}"}
    if args.model:
        extra["PARAKEET_MODEL"] = args.model
    return common.worker_env(base, **extra)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child:
        run_child(args.child)
        return None
    r = measure(args)
    print(report(r))
    name = f"long_audio-piece{args.piece:g}.json" if args.piece else "long_audio-split.json" if args.split else "long_audio.json"
    print(f"\nraw numbers in {common.write_json(name, r)}")
    return r


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Build (or reuse) the audio, run the handler on it in a child, and check what came back."""
    env = child_env(args)
    spec = {"version": SPEC_VERSION, "minutes": args.minutes, "seed": args.seed, "format": args.format, "bank": 600}
    (source, script), build_sec = timed(lambda: build_audio(spec))
    print(f"audio: {source} ({args.minutes:g} min, built in {build_sec:.0f} s); running the handler ...", flush=True)
    waited = common.wait_until_quiet(args.wait_quiet) if args.wait_quiet else None
    machine = common.machine_info(env["PARAKEET_MODEL"])
    with common.ForeignLoad() as load:
        (child, response, child_peak), total = timed(lambda: run_in_child(source, env))
    result = response["results"][0]
    if "error" in result:
        raise SystemExit(f"the handler failed: {result}")
    (OUT / "long_audio.hyp.txt").write_text(result["text"] + "\n")
    errors = testkit.word_errors(script, result["text"].split())
    return {
        "machine": machine,
        "wait_quiet": waited,
        "other_processes": load.summary(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "source": str(source), "format": args.format, "build_sec": build_sec, "child_total_sec": total,
        "audio_sec": result["duration"], "stats": response["stats"],
        "load_sec": child["load_sec"], "wall_sec": child["wall_sec"], "rtfx": result["duration"] / child["wall_sec"],
        "phase_sec": child["phase_sec"], "split_cuts_sec": child["split_cuts_sec"][1:],
        "path": path_taken(result["duration"], child["config"]), "config": child["config"],
        "local_attention_at_end": child["local_attention_at_end"],
        "peak_rss_mb": {"child": child_peak, **child["peak_rss_mb"]},
        "script_words": len(script), "word_errors": errors, "wer": errors / max(1, len(script)),
        "timestamps": timestamp_checks(result, result["duration"]),
    }  # fmt: skip


if __name__ == "__main__":
    main()
