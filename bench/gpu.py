"""The worker with a Parakeet-sized model (tools/make_parakeet_shaped.py): `make bench-gpu`.

    make bench-gpu                  # python -m bench.gpu: full size on CUDA, a reduced form on CPU
    python -m bench.gpu --layers 24 --files 6 --max-sec 30 --cold-repeats 0   # full size on a CPU

On CUDA (defaults): the full-size model (24 layers, 627M parameters, built once into bench/out
as a .nemo and unpacked), a mixed workload of --files speech files from 1 s to 20 min (the
throughput benchmark's files, formats and HTTP server), through

1. the worker end to end (handler(), the files' URLs in one job),
2. NeMo's transcribe(paths, batch_size=16) on the same files,
3. the model-only floor (transcribe() on decoded arrays sorted by length, batch_size=16),

each timed (RTFx = audio s / wall s) with its peak GPU memory (torch.cuda.max_memory_allocated);
the model's own memory; and the cold start (process start to first answered job, by phase, the
.nemo against the unpacked directory; bench/cold_start.py).

On CPU the same steps run at a reduced size (2 layers, 4 files of 1-20 s, one cold start each
way) so the benchmark keeps working where there is no GPU; CI runs only that reduced form.
Random weights: transcripts are random tokens, so WER is not reported; the handler and the
floor run the same model on the same samples, so the share of identical texts is.

Prints a table and writes every raw number to bench/out/gpu.json (--out to rename).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import cold_start, common, throughput
from bench.common import OUT, REPO, fmt, timed
from parakeet_worker import model as asr
from tools import testkit

FULL = {"layers": 24, "files": 24, "min_sec": 1.0, "max_sec": 1200.0, "bank": 300, "cold_repeats": 3,
        "page_cache": "both"}  # fmt: skip
REDUCED = {"layers": 2, "files": 4, "min_sec": 1.0, "max_sec": 20.0, "bank": 40, "cold_repeats": 1,
           "page_cache": "warm"}  # fmt: skip
TOOL = REPO / "tools" / "make_parakeet_shaped.py"


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def ensure_model(layers: int) -> tuple[Path, Path, dict[str, Any]]:
    """The Parakeet-shaped model with `layers` encoder layers, as .nemo and unpacked, built by
    the tool in a child process the first time and reused while the tool is unchanged."""
    nemo, unpacked = OUT / f"parakeet-shaped-{layers}L.nemo", OUT / f"parakeet-shaped-{layers}L"
    key_file = nemo.with_suffix(".key")
    key = hashlib.sha256(TOOL.read_bytes()).hexdigest()[:16]
    built = nemo.is_file() and (unpacked / "model_weights.ckpt").is_file() and nemo.with_suffix(".json").is_file()
    if not (built and key_file.is_file() and key_file.read_text() == key):
        print(f"building the Parakeet-shaped model ({layers} layers) ...", flush=True)
        OUT.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "tools.make_parakeet_shaped", "--out", str(nemo), "--layers", str(layers),
               "--unpacked", str(unpacked)]  # fmt: skip
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        key_file.write_text(key)
    return nemo, unpacked, json.loads(nemo.with_suffix(".json").read_text())


def load_worker() -> tuple[Any, float]:
    started = time.perf_counter()
    handler = testkit.load_worker()
    return handler, time.perf_counter() - started


def model_memory(worker: Any) -> dict[str, Any]:
    import torch

    model = asr.loaded_model()
    out: dict[str, Any] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameter_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "buffer_mb": sum(b.numel() * b.element_size() for b in model.buffers()) / 2**20,
        "process_rss_mb": common.process_peak_mb(),
    }
    if torch.cuda.is_available():
        out["gpu_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
        out["gpu_reserved_mb"] = torch.cuda.memory_reserved() / 2**20
    return out


# ---------------------------------------------------------------------------------------------
# The three ways, each with its peak GPU memory
# ---------------------------------------------------------------------------------------------


run_handler = throughput.run_handler  # the same job, the same checks


def with_gpu_peak(run: Any) -> Any:
    """Wrap a method's run so its result carries the peak GPU memory it allocated."""
    import torch

    def wrapped() -> dict[str, Any]:
        if not torch.cuda.is_available():
            return run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {**result, "gpu_peak_mb": peak / 2**20, "gpu_peak_over_model_mb": (peak - base) / 2**20}

    return wrapped


