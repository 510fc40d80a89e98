"""The memory model against measured passes, and what each plan costs in accuracy.

    python -m bench.memory_model                              # fit, then every point (~15 min on 2 cores)
    python -m bench.memory_model --points full:5,local:30     # some points (the fit is reused)
    python -m bench.memory_model --cap-gb 6 --refit           # a new fit; points over 6 GB predicted only

1. Fit: a child process loads the model and runs the start-up probes (parakeet_worker.memory's
   DEFAULT_PROBES: short passes of noise in both attention modes), each measured, and fits the
   PassCost. Written to bench/out/memory_model.fit.json (memory_model-<model>.fit.json with
   --model) and reused by later runs (--refit).
2. Points: one child process per (attention mode, minutes): it loads the model, reads speech of
   that length (espeak-ng in the demo vocabulary, with pauses; cached under bench/out/), runs
   one pass of it in that mode as the worker does (measured like a probe: the rows read from the
   WAV and the model call), decodes it, and reports the pass's measured peak, its own peak RSS
   (VmHWM: the whole child, model load included) and the WER. A point whose predicted peak RSS is
   over --cap-gb is not run: it is listed as "predicted, not run: over the bench cap".
The children run with the image's malloc settings (MALLOC_ARENA_MAX=2,
MALLOC_MMAP_THRESHOLD_=131072).

3. Plans: for a few memory budgets (what this machine has free now, and fixed ones), what the
   worker would choose at each length: attention mode and piece length, with the predicted peak,
   and the WER measured for that mode and length where it was run.

Prints tables and writes bench/out/memory_model.json (-<model>.json). On a GPU machine the same run measures
torch's allocator peak instead of RSS (parakeet_worker.memory.measure).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from bench.common import OUT, REPO
from parakeet_worker import memory
from parakeet_worker import model as asr
from parakeet_worker.memory import FULL, LOCAL, GiB, MiB
from tools import testkit

SPEC_VERSION = 1


def stem(args: argparse.Namespace) -> str:
    """memory_model, or memory_model-<model file> for another model than the demo's."""
    return f"memory_model-{Path(args.model).stem}" if args.model else "memory_model"
DEFAULT_POINTS = [(FULL, m) for m in (2, 3, 4, 5, 7, 10, 15, 20, 30)] + [(LOCAL, m) for m in (2, 5, 10, 15, 20, 30)]
BUDGETS_GB = (2.0, 4.0, 8.0, 16.0, 24.0, 40.0, 80.0)

# ---------------------------------------------------------------------------------------------
# The children: each loads the model, runs its passes, writes what it saw.
# ---------------------------------------------------------------------------------------------


class Worker:
    """The worker's own model path in this process: its model load and decoding config
    (testkit.load_worker) and its model call (model.run_model), the attention mode forced per
    pass (model.set_attention)."""

    def __init__(self) -> None:
        testkit.load_worker()
        self.model = asr.loaded_model()
        self.device = str(asr.state().device)

    def set_mode(self, mode: str) -> None:
        asr.set_attention(self.model, mode == LOCAL)

    def run(self, audio: np.ndarray, lengths: list[int], mode: str) -> list[str]:
        """One pass as the scheduler runs it: encoder and greedy decoding, texts out."""
        self.set_mode(mode)
        return [t.text for t in asr.run_model(self.model, audio, lengths, False)]

    def probe(self) -> memory.PassRunner:
        """The start-up probe: noise through the encoder (parakeet_worker.memory.encoder_pass)."""
        return memory.encoder_pass(self.model, self.device, self.set_mode, asr.state().autocast)


