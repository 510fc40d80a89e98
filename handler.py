"""parakeet-worker: a Runpod serverless worker that turns audio into text with NVIDIA Parakeet TDT.

Data flows top to bottom, and so does this file:

    config -> model -> audio in (fetch + ffmpeg) -> batching -> transcription -> output
    -> handler -> entry point

The GPU is billed per second, so everything around the model is built to keep it busy: sources
are fetched and decoded in a thread pool while earlier batches run, each item is decoded by one
ffmpeg process (small ones several to a process) straight to 16 kHz mono WAV (its length read
from the WAV header, no ffprobe), and batches are packed by duration so little of the GPU's work is padding.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import concurrent.futures as cf
import contextlib
import dataclasses
import itertools
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
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
    max_single_pass_sec: float = 10800.0
    max_audio_sec: float = 14400.0
    max_inputs: int = 500
    max_download_bytes: int = 2 * 1024**3
    max_base64_bytes: int = 20 * 1024**2
    download_connect_timeout: float = 10.0
    download_read_timeout: float = 30.0
    download_total_sec: float = 900.0
    download_retries: int = 3
    ffmpeg_timeout_sec: float = 900.0
    prepare_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    download_workers: int = 16
    allowed_local_roots: tuple[str, ...] = ("/runpod-volume", str(APP_DIR / "samples"))
    dtype: str = "auto"
    network_volume: str = "/runpod-volume"
    tmp_dir: str = field(default_factory=lambda: str(Path(tempfile.gettempdir()) / "parakeet-worker"))

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
            max_audio_sec=_env_num("MAX_AUDIO_SEC", d.max_audio_sec),
            max_inputs=max(1, _env_num("MAX_INPUTS", d.max_inputs, int)),
            max_download_bytes=_env_num("MAX_DOWNLOAD_BYTES", d.max_download_bytes, int),
            max_base64_bytes=_env_num("MAX_BASE64_BYTES", d.max_base64_bytes, int),
            download_connect_timeout=_env_num("DOWNLOAD_CONNECT_TIMEOUT", d.download_connect_timeout),
            download_read_timeout=_env_num("DOWNLOAD_READ_TIMEOUT", d.download_read_timeout),
            download_total_sec=_env_num("DOWNLOAD_TOTAL_SEC", d.download_total_sec),
            download_retries=_env_num("DOWNLOAD_RETRIES", d.download_retries, int),
            ffmpeg_timeout_sec=_env_num("FFMPEG_TIMEOUT_SEC", d.ffmpeg_timeout_sec),
            prepare_workers=max(1, _env_num("PREPARE_WORKERS", d.prepare_workers, int)),
            download_workers=max(1, _env_num("DOWNLOAD_WORKERS", d.download_workers, int)),
            allowed_local_roots=tuple(r for r in roots.split(":") if r),
            dtype=_env_choice("PARAKEET_DTYPE", d.dtype, ("auto", "bf16", "fp16", "fp32")),
            network_volume=_env("NETWORK_VOLUME_PATH", d.network_volume),
            tmp_dir=_env("WORKER_TMP_DIR", d.tmp_dir),
        )


CFG = Config.from_env()

# The job schema, checked by the Runpod SDK's rp_validator. The validator skips `constraints`
# when a default exists, so enums and ranges are also checked in _check_input().
INPUT_SCHEMA: dict[str, dict[str, Any]] = {
    "inputs": {"type": list, "required": True},
    "timestamps": {"type": bool, "required": False, "default": False},
    "output_format": {"type": str, "required": False, "default": "json"},
}
ITEM_KEYS = ("source", "audio_base64")

# ---------------------------------------------------------------------------------------------
# Model: loaded once per process, at import, so a warm (FlashBoot) worker never loads it twice.
# A failed load is kept, not raised: the worker stays up and answers every job with the cause,
# instead of crash-looping and burning GPU time on restarts.
# ---------------------------------------------------------------------------------------------

_MODEL: Any = None
_MODEL_ERROR: str | None = None
_MODEL_LOCK = threading.Lock()  # transcribe is not thread-safe: one model call at a time
_STATE: dict[str, Any] = {"local_attention": False, "timestamps": None, "device": "cpu", "autocast": None}


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
    _STATE.update(device=device, autocast=_autocast_dtype(device, torch))
    _STATE.update(local_attention=False, timestamps=None)
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
    """Greedy batched TDT decoding; word/segment timestamps only when a job asks for them."""
    from omegaconf import open_dict

    cfg = model.cfg.decoding
    with open_dict(cfg):
        cfg.strategy = "greedy_batch"
        cfg.compute_timestamps = timestamps
        if cuda_graphs is not None and "greedy" in cfg:
            cfg.greedy.use_cuda_graph_decoder = cuda_graphs
    model.change_decoding_strategy(cfg, verbose=False)
    _STATE["timestamps"] = timestamps


def _warm_up(model: Any) -> None:
    """One pass on a second of silence so the first request pays no lazy initialisation."""
    with _MODEL_LOCK:
        _forward_decode(model, np.zeros((1, SAMPLE_RATE), np.float32), [SAMPLE_RATE])


def _load_at_start() -> None:
    global _MODEL, _MODEL_ERROR
    if CFG.skip_model_load:
        return
    try:
        _MODEL = load_model(CFG.model)
    except Exception as exc:
        _MODEL_ERROR = f"model {CFG.model!r} could not be loaded: {type(exc).__name__}: {exc}"
        log.exception("model load failed")


# ---------------------------------------------------------------------------------------------
# Audio in: every source becomes one 16 kHz mono WAV in the job's temp dir, or an ItemError.
# ---------------------------------------------------------------------------------------------


class ItemError(Exception):
    """A problem with one input item: reported on that item, never fails the job."""

    def __init__(self, code: str, message: str, duration: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.duration = duration  # known when the audio was decoded (e.g. too_long)


@dataclass
class Prepared:
    """One decoded item (or one piece of a long item): frames [start, start+frames) of `wav`."""

    index: int
    source: str
    wav: Path
    frames: int
    start: int = 0
    warning: str | None = None

    @property
    def duration(self) -> float:
        return self.frames / SAMPLE_RATE


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


def _source_of(item: Any) -> tuple[str, str]:
    """Validate one input item; return (kind, value) with kind in url | path | base64."""
    if not isinstance(item, dict):
        raise ItemError("invalid_source", 'each input must be an object like {"source": "..."}')
    unknown = sorted(set(item) - set(ITEM_KEYS))
    if unknown:
        raise ItemError("invalid_source", f"unknown field(s) {unknown}; allowed: {list(ITEM_KEYS)}")
    given = [k for k in ITEM_KEYS if k in item]
    if len(given) != 1:
        raise ItemError("invalid_source", "give exactly one of 'source' or 'audio_base64'")
    value = item[given[0]]
    if not isinstance(value, str) or not value.strip():
        raise ItemError("invalid_source", f"'{given[0]}' must be a non-empty string")
    value = value.strip()
    if given[0] == "audio_base64" or value.startswith("data:"):
        return "base64", value
    scheme = urlparse(value).scheme.lower()
    if scheme in ("http", "https"):
        return "url", value
    if scheme == "file":
        return "path", unquote(urlparse(value).path)
    if "://" in value or (scheme and len(scheme) > 1):
        raise ItemError("invalid_source", f"unsupported source scheme {scheme!r}: use http(s), a path or base64")
    return "path", value


def _label(kind: str, value: str) -> str:
    return "base64" if kind == "base64" else value


def _local_path(raw: str) -> Path:
    """Resolve a local path, refusing anything (`..`, symlinks) that ends outside the roots."""
    path = Path(raw) if os.path.isabs(raw) else APP_DIR / raw
    real = Path(os.path.realpath(path))
    for root in CFG.allowed_local_roots:
        real_root = Path(os.path.realpath(root))
        if real == real_root or real_root in real.parents:
            break
    else:
        raise ItemError("forbidden_path", f"{raw} is outside the allowed roots {list(CFG.allowed_local_roots)}")
    if not real.is_file():
        raise ItemError("not_found", f"no file at {raw}")
    return real


def _decode_base64(value: str, dest: Path) -> Path:
    """Decode base64 (or a data: URL) to a file, with the MAX_BASE64_BYTES cap."""
    payload = value.split(",", 1)[1] if value.startswith("data:") else value
    if value.startswith("data:") and ";base64" not in value.split(",", 1)[0]:
        raise ItemError("invalid_source", "data: URLs must be base64-encoded")
    payload = re.sub(r"\s+", "", payload)
    if len(payload) * 3 // 4 > CFG.max_base64_bytes:
        raise ItemError("too_large", f"base64 audio is over the {CFG.max_base64_bytes}-byte cap")
    try:
        dest.write_bytes(base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError):
        raise ItemError("invalid_source", "audio_base64 is not valid base64") from None
    return dest


class _Retry(Exception):
    """A download failure worth another try (connection error, 429, 5xx)."""


def _download(url: str, dest: Path) -> Path:
    """Stream `url` to `dest` through the Runpod SDK's SSRF-safe fetch, with retries."""
    deadline = time.monotonic() + CFG.download_total_sec
    last = "no attempt made"
    for attempt in range(CFG.download_retries + 1):
        if attempt:
            pause = min(2.0 ** (attempt - 1) * 0.5, 8.0)
            if time.monotonic() + pause > deadline:
                break
            time.sleep(pause)
        try:
            with _download_slots():
                return _download_once(url, dest, deadline)
        except _Retry as exc:
            last = str(exc)
            log.warning("download attempt %d of %s failed: %s", attempt + 1, url, last)
    raise ItemError("download_failed", f"{last} (after {CFG.download_retries + 1} attempts)")


