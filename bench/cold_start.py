"""Cold start of the worker: process start to the first answered job, in fresh processes.

    python -m bench.cold_start --nemo .cache/parakeet-shaped.nemo --unpacked .cache/parakeet-shaped
    python -m bench.cold_start --nemo M.nemo --unpacked M-dir --repeats 5

Each run is a new Python process that starts the way the deployed worker does: it imports
handler and loads the model (asr.load_model imports torch and NeMo, then restores, moves to
the device and warms up), then answers one job (samples/digits.wav) through handler(). The
process writes when each phase ended to a file, so the split is: imports (interpreter start,
handler, torch and NeMo), restore, to device, warm-up, first job.

Page cache: "warm" starts with the model's files cached in RAM (a worker restarted on the same
host soon after); "cold" first evicts them (posix_fadvise DONTNEED on those files only), so the
start reads them from disk as a fresh worker does. --page-cache both (default) runs each.

Two variants of the same model, alternated run by run so that a busy neighbour on a shared
machine slows both alike:

- `nemo`: PARAKEET_MODEL=path.nemo, i.e. plain `ASRModel.restore_from(path.nemo)`, which
  extracts the archive to a temp dir on every start (what the worker did before);
- `unpacked`: PARAKEET_MODEL=the unpacked directory the image bakes in (asr.restore_unpacked).

Reports the median of each phase per variant, the spread (min-max), and the ratio of medians
(unpacked / nemo), and writes everything to bench/out/cold_start.json.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from parakeet_worker import model as asr

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"  # bench.common.OUT; the child imports nothing it need not (its imports are timed)
PHASES = ("imports", "restore", "to_device", "warm_up", "first_job", "total")
FIRST_JOB_SOURCE = OUT / "cold_start.digits.wav"  # samples/digits.wav, copied under the allowed root
TARGET_RATIO = 0.6


def answer(worker: Any, job: dict[str, Any]) -> dict[str, Any]:
    """handler(job), awaited if handler is a coroutine function."""
    out = worker.handler(job)
    return asyncio.run(out) if inspect.iscoroutine(out) else out


def child(result_file: Path, spawned_at: float) -> None:
    """Runs in the fresh process, as the worker starts: import handler, load the model (which
    imports torch and NeMo first), answer one job; writes the phase times."""
    marks = {"spawned": spawned_at, "started": time.time()}
    import handler

    getattr(handler, "ensure_model", lambda: None)()
    marks["loaded"] = time.time()
    if asr.loaded_model() is None:
        raise SystemExit(f"the model did not load: {asr.MODEL.error}")
    import torch

    load = dict(asr.state().load_timings)
    out = answer(handler, {"id": "cold-start", "input": {"inputs": [{"source": str(FIRST_JOB_SOURCE)}]}})
    marks["answered"] = time.time()
    if "error" in out or "error" in out["results"][0]:
        raise SystemExit(f"the first job failed: {out}")
    cuda = torch.cuda.is_available()
    phases = {
        "imports": marks["loaded"] - spawned_at - sum(load.values()),
        "restore": load["restore"],
        "to_device": load["to_device"],
        "warm_up": load["warm_up"],
        "first_job": marks["answered"] - marks["loaded"],
        "total": marks["answered"] - spawned_at,
    }
    result = {
        "phases": phases,
        "marks": marks,
        "interpreter_start_sec": marks["started"] - spawned_at,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpu_peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "text": out["results"][0].get("text"),
    }
    result_file.write_text(json.dumps(result))


def model_files(model: str) -> list[Path]:
    path = Path(model)
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (posix_fadvise DONTNEED: this process's own
    files only, no privileges needed), so the next start reads them from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_once(model: str, tag: str, index: int, page_cache: str = "warm") -> dict[str, Any]:
    """One cold start in a fresh process with PARAKEET_MODEL=model; with page_cache="cold" the
    model's files are first evicted from the page cache (a worker whose disk has not read them)."""
    from bench import common

    if page_cache == "cold":
        evict(model_files(model))
    result_file = OUT / f"cold_start.{tag}.{index}.json"
    result_file.unlink(missing_ok=True)
    env = common.worker_env(PARAKEET_MODEL=model)
    spawned = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cold_start", "--child", str(result_file), "--spawned", repr(spawned)],
        env=env, cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0 or not result_file.is_file():
        raise RuntimeError(f"cold start of {model} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(result_file.read_text())
    result_file.unlink()
    return result


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for phase in PHASES:
        values = [r["phases"][phase] for r in runs]
        out[phase] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                      "all": [round(v, 3) for v in values]}  # fmt: skip
    out["peak_rss_mb_median"] = statistics.median(r["peak_rss_mb"] for r in runs)
    gpu = [r["gpu_peak_allocated_mb"] for r in runs if r.get("gpu_peak_allocated_mb") is not None]
    out["gpu_peak_allocated_mb_median"] = statistics.median(gpu) if gpu else None
    return out


