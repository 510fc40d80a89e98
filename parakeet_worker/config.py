"""The worker's settings: every environment variable it reads, read in one place, once.

`CFG` is the one frozen `Config`. It is made from the environment the first time anything reads
`config.CFG` (importing this module reads nothing), and code reads it through this module at
call time (`config.CFG.x`, never `from ... import CFG`), so a test that swaps it
(`monkeypatch.setattr(config, "CFG", dataclasses.replace(config.CFG, ...))`) is seen everywhere.
docs/configuration.md documents each variable.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).resolve().parent.parent  # the repository (the image's /app)
SAMPLE_RATE = 16_000
DEFAULT_MODEL = "nvidia/parakeet-tdt-0.6b-v3"



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


def _env_languages(name: str) -> tuple[str, ...]:
    """A comma-separated list of ISO 639-1 codes ("en,de"), lower-cased, duplicates dropped."""
    codes: list[str] = []
    for part in _env(name, "").split(","):
        code = part.strip().lower()
        if not code:
            continue
        if len(code) != 2 or not (code.isascii() and code.isalpha()):
            raise SystemExit(f"{name}: {part.strip()!r} is not an ISO 639-1 language code such as 'en'")
        if code not in codes:
            codes.append(code)
    return tuple(codes)


def cpu_limit(cgroup_root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup"),
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
    """Every knob of the worker; docs/configuration.md documents each environment variable."""

    model: str = DEFAULT_MODEL
    skip_model_load: bool = False
    short_max_sec: float = 600.0
    batch_max_items: int = 16
    batch_max_total_sec: float = 1200.0
    batch_overhead_sec: float = 5.0
    local_attention_after_sec: float = 1440.0
    local_attention_context: tuple[int, int] = (256, 256)
    max_single_pass_sec: float = 1800.0  # the piece length: longer items run in pieces (docs/performance.md: Long audio)
    piece_min_sec: float = 60.0  # a piece that runs out of memory is split smaller, down to this
    memory_planning: bool = True  # attention, pieces and batches fit the memory there is (docs/operations.md: Memory)
    memory_budget_bytes: int = 0  # the most the worker may hold on its device; 0: what the device and container allow
    memory_margin: float = 0.25  # on every predicted peak
    memory_wait_sec: float = 30.0  # a pass that does not fit waits this long for memory, then is cut smaller
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
    prepare_workers: int = field(default_factory=cpu_limit)  # the container's CPUs, not the host's
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
    # HTTP limits (docs/operations.md, "HTTP limits"): a request head's bytes and time, a body's
    # idle deadline and minimum rate (after a grace), and how many bodies may be read at once
    http_head_max_bytes: int = 64 * 1024
    http_head_timeout_sec: float = 10.0
    http_body_idle_sec: float = 20.0
    http_body_min_rate: float = 4096.0  # bytes/s; 0: no minimum rate
    http_body_grace_sec: float = 10.0
    http_body_readers: int = 64
    boost_cache_bytes: int = 256 * 1024**2
    boost_max_job_phrases: int = 5000
    job_take_max: int = 8
    vad: bool = False  # the `vad` field's default; docs/vad.md says why off
    confidence: bool = False  # the `confidence` field's default; docs/confidence.md says why off
    confidence_calibration: str = ""  # a calibration JSON (bench/confidence.py --fit); "": the stored table
    speaker_model: str = str(APP_DIR / "models" / "campplus.ts")
    speaker_preload: bool = False
    diarize_workers: int = 1
    log_level: str = "info"
    ffmpeg_bin: str = ""  # "": ffmpeg on PATH, else the imageio-ffmpeg wheel's
    runpod_serverless: bool = False  # set by Runpod on its workers: run the SDK's worker loop
    progress_url: str = ""  # RUNPOD_WEBHOOK_POST_OUTPUT: where the SDK posts results; progress goes there too
    # live sessions, GET /v1/realtime (docs/realtime.md)
    realtime_max_sessions: int = 64
    realtime_partial_ms: int = 500
    realtime_max_turn_sec: float = 30.0
    realtime_max_buffer_sec: float = 120.0
    realtime_idle_sec: float = 120.0
    realtime_resume_sec: float = 60.0
    realtime_max_connection_sec: float = 0.0  # 0: no limit
    realtime_max_message_bytes: int = 1024**2
    realtime_send_queue: int = 256
    model_languages: tuple[str, ...] = ()  # (): the table by model name (analysis/language.py)

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
            memory_planning=_env_choice("MEMORY_PLANNING", "on", ("on", "off")) == "on",
            memory_budget_bytes=_env_num("WORKER_MEMORY_BUDGET_BYTES", d.memory_budget_bytes, int),
            memory_margin=_env_num("MEMORY_MARGIN", d.memory_margin),
            memory_wait_sec=_env_num("MEMORY_WAIT_SEC", d.memory_wait_sec),
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
            http_head_max_bytes=max(1024, _env_num("HTTP_HEAD_MAX_BYTES", d.http_head_max_bytes, int)),
            http_head_timeout_sec=max(0.1, _env_num("HTTP_HEAD_TIMEOUT_SEC", d.http_head_timeout_sec)),
            http_body_idle_sec=max(0.1, _env_num("HTTP_BODY_IDLE_SEC", d.http_body_idle_sec)),
            http_body_min_rate=max(0.0, _env_num("HTTP_BODY_MIN_RATE", d.http_body_min_rate)),
            http_body_grace_sec=max(0.0, _env_num("HTTP_BODY_GRACE_SEC", d.http_body_grace_sec)),
            http_body_readers=max(1, _env_num("HTTP_BODY_READERS", d.http_body_readers, int)),
            boost_cache_bytes=_env_num("BOOST_CACHE_BYTES", d.boost_cache_bytes, int),
            boost_max_job_phrases=max(1, _env_num("BOOST_MAX_JOB_PHRASES", d.boost_max_job_phrases, int)),
            job_take_max=_env_num("JOB_TAKE_MAX", d.job_take_max, int),
            vad=_env_choice("VAD", "off", ("on", "off")) == "on",
            confidence=_env_choice("CONFIDENCE", "off", ("on", "off")) == "on",
            confidence_calibration=_env("CONFIDENCE_CALIBRATION", d.confidence_calibration),
            speaker_model=_env("SPEAKER_MODEL", d.speaker_model),
            speaker_preload=_env_flag("SPEAKER_PRELOAD"),
            diarize_workers=max(1, _env_num("DIARIZE_WORKERS", d.diarize_workers, int)),
            log_level=_env_choice("LOG_LEVEL", d.log_level, LOG_LEVELS),
            ffmpeg_bin=os.environ.get("FFMPEG_BIN", "").strip(),
            runpod_serverless=_env_flag("RUNPOD_SERVERLESS"),
            progress_url=os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT", "").strip(),
            realtime_max_sessions=_env_num("REALTIME_MAX_SESSIONS", d.realtime_max_sessions, int),
            realtime_partial_ms=_env_num("REALTIME_PARTIAL_MS", d.realtime_partial_ms, int),
            realtime_max_turn_sec=max(1.0, _env_num("REALTIME_MAX_TURN_SEC", d.realtime_max_turn_sec)),
            realtime_max_buffer_sec=max(1.0, _env_num("REALTIME_MAX_BUFFER_SEC", d.realtime_max_buffer_sec)),
            realtime_idle_sec=_env_num("REALTIME_IDLE_SEC", d.realtime_idle_sec),
            realtime_resume_sec=_env_num("REALTIME_RESUME_SEC", d.realtime_resume_sec),
            realtime_max_connection_sec=_env_num("REALTIME_MAX_CONNECTION_SEC", d.realtime_max_connection_sec),
            realtime_max_message_bytes=max(1024, _env_num("REALTIME_MAX_MESSAGE_BYTES", d.realtime_max_message_bytes, int)),
            realtime_send_queue=max(1, _env_num("REALTIME_SEND_QUEUE", d.realtime_send_queue, int)),
            model_languages=_env_languages("MODEL_LANGUAGES"),
        )


def model_name(model: str) -> str:
    """What answers call the model: a hub id as given ("nvidia/parakeet-tdt-0.6b-v3"), a local
    .nemo file or unpacked directory by its name ("models/demo-tdt.nemo": "demo-tdt"), never
    the server's path to it (/v1/models, a job's stats)."""
    path = Path(model).expanduser()
    if model.endswith(".nemo") or path.is_absolute() or model.startswith(".") or path.exists():
        return path.name.removesuffix(".nemo") or "model"
    return model


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
CFG: Config  # made on first read (see __getattr__), then swapped only by tests


def __getattr__(name: str) -> Any:
    """`config.CFG`, read from the environment the first time it is asked for."""
    global CFG
    if name == "CFG":
        CFG = Config.from_env()
        return CFG
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