_DOWNLOAD_SLOTS: threading.BoundedSemaphore | None = None


def _download_slots() -> threading.BoundedSemaphore:
    """At most DOWNLOAD_WORKERS downloads at once, however many items wait for ffmpeg."""
    global _DOWNLOAD_SLOTS
    if _DOWNLOAD_SLOTS is None:
        _DOWNLOAD_SLOTS = threading.BoundedSemaphore(CFG.download_workers)
    return _DOWNLOAD_SLOTS


def _download_once(url: str, dest: Path, deadline: float) -> Path:
    timeout = (CFG.download_connect_timeout, CFG.download_read_timeout)
    try:
        response = safe_get(url, timeout=timeout, max_bytes=CFG.max_download_bytes)
    except SSRFError as exc:
        raise _ssrf_item_error(exc) from None
    except requests.ConnectionError as exc:
        raise _Retry(f"could not connect: {_short(exc)}") from None
    except requests.Timeout as exc:
        raise ItemError("download_timeout", f"no response within {CFG.download_read_timeout:g} s: {_short(exc)}") from None
    except requests.RequestException as exc:
        raise ItemError("download_failed", _short(exc)) from None
    too_slow = ItemError("download_timeout", f"download took over {CFG.download_total_sec:g} s")
    with response, _cut_off_at(deadline, response) as expired:
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retry(f"HTTP {response.status_code} from {url}")
        if response.status_code >= 400:
            raise ItemError("download_failed", f"HTTP {response.status_code} from {url}")
        try:
            with open(dest, "wb") as out:
                for chunk in iter_content_capped(response, 1 << 20, CFG.max_download_bytes):
                    out.write(chunk)
                    if time.monotonic() > deadline:
                        raise too_slow
        except SSRFError as exc:
            raise _ssrf_item_error(exc) from None
        except (requests.RequestException, OSError) as exc:
            if expired.is_set():
                raise too_slow from None
            code = "download_timeout" if "timed out" in str(exc).lower() else "download_failed"
            raise ItemError(code, f"download broke off: {_short(exc)}") from None
        if expired.is_set():  # the cut-off can end the body early without an exception
            raise too_slow
    return dest