def child_fit(request: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    w = Worker()
    load_sec = time.perf_counter() - started
    memory.trim_heap()
    base = memory.process_rss() or 0
    started = time.perf_counter()
    cost, probes = memory.calibrate(w.probe(), w.device, margin=request["margin"])  # measured here, never the cache
    return {"device": w.device, "load_sec": load_sec, "fit_sec": time.perf_counter() - started,
            "base_rss": base, "cost": cost.to_dict(), "probes": [dataclasses.asdict(p) for p in probes],
            "vm_hwm": memory.process_rss(key="VmHWM:")}  # fmt: skip


def child_pass(request: dict[str, Any]) -> dict[str, Any]:
    import soundfile as sf

    w = Worker()
    w.probe()(20.0, 1, request["mode"])  # as after start-up: the probes ran, the mode is set
    memory.trim_heap()
    base = memory.process_rss() or 0
    texts: list[str] = []

    def one_pass() -> None:
        audio, _ = sf.read(request["wav"], dtype="float32", always_2d=False)
        audio = audio[None, :]
        texts.extend(w.run(audio, [audio.shape[1]], request["mode"]))

    started = time.perf_counter()
    extra = memory.measure(one_pass, w.device)
    wall = time.perf_counter() - started
    script = Path(request["script"]).read_text().split()
    errors = testkit.word_errors(script, texts[0].split())
    return {"device": w.device, "base_rss": base, "extra": extra, "wall_sec": wall,
            "vm_hwm": memory.process_rss(key="VmHWM:"), "words": len(script), "word_errors": errors,
            "wer": errors / max(1, len(script))}  # fmt: skip


def run_child(kind: str, request: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """One measurement in a child process of its own (its peak RSS is its own)."""
    OUT.mkdir(parents=True, exist_ok=True)
    request_file = OUT / f"memory_model.{kind}.request.json"
    result_file = OUT / f"memory_model.{kind}.result.json"
    result_file.unlink(missing_ok=True)
    request_file.write_text(json.dumps({**request, "result": str(result_file)}))
    subprocess.run([sys.executable, "-m", "bench.memory_model", "--child", kind, str(request_file)],
                   env=env, cwd=REPO, check=True)  # fmt: skip
    return json.loads(result_file.read_text())


# ---------------------------------------------------------------------------------------------
# The parent: fit, points, plans
# ---------------------------------------------------------------------------------------------


def speech(minutes: float) -> tuple[Path, Path]:
    """A cached WAV of `minutes` of speech and its script."""
    spec = {"version": SPEC_VERSION, "minutes": minutes, "seed": 11, "bank": 200}
    stem = OUT / f"memory-speech-{common.spec_key(spec)}"
    wav, script = stem.with_suffix(".wav"), stem.with_suffix(".words.txt")
    if not (wav.is_file() and script.is_file()):
        OUT.mkdir(parents=True, exist_ok=True)
        partial = stem.with_suffix(".partial.wav")
        words = common.write_speech(partial, minutes * 60, spec["seed"], common.utterance_bank(spec["seed"], spec["bank"]))
        script.write_text(" ".join(words) + "\n")
        partial.rename(wav)
    return wav, script


def the_fit(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    fit_file = OUT / f"{stem(args)}.fit.json"
    if fit_file.is_file() and not args.refit:
        return json.loads(fit_file.read_text())
    print("fitting: the start-up probes in a child ...", flush=True)
    fit = run_child("fit", {"margin": args.margin}, env)
    fit_file.write_text(json.dumps(fit, indent=2) + "\n")
    return fit


def point(mode: str, minutes: float, cost: memory.PassCost, base: int, args: argparse.Namespace,
          env: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    seconds = minutes * 60
    row: dict[str, Any] = {"mode": mode, "minutes": minutes, "predicted_extra": cost.raw(seconds, 1, mode),
                           "predicted_extra_with_margin": cost.peak(seconds, 1, mode)}  # fmt: skip
    row["predicted_rss"] = base + row["predicted_extra_with_margin"]
    if row["predicted_rss"] > args.cap_gb * GiB:
        row["status"] = "predicted, not run: over the bench cap"
        return row
    wav, script = speech(minutes)
    print(f"{mode} attention, {minutes:g} min: running (predicted peak RSS {row['predicted_rss'] / GiB:.2f} GB) ...",
          flush=True)  # fmt: skip
    got = run_child("pass", {"mode": mode, "wav": str(wav), "script": str(script)}, env)
    row.update(status="run", measured_extra=got["extra"], measured_rss=got["vm_hwm"], child_base_rss=got["base_rss"],
               wall_sec=got["wall_sec"], wer=got["wer"], words=got["words"], device=got["device"],
               extra_error=row["predicted_extra"] / max(1, got["extra"]) - 1,
               fits_prediction=got["extra"] <= row["predicted_extra_with_margin"])  # fmt: skip
    return row


def plans(cost: memory.PassCost, base: int, rows: list[dict[str, Any]], cfg: dict[str, float]) -> list[dict[str, Any]]:
    """What the worker would choose at each length for each budget (the whole process may
    hold `budget`: a pass gets budget - base), and the WER measured for that choice."""
    now = memory.cpu_headroom()
    budgets = [("this machine now (" + now.source + ")", (now.free or 0))] + [
        (f"{gb:g} GB", int(gb * GiB) - base) for gb in BUDGETS_GB]  # fmt: skip
    wer = {(r["mode"], r["minutes"]): r.get("wer") for r in rows}
    minutes = sorted({r["minutes"] for r in rows})
    out = []
    for name, free in budgets:
        room = memory.Headroom("plan", max(0, free), name)
        lim = memory.limits(cost, room, cfg["local_after"], cfg["max_single_pass"], cfg["piece_min"])
        for m in minutes:
            seconds = m * 60
            piece = min(seconds, lim.piece_sec)
            plan = memory.plan_pass(cost, [piece], room.free, cfg["local_after"])
            out.append({"budget": name, "free_for_a_pass": room.free, "minutes": m, "mode": plan.mode,
                        "fits": plan.fits, "pieces": math.ceil(seconds / piece), "piece_sec": piece,
                        "predicted_extra": plan.predicted, "full_up_to_sec": lim.full_sec,
                        "wer_of_this_mode_one_pass": wer.get((plan.mode, m))})  # fmt: skip
    return out


def report(result: dict[str, Any]) -> str:
    fit = result["fit"]
    lines = [f"fit: {len(fit['probes'])} probes on {fit['device']} in {fit['fit_sec']:.1f} s "
             f"(model load {fit['load_sec']:.1f} s, base RSS {fit['base_rss'] / GiB:.2f} GB)"]  # fmt: skip
    c = fit["cost"]
    lines.append(f"cost: full {c['full_fixed'] / MiB:.1f} MB + {c['full_per_sec'] / MiB:.3f} MB/s + "
                 f"{c['full_per_sec2'] / 1024:.2f} KB/s^2; local {c['local_fixed'] / MiB:.1f} MB + "
                 f"{c['local_per_sec'] / MiB:.3f} MB/s; margin {c['margin']:.0%}\n")  # fmt: skip
    head = ("mode", "min", "predicted extra MB", "+margin MB", "measured extra MB", "error", "peak RSS GB (pred / meas)",
            "WER", "wall s", "status")  # fmt: skip
    rows = [(r["mode"], r["minutes"], r["predicted_extra"] / MiB, r["predicted_extra_with_margin"] / MiB,
             r.get("measured_extra", 0) / MiB if "measured_extra" in r else None,
             f"{r['extra_error']:+.0%}" if "extra_error" in r else None,
             f"{r['predicted_rss'] / GiB:.2f} / " + (f"{r['measured_rss'] / GiB:.2f}" if "measured_rss" in r else "-"),
             r.get("wer"), r.get("wall_sec"), r["status"]) for r in result["points"]]  # fmt: skip
    lines.append(common.markdown_table(head, rows))
    lines.append("")
    phead = ("budget", "min", "plan", "predicted extra MB", "full attention up to s", "WER (that mode, one pass)")
    prow = [(p["budget"], p["minutes"],
             f"{p['mode']}, {p['pieces']} x {p['piece_sec']:.0f} s" + ("" if p["fits"] else " (does not fit)"),
             (p["predicted_extra"] or 0) / MiB, p["full_up_to_sec"], p["wer_of_this_mode_one_pass"])
            for p in result["plans"]]  # fmt: skip
    lines.append(common.markdown_table(phead, prow))
    return "\n".join(lines)


def parse_points(text: str | None) -> list[tuple[str, float]]:
    if not text:
        return DEFAULT_POINTS
    out = []
    for part in text.split(","):
        mode, _, minutes = part.partition(":")
        if mode not in (FULL, LOCAL):
            raise SystemExit(f"--points: {part!r} is not full:MIN or local:MIN")
        out.append((mode, float(minutes)))
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", help="mode:minutes,... (default: full 2-30 min, local 2-30 min)")
    p.add_argument("--cap-gb", type=float, default=6.0, help="points predicted over this peak RSS are not run")
    p.add_argument("--margin", type=float, default=memory.DEFAULT_MARGIN)
    p.add_argument("--refit", action="store_true", help="fit again instead of reusing memory_model.fit.json")
    common.add_model_args(p)
    p.add_argument("--child", nargs=2, metavar=("KIND", "REQUEST"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child:
        kind, request_file = args.child
        request = json.loads(Path(request_file).read_text())
        result = child_fit(request) if kind == "fit" else child_pass(request)
        Path(request["result"]).write_text(json.dumps(result))
        return None
    extra = {"PARAKEET_MODEL": args.model} if args.model else {}
    # the image's malloc settings (as `make bench` runs bench.memory): resident memory then says what is in use
    env = common.worker_env(None, MALLOC_ARENA_MAX="2", MALLOC_MMAP_THRESHOLD_="131072", **extra)
    waited = common.wait_until_quiet(args.wait_quiet) if args.wait_quiet else None
    machine = common.machine_info(env["PARAKEET_MODEL"])
    with common.ForeignLoad() as load:
        fit = the_fit(args, env)
        cost = memory.PassCost.from_dict(fit["cost"])
        if args.margin != cost.margin:
            cost = dataclasses.replace(cost, margin=args.margin)
        previous = {}
        if (OUT / f"{stem(args)}.json").is_file():  # points run before (another --points) stay in the table
            old = json.loads((OUT / f"{stem(args)}.json").read_text())
            previous = {(r["mode"], r["minutes"]): r for r in old.get("points", []) if old.get("fit") == fit}
        for mode, minutes in parse_points(args.points):
            previous[(mode, minutes)] = point(mode, minutes, cost, fit["base_rss"], args, env)
    rows = [previous[k] for k in sorted(previous)]
    cfg = {"local_after": 1440.0, "max_single_pass": 1800.0, "piece_min": 60.0}
    result = {"machine": machine, "wait_quiet": waited, "other_processes": load.summary(), "cap_gb": args.cap_gb,
              "fit": fit, "points": rows, "config_caps": cfg, "plans": plans(cost, fit["base_rss"], rows, cfg)}  # fmt: skip
    print(report(result))
    print(f"\nraw numbers in {common.write_json(f'{stem(args)}.json', result)}")
    return result


if __name__ == "__main__":
    main()
