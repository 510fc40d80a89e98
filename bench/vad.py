"""Voice activity detection on call-like audio: an hour of calls, about half of it silence, some
of it noise and hold music, through handler() with `vad` off and on.

    make bench                              # part of it: python -m bench.vad
    python -m bench.vad --minutes 10        # shorter, for development
    python -m bench.vad --model-minutes 20  # VAD's cost on the whole hour, the model on 20 min

The audio is twelve 5-minute calls: turns of speech in the demo model's vocabulary (two or three
utterances of the shared bank with short gaps), between pauses of 1 to 10 s; a faint line hiss
throughout, and a quarter of the longer pauses filled with white noise or a swelling chord
("hold music"). Built once, cached under bench/out/ by its spec. Measured, in this process:

- VAD alone: silero on every call, one after the other on one core (_speech_regions), and how much
  it finds against the speech that is really there;
- the handler on the same calls (or the first --model-minutes of them) with `vad` false and true:
  wall, seconds of audio the model was given (stats.speech_sec), seconds inside model calls
  (_forward_decode) and inside VAD (_vad_probs), summed over threads, and WER against the script;
- the first load of the VAD model (the worker's start with VAD=on pays it).

Prints a table and writes bench/out/vad.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from bench import common
from bench.common import OUT, SAMPLE_RATE, timed
from parakeet_worker import config, transcript
from parakeet_worker.analysis import vad
from tools import synth, testkit

SPEC_VERSION = 1
CALL_MIN = 5.0
TARGETS = {"model_over_speech": 1.10, "vad_sec_per_hour": 15.0}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=60.0, help="audio in all (5-minute calls)")
    p.add_argument("--model-minutes", type=float, default=None, help="give the handler only the first calls")
    p.add_argument("--seed", type=int, default=19)
    common.add_model_args(p)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Audio: calls with a known script and known speech.
# ---------------------------------------------------------------------------------------------


def _hold(rng: np.random.Generator, n: int) -> np.ndarray:
    """A pause's filler: white noise, or a chord whose notes swell and fade."""
    if rng.random() < 0.5:
        return (rng.standard_normal(n) * rng.uniform(0.005, 0.03)).astype(np.float32)
    t = np.arange(n) / SAMPLE_RATE
    root = rng.uniform(180, 300)
    notes = [root, root * 1.26, root * 1.5, root * 2]
    chord = sum(np.sin(2 * np.pi * f * t) * (0.5 + 0.5 * np.sin(np.pi * t * 0.7 + i)) for i, f in enumerate(notes))
    return (chord * rng.uniform(0.01, 0.04)).astype(np.float32)


def build_calls(spec: dict[str, Any]) -> list[tuple[Path, list[str], float]]:
    """The calls of `spec`, cached in bench/out/vad-<key>/ (written once)."""
    folder = OUT / f"vad-{common.spec_key(spec)}"
    index = folder / "calls.json"
    if index.is_file():
        return [(Path(p), words, speech) for p, words, speech in json.loads(index.read_text())]
    folder.mkdir(parents=True, exist_ok=True)
    bank = common.utterance_bank(spec["seed"], spec["bank"])
    rng = np.random.default_rng(spec["seed"])
    calls = []
    for n in range(max(1, round(spec["minutes"] / CALL_MIN))):
        path = folder / f"call-{n:02d}.wav"
        script, speech = _call(path, CALL_MIN * 60, rng, bank)
        calls.append((path, script, speech / SAMPLE_RATE))
    index.write_text(json.dumps([(str(p), w, s) for p, w, s in calls]))
    return calls


def _call(path: Path, seconds: float, rng: np.random.Generator, bank: Sequence[common.Utterance]) -> tuple[list[str], int]:
    """One call: turns of two or three utterances between pauses, written to `path`."""
    total = round(seconds * SAMPLE_RATE)
    out = np.zeros(total, np.float32)
    script: list[str] = []
    pos, speech = int(0.5 * SAMPLE_RATE), 0
    while True:
        turn: list[np.ndarray] = []
        words: list[str] = []
        for k in range(int(rng.integers(2, 4))):
            utt = bank[int(rng.integers(len(bank)))]
            if k:
                turn.append(np.zeros(int(rng.uniform(0.1, 0.4) * SAMPLE_RATE), np.float32))
            turn.append(synth.trim(utt.audio))
            words.extend(utt.words)
        audio = np.concatenate(turn)
        if pos + len(audio) > total - SAMPLE_RATE:
            break
        out[pos : pos + len(audio)] = audio
        script.extend(words)
        speech += len(audio)
        pos += len(audio)
        pause = int(rng.uniform(1.0, 10.0) * SAMPLE_RATE)
        if pause > 3 * SAMPLE_RATE and rng.random() < 0.25:
            lead = int(0.5 * SAMPLE_RATE)  # the filler starts after the last word has faded
            end = min(total, pos + pause - lead)
            out[pos + lead : end] += _hold(rng, max(0, end - pos - lead))
        pos += pause
    out += (rng.standard_normal(total) * 3e-4).astype(np.float32)  # line hiss
    sf.write(str(path), out, SAMPLE_RATE, subtype="PCM_16")
    return script, speech


# ---------------------------------------------------------------------------------------------
# Measuring.
# ---------------------------------------------------------------------------------------------