@contextlib.contextmanager
def _cut_off_at(deadline: float, response: requests.Response) -> Iterator[threading.Event]:
    """Hold the download to its deadline. requests bounds each read, not the whole body, so a
    server that sends a byte every few seconds would hold the item (and a download slot) for
    ever. At the deadline a timer shuts the socket down, which wakes the blocked read; the
    event it sets tells the reader why the body ended."""
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        # urllib3 2 -> http.client response -> buffered reader -> SocketIO -> socket. Should the
        # chain ever break, the per-chunk deadline check in _download_once still applies.
        sock = response.raw
        for attr in ("_fp", "fp", "raw", "_sock"):
            sock = getattr(sock, attr, None)
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), cut)
    timer.daemon = True
    timer.start()
    try:
        yield expired
    finally:
        timer.cancel()


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


def _ffmpeg_cmd(pairs: Sequence[tuple[Path, Path]]) -> list[str]:
    """One ffmpeg command decoding the first audio stream of each source to its own 16 kHz mono
    s16 WAV. Whitelists are per input: no file of ours may make ffmpeg open another one."""
    cmd = [_ffmpeg_bin(), "-nostdin", "-hide_banner", "-loglevel", "error"]
    for src, _ in pairs:
        cmd += ["-protocol_whitelist", "file,pipe", "-format_whitelist", FFMPEG_FORMATS, "-i", f"file:{src}"]
    for n, (_, dest) in enumerate(pairs):
        cmd += [
            "-map", f"{n}:a:0", "-vn", "-sn", "-dn", "-ac", "1", "-ar", str(SAMPLE_RATE),
            "-c:a", "pcm_s16le", "-t", f"{CFG.max_audio_sec + 1:.3f}", "-f", "wav", "-y", f"file:{dest}",
        ]  # fmt: skip
    return cmd


def _run_ffmpeg(pairs: Sequence[tuple[Path, Path]]) -> tuple[int, str]:
    """Run ffmpeg on `pairs`; (exit code, stderr). Raises decode_timeout."""
    try:
        proc = subprocess.run(
            _ffmpeg_cmd(pairs), stdin=subprocess.DEVNULL, capture_output=True, timeout=CFG.ffmpeg_timeout_sec
        )
    except subprocess.TimeoutExpired:
        raise ItemError("decode_timeout", f"ffmpeg took over {CFG.ffmpeg_timeout_sec:g} s") from None
    return proc.returncode, proc.stderr.decode("utf-8", "replace").strip()


def _wav_frames(dest: Path) -> int:
    try:
        return sf.info(str(dest)).frames
    except RuntimeError as exc:
        raise ItemError("not_audio", f"ffmpeg wrote no readable audio: {exc}") from None


def _to_wav(src: Path, dest: Path) -> tuple[int, str | None]:
    """Decode the first audio stream of `src` to 16 kHz mono s16 WAV; return (frames, warning)."""
    code, stderr = _run_ffmpeg([(src, dest)])
    tail = stderr[-400:]
    if code != 0:
        if "matches no streams" in stderr:
            raise ItemError("no_audio", "the file has no audio stream")
        raise ItemError("not_audio", f"ffmpeg could not decode it as audio: {tail or 'exit ' + str(code)}")
    return _wav_frames(dest), (f"decoder reported errors, transcribed what decoded: {tail}" if tail else None)


def _to_wavs(pairs: Sequence[tuple[Path, Path]]) -> list[tuple[int, str | None] | ItemError]:
    """Several small files in one ffmpeg process: starting ffmpeg (~50 ms, 200 shared libraries)
    costs more than decoding a short clip. Anything but a clean run is redone file by file, so
    each error and warning lands on its own item."""
    if len(pairs) > 1:
        try:
            code, stderr = _run_ffmpeg(pairs)
            if code == 0 and not stderr:
                return [(_wav_frames(dest), None) for _, dest in pairs]
        except ItemError:
            pass
    out: list[tuple[int, str | None] | ItemError] = []
    for src, dest in pairs:
        try:
            out.append(_to_wav(src, dest))
        except ItemError as exc:
            out.append(exc)
    return out


# ffmpeg's CPU cost on one core (Debian's ffmpeg 5.1, measured on this project's benchmark
# workload): ~55 ms to start, then milliseconds per MB of input by container. Only an estimate,
# used to order and group the work.
FFMPEG_START_MS = 55.0
DECODE_MS_PER_MB = {b"RIFF": 3.0, b"RF64": 3.0, b"FORM": 3.0, b"fLaC": 22.0, b"OggS": 300.0}
DECODE_MS_PER_MB_OTHER = 75.0  # mp3, m4a/mp4 (58), webm, anything else


