"""What both benchmarks share: the worker's environment, speech with a known script, memory
probes, word error rate, machine info and result tables (the HTTP server, word error counting
and the ffmpeg encode helper are tools.testkit's).

Generated audio is cached under bench/out/ (git-ignored), keyed by a hash of what made it, so a
rerun measures the worker instead of espeak-ng and the encoders.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import soundfile as sf

from tools import synth
from tools.testkit import word_errors

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
DEFAULT_MODEL = "models/demo-tdt.nemo"
SAMPLE_RATE = synth.SAMPLE_RATE

# ---------------------------------------------------------------------------------------------
# Environment: handler reads its config once, at import (the model loads later, on the first job or
# ensure_model()), so this runs first.
# ---------------------------------------------------------------------------------------------


def worker_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment the worker runs with in a benchmark (as tests/conftest.py sets it up):
    bench/out as an allowed local root, 127.0.0.1 URLs allowed, no proxies, quiet logs."""
    env = dict(os.environ if base is None else base)
    for var in ("SKIP_MODEL_LOAD", "RUNPOD_SERVERLESS", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(var, None)
    env.setdefault("PARAKEET_MODEL", DEFAULT_MODEL)
    env.setdefault("LOG_LEVEL", "WARNING")
    env.update(
        WORKER_TMP_DIR=str(OUT / "worker-tmp"),
        ALLOWED_LOCAL_ROOTS=str(OUT),
        RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONPATH=str(REPO),
        **extra,
    )
    return env


def configure_env(**extra: str) -> None:
    """Apply worker_env() to this process, before `import handler`."""
    OUT.mkdir(parents=True, exist_ok=True)
    env = worker_env(**extra)
    os.environ.clear()
    os.environ.update(env)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def spec_key(spec: dict[str, Any]) -> str:
    """A short stable hash of a generation spec and of tools/synth.py (which makes the speech):
    the cache key of the audio, so a change to either builds fresh audio."""
    synth_code = hashlib.sha256(Path(synth.__file__).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps([spec, synth_code], sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Speech with a known script: utterances in the demo model's vocabulary, with pauses between.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Utterance:
    words: tuple[str, ...]
    audio: np.ndarray


def utterance_bank(seed: int, size: int) -> list[Utterance]:
    """`size` utterances like the demo model's training data (whole sentences, or words spoken
    one by one), over all voices, speeds and levels. Long files reuse them in random order, so
    espeak-ng runs `size` times however long the audio gets."""
    rng = np.random.default_rng([seed, 7])
    return [_utterance(rng) for _ in range(size)]


def _utterance(rng: np.random.Generator) -> Utterance:
    voice = str(rng.choice(synth.VOICES))
    speed, pitch = int(rng.integers(130, 201)), int(rng.integers(35, 66))
    words = tuple(str(w) for w in rng.choice(synth.VOCAB, size=int(rng.integers(1, 9))))
    if rng.random() < 0.6:
        audio = synth.speak(" ".join(words), voice, speed, pitch)
    else:
        audio = synth.spaced_words(rng, list(words), voice, speed, pitch, gap=(0.05, 0.6))
    gain = 10 ** (rng.uniform(-12, -3) / 20) / (np.abs(audio).max() or 1.0)
    return Utterance(words, (audio * gain).astype(np.float32))


def _pause(rng: np.random.Generator, first: bool) -> int:
    """Samples of silence before an utterance: short at the start, now and then a long one."""
    if first:
        return int(rng.uniform(0.05, 0.3) * SAMPLE_RATE)
    long_pause = rng.random() < 0.1
    return int(rng.uniform(*((1.5, 3.0) if long_pause else (0.2, 1.0))) * SAMPLE_RATE)


def speech_chunks(
    seconds: float, rng: np.random.Generator, bank: Sequence[Utterance]
) -> Iterator[tuple[np.ndarray, tuple[str, ...]]]:
    """(audio, words) pieces that add up to exactly `seconds`: pause + utterance each, then
    silence to the end. Near the end only utterances that still fit are drawn, so even a
    1-second file says something. A faint noise floor keeps the silence from being digital zero."""
    total, done = round(seconds * SAMPLE_RATE), 0
    while True:
        pause = _pause(rng, first=done == 0)
        room = total - done - pause
        utt = bank[int(rng.integers(len(bank)))]
        if len(utt.audio) > room:
            fitting = [u for u in bank if len(u.audio) <= room]
            if not fitting:
                break
            utt = fitting[int(rng.integers(len(fitting)))]
        chunk = np.concatenate([np.zeros(pause, np.float32), utt.audio])
        done += len(chunk)
        yield _with_noise(chunk, rng), utt.words
    yield _with_noise(np.zeros(total - done, np.float32), rng), ()


def _with_noise(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return audio + (rng.standard_normal(len(audio)) * 3e-4).astype(np.float32)


def write_speech(path: Path, seconds: float, seed: int, bank: Sequence[Utterance]) -> list[str]:
    """Stream speech into a 16 kHz mono WAV chunk by chunk (the file is never in memory as a
    whole, so hours cost no RAM); return the script, the words in order."""
    rng = np.random.default_rng(seed)
    script: list[str] = []
    with sf.SoundFile(str(path), "w", samplerate=SAMPLE_RATE, channels=1, subtype="PCM_16") as out:
        for audio, words in speech_chunks(seconds, rng, bank):
            out.write(audio)
            script.extend(words)
    return script


# ---------------------------------------------------------------------------------------------
# Memory, time, and how busy the rest of the machine was.
# ---------------------------------------------------------------------------------------------


class ForeignLoad:
    """Samples, once a second in a thread, the CPU used by processes that are not this one or its
    children: on a shared 2-core machine one busy neighbour changes every timing (torch's
    OpenMP threads then wait for a core on every small op), so a run reports how quiet it was."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.samples: list[float] = []
        self.top: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ForeignLoad:
        _MONITORS.insert(0, self)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        _MONITORS.remove(self)

    def _run(self) -> None:
        me = psutil.Process()
        seen: dict[int, psutil.Process] = {}
        while not self._stop.wait(self.interval):
            ours = {me.pid} | {c.pid for c in me.children(recursive=True)}
            total = 0.0
            for proc in psutil.process_iter(["cmdline"]):
                if proc.pid in ours:
                    continue
                proc = seen.setdefault(proc.pid, proc)
                with contextlib.suppress(psutil.Error):
                    cpu = proc.cpu_percent(None)
                    total += cpu
                    if cpu >= 20:
                        cmd = " ".join(proc.info["cmdline"] or [])[:120]
                        self.top[cmd] = max(self.top.get(cmd, 0.0), cpu)
            self.samples.append(total)

    def summary(self) -> dict[str, Any]:
        s = self.samples[1:] or [0.0]  # the first reading of each process is meaningless
        return {"mean_cpu_percent": round(float(np.mean(s)), 1), "max_cpu_percent": round(max(s), 1),
                "busy_share": round(float(np.mean([x >= 20 for x in s])), 3), "busiest": self.top}  # fmt: skip


_PEAK_KB = {"before_resets": 0}
_MONITORS: list[ForeignLoad] = []  # the running ForeignLoad, if any, for phase()


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def process_peak_mb() -> float:
    """Peak RSS of this process over its whole life, including peaks from before any reset."""
    return max(_PEAK_KB["before_resets"], _maxrss_kb()) / 1024


@contextlib.contextmanager
def phase(into: dict[str, Any], key: str) -> Iterator[None]:
    """Record a block in into[key]: its wall seconds, the peak RSS (MB) of this process during
    it, and other processes' CPU meanwhile (if a ForeignLoad is running).

    Linux lets a process reset its RSS high-water mark (write 5 to /proc/self/clear_refs), so the
    block's peak is exact rather than sampled; where that is not allowed the peak is None."""
    _PEAK_KB["before_resets"] = max(_PEAK_KB["before_resets"], _maxrss_kb())
    try:
        Path("/proc/self/clear_refs").write_text("5")
        exact = True
    except OSError:
        exact = False
    first = len(_MONITORS[0].samples) if _MONITORS else 0
    started = time.perf_counter()
    try:
        yield
    finally:
        other = _MONITORS[0].samples[first:] if _MONITORS else []
        into[key] = {
            "sec": round(time.perf_counter() - started, 3),
            "peak_rss_mb": round(_maxrss_kb() / 1024, 1) if exact else None,
            "other_cpu_mean": round(float(np.mean(other)), 1) if other else None,
            "other_cpu_max": round(max(other), 1) if other else None,
        }


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


# What "where does the time go" adds up: label -> "module:function" under parakeet_worker.
PHASES = {"_download": "audio.download:fetch_url", "_run_ffmpeg": "audio.ffmpeg:run_ffmpeg",
          "_load_rows": "model:load_rows", "_forward_decode": "model:forward_decode"}  # fmt: skip


def instrument(targets: dict[str, str] | None = None) -> dict[str, float]:
    """Wrap the worker's functions (label -> "module:function") to add up the seconds spent in
    each. The worker calls them through their modules, so replacing the module attribute is
    enough; threads add up, so prepare seconds can exceed wall seconds. uninstrument() undoes it."""
    import importlib

    targets = targets or PHASES
    totals = dict.fromkeys(targets, 0.0)
    lock = threading.Lock()
    for label, where in targets.items():
        module_name, attr = where.split(":")
        module = importlib.import_module(f"parakeet_worker.{module_name}")
        original = getattr(module, attr)

        def wrapped(*args: Any, _label: str = label, _fn: Callable[..., Any] = original, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                with lock:
                    totals[_label] += time.perf_counter() - started

        wrapped.original = original  # type: ignore[attr-defined]
        setattr(module, attr, wrapped)
    return totals


def uninstrument(targets: dict[str, str] | None = None) -> None:
    import importlib

    for where in (targets or PHASES).values():
        module_name, attr = where.split(":")
        module = importlib.import_module(f"parakeet_worker.{module_name}")
        setattr(module, attr, getattr(getattr(module, attr), "original", getattr(module, attr)))


# ---------------------------------------------------------------------------------------------
# Accuracy.
# ---------------------------------------------------------------------------------------------


def wer(ref: Sequence[str], hyp: Sequence[str]) -> float:
    return word_errors(ref, hyp) / max(1, len(ref))


# ---------------------------------------------------------------------------------------------
# Machine info and output.
# ---------------------------------------------------------------------------------------------


def busy_processes(window: float = 1.0, min_cpu: float = 5.0) -> list[dict[str, Any]]:
    """Other processes using CPU right now: what else ran while we measured."""
    me = os.getpid()
    procs = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.pid != me]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
    time.sleep(window)
    busy = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            cpu = p.cpu_percent(None)
            if cpu >= min_cpu:
                busy.append({"pid": p.pid, "cpu_percent": cpu, "cmd": " ".join(p.info["cmdline"] or [])[:160]})
    return busy


def wait_until_quiet(max_wait: float, threshold: float = 10.0, settle: int = 3) -> dict[str, Any]:
    """Wait, up to `max_wait` s, until no other process has used `threshold` % CPU for `settle`
    5-second windows in a row: on a shared 2-core machine a timing taken next to a busy
    neighbour says little about the worker."""
    started, quiet, last_busy = time.monotonic(), 0, []
    while quiet < settle and time.monotonic() - started < max_wait:
        busy = busy_processes(window=5.0, min_cpu=threshold)
        quiet = 0 if busy else quiet + 1
        if busy:
            last_busy = busy
            print(
                f"waiting for a quiet machine: {busy[0]['cmd'][:80]} uses {busy[0]['cpu_percent']:.0f}% CPU", flush=True
            )
    return {"waited_sec": round(time.monotonic() - started, 1), "quiet": quiet >= settle, "last_busy": last_busy}


def _file_hash(path: Path) -> str | None:
    """Which model file was measured (the demo model gets retrained): a short sha256."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else None


def machine_info(model: str) -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cpu_count": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": version("torch"),
        "nemo_toolkit": version("nemo_toolkit"),
        "runpod": version("runpod"),
        "model": model,
        "model_sha256": _file_hash(Path(REPO, model)),
        "device": "cpu",
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "busy_processes": busy_processes(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(name: str, data: dict[str, Any]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def add_model_args(p: Any) -> None:
    """The options both benchmarks take: which model, and waiting for a quiet machine."""
    p.add_argument("--model", help="a .nemo to use instead of $PARAKEET_MODEL or models/demo-tdt.nemo")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SEC",
                   help="first wait up to SEC s for other processes to go idle")  # fmt: skip
