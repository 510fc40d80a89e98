"""The ASR model: where it comes from, how it is loaded, placed and warmed, how it decodes, and
one forward pass on a padded batch.

Loaded once per process, by main() before the SDK takes a job (or on the first job when
handler() is called in-process), never at import: a dry run (SKIP_MODEL_LOAD=1) and the tests
of pure logic never import torch or NeMo. A failed load is kept, not raised (see state.LoadOnce).
Model calls run one at a time (NeMo models are not thread-safe), on the scheduler's thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from parakeet_worker import config, errors, memory, patches, privacy
from parakeet_worker.analysis import boosting, confidence, script_mask, speakers, vad
from parakeet_worker.analysis.boosting import Boost
from parakeet_worker.audio import disk
from parakeet_worker.config import SAMPLE_RATE
from parakeet_worker.errors import ItemError
from parakeet_worker.state import LoadOnce, shared
from parakeet_worker.transcript import Prepared, Span, Transcript

log = logging.getLogger("parakeet-worker")

@dataclass
class WorkerState:
    """What the running worker knows about its model and its own health (one per process)."""

    local_attention: bool = False  # the encoder's attention mode now (see _maybe_set_local_attention)
    timestamps: bool | None = None  # the decoder's timestamp mode now (see configure_decoding)
    device: str = "cpu"
    autocast: Any = None  # the torch dtype of model calls, None for fp32
    durations_fixed: bool | None = None  # whether NeMo 3.0's stale-duration patch applied (fix_tdt_durations)
    gpu_fault: str | None = None  # why the GPU is unusable: every job is refused, the worker asks to be replaced
    model_thread_died: str | None = None  # why the scheduler thread ended: the same, without a GPU to blame
    load_timings: dict[str, float] = field(default_factory=dict)  # seconds of the last load: restore, to_device, warm_up
    model_lock: threading.Lock = field(default_factory=threading.Lock)  # one model call at a time

    @property
    def unhealthy(self) -> str | None:
        """Why no job can run on this worker any more (None while it is healthy)."""
        return self.gpu_fault or self.model_thread_died


@shared
def state() -> WorkerState:
    """This process's WorkerState."""
    return WorkerState()


def worker_healthy() -> bool:
    """False once no job can run here (a GPU fault, a dead model thread): a health check
    (HTTP /ping) answers unhealthy, and every job's output asks Runpod for a new worker."""
    return state().unhealthy is None


def resolve_model_source(name: str) -> tuple[str, str]:
    """Where to load `name` from: ("dir", an unpacked .nemo), ("file", a .nemo) or ("hub", repo id).

    Order: a local directory or .nemo path; the unpacked copy baked into the image (see
    unpacked_dir); a .nemo already in HF_HOME; Runpod's cached models; and otherwise the hub (see
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
    unpacked = unpacked_dir(name)
    if _is_unpacked_model(unpacked):
        return "dir", str(unpacked)
    for candidate in _cached_nemo_files(name):
        return "file", candidate
    return "hub", name


def unpacked_dir(repo_id: str) -> Path:
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


def load_model(name: str) -> Any:
    """Load, place and warm the model. Raises on failure (the caller keeps the error).
    Each phase's seconds go to state().load_timings (what a cold start spends where)."""
    kind, where = resolve_model_source(name)
    if kind == "dir":
        _prefetch(Path(where) / "model_weights.ckpt")  # the disk read overlaps the imports below
    import torch
    from nemo.collections.asr.models import ASRModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info("loading model %s from %s (%s) on %s", name, where, kind, device)
    state().load_timings.clear()
    started = time.perf_counter()
    cpu = torch.device("cpu")
    if kind == "dir":
        model = restore_unpacked(where)
    elif kind == "file":
        model = ASRModel.restore_from(where, map_location=cpu)
    else:
        model = _load_from_hub(where, cpu)
    state().load_timings["restore"] = time.perf_counter() - started
    started = time.perf_counter()
    model = model.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    state().load_timings["to_device"] = time.perf_counter() - started
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
    state().device, state().autocast = device, _autocast_dtype(device, torch)
    state().local_attention, state().timestamps = False, None
    configure_decoding(model, timestamps=False, cuda_graphs=device == "cuda")
    try:
        _warm_up(model)
    except Exception as exc:
        if device != "cuda":
            raise
        log.warning("warm-up failed with CUDA-graph decoding (%s); falling back", exc)
        configure_decoding(model, timestamps=False, cuda_graphs=False)
        _warm_up(model)
    state().load_timings["warm_up"] = time.perf_counter() - started
    started = time.perf_counter()
    fit_memory(model)
    state().load_timings["memory_model"] = time.perf_counter() - started
    return model


