"""Memory: what one model pass needs, what the worker has, and plans that fit.

Why: the encoder's full attention needs memory that grows with the square of the audio's length
(the demo model on CPU: 425 s took 4.3 GB, 15 minutes 15 GB), local attention linearly. Fixed
thresholds (LOCAL_ATTENTION_AFTER_SEC, MAX_SINGLE_PASS_SEC, BATCH_MAX_TOTAL_SEC) fit one card;
on a smaller GPU or a CPU they let a pass ask for more than the device has, and on a CPU (or when
host RAM runs out first) the kernel's OOM killer ends the worker and every job in it. So:

- :class:`Headroom`: the memory a pass may add now. CUDA: free device memory
  (``torch.cuda.mem_get_info``) plus what torch's cache holds unused. CPU: the tightest of the
  container's cgroup limits (v2 ``memory.max``/``memory.high``, v1 ``memory.limit_in_bytes``)
  less what the cgroup uses (page cache that can be dropped not counted), and the host's
  ``MemAvailable``. An explicit budget (WORKER_MEMORY_BUDGET_BYTES: the most the worker process
  may hold) less what the process holds now tightens it further.
- :class:`PassCost`: the peak one pass adds, per model and device, fitted at start-up from a few
  short passes measured in the process (:func:`calibrate`): ``fixed + rows * (a*s + b*s**2)``
  for full attention, ``fixed + rows * a*s`` for local, times ``1 + margin``.
- :func:`plan_pass`, :func:`limits`: the attention mode and how many rows of a batch run, and
  the longest full-attention pass and the piece length, such that the predicted peak fits. The
  config's thresholds stay upper limits a user can set.
- :class:`MemoryPlanner` (one per process, :func:`planner`): the fitted cost (kept between
  starts, :func:`load_cost`), fresh headroom readings, and admission
  (:meth:`MemoryPlanner.admit`): a pass that does not fit waits up to MEMORY_WAIT_SEC for
  memory, and is then reported as not fitting, so that its caller cuts it smaller.

Measured with the demo model on CPU (bench/memory_model.py, the image's malloc settings): the
prediction (fit plus PASS_ALLOWANCE) was above every measured pass from 2 to 30 minutes before
the margin, by 7-38% with full attention and 1-9% with local. Resident memory says what is in
use when big blocks are mapped (the image's MALLOC_MMAP_THRESHOLD_=131072); with glibc's default,
probes of one length differed by up to ~40% between runs.

Importing reads nothing and imports no torch; every reading happens on a call.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from parakeet_worker import config
from parakeet_worker.state import shared

log = logging.getLogger("parakeet-worker")

FULL, LOCAL = "full", "local"
MODES = (FULL, LOCAL)
DEFAULT_MARGIN = 0.25  # on every predicted peak: the fit extrapolates from short passes
UNLIMITED_V1 = 1 << 60  # cgroup v1 writes ~2**63 (rounded to the page) for "no limit"
MiB, GiB = 1024**2, 1024**3

# ---------------------------------------------------------------------------------------------
# What the worker can use
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Headroom:
    """The memory one model pass may add on top of what is in use now, in bytes, and which
    reading bounded it; `free` None: nothing could be read (plans then follow the config only)."""

    device: str
    free: int | None
    source: str
    readings: dict[str, int] = field(default_factory=dict)  # every bound read, by source

    def describe(self) -> str:
        if self.free is None:
            return f"{self.device}: memory unknown"
        return f"{_gb(self.free)} free on {self.device} ({self.source})"


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _stat_field(path: Path, name: str) -> int:
    """One counter of a cgroup ``memory.stat`` file (0 where missing)."""
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return _int(value.strip()) or 0
    return 0


def _own_cgroups(self_cgroup: Path) -> dict[str, str]:
    """This process's cgroup path by controller ("" for v2), from /proc/self/cgroup."""
    own: dict[str, str] = {}
    for line in _read(self_cgroup).splitlines():
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = path
    return own