def measure_methods(worker: Any, ctx: dict[str, Any], repeat: int, phases: dict[str, Any]) -> dict[str, Any]:
    paths, urls, seconds = ctx["paths"], ctx["urls"], ctx["seconds"]
    model = asr.loaded_model()
    out: dict[str, Any] = {}
    with common.phase(phases, "handler"):
        out["handler"] = throughput.best_of(repeat, "handler", with_gpu_peak(lambda: run_handler(worker, urls)))
    with common.phase(phases, "nemo_paths"):
        out["nemo_paths"] = throughput.best_of(
            repeat, "NeMo transcribe(paths)", with_gpu_peak(lambda: throughput.run_nemo_paths(model, paths, seconds))
        )
    arrays = throughput.decode_all(paths)
    with common.phase(phases, "floor"):
        out["floor"] = throughput.best_of(
            repeat, "model-only floor", with_gpu_peak(lambda: throughput.run_floor(model, arrays))
        )
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def table_rows(r: dict[str, Any]) -> list[tuple[Any, ...]]:
    audio = r["workload"]["audio_sec"]
    e2e, mem = r["end_to_end"], r["model_memory"]
    rows: list[tuple[Any, ...]] = [
        ("device", r["device"]),
        ("model", f"{r['model']['layers']} layers, {mem['parameters']:,} parameters ({mem['parameter_mb']:,.0f} MiB)"),
        ("workload", f"{r['workload']['files']} files, {audio / 60:.1f} min, {r['workload']['min_sec']:g}-"
                     f"{r['workload']['max_sec']:g} s"),
        ("model load in this process, s", r["model_load_sec"]),
    ]
    if "gpu_allocated_mb" in mem:
        rows.append(("GPU memory after load: allocated / reserved, MiB", f"{mem['gpu_allocated_mb']:,.0f} / {mem['gpu_reserved_mb']:,.0f}"))
    for key, name in (("handler", "worker end to end"), ("nemo_paths", "NeMo transcribe(paths, 16)"), ("floor", "model-only floor")):
        m = e2e[key]
        wall = m.get("wall_sec")
        cell = "failed: " + m.get("error", "") if wall is None else f"{wall:.1f} s, RTFx {fmt(audio / wall)}"
        if m.get("gpu_peak_mb") is not None:
            cell += f", peak GPU {m['gpu_peak_mb']:,.0f} MiB"
        rows.append((name, cell))
    hw, nw, fw = (e2e[k].get("wall_sec") for k in ("handler", "nemo_paths", "floor"))
    rows += [
        ("worker / NeMo-from-paths", throughput.ratio(hw, nw)),
        ("worker / floor", throughput.ratio(hw, fw)),
        ("worker batches, padding efficiency", f"{e2e['handler'].get('stats', {}).get('batches')}, "
                                               f"{fmt(e2e['handler'].get('stats', {}).get('padding_efficiency'))}"),
        ("worker text == floor text (share of files)", r["handler_equals_floor"]),
        ("peak RSS of this process, MB", r["peak_rss_mb"]),
        ("other processes' CPU %, mean / max", f"{r['other_processes']['mean_cpu_percent']:.0f} / "
                                               f"{r['other_processes']['max_cpu_percent']:.0f}"),
    ]
    for mode, cs in r.get("cold_start", {}).items():
        for tag, s in cs["summary"].items():
            phases = ", ".join(f"{p} {s[p]['median']:.1f}" for p in cold_start.PHASES if p != "total")
            rows.append((f"cold start, {tag}, {mode} page cache: median s", f"{s['total']['median']:.1f} ({phases})"))
        if "ratio_of_medians" in cs:
            rows.append((f"cold start unpacked / nemo ({mode})", cs["ratio_of_medians"]))
    return rows


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None, cuda: bool) -> argparse.Namespace:
    d = FULL if cuda else REDUCED
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=d["layers"], help=f"encoder layers (default {d['layers']} here)")
    p.add_argument("--nemo", help="use this Parakeet-shaped .nemo (with --unpacked) instead of building one")
    p.add_argument("--unpacked", help="the same model unpacked")
    p.add_argument("--files", type=int, default=d["files"])
    p.add_argument("--min-sec", type=float, default=d["min_sec"])
    p.add_argument("--max-sec", type=float, default=d["max_sec"])
    p.add_argument("--bank", type=int, default=d["bank"], help="distinct espeak-ng utterances the speech is drawn from")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--repeat", type=int, default=1, help="runs per method; the fastest is kept")
    p.add_argument("--cold-repeats", type=int, default=d["cold_repeats"], help="cold starts per variant (0: none)")
    p.add_argument("--page-cache", choices=("warm", "cold", "both"), default=d["page_cache"])
    p.add_argument("--cold-variants", choices=("both", "unpacked"), default="both",
                   help="unpacked: time only the image's way, not the .nemo as well")  # fmt: skip
    p.add_argument("--out", default="gpu.json", help="file name under bench/out")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SEC")
    args = p.parse_args(argv)
    if bool(args.nemo) != bool(args.unpacked):
        p.error("--nemo and --unpacked go together")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    args = parse_args(argv, cuda)
    if args.nemo:
        nemo, unpacked = Path(args.nemo), Path(args.unpacked)
        report_file = nemo.with_suffix(".json")
        report = json.loads(report_file.read_text()) if report_file.is_file() else {"layers": None}
    else:
        nemo, unpacked, report = ensure_model(args.layers)
    common.configure_env(PARAKEET_MODEL=str(unpacked))
    result: dict[str, Any] = {"args": vars(args), "model": {"nemo": str(nemo), "unpacked": str(unpacked),
                              "layers": report.get("layers"), "report": report}}  # fmt: skip
    if args.wait_quiet:
        result["wait_quiet"] = common.wait_until_quiet(args.wait_quiet)
    started = time.perf_counter()
    result["machine"] = common.machine_info("")
    result["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    with common.ForeignLoad() as load:
        if args.cold_repeats:  # first, while this process holds no model
            modes = ("warm", "cold") if args.page_cache == "both" else (args.page_cache,)
            variants = {"nemo": str(nemo), "unpacked": str(unpacked)}
            if args.cold_variants == "unpacked":
                del variants["nemo"]
            result["cold_start"] = {m: cold_start.measure(variants, args.cold_repeats, m) for m in modes}
        spec = {"version": throughput.WORKLOAD_VERSION, "files": args.files, "seed": args.seed,
                "min_sec": args.min_sec, "max_sec": args.max_sec, "formats": throughput.FORMATS, "bank": args.bank}  # fmt: skip
        (root, files), result["workload_build_sec"] = timed(lambda: throughput.build_workload(spec))
        result["workload"] = {**throughput.summarize_workload(files), "dir": str(root)}
        print(f"workload: {len(files)} files, {result['workload']['audio_sec'] / 60:.1f} min of audio", flush=True)
        worker, result["model_load_sec"] = load_worker()
        result["load_timings"] = dict(getattr(worker, "LOAD_TIMINGS", {}))
        result["model_memory"] = model_memory(worker)
        result["phases"] = phases = {}
        with testkit.LocalServer(root=root) as server:
            ctx = {"paths": [root / f["name"] for f in files], "urls": [f"{server.url}/files/{f['name']}" for f in files],
                   "seconds": [f["seconds"] for f in files]}  # fmt: skip
            result["warm_up_sec"] = throughput.warm_up(worker, ctx, count=3)
            print("measuring end to end ...", flush=True)
            result["end_to_end"] = e2e = measure_methods(worker, ctx, args.repeat, phases)
    ours, floor = e2e["handler"].get("texts"), e2e["floor"].get("texts")
    result["handler_equals_floor"] = (
        None if ours is None or floor is None else float(np.mean([a == b for a, b in zip(ours, floor, strict=True)]))
    )
    result["peak_rss_mb"] = round(common.process_peak_mb(), 1)
    result["other_processes"] = load.summary()
    result["total_sec"] = time.perf_counter() - started
    print(common.markdown_table(("metric", "value"), table_rows(result)))
    print(f"\n{result['total_sec']:.0f} s in all; raw numbers in {common.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