def _decode_cost_ms(src: Path) -> float:
    """Estimated ffmpeg decode time of `src`, without its start-up: its size times its format's rate."""
    with open(src, "rb") as f:
        magic = f.read(4)
    return src.stat().st_size / 1e6 * DECODE_MS_PER_MB.get(magic, DECODE_MS_PER_MB_OTHER)


@dataclass(eq=False)
class _Decode:
    """One file waiting for ffmpeg, and what came of it."""

    src: Path
    dest: Path
    cost_ms: float
    done: bool = False
    result: tuple[int, str | None] | BaseException | None = None


class _Decoder:
    """Runs ffmpeg for every job's items, PREPARE_WORKERS processes at a time (it is CPU-bound,
    however many downloads are running). The threads waiting on it take turns doing the work,
    costliest file first, so that no long decode starts last and holds up the end; files that
    decode in less time than ffmpeg takes to start go several to a process."""

    GROUP_BELOW_MS = 3 * FFMPEG_START_MS  # a file this cheap shares a process...
    GROUP_MAX_MS = 6 * FFMPEG_START_MS  # ...with others, up to this much decoding in all
    GROUP_ITEMS = 16

    def __init__(self, slots: int):
        self.slots = slots
        self.running = 0
        self.pending: list[_Decode] = []
        self.cond = threading.Condition()

    def decode(self, src: Path, dest: Path) -> tuple[int, str | None]:
        """`src` as a 16 kHz mono WAV at `dest`: (frames, warning); raises ItemError."""
        mine = _Decode(src, dest, _decode_cost_ms(src))
        with self.cond:
            self.pending.append(mine)
            self.pending.sort(key=lambda d: d.cost_ms, reverse=True)
        while (work := self._next(mine)) is not None:
            try:
                self._run(work)
            finally:
                with self.cond:
                    self.running -= 1
                    self.cond.notify_all()
        if isinstance(mine.result, BaseException):
            raise mine.result
        return mine.result  # type: ignore[return-value]

    def _next(self, mine: _Decode) -> list[_Decode] | None:
        """Wait until `mine` is done (None), or a slot is free and work waits: take it."""
        with self.cond:
            while not mine.done and (self.running >= self.slots or not self.pending):
                self.cond.wait()
            if mine.done:
                return None
            self.running += 1
            return self._take()

    def _take(self) -> list[_Decode]:
        """The next process's work, from the costliest pending file (called holding the lock)."""
        work = [self.pending.pop(0)]
        if work[0].cost_ms >= self.GROUP_BELOW_MS:
            return work
        total = work[0].cost_ms
        while self.pending and len(work) < self.GROUP_ITEMS and total + self.pending[0].cost_ms <= self.GROUP_MAX_MS:
            total += self.pending[0].cost_ms
            work.append(self.pending.pop(0))
        return work

    @staticmethod
    def _run(work: list[_Decode]) -> None:
        try:
            results: list[Any] = _to_wavs([(d.src, d.dest) for d in work])
        except Exception as exc:  # noqa: BLE001 - handed to each waiting item's own thread
            results = [exc] * len(work)
        for d, result in zip(work, results, strict=True):
            d.result, d.done = result, True


_DECODER: _Decoder | None = None


def _decoder() -> _Decoder:
    global _DECODER
    if _DECODER is None:
        _DECODER = _Decoder(CFG.prepare_workers)
    return _DECODER


def _fetch_to_wav(index: int, item: Any, workdir: Path) -> Prepared:
    """Any source, any format -> a 16 kHz mono WAV in `workdir`, with its exact length."""
    kind, value = _source_of(item)
    raw = workdir / f"{index}.src"
    if kind == "url":
        src = _download(value, raw)
    elif kind == "base64":
        src = _decode_base64(value, raw)
    else:
        src = _local_path(value)
    if src.stat().st_size == 0:
        raise ItemError("empty_audio", "the file is empty")
    wav = workdir / f"{index}.wav"
    try:
        frames, warning = _decoder().decode(src, wav)
    finally:
        raw.unlink(missing_ok=True)  # the WAV is all we need from here on
    if frames == 0:
        wav.unlink(missing_ok=True)
        raise ItemError("empty_audio", "the audio has no samples")
    if frames > CFG.max_audio_sec * SAMPLE_RATE:
        wav.unlink(missing_ok=True)
        raise ItemError(
            "too_long", f"audio is longer than MAX_AUDIO_SEC={CFG.max_audio_sec:g} s", duration=frames / SAMPLE_RATE
        )
    return Prepared(index=index, source=_label(kind, value), wav=wav, frames=frames, warning=warning)


# ---------------------------------------------------------------------------------------------
# Batching: short items share batches, long ones run alone, and the longest switch the encoder
# to local attention (or are split, past MAX_SINGLE_PASS_SEC).
# ---------------------------------------------------------------------------------------------

SHORT, LONG, LOCAL = "short", "long", "local"


def _bucket_of(duration: float, cfg: Config | None = None) -> str:
    cfg = cfg or CFG
    if duration <= cfg.short_max_sec:
        return SHORT
    return LOCAL if duration > cfg.local_attention_after_sec else LONG


def _bucketize_by_duration(items: Iterable[Prepared], cfg: Config | None = None) -> dict[str, list[Prepared]]:
    """Split items into short (batched), long (alone, full attention) and local (alone, local
    attention) buckets, each sorted by duration so batches pad little and modes switch once."""
    buckets: dict[str, list[Prepared]] = {SHORT: [], LONG: [], LOCAL: []}
    for item in items:
        buckets[_bucket_of(item.duration, cfg)].append(item)
    for bucket in buckets.values():
        bucket.sort(key=lambda p: p.duration)
    return buckets