def set_attention(model: Any, local: bool) -> None:
    """The encoder in local attention (LOCAL_ATTENTION_CONTEXT) or full attention. Switching
    costs about 2 s on the real model, so it only happens when the mode changes. NeMo builds the
    new attention modules in training mode (dropout on), hence the eval()."""
    if local == state().local_attention:
        return
    if local:
        model.change_attention_model("rel_pos_local_attn", list(config.CFG.local_attention_context))
    else:
        model.change_attention_model("rel_pos", [-1, -1])
    model.eval()
    state().local_attention = local
    log.info("encoder attention: %s", "local" if local else "full")


def fit_memory(model: Any) -> None:
    """The memory model of this model on this device (memory.planner()): kept from an earlier
    start of a worker on this machine with the same model, device and software, or measured now
    with a few short passes of the encoder (a few seconds on CPU with the demo model, less on a
    GPU). Off with MEMORY_PLANNING=off: the config's limits alone decide."""
    if not config.CFG.memory_planning:
        return
    import platform

    import torch

    device, autocast = state().device, state().autocast
    where = Path(config.CFG.model)
    identity = (config.CFG.model, *((where.stat().st_size, where.stat().st_mtime) if where.exists() else ()))
    hardware = torch.cuda.get_device_name() if device == "cuda" else f"cpu {platform.machine()}"
    key = memory.cache_key(identity, hardware, str(autocast), torch.__version__, config.CFG.local_attention_context)
    with state().model_lock:
        runner = memory.encoder_pass(model, device, lambda mode: set_attention(model, mode == memory.LOCAL), autocast)
        try:
            memory.planner().fit(device, runner, key, memory.default_cache())
        finally:
            set_attention(model, False)
            if device == "cuda":
                torch.cuda.empty_cache()


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


def restore_unpacked(directory: str) -> Any:
    """Restore an unpacked .nemo where it lies, through NeMo's own restore_from, minus the work
    a cold start need not do:

    - no archive to extract: SaveRestoreConnector.model_extracted_dir restores in place;
    - no random initialisation of the parameters (see no_random_init): the checkpoint's tensors
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
    with no_random_init(torch):
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
def no_random_init(torch: Any) -> Iterator[None]:
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
    with VolumeCache(dirs=[str(mirror)], volume_path=config.CFG.network_volume):
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
    if device != "cuda" or config.CFG.dtype == "fp32":
        return None
    if config.CFG.dtype == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else None


def configure_decoding(model: Any, timestamps: bool, cuda_graphs: bool | None = None) -> None:
    """Greedy batched TDT decoding; word/segment timestamps only when a job asks for them; per-item
    key-phrase boosting unless BOOSTING=off (an item without boosting decodes exactly as with it
    off; see the boosting section). NeMo 3.0's stale-duration bug is patched first."""
    from omegaconf import open_dict

    state().durations_fixed = patches.fix_tdt_durations()
    cfg = model.cfg.decoding
    with open_dict(cfg):
        cfg.strategy = "greedy_batch"
        cfg.compute_timestamps = timestamps
        if cuda_graphs is not None and "greedy" in cfg:
            cfg.greedy.use_cuda_graph_decoder = cuda_graphs
        if config.CFG.boosting and "greedy" not in cfg:
            cfg.greedy = {}
        if "greedy" in cfg:
            cfg.greedy.enable_per_stream_biasing = config.CFG.boosting
    model.change_decoding_strategy(cfg, verbose=False)
    state().timestamps = timestamps
    decoders = model.__dict__.setdefault("_pw_decoders", {})  # see _use_decoding
    if cuda_graphs is not None:  # a new set-up: the other setting's decoder is rebuilt on its first use
        decoders.clear()
    decoders[timestamps] = (model.decoding, model.wer)
    multi = boosting.multi_model(model)
    if cuda_graphs and multi is not None and not multi.compatible_with_cuda_graphs():  # at load, on a GPU
        log.warning("boosting without Triton: NeMo decodes without CUDA graphs (install triton, or set BOOSTING=off)")