def _levels(base: Path, rel: str | None) -> list[Path]:
    """`base` and, where the process's cgroup is below it, that cgroup and each ancestor: in a
    container its own cgroup is usually mounted at the root; outside one it is the named path."""
    dirs = [base]
    if rel and rel.strip("/"):
        leaf = base / rel.strip("/")
        dirs += [leaf, *(p for p in leaf.parents if base in p.parents)]
    return dirs


def cgroup_limits(root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")) -> dict[str, int]:
    """Room under every memory limit on this process's cgroup and its ancestors, by source
    (``"cgroup v2 memory.max at /sys/fs/cgroup/x"``): the limit less what the cgroup uses, the
    inactive page cache (which the kernel drops before it kills) not counted. Empty when no
    limit is set. Reads cgroup v2 and v1 alike."""
    own = _own_cgroups(self_cgroup)
    rooms: dict[str, int] = {}
    for d in dict.fromkeys(_levels(root, own.get(""))):  # v2
        used = _int(_read(d / "memory.current"))
        if used is None:
            continue
        used -= _stat_field(d / "memory.stat", "inactive_file")
        for name in ("memory.max", "memory.high"):
            limit = _int(_read(d / name))  # "max" (no limit) reads as None
            if limit is not None:
                rooms[f"cgroup v2 {name} at {d}"] = limit - max(0, used)
    for mount in ("memory",):  # v1
        for d in dict.fromkeys(_levels(root / mount, own.get("memory"))):
            limit, used = _int(_read(d / "memory.limit_in_bytes")), _int(_read(d / "memory.usage_in_bytes"))
            if limit is None or used is None or limit >= UNLIMITED_V1:
                continue
            used -= _stat_field(d / "memory.stat", "total_inactive_file")
            rooms[f"cgroup v1 memory.limit_in_bytes at {d}"] = limit - max(0, used)
    return rooms


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The host's MemAvailable (what the kernel can hand out without swapping), in bytes."""
    for line in _read(meminfo).splitlines():
        if line.startswith("MemAvailable:"):
            value = _int(line.split()[1])
            return None if value is None else value * 1024
    return None


def process_rss(status: Path = Path("/proc/self/status"), key: str = "VmRSS:") -> int | None:
    """This process's resident memory (or, with key="VmHWM:", its peak), in bytes."""
    for line in _read(status).splitlines():
        if line.startswith(key):
            value = _int(line.split()[1])
            return None if value is None else value * 1024
    return None


def cpu_headroom(
    budget: int | None = None,
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    self_cgroup: Path = Path("/proc/self/cgroup"),
    meminfo: Path = Path("/proc/meminfo"),
    status: Path = Path("/proc/self/status"),
) -> Headroom:
    """Host RAM a pass may add now: the least room under the cgroup limits, MemAvailable, and
    `budget` (the most this process may hold) less its RSS."""
    readings = dict(cgroup_limits(cgroup_root, self_cgroup))
    available = mem_available(meminfo)
    if available is not None:
        readings["MemAvailable"] = available
    if budget:
        readings["WORKER_MEMORY_BUDGET_BYTES less the worker's RSS"] = budget - (process_rss(status) or 0)
    return _tightest("cpu", readings)


def cuda_headroom(budget: int | None = None, device: Any = None) -> Headroom:
    """GPU memory a pass may add now: free device memory plus what torch's caching allocator
    holds unused; with `budget` (the most this process may hold on the GPU), that less what
    torch has allocated, if tighter."""
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    readings = {"cuda mem_get_info + torch cache": free + max(0, torch.cuda.memory_reserved(device) - allocated)}
    if budget:
        readings["WORKER_MEMORY_BUDGET_BYTES less torch's allocations"] = budget - allocated
    return _tightest("cuda", readings)


def _tightest(device: str, readings: dict[str, int]) -> Headroom:
    if not readings:
        return Headroom(device, None, "nothing readable")
    source = min(readings, key=readings.__getitem__)
    return Headroom(device, max(0, readings[source]), source, readings)


def headroom(device: str, budget: int | None = None) -> Headroom:
    """What a pass may add now on `device` ("cuda..." or "cpu"); see cpu_headroom/cuda_headroom."""
    return cuda_headroom(budget) if device.startswith("cuda") else cpu_headroom(budget)


# ---------------------------------------------------------------------------------------------
# What a pass costs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PassCost:
    """The peak memory one model pass adds, in bytes, for `rows` rows padded to `seconds`:

        full:  full_fixed  + rows * (full_per_sec * seconds + full_per_sec2 * seconds**2)
        local: local_fixed + rows * local_per_sec * seconds

    times (1 + margin). Full attention's scores are (heads x frames x frames) per row and
    layer: the square term; everything else (features, subsampling, activations, local
    attention's fixed window) grows with the length."""

    full_fixed: float
    full_per_sec: float
    full_per_sec2: float
    local_fixed: float
    local_per_sec: float
    margin: float = DEFAULT_MARGIN
    source: str = ""
    allowance: float = 0.0  # added to every pass: what the encoder-only probes do not see (PASS_ALLOWANCE)

    def fixed(self, mode: str) -> float:
        return (self.full_fixed if mode == FULL else self.local_fixed) + self.allowance

    def raw(self, seconds: float, rows: int = 1, mode: str = FULL) -> float:
        """The fitted peak, without the margin."""
        if mode == FULL:
            return self.fixed(mode) + rows * (self.full_per_sec * seconds + self.full_per_sec2 * seconds**2)
        return self.fixed(mode) + rows * self.local_per_sec * seconds

    def peak(self, seconds: float, rows: int = 1, mode: str = FULL) -> int:
        """The predicted peak, margin included: what must be free for the pass to run."""
        return math.ceil(self.raw(seconds, rows, mode) * (1 + self.margin))

    def longest(self, free: float, mode: str = FULL, rows: int = 1) -> float:
        """The longest pass (seconds, every row that long) whose predicted peak fits in `free`;
        0 when not even a moment fits, inf when the cost does not grow with the length."""
        room = free / (1 + self.margin) - self.fixed(mode)
        if room <= 0:
            return 0.0
        a = rows * (self.full_per_sec if mode == FULL else self.local_per_sec)
        b = rows * self.full_per_sec2 if mode == FULL else 0.0
        if b > 0:
            return (-a + math.sqrt(a * a + 4 * b * room)) / (2 * b)
        return room / a if a > 0 else math.inf

    def max_rows(self, seconds: float, free: float, mode: str = FULL) -> int:
        """How many rows of `seconds` fit in `free` at once (0: not even one)."""
        fixed = self.fixed(mode)
        per_row = self.raw(seconds, 1, mode) - fixed
        room = free / (1 + self.margin) - fixed
        if room < per_row or room <= 0:
            return 0
        return int(room // per_row) if per_row > 0 else 1 << 20

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PassCost:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class Probe:
    """One measured pass: its rows of `seconds` in `mode`, and the peak it added (bytes)."""

    seconds: float
    rows: int
    mode: str
    peak: int


# Probes at start-up: (seconds, rows, mode). Full attention's square term passes the linear ones
# at about 100 s (demo model), so the probes reach past that; local attention pads to its window
# (about 40 s each way), so its slope shows past that. Two rows once: the fixed part per pass.
DEFAULT_PROBES: tuple[tuple[float, int, str], ...] = (
    (20.0, 1, FULL), (40.0, 1, FULL), (40.0, 2, FULL), (80.0, 1, FULL), (120.0, 1, FULL),
    (60.0, 1, LOCAL), (120.0, 1, LOCAL), (180.0, 1, LOCAL),
)  # fmt: skip


def _least_squares(columns: list[list[float]], peaks: list[float]) -> list[float]:
    """Non-negative least squares for a handful of terms: every subset of the columns is fitted
    and the best one whose coefficients are all >= 0 kept (a term the data cannot support, say
    a negative fixed cost, is dropped rather than made up)."""
    import numpy as np

    y = np.asarray(peaks, dtype=float)
    best: tuple[float, list[float]] = (math.inf, [0.0] * len(columns))
    for size in range(len(columns), 0, -1):
        for keep in itertools.combinations(range(len(columns)), size):
            x = np.asarray([columns[k] for k in keep], dtype=float).T
            coef, *_ = np.linalg.lstsq(x, y, rcond=None)
            if (coef < 0).any():
                continue
            err = float(np.sum((x @ coef - y) ** 2))
            if err < best[0]:
                full = [0.0] * len(columns)
                for k, c in zip(keep, coef, strict=True):
                    full[k] = float(c)
                best = (err, full)
    return best[1]


# What a whole pass holds beside what the probes (the encoder on noise) measure: the decoder's
# hypotheses, the rows read from the WAVs, the allocator's slack. Measured with the demo model
# (bench/memory_model.py): a 2-minute local pass of speech took 188 MB against 117 MB fitted from
# the probes, the worst gap of the 2-30 minute points in either mode.
PASS_ALLOWANCE = 80 * MiB


def fit(probes: Sequence[Probe], margin: float = DEFAULT_MARGIN, source: str = "fitted") -> PassCost:
    """The PassCost that best explains measured passes (least squares, no negative terms),
    scaled up where needed so that it predicts no probe below what it measured (a fit that
    passes under its own data would extrapolate from under it). Each mode needs probes of at
    least two lengths; a mode without them costs what the other one fitted."""
    full = [p for p in probes if p.mode == FULL]
    local = [p for p in probes if p.mode == LOCAL]
    f_fixed = f_lin = f_sq = l_fixed = l_lin = 0.0
    if len({p.seconds for p in full}) >= 2:
        f_fixed, f_lin, f_sq = _covering(full, _least_squares(
            [[1.0] * len(full), [p.rows * p.seconds for p in full], [p.rows * p.seconds**2 for p in full]],
            [float(p.peak) for p in full],
        ))  # fmt: skip
    if len({p.seconds for p in local}) >= 2:
        l_fixed, l_lin = _covering(local, _least_squares(
            [[1.0] * len(local), [p.rows * p.seconds for p in local]], [float(p.peak) for p in local]
        ))  # fmt: skip
    if not local or l_lin == 0.0 == l_fixed:
        l_fixed, l_lin = f_fixed, f_lin
    if not full or f_lin == f_sq == f_fixed == 0.0:
        f_fixed, f_lin = l_fixed, l_lin
    return PassCost(f_fixed, f_lin, f_sq, l_fixed, l_lin, margin, source, PASS_ALLOWANCE)


def _covering(probes: Sequence[Probe], coef: list[float]) -> list[float]:
    """`coef` (fixed, per row-second, per row-second squared) times the largest measured /
    predicted ratio over `probes`, when that is over 1."""
    def predicted(p: Probe) -> float:
        return coef[0] + p.rows * (coef[1] * p.seconds + (coef[2] * p.seconds**2 if len(coef) > 2 else 0.0))

    worst = max((p.peak / predicted(p) for p in probes if predicted(p) > 0), default=1.0)
    return [c * worst for c in coef] if worst > 1.0 else coef


# ---------------------------------------------------------------------------------------------
# Measuring a pass
# ---------------------------------------------------------------------------------------------

_LIBC: Any = None


def trim_heap() -> None:
    """glibc's malloc_trim(0): freed heap memory goes back to the OS, so RSS says what is in
    use (a no-op where the C library is not glibc)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


@contextlib.contextmanager
def _rss_peak() -> Iterator[Callable[[], int]]:
    """The peak RSS (bytes) of this process within the block, from VmHWM after resetting it
    (/proc/self/clear_refs, exact); where that is not allowed, RSS sampled every millisecond."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        samples = [process_rss() or 0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.001):
                samples.append(process_rss() or 0)

        thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        thread.start()
        try:
            yield lambda: max(samples)
        finally:
            stop.set()
            thread.join()
        return
    yield lambda: process_rss(key="VmHWM:") or 0


def measure(fn: Callable[[], Any], device: str = "cpu") -> int:
    """The peak memory (bytes) that running `fn` adds on top of what was in use when it began:
    on CUDA torch's allocator peak, on CPU the process's resident peak (heap trimmed first, so
    memory freed earlier is not counted as in use). Other threads' allocations meanwhile count
    too: measure while the worker is otherwise idle."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - base)
    trim_heap()
    base = process_rss() or 0
    with _rss_peak() as peak:
        fn()
        top = peak()
    return max(0, top - base)


# A pass to measure: (seconds, rows, mode) -> runs the model on that much audio in that mode.
PassRunner = Callable[[float, int, str], Any]


def encoder_pass(model: Any, device: str, set_mode: Callable[[str], Any], autocast: Any = None,
                 layers: int | None = 1) -> PassRunner:  # fmt: skip
    """A PassRunner for a NeMo ASR model: `rows` rows of faint noise (made inside the pass, as
    a batch's rows are read inside one) through the preprocessor and encoder (model.forward) in
    inference mode, after `set_mode(mode)` switched the attention.

    The decoder is left out: its memory is small beside the encoder's (one frame at a time), and
    on noise it is slow (the demo model on CPU: 18 s of greedy decoding for 90 s of noise, 1.7 s
    for its encoder). The encoder runs its first `layers` layers only (None: all): its layers
    run one after the other, each freeing its input, so the peak does not grow with the depth
    (measured: 1 layer of the demo model's 3, and of the Parakeet-shaped model's 2, gave the same
    peaks to the MB from 40 to 180 s, both modes), while the time does: Parakeet has 24."""

    def run(seconds: float, rows: int, mode: str) -> None:
        import numpy as np
        import torch

        set_mode(mode)
        frames = int(seconds * 16_000)
        noise = np.random.default_rng(0).standard_normal((rows, frames), dtype=np.float32) * 0.01
        signal = torch.from_numpy(noise).to(device)
        length = torch.full((rows,), frames, dtype=torch.int64, device=device)
        kind = "cuda" if device.startswith("cuda") else "cpu"
        encoder = getattr(model, "encoder", None)
        every = getattr(encoder, "layers", None)
        if layers is not None and isinstance(every, torch.nn.ModuleList):
            encoder.layers = torch.nn.ModuleList(list(every)[:layers])
        try:
            with torch.inference_mode(), torch.autocast(device_type=kind, dtype=autocast, enabled=autocast is not None):
                encoded, _ = model.forward(input_signal=signal, input_signal_length=length)
            del encoded
        finally:
            if every is not None:
                encoder.layers = every
        del signal, noise

    return run


def calibrate(
    run_pass: PassRunner,
    device: str = "cpu",
    probes: Sequence[tuple[float, int, str]] = DEFAULT_PROBES,
    margin: float = DEFAULT_MARGIN,
) -> tuple[PassCost, list[Probe]]:
    """Measure each probe pass twice and keep the smaller peak, then fit the cost. At start-up,
    before any job. The first pass of a length also sets up what later passes of it reuse
    (measured with the demo model: 199 MB the first time an 80-s pass ran, 127 MB every time
    after), which a fit through it would extrapolate as if every pass paid it again."""
    measured = [Probe(s, rows, mode, min(measure(lambda s=s, r=rows, m=mode: run_pass(s, r, m), device)
                                         for _ in range(2)))
                for s, rows, mode in probes]  # fmt: skip
    return fit(measured, margin, f"fitted on {len(measured)} passes on {device}"), measured


COST_VERSION = 5  # 2: the encoder's first layer; 3: fits cover every probe; 4: the smaller of two; 5: allowance


def cache_key(*parts: object) -> str:
    """A file-name-safe key for a fitted cost: a hash of what it depends on (the model file or
    name with its size and time, the device's name, the dtype, torch's version, the probes)."""
    import hashlib

    return hashlib.sha256(repr((COST_VERSION, DEFAULT_PROBES, *parts)).encode()).hexdigest()[:16]


def load_cost(folder: Path, key: str) -> PassCost | None:
    """A cost fitted before under `key` in `folder`, or None (missing, unreadable, or stale)."""
    import json

    try:
        data = json.loads((folder / f"memory-cost-{key}.json").read_text())
        return PassCost.from_dict(data)
    except (OSError, ValueError, TypeError):
        return None


def store_cost(folder: Path, key: str, cost: PassCost) -> None:
    """Keep a fitted cost for the next start (written whole or not at all; a failure is only
    logged: the next start probes again)."""
    import json
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
            json.dump(cost.to_dict(), f)
        Path(f.name).replace(folder / f"memory-cost-{key}.json")
    except OSError as exc:
        log.warning("could not keep the fitted memory model in %s: %s", folder, exc.strerror or exc)


# ---------------------------------------------------------------------------------------------
# Plans that fit
# ---------------------------------------------------------------------------------------------


_CONFIG_ONLY = "no memory model: the config's limits only"


@dataclass(frozen=True)
class PassPlan:
    """How a batch runs: in `mode`, its `rows` shortest rows (the rest wait for a later batch),
    predicted to add `predicted` bytes with `free` bytes free. `fits` False: not even one row
    fits in either mode; the caller waits, then cuts it smaller."""

    mode: str
    rows: int
    seconds: float  # the longest of those rows
    predicted: int | None
    free: int | None
    fits: bool
    why: str

    def line(self) -> str:
        """The decision and its numbers, for the log."""
        pred = "n/a" if self.predicted is None else _gb(self.predicted)
        free = "unknown" if self.free is None else _gb(self.free)
        return (f"memory plan: {self.rows} row(s) of <= {self.seconds:.0f} s with {self.mode} attention, "
                f"predicted peak {pred} of {free} free: {self.why}")  # fmt: skip


def plan_pass(cost: PassCost | None, durations: Sequence[float], free: int | None, local_after_sec: float) -> PassPlan:
    """The mode and the rows of a batch (row durations in seconds) that fit in `free` bytes.

    Full attention where the longest row is within `local_after_sec` (the user's cap) and the
    pass fits, with as many rows (shortest first) as fit; local attention where full does not
    fit even one row; not fitting at all where neither does. Without a cost or a reading, the
    config alone decides (every row; local past `local_after_sec`)."""
    ordered = sorted(durations)
    n, longest = len(ordered), ordered[-1]
    if cost is None or free is None:
        mode = LOCAL if longest > local_after_sec else FULL
        return PassPlan(mode, n, longest, None, free, True, _CONFIG_ONLY)
    full_ok = longest <= local_after_sec
    k_full = _rows_that_fit(cost, ordered, free, FULL) if full_ok else 0
    if k_full:
        why = "fits" if k_full == n else f"{n - k_full} longer row(s) wait for a later batch"
        return PassPlan(FULL, k_full, ordered[k_full - 1], cost.peak(ordered[k_full - 1], k_full, FULL), free, True, why)
    k_local = _rows_that_fit(cost, ordered, free, LOCAL)
    if k_local:
        why = f"past LOCAL_ATTENTION_AFTER_SEC={local_after_sec:g}" if not full_ok else (
            f"full attention would need {_gb(cost.peak(ordered[0], 1, FULL))}")  # fmt: skip
        if k_local < n:
            why += f"; {n - k_local} longer row(s) wait for a later batch"
        return PassPlan(LOCAL, k_local, ordered[k_local - 1], cost.peak(ordered[k_local - 1], k_local, LOCAL), free,
                        True, why)  # fmt: skip
    need = min(cost.peak(ordered[0], 1, m) for m in ((FULL, LOCAL) if full_ok else (LOCAL,)))
    return PassPlan(LOCAL, 1, ordered[0], need, free, False, "does not fit in either mode")


def _rows_that_fit(cost: PassCost, ordered: Sequence[float], free: int, mode: str) -> int:
    """The most rows of `ordered` (shortest first) whose padded pass fits in `free`."""
    k = 0
    while k < len(ordered) and cost.peak(ordered[k], k + 1, mode) <= free:
        k += 1
    return k


@dataclass(frozen=True)
class Limits:
    """What one pass may hold here and now, each capped by the user's setting: the longest item
    that runs with full attention, and the piece length of long items (local attention)."""

    full_sec: float
    piece_sec: float
    free: int | None
    source: str

    def line(self) -> str:
        free = "unknown" if self.free is None else _gb(self.free)
        return (f"memory limits: full attention up to {self.full_sec:.0f} s, pieces of up to {self.piece_sec:.0f} s "
                f"({free} free, {self.source})")  # fmt: skip


def limits(cost: PassCost | None, room: Headroom, local_after_sec: float, max_single_pass_sec: float,
           piece_min_sec: float) -> Limits:  # fmt: skip
    """Full attention up to min(LOCAL_ATTENTION_AFTER_SEC, what fits); pieces of
    min(MAX_SINGLE_PASS_SEC, what fits with local attention), never under PIECE_MIN_SEC (a piece
    at the floor that still does not fit fails admission, and is answered out_of_memory)."""
    if cost is None or room.free is None:
        return Limits(local_after_sec, max_single_pass_sec, room.free, "no memory model: the config's limits")
    full = min(local_after_sec, cost.longest(room.free, FULL))
    piece = max(min(piece_min_sec, max_single_pass_sec), min(max_single_pass_sec, cost.longest(room.free, LOCAL)))
    return Limits(full, piece, room.free, room.source)


def _gb(n: float) -> str:
    return f"{n / GiB:.2f} GB" if abs(n) >= 0.1 * GiB else f"{n / MiB:.0f} MB"


# ---------------------------------------------------------------------------------------------
# The worker's planner: the fitted cost, fresh readings, admission
# ---------------------------------------------------------------------------------------------


class MemoryPlanner:
    """The worker's memory planning: the cost fitted for its model on its device (None until
    fitted, in a dry run, or with MEMORY_PLANNING=off: plans then follow the config alone), and
    headroom readings, reused for at most `max_age` seconds (a reading is a few small file
    reads, and the planner asks for one per batch). The settings (WORKER_MEMORY_BUDGET_BYTES,
    MEMORY_MARGIN, MEMORY_WAIT_SEC and the config's caps) are read at each call, so a test that
    swaps the config is seen at once."""

    def __init__(self, max_age: float = 0.25) -> None:
        self.device = "cpu"
        self.fitted: PassCost | None = None
        self.max_age = max_age
        self._room: tuple[float, int | None, Headroom] | None = None
        self._lock = threading.Lock()

    def cost(self) -> PassCost | None:
        """The fitted cost with the margin in force; None where plans follow the config alone."""
        cfg = config.CFG
        if self.fitted is None or not cfg.memory_planning:
            return None
        return replace(self.fitted, margin=cfg.memory_margin)

    def fit(self, device: str, run_pass: PassRunner, key: str, cache: Path | None = None) -> PassCost | None:
        """At start-up (model loaded, no job yet): the cost kept under `key` in `cache` by an
        earlier start, or fitted now from the probes (and kept). A probe that fails (a GPU too
        small for it) leaves the planner without a cost: plans follow the config alone."""
        self.device = device
        started = time.perf_counter()
        cost = load_cost(cache, key) if cache is not None else None
        how = "kept from an earlier start"
        if cost is None:
            try:
                cost, measured = calibrate(run_pass, device, DEFAULT_PROBES, config.CFG.memory_margin)
            except Exception as exc:  # noqa: BLE001 - the worker runs on without a memory model
                log.warning("memory model not fitted (%s: %s); the config's limits alone decide", type(exc).__name__, exc)
                return None
            how = "measured: " + ", ".join(f"{p.mode} {p.seconds:g} s x{p.rows} {_gb(p.peak)}" for p in measured)
            if cache is not None:
                store_cost(cache, key, cost)
        self.fitted = cost
        log.info("memory model in %.1f s (%s); %s", time.perf_counter() - started, how, self.limits().line())
        return cost

    def room(self, fresh: bool = False) -> Headroom:
        """What a pass may add now (a reading at most max_age old, unless `fresh`)."""
        budget = config.CFG.memory_budget_bytes or None
        now = time.monotonic()
        with self._lock:
            kept = self._room
        if not fresh and kept is not None and now - kept[0] < self.max_age and kept[1] == budget:
            return kept[2]
        room = headroom(self.device, budget)
        with self._lock:
            self._room = (now, budget, room)
        return room

    def limits(self, room: Headroom | None = None) -> Limits:
        """The longest full-attention pass and the piece length that fit in `room` (a reading
        now if not given), within the caps."""
        cfg = config.CFG
        return limits(self.cost(), room or self.room(), cfg.local_attention_after_sec, cfg.max_single_pass_sec,
                      cfg.piece_min_sec)  # fmt: skip

    def plan(self, durations: Sequence[float], fresh: bool = False) -> PassPlan:
        return plan_pass(self.cost(), durations, self.room(fresh).free, config.CFG.local_attention_after_sec)

    def admit(self, durations: Sequence[float], stop: threading.Event | None = None, poll_sec: float = 0.25) -> PassPlan:
        """The plan to run a batch with, right before it runs. When not even one row fits: trim
        the heap and read again, then wait up to MEMORY_WAIT_SEC for memory to free up (another
        process, a diarization, the page cache); a plan that still does not fit comes back as
        such (fits False), for the caller to cut the work smaller. The decision is logged (at
        INFO when memory changed it or the pass is long, else DEBUG)."""
        plan = self.plan(durations, fresh=True)
        if not plan.fits:
            trim_heap()
            plan = self.plan(durations, fresh=True)
        wait_sec = config.CFG.memory_wait_sec
        deadline = time.monotonic() + wait_sec
        if not plan.fits and wait_sec > 0:
            log.warning("%s; waiting up to %.0f s for memory", plan.line(), wait_sec)
        while not plan.fits and time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            time.sleep(poll_sec)
            plan = self.plan(durations, fresh=True)
        changed = not plan.fits or plan.rows < len(durations) or plan.why not in ("fits", _CONFIG_ONLY)
        log.log(logging.INFO if changed or plan.seconds > LOG_PASSES_OVER_SEC else logging.DEBUG, "%s", plan.line())
        return plan


LOG_PASSES_OVER_SEC = 600.0  # a pass this long is logged with its plan at INFO


@shared
def planner() -> MemoryPlanner:
    """This process's MemoryPlanner (its cost is fitted when the model loads: model.fit_memory)."""
    return MemoryPlanner()


def default_cache() -> Path:
    """Where fitted costs are kept between starts of a worker on this machine (a container
    restarted after a crash skips the probes): $TMPDIR/parakeet-worker-memory, beside (not in)
    WORKER_TMP_DIR, whose every file belongs to a job."""
    import tempfile

    return Path(tempfile.gettempdir()) / "parakeet-worker-memory"