def _make_batches(items: Sequence[Prepared], cfg: Config | None = None) -> list[list[Prepared]]:
    """Pack items into batches of <= BATCH_MAX_ITEMS and <= BATCH_MAX_TOTAL_SEC.

    Items are sorted by duration and cut into runs that minimise padded seconds plus a fixed
    cost per batch (BATCH_OVERHEAD_SEC): the exact optimum over contiguous runs, by dynamic
    programming. An item longer than the whole budget gets a batch of its own.
    """
    cfg = cfg or CFG
    ordered = sorted(items, key=lambda p: p.duration)
    n = len(ordered)
    best = [0.0] + [float("inf")] * n  # best[i]: cheapest packing of the first i items
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        total = 0.0
        for start in range(end - 1, max(-1, end - 1 - cfg.batch_max_items), -1):
            total += ordered[start].duration
            if total > cfg.batch_max_total_sec and start < end - 1:
                break
            cost = best[start] + (end - start) * ordered[end - 1].duration + cfg.batch_overhead_sec
            if cost < best[end]:
                best[end], cut[end] = cost, start
    batches: list[list[Prepared]] = []
    end = n
    while end > 0:
        batches.append(ordered[cut[end] : end])
        end = cut[end]
    return batches[::-1]


def _padding_efficiency(batches: Iterable[Sequence[Prepared]]) -> float:
    real = padded = 0.0
    for batch in batches:
        real += sum(p.duration for p in batch)
        padded += len(batch) * max(p.duration for p in batch)
    return real / padded if padded else 1.0


# ---------------------------------------------------------------------------------------------
# Transcription
# ---------------------------------------------------------------------------------------------


@dataclass
class Transcript:
    """What the model said about one item, timestamps in seconds from the item's start."""

    text: str
    words: list[dict[str, Any]] = field(default_factory=list)
    segments: list[dict[str, Any]] = field(default_factory=list)


DRY_RUN_TEXT = "[dry run: SKIP_MODEL_LOAD=1, no model loaded]"


def _maybe_set_local_attention(model: Any, duration: float) -> None:
    """Local attention above LOCAL_ATTENTION_AFTER_SEC, full attention otherwise.

    Switching costs about 2 s on the real model, so it only happens when the mode changes.
    NeMo builds the new attention modules in training mode (dropout on), hence the eval().
    """
    want_local = duration > CFG.local_attention_after_sec
    if want_local == _STATE["local_attention"]:
        return
    if want_local:
        model.change_attention_model("rel_pos_local_attn", list(CFG.local_attention_context))
    else:
        model.change_attention_model("rel_pos", [-1, -1])
    model.eval()
    _STATE["local_attention"] = want_local
    log.info("encoder attention: %s", "local" if want_local else "full")


def _load_batch(batch: Sequence[Prepared]) -> tuple[np.ndarray, list[int]]:
    """Read each WAV straight into its row of one zero-padded float32 matrix: one copy."""
    lengths = [p.frames for p in batch]
    audio = np.zeros((len(batch), max(lengths)), dtype=np.float32)
    for row, p in enumerate(batch):
        with sf.SoundFile(str(p.wav)) as f:
            f.seek(p.start)
            f.read(p.frames, dtype="float32", out=audio[row, : p.frames])
    return audio, lengths


def _forward_decode(model: Any, audio: np.ndarray, lengths: list[int]) -> list[Any]:
    """Encoder + greedy TDT decoding on a padded batch, as transcribe() does, minus its
    per-call dataloader, temp files and mode switching. Returns NeMo Hypothesis objects."""
    import torch

    device = _STATE["device"]
    signal = torch.from_numpy(audio).to(device, non_blocking=True)
    length = torch.tensor(lengths, dtype=torch.int64, device=device)
    dtype = _STATE["autocast"]
    with torch.inference_mode(), torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
        encoded, encoded_len = model.forward(input_signal=signal, input_signal_length=length)
        hyps = model.decoding.rnnt_decoder_predictions_tensor(encoded, encoded_len, return_hypotheses=True)
    del signal, encoded
    return list(hyps)


def _run_model(model: Any, batch: Sequence[Prepared], timestamps: bool) -> list[Transcript]:
    """One model call on one batch (all items in the same attention mode)."""
    if model is None:
        return [Transcript(DRY_RUN_TEXT) for _ in batch]
    audio, lengths = _load_batch(batch)
    with _MODEL_LOCK:
        _maybe_set_local_attention(model, max(p.duration for p in batch))
        if any(m.training for m in model.modules()):
            model.eval()  # see _maybe_set_local_attention; NeMo's transcribe() can leave it so too
        if _STATE["timestamps"] != timestamps:
            _configure_decoding(model, timestamps)
        hyps = _forward_decode(model, audio, lengths)
    del audio
    stride = model.encoder.subsampling_factor * float(model.cfg.preprocessor.window_stride)
    return [_transcript(h, stride if timestamps else None) for h in hyps]