def _use_decoding(model: Any, timestamps: bool) -> None:
    """Switch decoding to `timestamps` on or off. Each setting's decoder is built once
    (configure_decoding) and kept on the model, so a switch swaps two references instead of
    rebuilding: NeMo's decoders and their OmegaConf configs are reference cycles, and each
    rebuilt one stayed in memory (~39 MB with boosting on) until a full garbage collection."""
    from omegaconf import open_dict

    cached = model.__dict__.get("_pw_decoders", {}).get(timestamps)
    if cached is None:
        configure_decoding(model, timestamps)
        return
    model.decoding, model.wer = cached
    if model.joint.fuse_loss_wer:
        model.joint.set_wer(model.wer)
    with open_dict(model.cfg.decoding):
        model.cfg.decoding.compute_timestamps = timestamps
    state().timestamps = timestamps


def _warm_up(model: Any) -> None:
    """One pass on a second of silence so the first request pays no lazy initialisation."""
    with state().model_lock:
        forward_decode(model, np.zeros((1, SAMPLE_RATE), np.float32), [SAMPLE_RATE])


def _load_configured() -> Any:
    """The model named by PARAKEET_MODEL, loaded and warm; None in a dry run."""
    if config.CFG.skip_model_load:
        return None
    privacy.telemetry_off()  # before NeMo (and huggingface_hub, wandb, lightning) are imported
    confidence_calibration()  # a bad CONFIDENCE_CALIBRATION fails here, before the long load
    model = load_model(config.CFG.model)
    with contextlib.suppress(Exception):  # a broken silero install fails on VAD's first use
        vad.import_silero()  # see there: not while model calls run
    return model


MODEL: LoadOnce[Any] = LoadOnce(
    _load_configured, lambda exc: f"model {config.CFG.model!r} could not be loaded: {type(exc).__name__}: {exc}"
)


def ensure_model() -> Any:
    """Load the model once per process (thread-safe); None in a dry run or after a failure,
    which is then kept in MODEL.error. With SPEAKER_PRELOAD the speaker model loads now too."""
    model = MODEL.get()
    if config.CFG.speaker_preload:  # else on the first diarized item
        with contextlib.suppress(ItemError):  # kept by speakers; items say why
            speakers.speaker_model()
    return model


def loaded_model() -> Any:
    """The model if it is loaded (None before, after a failed load, and in a dry run)."""
    return MODEL.value


DRY_RUN_TEXT = "[dry run: SKIP_MODEL_LOAD=1, no model loaded]"


def load_rows(items: Sequence[Prepared]) -> tuple[np.ndarray, list[int], dict[int, ItemError]]:
    """Read each item's WAV frames (or a live turn's samples) straight into its row of one
    zero-padded float32 matrix (one copy). An item whose audio cannot be read gets an error and
    an empty row."""
    lengths = [p.frames for p in items]
    audio = np.zeros((len(items), max(lengths)), dtype=np.float32)
    failed: dict[int, ItemError] = {}
    for row, p in enumerate(items):
        if p.samples is not None:  # a live turn: in memory already
            audio[row, : p.frames] = p.samples
            continue
        try:
            with sf.SoundFile(str(p.wav)) as f:
                at = 0
                for lo, hi in p.regions or ((p.start, p.start + p.frames),):
                    f.seek(lo)
                    f.read(hi - lo, dtype="float32", out=audio[row, at : at + hi - lo])
                    at += hi - lo
        except (OSError, RuntimeError) as exc:
            failed[row] = disk.tmp_problem(p.wav.parent) or ItemError(
                "internal_error", f"could not read the decoded audio {p.wav.name}: {errors.short(exc)}"
            )
    return audio, lengths, failed


def forward_decode(
    model: Any, audio: np.ndarray, lengths: list[int], seeds: list[Any] | None = None, scored: Sequence[bool] | None = None
) -> list[Any]:
    """Encoder + greedy TDT decoding on a padded batch, as transcribe() does, minus its
    per-call dataloader, temp files and mode switching. Returns NeMo Hypothesis objects.
    `seeds` (see registered) carry the rows' boosting requests. The rows `scored` marks get
    their tokens' log-probabilities (analysis.confidence.token_logprobs, one pass over the batch
    after decoding, while the encoder's output is still here) as `hyp.pw_logprobs`."""
    import torch

    device = state().device
    signal = torch.from_numpy(np.ascontiguousarray(audio)).to(device, non_blocking=True)
    length = torch.tensor(lengths, dtype=torch.int64, device=device)
    dtype = state().autocast
    with torch.inference_mode(), torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
        encoded, encoded_len = model.forward(input_signal=signal, input_signal_length=length)
        hyps = model.decoding.rnnt_decoder_predictions_tensor(
            encoded, encoded_len, return_hypotheses=True, partial_hypotheses=seeds
        )
        rows = [r for r, want in enumerate(scored or ()) if want]
        if rows:
            found = confidence.token_logprobs(model, encoded, encoded_len, hyps, rows)
            for r, logprobs in zip(rows, found, strict=True):
                hyps[r].pw_logprobs = logprobs
    del signal, encoded
    return list(hyps)