def vad_alone(worker: Any, calls: Sequence[tuple[Path, list[str], float]]) -> dict[str, Any]:
    """silero on every call in turn (one core): its seconds, and what it found."""
    padded = 0.0
    started = time.perf_counter()
    for path, _, _ in calls:
        frames = sf.info(str(path)).frames
        item = transcript.Prepared(index=0, source=str(path), wav=path, frames=frames)
        regions = vad.speech_regions(item)
        padded += sum(hi - lo for lo, hi in regions) / SAMPLE_RATE
    sec = time.perf_counter() - started
    audio = sum(sf.info(str(p)).frames for p, _, _ in calls) / SAMPLE_RATE
    return {"sec": round(sec, 2), "audio_sec": round(audio, 1), "sec_per_hour": round(sec * 3600 / audio, 2),
            "regions_sec": round(padded, 1)}  # fmt: skip


def through_handler(worker: Any, calls: Sequence[tuple[Path, list[str], float]], vad: bool) -> dict[str, Any]:
    """One job with every call, `vad` as given: wall, model and VAD seconds, WER."""
    targets = {"_forward_decode": "model:forward_decode", "_vad_probs": "analysis.vad:vad_probs"}
    totals = common.instrument(targets)
    job = {"id": f"vad-{vad}", "input": {"inputs": [{"source": str(p)} for p, _, _ in calls], "vad": vad}}
    try:
        out, wall = timed(lambda: asyncio.run(worker.handler(job)))
    finally:
        common.uninstrument(targets)  # the next phase measures afresh
    if "error" in out:
        raise SystemExit(f"the handler failed: {out['error']}")
    errors = words = 0
    for (_, script, _), result in zip(calls, out["results"], strict=True):
        if "error" in result:
            raise SystemExit(f"the handler failed on {result['source']}: {result['error']}")
        errors += testkit.word_errors(script, result["text"].split())
        words += len(script)
    stats = out["stats"]
    return {
        "wall_sec": round(wall, 2), "audio_sec": stats["audio_sec"], "model_given_sec": stats["speech_sec"],
        "model_call_sec": round(totals["_forward_decode"], 2), "vad_sec": round(totals["_vad_probs"], 2),
        "batches": stats["batches"], "word_errors": errors, "words": words, "wer": round(errors / max(1, words), 4),
    }  # fmt: skip


def measure(args: argparse.Namespace) -> dict[str, Any]:
    common.configure_env(**({"PARAKEET_MODEL": args.model} if args.model else {}))
    spec = {"version": SPEC_VERSION, "minutes": args.minutes, "seed": args.seed, "bank": 400}
    calls, build_sec = timed(lambda: build_calls(spec))
    speech = sum(s for _, _, s in calls)
    print(f"audio: {len(calls)} calls of {CALL_MIN:g} min, {speech:.0f} s of speech (built in {build_sec:.0f} s)", flush=True)
    waited = common.wait_until_quiet(args.wait_quiet) if args.wait_quiet else None
    import handler as worker

    worker.ensure_model()
    _, load_sec = timed(vad.ensure_vad)
    some = calls if args.model_minutes is None else calls[: max(1, round(args.model_minutes / CALL_MIN))]
    some_speech = sum(s for _, _, s in some)
    r: dict[str, Any] = {"machine": common.machine_info(str(config.CFG.model)), "wait_quiet": waited,
                         "spec": spec, "calls": len(calls), "speech_sec": round(speech, 1), "vad_load_sec": round(load_sec, 3),
                         "pad_sec": vad.VAD_PAD_SEC, "bridge_sec": vad.VAD_BRIDGE_SEC}  # fmt: skip
    with common.ForeignLoad() as load:
        print("VAD alone on every call ...", flush=True)
        r["vad_alone"] = vad_alone(worker, calls)
        print(f"handler on {len(some)} calls, vad off and on ...", flush=True)
        r["handler_calls"], r["handler_speech_sec"] = len(some), round(some_speech, 1)
        r["vad_off"] = through_handler(worker, some, vad=False)
        r["vad_on"] = through_handler(worker, some, vad=True)
    r["other_processes"] = load.summary()
    on, off = r["vad_on"], r["vad_off"]
    r["checks"] = {
        "model_over_speech": round(on["model_given_sec"] / some_speech, 3),
        "model_given_within_target": on["model_given_sec"] <= TARGETS["model_over_speech"] * some_speech,
        "vad_within_target": r["vad_alone"]["sec_per_hour"] <= TARGETS["vad_sec_per_hour"],
        "wer_not_worse": on["word_errors"] <= off["word_errors"],
    }
    return r


def report(r: dict[str, Any]) -> str:
    on, off, alone = r["vad_on"], r["vad_off"], r["vad_alone"]
    rows = [
        [name, x["wall_sec"], x["audio_sec"], x["model_given_sec"], x["model_call_sec"], x["vad_sec"], x["batches"], f"{x['wer']:.2%}"]
        for name, x in (("vad off", off), ("vad on", on))
    ]
    head = ["job", "wall s", "audio s", "model given s", "in model calls s", "in VAD s", "batches", "WER"]
    lines = [
        common.markdown_table(head, rows),
        "",
        f"speech in those calls: {r['handler_speech_sec']} s; the model was given {r['checks']['model_over_speech']}x that "
        f"(target <= {TARGETS['model_over_speech']})",
        f"VAD alone on all {r['calls']} calls ({alone['audio_sec']:.0f} s): {alone['sec']} s on one core = "
        f"{alone['sec_per_hour']} s per hour (target <= {TARGETS['vad_sec_per_hour']:g}); regions {alone['regions_sec']} s "
        f"for {r['speech_sec']} s of speech",
        f"VAD model load: {r['vad_load_sec']} s; other processes: {r['other_processes']['mean_cpu_percent']}% CPU on average",
        f"checks: {r['checks']}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    r = measure(parse_args(argv))
    print(report(r))
    print(f"\nraw numbers in {common.write_json('vad.json', r)}")
    return r


if __name__ == "__main__":
    main()