def _transcript(hyp: Any, frame_sec: float | None) -> Transcript:
    """NeMo Hypothesis -> Transcript; frame offsets become seconds (as NeMo's
    process_timestamp_outputs computes them)."""
    text = hyp.text if isinstance(hyp.text, str) else ""
    if frame_sec is None or not isinstance(getattr(hyp, "timestamp", None), dict):
        return Transcript(text.strip())

    def spans(kind: str, key: str) -> list[dict[str, Any]]:
        return [
            {key: s[kind], "start": s["start_offset"] * frame_sec, "end": s["end_offset"] * frame_sec}
            for s in hyp.timestamp.get(kind, [])
        ]

    return Transcript(text.strip(), spans("word", "word"), spans("segment", "segment"))


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


def _run_resilient(model: Any, batch: Sequence[Prepared], timestamps: bool) -> list[Transcript | ItemError]:
    """Run a batch; if the model fails, retry its halves, so only an item that fails alone
    gets an error. A CUDA out-of-memory takes the same path, after emptying the cache."""
    try:
        return list(_run_model(model, batch, timestamps))
    except Exception as exc:
        if _is_oom(exc):
            import torch

            torch.cuda.empty_cache()
        if len(batch) == 1:
            log.exception("transcription failed for item %d", batch[0].index)
            code = "out_of_memory" if _is_oom(exc) else "transcription_failed"
            return [ItemError(code, f"the model failed on this item: {type(exc).__name__}: {_short(exc)}")]
        log.warning("batch of %d failed (%s); retrying in halves", len(batch), _short(exc, 120))
        half = len(batch) // 2
        return _run_resilient(model, batch[:half], timestamps) + _run_resilient(model, batch[half:], timestamps)


def _split_points(item: Prepared, piece_sec: float) -> list[int]:
    """Frame offsets where a too-long item is cut: the quietest 200 ms near each boundary.

    The search looks back from each boundary over min(60 s, a quarter piece), reading only that
    window from disk, so a cut lands in a pause between words rather than inside one.
    """
    piece = int(piece_sec * SAMPLE_RATE)
    window = int(min(60.0, piece_sec / 4) * SAMPLE_RATE)
    hop = SAMPLE_RATE // 100  # 10 ms energy frames
    cuts, pos = [0], 0
    while item.frames - pos > piece:
        lo = pos + piece - window
        with sf.SoundFile(str(item.wav)) as f:
            f.seek(item.start + lo)
            chunk = f.read(window, dtype="float32")
        energy = np.add.reduceat(chunk**2, np.arange(0, len(chunk), hop))
        smooth = np.convolve(energy, np.ones(20), mode="same")  # 200 ms
        pos = lo + int(np.argmin(smooth[10:-10]) + 10) * hop
        cuts.append(pos)
    return cuts


def _transcribe_split(
    model: Any, item: Prepared, timestamps: bool, on_piece: Callable[[Prepared, float], None] | None = None
) -> Transcript | ItemError:
    """Audio over MAX_SINGLE_PASS_SEC: transcribe pieces cut at pauses, then join the text and
    shift each piece's timestamps by where it starts. Only one piece is in memory at a time.
    `on_piece(item, seconds done)` follows the pieces: one item can take minutes of GPU."""
    cuts = [*_split_points(item, CFG.max_single_pass_sec), item.frames]
    joined = Transcript("")
    for lo, hi in itertools.pairwise(cuts):
        piece = dataclasses.replace(item, start=item.start + lo, frames=hi - lo)
        (part,) = _run_resilient(model, [piece], timestamps)
        if isinstance(part, ItemError):
            return part
        if on_piece and hi < item.frames:
            on_piece(item, hi / SAMPLE_RATE)
        shift = lo / SAMPLE_RATE
        joined.text = f"{joined.text} {part.text}".strip()
        for span in part.words + part.segments:
            span["start"] += shift
            span["end"] += shift
        joined.words += part.words
        joined.segments += part.segments
    return joined


def transcribe_batched(
    model: Any,
    items: Iterable[Prepared],
    timestamps: bool,
    on_done: Callable[[list[Prepared]], None] | None = None,
    on_piece: Callable[[Prepared, float], None] | None = None,
) -> tuple[dict[int, Transcript | ItemError], list[list[Prepared]]]:
    """Transcribe prepared items as they arrive; return results by input index and the batches.

    `items` may be a live iterator (the prepare pool's completions): long items start as soon
    as they are ready, and short ones start early once enough are waiting to fill two batches,
    so the GPU works while later downloads are still running. The rest is packed at the end.
    Local-attention items run last, so the encoder switches mode at most once per job.
    `on_done(batch)` follows each batch, `on_piece(item, seconds)` the pieces of a split item.
    """
    results: dict[int, Transcript | ItemError] = {}
    batches: list[list[Prepared]] = []
    waiting: list[Prepared] = []
    deferred: list[Prepared] = []

    def run(batch: list[Prepared]) -> None:
        outs: list[Transcript | ItemError]
        try:
            if len(batch) == 1 and batch[0].duration > CFG.max_single_pass_sec:
                outs = [_transcribe_split(model, batch[0], timestamps, on_piece)]
            else:
                outs = _run_resilient(model, batch, timestamps)
        except Exception as exc:  # a bug outside the model call: this batch's items, not the job
            log.exception("batch of %d failed outside the model", len(batch))
            outs = [ItemError("internal_error", f"{type(exc).__name__}: {_short(exc)}") for _ in batch]
        results.update((p.index, out) for p, out in zip(batch, outs, strict=False))
        batches.append(batch)
        if on_done:
            on_done(batch)

    for item in items:
        bucket = _bucket_of(item.duration)
        if bucket == LONG:
            run([item])
        elif bucket == LOCAL:
            deferred.append(item)
        else:
            waiting.append(item)
            full = len(waiting) >= 2 * CFG.batch_max_items
            if full or sum(p.duration for p in waiting) >= 2 * CFG.batch_max_total_sec:
                # the biggest of the batches the rest would be packed into: it gains least by waiting
                first = max(_make_batches(waiting), key=lambda b: sum(p.frames for p in b))
                waiting = [p for p in waiting if p not in first]
                run(first)
    for batch in _make_batches(waiting):
        run(batch)
    for item in sorted(deferred, key=lambda p: p.duration):
        run([item])
    return results, batches