# Called under the model lock before a batch runs, with the batch's longest row in seconds and
# its rows: how the caller sets the encoder up for it (handler._maybe_set_local_attention).
Prepare = Callable[[Any, float, int], None]


def run_model(
    model: Any, audio: np.ndarray, lengths: list[int], timestamps: bool, boosts: Sequence[Boost | None] | None = None,
    prepare: Prepare | None = None, scripts: Sequence[frozenset[str] | None] | None = None,
    scored: Sequence[bool] | None = None,
) -> list[Transcript]:
    """One model call on one batch (all rows in the same attention mode); `boosts` has one entry
    per row, None for a row decoded without boosting; `prepare` sets the encoder up first;
    `scripts` (one per row, or None) keeps a row's decoding to the scripts of its language hint
    (analysis/script_mask.py: a batch without any decodes exactly as without the mask code); the
    rows `scored` marks (None: none) come back with confidence (analysis.confidence.scored).
    Scoring runs after decoding and changes neither text nor timestamps."""
    if model is None:
        return [Transcript(DRY_RUN_TEXT) for _ in lengths]
    with state().model_lock:
        if prepare is not None:
            prepare(model, max(lengths) / SAMPLE_RATE, len(lengths))
        if any(m.training for m in model.modules()):
            model.eval()  # see _maybe_set_local_attention
        if state().timestamps != timestamps:
            _use_decoding(model, timestamps)
        with boosting.registered(model, boosts) as seeds, script_mask.masked_decoding(model, scripts):
            if scored is not None and any(scored):  # (hooks that wrap forward_decode may take four arguments)
                hyps = forward_decode(model, audio, lengths, seeds, scored)
            else:
                hyps = forward_decode(model, audio, lengths, seeds)
    stride = model.encoder.subsampling_factor * float(model.cfg.preprocessor.window_stride)
    return [to_transcript(h, stride if timestamps else None, model.tokenizer) for h in hyps]


def to_transcript(hyp: Any, frame_sec: float | None, tokenizer: Any = None) -> Transcript:
    """NeMo Hypothesis -> Transcript; frame offsets become seconds (as NeMo's
    process_timestamp_outputs computes them). A hypothesis forward_decode scored comes back
    with its confidence (analysis.confidence.scored; its tokens named by `tokenizer`)."""
    text = hyp.text if isinstance(hyp.text, str) else ""
    if frame_sec is None or not isinstance(getattr(hyp, "timestamp", None), dict):
        out = Transcript(text.strip())
    else:

        def spans(kind: str) -> list[Span]:
            return [Span(s[kind], s["start_offset"] * frame_sec, s["end_offset"] * frame_sec) for s in hyp.timestamp.get(kind, [])]

        out = Transcript(text.strip(), spans("word"), spans("segment"))
    logprobs = getattr(hyp, "pw_logprobs", None)
    if logprobs is None or tokenizer is None:
        return out
    durations = getattr(hyp, "token_duration", None)
    durations = [int(d) for d in (durations.tolist() if hasattr(durations, "tolist") else durations or [])]
    tokens = confidence.tokens_of(hyp, tokenizer, logprobs)
    return confidence.scored(out, tokens, confidence.frames_of(hyp), durations, frame_sec, confidence_calibration())


def confidence_calibration() -> confidence.Calibration:
    """This model's calibration map (analysis.confidence.configured); a file that cannot be read
    is said with the variable that names it."""
    path = config.CFG.confidence_calibration
    try:
        return confidence.configured()
    except (OSError, ValueError) as exc:
        raise ValueError(f"CONFIDENCE_CALIBRATION={path!r} could not be read: {type(exc).__name__}: {exc}") from None
