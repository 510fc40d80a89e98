"""Throughput of the worker on one mixed workload, against the ways it replaces.

    make bench                        # PARAKEET_MODEL=models/demo-tdt.nemo python -m bench.throughput
    python -m bench.throughput --files 8 --max-sec 30 --model /tmp/devmodel/dev.nemo   # quick check
    python -m bench.throughput --wait-quiet 900      # on a shared machine: start once it is idle

The workload: --files speech files (the demo vocabulary, espeak-ng voices, pauses) with durations
log-uniform from --min-sec to --max-sec, in mp3, m4a, ogg/opus, flac and wav at 8/16/44.1/48 kHz,
some stereo, served by a real HTTP server on 127.0.0.1. On it, in one process:

1. prepare: the handler's own prepare path (_fetch_to_wav on its pool) vs the sequential way
   (requests download, ffmpeg to 16 kHz WAV, ffprobe for the length), in audio s per wall s;
2. end to end: handler() vs NeMo's transcribe() on the files' paths (NeMo reads and resamples
   them itself) and vs the model-only floor (transcribe() on decoded arrays sorted by length);
3. the padding efficiency of the handler's batches; 4. import and model-load time in fresh
   processes; 5. peak RSS, of the process and of each phase.

Prints a table and writes every raw number to bench/out/throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import requests

from bench import common
from bench.common import OUT, REPO, SAMPLE_RATE, fmt, timed
from parakeet_worker import config, transcript
from parakeet_worker import job as jobs
from parakeet_worker import model as asr
from parakeet_worker.audio import disk
from tools import testkit

# (suffix, ffmpeg codec arguments, sample rate, channels); file i gets FORMATS[i % len].
FORMATS: tuple[tuple[str, tuple[str, ...], int, int], ...] = (
    ("mp3", ("-c:a", "libmp3lame", "-b:a", "64k"), 44100, 1),
    ("m4a", ("-c:a", "aac", "-b:a", "96k"), 48000, 2),
    ("ogg", ("-c:a", "libopus", "-b:a", "32k"), 48000, 1),
    ("flac", ("-c:a", "flac"), 16000, 1),
    ("wav", ("-c:a", "pcm_s16le"), 8000, 1),
    ("wav", ("-c:a", "pcm_s16le"), 44100, 2),
    ("opus", ("-c:a", "libopus", "-b:a", "48k"), 48000, 2),
    ("wav", ("-c:a", "pcm_s16le"), 48000, 1),
    ("flac", ("-c:a", "flac"), 44100, 2),
    ("mp3", ("-c:a", "libmp3lame", "-b:a", "48k"), 22050, 2),
)

WORKLOAD_VERSION = 1  # bump when the generator changes, so cached workloads are rebuilt
NEMO_BATCH_SIZE = 16
# Full attention needs memory ~ items x longest^2 (~6 GB for one 10-minute item with the demo
# model's 4 heads). NeMo's fixed batch_size=16 would put up to 16 ten-minute items in one batch
# (~100 GB): the NeMo runs also cut a batch where it would pass what the handler's own largest
# batch may use (two 10-minute items, ~13 GB), so that they fit in this machine's RAM.
ATTENTION_BUDGET_S2 = 2 * 600.0**2
TARGETS = {"prepare_speedup": 3.0, "handler_vs_nemo_paths": 0.6, "handler_vs_floor": 1.1,
           "padding_efficiency": 0.9, "import_overhead_sec": 0.5}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------


def workload_spec(args: argparse.Namespace) -> dict[str, Any]:
    return {"version": WORKLOAD_VERSION, "files": args.files, "seed": args.seed, "min_sec": args.min_sec,
            "max_sec": args.max_sec, "formats": FORMATS, "bank": 300}  # fmt: skip


def durations(spec: dict[str, Any]) -> list[float]:
    """Log-uniform lengths with both ends included, in a seeded random order (so containers
    and lengths are not correlated)."""
    rng = np.random.default_rng(spec["seed"])
    lo, hi = np.log(spec["min_sec"]), np.log(spec["max_sec"])
    inner = np.exp(rng.uniform(lo, hi, spec["files"] - 2))
    return [round(float(d), 3) for d in rng.permutation([spec["min_sec"], spec["max_sec"], *inner])]


def build_workload(spec: dict[str, Any]) -> tuple[Path, list[dict[str, Any]]]:
    """The workload's files and manifest, made once per spec and then read from bench/out."""
    root = OUT / f"workload-{common.spec_key(spec)}"
    manifest = root / "manifest.json"
    if manifest.is_file():
        return root, json.loads(manifest.read_text())
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    bank = common.utterance_bank(spec["seed"], spec["bank"])

    def make(i: int, seconds: float) -> dict[str, Any]:
        suffix, codec, rate, channels = FORMATS[i % len(FORMATS)]
        name = f"{i:03d}-{round(seconds)}s-{rate // 1000}k-{channels}ch.{suffix}"
        src = partial / f"{i:03d}.src.wav"
        script = common.write_speech(src, seconds, seed=spec["seed"] * 1000 + i, bank=bank)
        testkit.encode(src, partial / name, "-map_metadata", "-1", codec=codec, rate=rate, channels=channels)
        src.unlink()
        return {
            "name": name,
            "seconds": seconds,
            "rate": rate,
            "channels": channels,
            "format": suffix,
            "script": script,
        }

    with cf.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        files = list(pool.map(make, range(spec["files"]), durations(spec)))
    (partial / "manifest.json").write_text(json.dumps(files, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return root, files


# ---------------------------------------------------------------------------------------------
# 1. Prepare throughput
# ---------------------------------------------------------------------------------------------


def prepare_with_handler(worker: Any, urls: Sequence[str]) -> tuple[float, float]:
    """(audio seconds, wall seconds) of the handler's prepare path, exactly as handler() runs it."""
    Path(config.CFG.tmp_dir).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-prepare-", dir=config.CFG.tmp_dir))
    items: list[Any] = []
    try:
        started = time.perf_counter()
        futures = [jobs.prepare_pool().submit(worker._fetch_to_wav, i, {"source": u}, workdir) for i, u in enumerate(urls)]
        items = [f.result() for f in cf.as_completed(futures)]
        wall = time.perf_counter() - started
    finally:
        for item in items:
            disk.budget().release(item.wav)
        shutil.rmtree(workdir, ignore_errors=True)
    return sum(p.duration for p in items), wall


def prepare_sequentially(urls: Sequence[str]) -> tuple[float, float]:
    """The seed's way, one file at a time: requests to a file, ffmpeg to 16 kHz mono WAV,
    ffprobe for the duration."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-seq-"))
    total = 0.0
    try:
        started = time.perf_counter()
        for i, url in enumerate(urls):
            src, wav = workdir / f"{i}.src", workdir / f"{i}.wav"
            with requests.get(url, stream=True, timeout=60) as response:
                response.raise_for_status()
                with open(src, "wb") as out:
                    for chunk in response.iter_content(1 << 20):
                        out.write(chunk)
            subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(src),
                            "-ac", "1", "-ar", str(SAMPLE_RATE), "-c:a", "pcm_s16le", str(wav)], check=True)  # fmt: skip
            probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
                                    str(wav)], check=True, capture_output=True, text=True)  # fmt: skip
            total += float(probe.stdout)
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return total, wall


def measure_prepare(worker: Any, urls: Sequence[str], repeat: int, phases: dict[str, Any]) -> dict[str, Any]:
    ours, seq = [], []
    for _ in range(repeat):
        with common.phase(phases, "prepare_handler"):
            ours.append(prepare_with_handler(worker, urls))
        with common.phase(phases, "prepare_sequential"):
            seq.append(prepare_sequentially(urls))
    audio, ours_wall = min(ours, key=lambda r: r[1])
    seq_audio, seq_wall = min(seq, key=lambda r: r[1])
    return {
        "audio_sec": round(audio, 3),
        "audio_sec_ffprobe": round(seq_audio, 3),
        "handler_wall_sec": [round(w, 3) for _, w in ours],
        "sequential_wall_sec": [round(w, 3) for _, w in seq],
        "handler_rtfx": audio / ours_wall,
        "sequential_rtfx": seq_audio / seq_wall,
        "speedup": (audio / ours_wall) / (seq_audio / seq_wall),
    }


# ---------------------------------------------------------------------------------------------
# 2. End to end: handler vs NeMo from paths vs the model-only floor
# ---------------------------------------------------------------------------------------------


def run_handler(worker: Any, urls: Sequence[str]) -> dict[str, Any]:
    job = {"id": "bench-throughput", "input": {"inputs": [{"source": u} for u in urls], "timestamps": False}}
    out, wall = timed(lambda: asyncio.run(worker.handler(job)))
    if "error" in out:
        raise RuntimeError(f"handler failed: {out['error']}")
    failed = [r for r in out["results"] if "error" in r]
    if failed:
        raise RuntimeError(f"handler failed on {len(failed)} items, e.g. {failed[0]}")
    return {"wall_sec": wall, "stats": out["stats"], "texts": [r["text"] for r in out["results"]]}


def memory_safe_batches(seconds: Sequence[float], order: Sequence[int]) -> list[list[int]]:
    """Indices in `order`, cut every NEMO_BATCH_SIZE as NeMo's batch_size=16 does, and also
    before a batch would pass ATTENTION_BUDGET_S2 (items x longest^2)."""
    batches: list[list[int]] = [[]]
    for i in order:
        batch = batches[-1]
        longest = max([seconds[k] for k in batch] + [seconds[i]])
        if batch and (len(batch) == NEMO_BATCH_SIZE or (len(batch) + 1) * longest**2 > ATTENTION_BUDGET_S2):
            batches.append(batch := [])
        batch.append(i)
    return batches


def as_calls(batches: Sequence[list[int]]) -> list[list[int]]:
    """Consecutive full batches share one transcribe() call (NeMo cuts them at 16 itself, the
    same way), since every call pays ~0.4 s of dataloader set-up; a short batch ends a call."""
    calls: list[list[int]] = [[]]
    for batch in batches:
        calls[-1].extend(batch)
        if len(batch) < NEMO_BATCH_SIZE:
            calls.append([])
    return [call for call in calls if call]


def nemo_transcribe(model: Any, audio: list[Any], **options: Any) -> list[str]:
    """model.transcribe(audio, batch_size=16) -> texts, then model.eval() again: NeMo 3.0's
    transcribe() ends by unfreezing encoder, decoder and joint, which calls .train() on them,
    and the handler would then run with dropout on and BatchNorm updating its statistics."""
    try:
        hyps = model.transcribe(audio, batch_size=NEMO_BATCH_SIZE, verbose=False, **options)
    finally:
        model.eval()
    return [(h.text if hasattr(h, "text") else str(h)).strip() for h in hyps]


def run_nemo_paths(model: Any, paths: Sequence[Path], seconds: Sequence[float]) -> dict[str, Any]:
    """NeMo's own transcribe() on the original files in input order (its lhotse loader reads and
    resamples them), batch_size=16 within the memory budget, timed as a whole. Stereo files need
    channel_selector=0 (the workload's two channels are the same): without it NeMo 3.0 passes
    [batch, 2, time] to the encoder and fails; its lhotse loader has no "average" option."""
    calls = as_calls(memory_safe_batches(seconds, range(len(paths))))
    return timed_calls(calls, lambda b: nemo_transcribe(model, [str(paths[i]) for i in b], channel_selector=0))


def timed_calls(calls: list[list[int]], transcribe: Any) -> dict[str, Any]:
    """Run `transcribe(batch)` for each batch of item indices, timing each call: the summed wall
    time, the calls, their times, and the texts back in item order."""
    texts: dict[int, str] = {}
    call_sec = []
    for batch in calls:
        said, spent = timed(lambda b=batch: transcribe(b))
        call_sec.append(round(spent, 3))
        texts.update(zip(batch, said, strict=True))
    return {"wall_sec": sum(call_sec), "calls": calls, "call_sec": call_sec, "texts": [texts[i] for i in sorted(texts)]}


def decode_all(paths: Sequence[Path]) -> list[np.ndarray]:
    """Every file as 16 kHz mono float32, through the same s16 WAV samples the handler reads."""

    def decode(path: Path) -> np.ndarray:
        cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-ac", "1", "-ar", str(SAMPLE_RATE),
               "-f", "s16le", "-c:a", "pcm_s16le", "-"]  # fmt: skip
        raw = subprocess.run(cmd, check=True, capture_output=True).stdout
        return np.frombuffer(raw, np.int16).astype(np.float32) / 32768.0

    with cf.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return list(pool.map(decode, paths))


def run_floor(model: Any, arrays: Sequence[np.ndarray]) -> dict[str, Any]:
    """The model-only floor: transcribe() on decoded arrays sorted by length, batch_size=16
    within the memory budget. Only the transcribe() calls are timed."""
    seconds = [len(a) / SAMPLE_RATE for a in arrays]
    calls = as_calls(memory_safe_batches(seconds, sorted(range(len(arrays)), key=seconds.__getitem__)))
    result = timed_calls(calls, lambda b: nemo_transcribe(model, [arrays[i] for i in b]))
    return {**result, "padding_efficiency": padding_efficiency(seconds, calls)}


def padding_efficiency(seconds: Sequence[float], calls: Sequence[list[int]]) -> float:
    """Real / padded seconds of the batches NeMo forms from these calls (it cuts each call's
    items into runs of NEMO_BATCH_SIZE), by the handler's own formula."""
    import handler

    runs = [call[s : s + NEMO_BATCH_SIZE] for call in calls for s in range(0, len(call), NEMO_BATCH_SIZE)]
    batches = [[transcript.Prepared(i, "", Path(), round(seconds[i] * SAMPLE_RATE)) for i in run] for run in runs]
    return round(handler._padding_efficiency(batches), 4)


def best_of(repeat: int, name: str, run: Any) -> dict[str, Any]:
    """Run `repeat` times; keep the fastest run and every wall time. A method that fails is
    recorded with its error, so the other numbers of a long run are not lost."""
    runs = []
    for _ in range(repeat):
        try:
            runs.append(run())
        except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
            print(f"  {name} failed: {type(exc).__name__}: {exc}", flush=True)
            return {"wall_sec": None, "error": f"{type(exc).__name__}: {exc}", "texts": None}
        print(f"  {name}: {runs[-1]['wall_sec']:.1f} s", flush=True)
    best = min(runs, key=lambda r: r["wall_sec"])
    return {**best, "all_wall_sec": [round(r["wall_sec"], 3) for r in runs]}


def measure_end_to_end(worker: Any, ctx: dict[str, Any], repeat: int, phases: dict[str, Any]) -> dict[str, Any]:
    paths, urls, seconds = ctx["paths"], ctx["urls"], ctx["seconds"]
    model = asr.loaded_model()
    spent = common.instrument()
    with common.phase(phases, "handler"):
        handler = best_of(repeat, "handler", lambda: run_handler(worker, urls))
        handler["phase_sec_all_runs"] = {k: round(v, 3) for k, v in spent.items()}
    with common.phase(phases, "nemo_paths"):
        nemo = best_of(repeat, "NeMo transcribe(paths)", lambda: run_nemo_paths(model, paths, seconds))
    arrays = decode_all(paths)
    with common.phase(phases, "floor"):
        floor = best_of(repeat, "model-only floor", lambda: run_floor(model, arrays))
    return {"handler": handler, "nemo_paths": nemo, "floor": floor}


def warm_up(worker: Any, ctx: dict[str, Any], count: int = 4) -> float:
    """One pass of each method over the shortest files: lazy initialisation is not measured."""
    short = sorted(range(len(ctx["paths"])), key=ctx["seconds"].__getitem__)[:count]
    started = time.perf_counter()
    run_handler(worker, [ctx["urls"][i] for i in short])
    run_nemo_paths(asr.loaded_model(), [ctx["paths"][i] for i in short], [ctx["seconds"][i] for i in short])
    run_floor(asr.loaded_model(), decode_all([ctx["paths"][i] for i in short]))
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------
# 4. Import and model-load time, in fresh processes
# ---------------------------------------------------------------------------------------------

IMPORT_CODE = "import time; t = time.perf_counter(); import {module}; {then}; print(time.perf_counter() - t)"


def time_import(module: str, env: dict[str, str], runs: int, then: str = "pass") -> dict[str, float]:
    """Best wall time of `python -c "import module; then"` (interpreter start included) and the
    best time the statements themselves took, over `runs` fresh processes."""
    walls, inside = [], []
    for _ in range(runs):
        cmd = [sys.executable, "-c", IMPORT_CODE.format(module=module, then=then)]
        proc, wall = timed(
            lambda c=cmd: subprocess.run(c, env=env, cwd=REPO, check=True, capture_output=True, text=True)
        )
        walls.append(wall)
        inside.append(float(proc.stdout.strip().splitlines()[-1]))
    return {"wall_sec": min(walls), "import_sec": min(inside), "all_wall_sec": [round(w, 3) for w in walls]}


def measure_imports(runs: int) -> dict[str, Any]:
    plain = common.worker_env()
    skip = common.worker_env(SKIP_MODEL_LOAD="1")
    result = {
        "runpod": time_import("runpod", plain, runs),
        "handler_skip_model_load": time_import("handler", skip, runs),
        "handler_with_model": time_import("handler", plain, 1, then="handler.ensure_model()"),  # loads on use
    }
    result["overhead_sec"] = result["handler_skip_model_load"]["wall_sec"] - result["runpod"]["wall_sec"]
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


METHODS = ("handler", "nemo_paths", "floor")


def accuracy(files: Sequence[dict[str, Any]], e2e: dict[str, Any]) -> dict[str, Any]:
    """WER of each method against the scripts, and how often handler and floor agree exactly
    (same samples into the same model: they should, up to batch padding effects)."""
    words = sum(len(f["script"]) for f in files)
    result: dict[str, Any] = {}
    for method in METHODS:
        texts = e2e[method]["texts"]
        errors = (
            None
            if texts is None
            else sum(testkit.word_errors(f["script"], t.split()) for f, t in zip(files, texts, strict=True))
        )
        result[f"wer_{method}"] = None if errors is None else errors / max(1, words)
    ours, floor = e2e["handler"]["texts"], e2e["floor"]["texts"]
    result["handler_equals_floor"] = (
        None if ours is None or floor is None else float(np.mean([a == b for a, b in zip(ours, floor, strict=True)]))
    )
    return result


def check(value: float | None, target: float, higher_is_better: bool) -> bool | None:
    if value is None:
        return None
    return value >= target if higher_is_better else value <= target


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def wall_cell(wall: float | None, audio: float) -> str:
    return "failed" if wall is None else f"{wall:.1f} ({audio / wall:.0f}x)"


def per_phase(phases: dict[str, Any], key: str) -> str:
    return " / ".join(fmt(phases.get(m, {}).get(key)) for m in METHODS)


def other_cell(summary: dict[str, Any]) -> str:
    return f"{summary['mean_cpu_percent']:.0f} / {summary['max_cpu_percent']:.0f}"


def phase_cell(handler: dict[str, Any]) -> str:
    """Seconds in ffmpeg and in the model, per handler run (the counters span every run)."""
    phases, runs = handler.get("phase_sec_all_runs", {}), max(1, len(handler.get("all_wall_sec", [])))
    return f"{phases.get('_run_ffmpeg', 0) / runs:.1f} / {phases.get('_forward_decode', 0) / runs:.1f}"


def table_rows(r: dict[str, Any]) -> list[tuple[Any, ...]]:
    prep, e2e, imp, acc, phases = r["prepare"], r["end_to_end"], r.get("imports"), r["accuracy"], r["phases"]
    hw, nw, fw = (e2e[k]["wall_sec"] for k in METHODS)
    audio = r["workload"]["audio_sec"]
    pad = e2e["handler"].get("stats", {}).get("padding_efficiency")
    rows: list[tuple[Any, ...]] = [
        ("prepare: handler pool, audio s / wall s", prep["handler_rtfx"], "", None),
        ("prepare: sequential requests+ffmpeg+ffprobe", prep["sequential_rtfx"], "", None),
        ("prepare speedup", prep["speedup"], ">= 3.0", check(prep["speedup"], TARGETS["prepare_speedup"], True)),
        ("end to end: handler wall s (RTFx)", wall_cell(hw, audio), "", None),
        ("end to end: NeMo transcribe(paths) wall s", wall_cell(nw, audio), "", None),
        ("end to end: model-only floor wall s", wall_cell(fw, audio), "", None),
        (
            "handler / NeMo-from-paths",
            ratio(hw, nw),
            "<= 0.6",
            check(ratio(hw, nw), TARGETS["handler_vs_nemo_paths"], False),
        ),
        ("handler / floor", ratio(hw, fw), "<= 1.1", check(ratio(hw, fw), TARGETS["handler_vs_floor"], False)),
        ("padding efficiency (handler batches)", pad, ">= 0.9", check(pad, TARGETS["padding_efficiency"], True)),
        ("padding efficiency (floor: sorted, batches of 16)", e2e["floor"].get("padding_efficiency"), "", None),
        ("handler batches", e2e["handler"].get("stats", {}).get("batches"), "", None),
        ("handler per run: s in ffmpeg (summed over threads) / model", phase_cell(e2e["handler"]), "", None),
    ]
    if imp:
        over = imp["overhead_sec"]
        rows += [
            ("import runpod, s", imp["runpod"]["wall_sec"], "", None),
            ("import handler (SKIP_MODEL_LOAD=1), s", imp["handler_skip_model_load"]["wall_sec"], "", None),
            ("import overhead over runpod, s", over, "<= 0.5", check(over, TARGETS["import_overhead_sec"], False)),
            ("import handler + model load, s", imp["handler_with_model"]["wall_sec"], "", None),
        ]
    wers = " / ".join(fmt(acc[f"wer_{m}"]) for m in METHODS)
    rows += [
        ("peak RSS, whole process, MB", r["peak_rss_mb"], "", None),
        ("peak RSS, handler / NeMo paths / floor phase, MB", per_phase(phases, "peak_rss_mb"), "", None),
        ("other processes' CPU %, mean in those phases", per_phase(phases, "other_cpu_mean"), "~0", None),
        ("other processes' CPU %, whole run mean / max", other_cell(r["other_processes"]), "~0", None),
        ("WER handler / NeMo paths / floor", wers, "", None),
        ("handler text == floor text (share of files)", acc["handler_equals_floor"], "", None),
    ]
    return rows


def summarize_workload(files: Sequence[dict[str, Any]]) -> dict[str, Any]:
    seconds = [f["seconds"] for f in files]
    kinds = sorted({f"{f['format']}@{f['rate']}/{f['channels']}ch" for f in files})
    return {"files": len(files), "audio_sec": round(sum(seconds), 1), "min_sec": min(seconds),
            "max_sec": max(seconds), "median_sec": float(np.median(seconds)), "kinds": kinds}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=40, help="number of files in the workload (>= 3)")
    p.add_argument("--min-sec", type=float, default=1.0)
    p.add_argument("--max-sec", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--repeat", type=int, default=1, help="runs per measurement; the best is kept")
    p.add_argument("--import-runs", type=int, default=3, help="fresh processes per import timing (0: skip)")
    common.add_model_args(p)
    return p.parse_args(argv)


def load_worker() -> tuple[Any, float]:
    """Import handler and load its model in this process."""
    started = time.perf_counter()
    handler = testkit.load_worker()
    return handler, time.perf_counter() - started


def measure(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Everything, in order: the workload, imports in fresh processes, the model load, then
    prepare and end to end on the served workload. Fills `result`."""
    spec = workload_spec(args)
    (root, files), result["workload_build_sec"] = timed(lambda: build_workload(spec))
    result["workload"] = {**summarize_workload(files), "dir": str(root), "spec_key": common.spec_key(spec)}
    print(f"workload: {len(files)} files, {result['workload']['audio_sec'] / 60:.1f} min of audio", flush=True)
    result["phases"] = phases = {}
    if args.import_runs:
        with common.phase(phases, "imports"):
            result["imports"] = measure_imports(args.import_runs)
    (worker, result["model_load_in_process_sec"]) = load_worker()
    with testkit.LocalServer(root=root) as server:
        ctx = {"paths": [root / f["name"] for f in files], "urls": [f"{server.url}/files/{f['name']}" for f in files],
               "seconds": [f["seconds"] for f in files]}  # fmt: skip
        result["warm_up_sec"] = warm_up(worker, ctx)
        print("measuring prepare ...", flush=True)
        result["prepare"] = prep = measure_prepare(worker, ctx["urls"], args.repeat, phases)
        print(f"  handler {prep['handler_rtfx']:.0f}x, sequential {prep['sequential_rtfx']:.0f}x real time", flush=True)
        print("measuring end to end ...", flush=True)
        result["end_to_end"] = measure_end_to_end(worker, ctx, args.repeat, phases)
    result["accuracy"] = accuracy(files, result["end_to_end"])
    result["peak_rss_mb"] = round(common.process_peak_mb(), 1)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.configure_env(**({"PARAKEET_MODEL": args.model} if args.model else {}))
    result: dict[str, Any] = {"args": vars(args)}
    if args.wait_quiet:
        result["wait_quiet"] = common.wait_until_quiet(args.wait_quiet)
    started = time.perf_counter()
    result["machine"] = common.machine_info(os.environ["PARAKEET_MODEL"])
    with common.ForeignLoad() as load:
        measure(args, result)
    result["other_processes"] = load.summary()
    result["total_sec"] = time.perf_counter() - started
    print(common.markdown_table(("metric", "value", "target", "ok?"), table_rows(result)))
    print(f"\n{result['total_sec']:.0f} s in all; raw numbers in {common.write_json('throughput.json', result)}")
    return result


if __name__ == "__main__":
    main()