# ---------------------------------------------------------------------------------------------
# Output: one result per input, in input order; subtitles rendered from segment timestamps.
# ---------------------------------------------------------------------------------------------

SUB_MAX_CHARS = 42
SUB_MAX_SEC = 7.0


def _subtitle_cues(transcript: Transcript) -> list[tuple[float, float, str]]:
    """Cues of <= 42 characters and <= 7 s, cut at word boundaries and at segment ends."""
    segment_ends = sorted(s["end"] for s in transcript.segments)
    cues: list[tuple[float, float, str]] = []
    line: list[dict[str, Any]] = []
    for word in transcript.words:
        if line:
            text = " ".join(w["word"] for w in [*line, word])
            new_segment = bisect.bisect_left(segment_ends, word["start"]) != bisect.bisect_left(
                segment_ends, line[-1]["start"]
            )
            if new_segment or len(text) > SUB_MAX_CHARS or word["end"] - line[0]["start"] > SUB_MAX_SEC:
                cues.append((line[0]["start"], line[-1]["end"], " ".join(w["word"] for w in line)))
                line = []
        line.append(word)
    if line:
        cues.append((line[0]["start"], line[-1]["end"], " ".join(w["word"] for w in line)))
    fixed: list[tuple[float, float, str]] = []
    for start, end, text in cues:  # ordered, non-overlapping, never zero-length
        start = max(start, fixed[-1][1]) if fixed else start
        fixed.append((start, max(end, start + 0.01), text))
    return fixed


def _clock(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(transcript: Transcript) -> str:
    blocks = [
        f"{n}\n{_clock(a, ',')} --> {_clock(b, ',')}\n{text}\n"
        for n, (a, b, text) in enumerate(_subtitle_cues(transcript), start=1)
    ]
    return "\n".join(blocks)


def to_vtt(transcript: Transcript) -> str:
    blocks = [f"{_clock(a, '.')} --> {_clock(b, '.')}\n{text}\n" for a, b, text in _subtitle_cues(transcript)]
    return "WEBVTT\n\n" + "\n".join(blocks)


def _item_result(index: int, source: str, out: Any, params: dict[str, Any], prepared: Prepared | None) -> dict[str, Any]:
    result: dict[str, Any] = {"index": index, "source": source}
    duration = prepared.duration if prepared is not None else getattr(out, "duration", None)
    if duration is not None:
        result["duration"] = round(duration, 3)
    if isinstance(out, ItemError):
        result.update(code=out.code, error=out.message)
        return result
    result["text"] = out.text
    if params["timestamps"]:
        result["timestamps"] = {
            "word": [{"word": w["word"], "start": round(w["start"], 3), "end": round(w["end"], 3)} for w in out.words],
            "segment": [
                {"segment": s["segment"], "start": round(s["start"], 3), "end": round(s["end"], 3)} for s in out.segments
            ],
        }
    if params["output_format"] in ("srt", "vtt"):
        result["subtitles"] = to_srt(out) if params["output_format"] == "srt" else to_vtt(out)
    if prepared is not None and prepared.warning:
        result["warning"] = prepared.warning
    return result


# ---------------------------------------------------------------------------------------------
# Handler
# ---------------------------------------------------------------------------------------------

_POOL: cf.ThreadPoolExecutor | None = None


def _pool() -> cf.ThreadPoolExecutor:
    """Shared by jobs: downloads wait on the network; ffmpeg runs PREPARE_WORKERS at a time (_Decoder)."""
    global _POOL
    if _POOL is None:
        # Threads mostly wait: on the network (DOWNLOAD_WORKERS at a time) or for ffmpeg
        # (PREPARE_WORKERS at a time). Enough of them that items waiting for ffmpeg do not hold
        # back the next downloads.
        size = 4 * max(CFG.prepare_workers, CFG.download_workers)
        _POOL = cf.ThreadPoolExecutor(max_workers=size, thread_name_prefix="prepare")
    return _POOL


def _check_input(job_input: Any) -> tuple[dict[str, Any] | None, str | None]:
    """Validate the job with rp_validator plus the checks it skips; return (params, error)."""
    if not isinstance(job_input, dict):
        return None, 'input must be an object like {"inputs": [{"source": "..."}]}'
    checked = validate(job_input, INPUT_SCHEMA)
    if "errors" in checked:
        return None, "invalid input: " + " ".join(checked["errors"])
    params = checked["validated_input"]
    if not params["inputs"]:
        return None, "invalid input: inputs must hold at least one item"
    if len(params["inputs"]) > CFG.max_inputs:
        return None, f"invalid input: inputs has {len(params['inputs'])} items, more than MAX_INPUTS={CFG.max_inputs}"
    if params["output_format"] not in OUTPUT_FORMATS:
        return None, f"invalid input: output_format must be one of {list(OUTPUT_FORMATS)}"
    return params, None


def _prepare_all(inputs: list[Any], workdir: Path, errors: dict[int, ItemError]) -> tuple[list[cf.Future], Iterator[Prepared]]:
    """Start fetching every item; return the futures and an iterator over finished items."""
    futures = {_pool().submit(_fetch_to_wav, i, item, workdir): i for i, item in enumerate(inputs)}

    def finished() -> Iterator[Prepared]:
        for future in cf.as_completed(futures):
            index = futures[future]
            try:
                yield future.result()
            except ItemError as exc:
                errors[index] = exc
            except Exception as exc:
                log.exception("preparing item %d failed", index)
                errors[index] = ItemError("internal_error", f"{type(exc).__name__}: {_short(exc)}")

    return list(futures), finished()


def handler(job: dict[str, Any]) -> dict[str, Any]:
    """Runpod entry: {"input": {"inputs": [...], "timestamps": bool, "output_format": str}}."""
    started = time.monotonic()
    params, error = _check_input(job.get("input"))
    if error:
        return {"error": error}
    if _MODEL_ERROR:
        return {"error": _MODEL_ERROR}
    inputs = params["inputs"]
    Path(CFG.tmp_dir).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="job-", dir=CFG.tmp_dir))
    futures: list[cf.Future] = []
    try:
        errors: dict[int, ItemError] = {}
        futures, ready = _prepare_all(inputs, workdir, errors)
        prepared: dict[int, Prepared] = {}
        progress, piece_progress = _progress_reporter(job, len(inputs), prepared, errors)

        def arrived() -> Iterator[Prepared]:
            for item in ready:
                prepared[item.index] = item
                yield item

        want_times = params["timestamps"] or params["output_format"] in ("srt", "vtt")
        outputs, batches = transcribe_batched(_MODEL, arrived(), want_times, progress, piece_progress)
        outputs.update(errors)
        results = []
        for i, item in enumerate(inputs):
            source = _source_label(item)
            out = outputs.get(i) or ItemError("internal_error", "no result was produced for this item")
            try:
                results.append(_item_result(i, source, out, params, prepared.get(i)))
            except Exception as exc:  # a rendering bug costs this item, not the job
                log.exception("could not render the result of item %d", i)
                err = ItemError("internal_error", f"{type(exc).__name__}: {_short(exc)}")
                results.append(_item_result(i, source, err, params, None))
        response: dict[str, Any] = {"results": results}
        if params["output_format"] == "text":
            response["text"] = "\n".join(r.get("text", "") for r in results)
        audio_sec = sum(p.duration for p in prepared.values())
        response["stats"] = {
            "model": CFG.model if _MODEL is not None else None,
            "items": len(inputs),
            "failed": sum(1 for r in results if "error" in r),
            "audio_sec": round(audio_sec, 3),
            "wall_sec": round(time.monotonic() - started, 3),
            "batches": len(batches),
            "padding_efficiency": round(_padding_efficiency(batches), 4),
        }
        return response
    finally:
        cf.wait(futures)  # nothing may still write into workdir once it is gone
        shutil.rmtree(workdir, ignore_errors=True)