def measure(variants: dict[str, str], repeats: int, page_cache: str = "warm", log: Any = print) -> dict[str, Any]:
    """Alternate the variants `repeats` times; per-variant summaries and the paired ratios."""
    from bench import common

    runs: dict[str, list[dict[str, Any]]] = {tag: [] for tag in variants}
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "samples" / "digits.wav", FIRST_JOB_SOURCE)
    with common.ForeignLoad() as load:
        for i in range(repeats):
            order = list(variants) if i % 2 == 0 else list(reversed(variants))  # neither always goes first
            for tag in order:
                r = run_once(variants[tag], tag, i, page_cache)
                runs[tag].append(r)
                log(f"  cold start {i + 1}/{repeats} {tag} ({page_cache} page cache): {r['phases']['total']:.1f} s "
                    f"({', '.join(f'{k} {v:.1f}' for k, v in r['phases'].items() if k != 'total')})")  # fmt: skip
    result: dict[str, Any] = {"variants": variants, "repeats": repeats, "page_cache": page_cache, "runs": runs,
                              "summary": {tag: summarize(rs) for tag, rs in runs.items()},
                              "other_processes": load.summary()}  # fmt: skip
    if {"nemo", "unpacked"} <= set(variants):
        s = result["summary"]
        result["ratio_of_medians"] = s["unpacked"]["total"]["median"] / s["nemo"]["total"]["median"]
        paired = [u["phases"]["total"] / n["phases"]["total"] for u, n in zip(runs["unpacked"], runs["nemo"], strict=True)]
        result["paired_ratios"] = [round(p, 3) for p in paired]
    return result


def table(result: dict[str, Any]) -> str:
    from bench import common

    tags = list(result["variants"])
    rows = []
    for phase in PHASES:
        cells = []
        for tag in tags:
            p = result["summary"][tag][phase]
            cells.append(f"{p['median']:.2f} ({p['min']:.2f}-{p['max']:.2f})")
        rows.append((f"{phase}, s: median (min-max)", *cells))
    rows.append(("peak RSS, MB (median)", *(f"{result['summary'][t]['peak_rss_mb_median']:,.0f}" for t in tags)))
    if "ratio_of_medians" in result:
        paired = result["paired_ratios"]
        ok = "yes" if result["ratio_of_medians"] <= TARGET_RATIO else "NO"
        rows.append(("unpacked / nemo, total (medians)", f"{result['ratio_of_medians']:.3f} (target <= {TARGET_RATIO}: {ok})",
                     f"paired runs {min(paired):.3f}-{max(paired):.3f}"))  # fmt: skip
    return common.markdown_table(("phase", *tags), rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nemo", help="the model as a .nemo (plain restore_from)")
    p.add_argument("--unpacked", help="the same model unpacked (docker/fetch_model.py --unpack)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--page-cache", choices=("warm", "cold", "both"), default="both",
                   help="cold: evict the model's files from the page cache before each start")  # fmt: skip
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.spawned)
        return None
    from bench import common

    variants = {k: v for k, v in (("nemo", args.nemo), ("unpacked", args.unpacked)) if v}
    if not variants:
        p.error("give --nemo and/or --unpacked")
    OUT.mkdir(parents=True, exist_ok=True)
    modes = ("warm", "cold") if args.page_cache == "both" else (args.page_cache,)
    result: dict[str, Any] = {"machine": common.machine_info(""), "threads": os.cpu_count(), "variants": variants}
    for mode in modes:
        result[mode] = measure(variants, args.repeats, mode)
        print(f"\n{mode} page cache:")
        print(table(result[mode]))
    print(f"raw numbers in {common.write_json('cold_start.json', result)}")
    return result


if __name__ == "__main__":
    main()