def _source_label(item: Any) -> str:
    """What a result echoes as its source: the URL or path, "base64" for inline audio (never
    the payload), or a short repr of an item that is not a valid source at all."""
    try:
        return _label(*_source_of(item))[:1000]
    except ItemError:
        source = item.get("source") if isinstance(item, dict) else None
        return source[:200] if isinstance(source, str) else repr(item)[:200]


def _progress_reporter(
    job: dict[str, Any], total: int, prepared: dict[int, Prepared], errors: dict[int, ItemError]
) -> tuple[Callable[[list[Prepared]], None], Callable[[Prepared, float], None]]:
    """After each batch, and each piece of a split item, send items and audio seconds done
    (and their totals) through the SDK's progress_update. A job that finishes in one short
    batch sends nothing."""
    done = {"items": 0, "sec": 0.0, "batches": 0}

    def send(partial_sec: float) -> None:
        all_known = len(prepared) + len(errors) >= total
        update = {
            "items_done": done["items"],
            "items_total": total - len(errors) if all_known else total,
            "audio_sec_done": round(done["sec"] + partial_sec, 3),
            "audio_sec_total": round(sum(p.duration for p in prepared.values()), 3) if all_known else None,
            "batches_done": done["batches"],
        }
        if os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):  # deployed: Runpod set where to post
            runpod.serverless.progress_update(job, update)
        else:
            log.debug("progress (not posted, no RUNPOD_WEBHOOK_POST_OUTPUT): %s", update)

    def batch_done(batch: list[Prepared]) -> None:
        done["items"] += len(batch)
        done["sec"] += sum(p.duration for p in batch)
        done["batches"] += 1
        finished = done["items"] + len(errors) >= total
        if not (done["batches"] == 1 and finished and batch[0].duration <= CFG.short_max_sec):
            send(0.0)

    def piece_done(item: Prepared, seconds_into_item: float) -> None:
        send(seconds_into_item)

    return batch_done, piece_done


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
_load_at_start()


def main(argv: list[str]) -> None:
    """RUNPOD_SERVERLESS=1: the Runpod worker loop. Otherwise the SDK's local paths:
    `--test_input '{...}'`, `--rp_serve_api`, or test_input.json in the working directory."""
    local_args = any(a.startswith(("--test_input", "--rp_")) for a in argv)
    if not _env_flag("RUNPOD_SERVERLESS") and not local_args and not Path("test_input.json").is_file():
        sys.exit("nothing to run: set RUNPOD_SERVERLESS=1, pass --test_input '{...}' or --rp_serve_api")
    runpod.serverless.start({"handler": handler})


if __name__ == "__main__":
    main(sys.argv[1:])
