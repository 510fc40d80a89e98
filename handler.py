"""parakeet-worker: a Runpod serverless worker that turns audio into text with NVIDIA Parakeet TDT.

This file is the Runpod entry and the spine of the design; it wires the parts in
parakeet_worker/ together. Read top to bottom, it follows an item's data:

    _fetch_to_wav        any source, any format -> a 16 kHz mono WAV (download, base64, path, upload; ffmpeg)
    the planner          ready units -> the next batch: _bucketize_by_duration, _make_batches, _plan_next
    the model's turn     _maybe_set_local_attention, then one forward pass (model.run_model) per batch
    the item's path      _prepare_unit (fetch, VAD, submit), _transcribe_item (pieces, speakers)
    transcribe_batched   every item of one job, sharing the one scheduler with every other job
    run_job              one native job from any transport: checks, the job, its answer
    handler              Runpod's queue entry (native jobs and the OpenAI route)
    main                 the queue worker loop, or the HTTP server (WORKER_MODE=http)

The GPU is billed per second, so everything around the model is built to keep it busy: sources
are fetched and decoded in a thread pool while earlier batches run, each item is decoded by one
ffmpeg process (small ones several to a process) straight to 16 kHz mono WAV, and batches are
packed by duration so little of the GPU's work is padding. docs/architecture.md draws the layers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import dataclasses
import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import runpod

from parakeet_worker import (
    config,
    engine,
    errors,
    memory,
    openai_api,
    output,
    patches,
    pieces,
    privacy,
    request,
    scheduler,
)
from parakeet_worker import job as jobs
from parakeet_worker import model as asr
from parakeet_worker.analysis import confidence, language, speakers, vad
from parakeet_worker.analysis.known_speakers import KnownSpeaker, KnownSpeakerError, Voiceprint
from parakeet_worker.audio import decoder, disk, download, sources
from parakeet_worker.audio.uploads import Uploads
from parakeet_worker.config import SAMPLE_RATE
from parakeet_worker.errors import ItemError, JobError
from parakeet_worker.job import Events, Job
from parakeet_worker.pieces import RESPLIT_FRACTION
from parakeet_worker.scheduler import Arrival, Unit, UnitResult
from parakeet_worker.state import shared
from parakeet_worker.transcript import Prepared, Tokens, Transcript

log = logging.getLogger("parakeet-worker")


# --- _fetch_to_wav: one item from its source to its WAV --------------------------------------


def _fetch_to_wav(
    index: int, item: Any, workdir: Path, stop: threading.Event | None = None,
    on_decoded: Callable[[], None] | None = None,
) -> Prepared:
    """Any source, any format -> a 16 kHz mono WAV in `workdir`, with its exact length.
    `stop` (the job was stopped) ends a wait for disk, a download or an ffmpeg run early;
    `on_decoded` hears when its ffmpeg run is over (see decoder.Decoder.decode)."""
    kind, value = sources.source_of(item)
    log.debug("item %d: fetching %s", index, sources.label_of(kind, value))  # redacted: SafeLogRecords
    wav = workdir / f"{index}.wav"
    try:
        return _fetch_reserved(index, kind, value, wav, stop, on_decoded)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # a read-only temp dir cannot delete either
            wav.unlink(missing_ok=True)
        disk.budget().release(wav)
        if isinstance(exc, OSError) or (isinstance(exc, ItemError) and exc.code in TMP_SUSPECT_CODES):
            problem = disk.tmp_problem(workdir)  # a write there failed: say why, not only what failed
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
        src = download.fetch_url(value, raw, stop, lambda size: disk.budget().resize(wav, size))
    elif kind == "base64":
        src = sources.decode_base64(value, raw)
    elif kind == "upload":
        src = raw  # written there, and counted under `wav`, by Uploads
    else:
        src = sources.local_path(value)
    source_bytes = raw.stat().st_size if src == raw else 0  # it sits beside the WAV until ffmpeg is done
    disk.budget().resize(wav, source_bytes)
    if src.stat().st_size == 0:
        raise ItemError("empty_audio", "the file is empty")
    try:
        frames, warning = _decode_in_budget(src, wav, source_bytes, stop, on_decoded)
    finally:
        raw.unlink(missing_ok=True)  # the WAV is all we need from here on
    disk.budget().resize(wav, wav.stat().st_size)
    if frames == 0:
        raise ItemError("empty_audio", "the audio has no samples")
    if frames > config.CFG.max_audio_sec * SAMPLE_RATE:
        raise ItemError(
            "too_long", f"audio is longer than MAX_AUDIO_SEC={config.CFG.max_audio_sec:g} s", duration=frames / SAMPLE_RATE
        )
    return Prepared(index=index, source=sources.label_of(kind, value), wav=wav, frames=frames, warning=warning)


def _decode_in_budget(
    src: Path, wav: Path, source_bytes: int, stop: threading.Event | None, on_decoded: Callable[[], None] | None
) -> tuple[int, str | None]:
    """Decode `src` under the temp-disk bound: reserve what its WAV should take (waiting while
    the bound is reached) and stop ffmpeg there. Audio longer than its header or size said is
    decoded again, with the most any item can take reserved: the bound holds either way."""
    limit = disk.wav_bytes_estimate(src)
    while True:
        disk.budget().reserve(wav, limit + source_bytes, stop)
        frames, warning = decoder.shared_decoder().decode(src, wav, stop, on_decoded, limit)
        if limit >= disk.max_wav_bytes() or wav.stat().st_size < limit:
            return frames, warning
        log.info("%s decodes to more than the %d bytes its header or size said; decoding it again", src.name, limit)
        wav.unlink(missing_ok=True)
        disk.budget().resize(wav, source_bytes)
        limit = disk.max_wav_bytes()


# ---------------------------------------------------------------------------------------------
# Batching: short items share batches, long ones run alone, and the longest switch the encoder
# to local attention (pieces of long items come one by one). What is short, long or local, and
# how many rows a batch may hold, is what fits the memory there is (memory.planner(): the
# config's SHORT_MAX_SEC, LOCAL_ATTENTION_AFTER_SEC and BATCH_MAX_TOTAL_SEC are upper limits).
# Pure functions of the units and those limits: nothing here touches the model or the disk.
# ---------------------------------------------------------------------------------------------

SHORT, LONG, LOCAL = "short", "long", "local"


class _Timed(Protocol):
    @property
    def duration(self) -> float: ...


T = TypeVar("T", bound=_Timed)


def _full_attention_sec() -> float:
    """The longest item that runs with full attention: LOCAL_ATTENTION_AFTER_SEC, or less where
    full attention's memory (which grows with the square of the length) does not fit."""
    return memory.planner().limits().full_sec


def _bucket_of(duration: float, full_sec: float) -> str:
    if duration <= min(config.CFG.short_max_sec, full_sec):
        return SHORT
    return LOCAL if duration > full_sec else LONG


def _bucketize_by_duration(items: Iterable[T], full_sec: float | None = None) -> dict[str, list[T]]:
    """Split items into short (batched), long (alone, full attention) and local (alone, local
    attention) buckets, each sorted by duration so batches pad little. `full_sec`: the longest
    item with full attention (_full_attention_sec() if not given)."""
    full_sec = _full_attention_sec() if full_sec is None else full_sec
    buckets: dict[str, list[T]] = {SHORT: [], LONG: [], LOCAL: []}
    for item in items:
        buckets[_bucket_of(item.duration, full_sec)].append(item)
    for bucket in buckets.values():
        bucket.sort(key=lambda p: p.duration)
    return buckets


def _make_batches(items: Sequence[T], fits: Callable[[int, float], bool] | None = None) -> list[list[T]]:
    """Pack items into batches of <= BATCH_MAX_ITEMS and <= BATCH_MAX_TOTAL_SEC, each one that
    `fits(rows, longest seconds)` in memory (all rows are padded to the longest).

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
        for start in range(end - 1, max(-1, end - 1 - config.CFG.batch_max_items), -1):
            total += ordered[start].duration
            if start < end - 1 and (total > config.CFG.batch_max_total_sec
                                    or (fits is not None and not fits(end - start, ordered[end - 1].duration))):
                break  # fmt: skip
            cost = best[start] + (end - start) * ordered[end - 1].duration + config.CFG.batch_overhead_sec
            if cost < best[end]:
                best[end], cut[end] = cost, start
    batches: list[list[T]] = []
    end = n
    while end > 0:
        batches.append(ordered[cut[end] : end])
        end = cut[end]
    return batches[::-1]


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

    A live session's committed turn (a unit with live_final) is not fair-queued: the oldest one
    leads the next batch, with the other live finals packed first, so that a speaker's text waits
    for the batch running now and no more. Live audio comes at most as fast as people speak, so
    this cannot starve file jobs; a live partial is an ordinary unit of its session.
    """
    if not ready:
        return []
    served = served or {}
    by_job: dict[Any, list[Unit]] = {}
    for unit in sorted(ready, key=lambda u: u.seq):
        by_job.setdefault(unit.job, []).append(unit)
    order = sorted(by_job, key=lambda j: (served.get(j, 0.0), by_job[j][0].seq))
    room = memory.planner().room()  # one reading of the memory there is, for this whole plan
    cost, free, full_sec = memory.planner().cost(), room.free, memory.planner().limits(room).full_sec

    def fits(rows: int, longest: float) -> bool:
        return cost is None or free is None or cost.peak(longest, rows, memory.FULL) <= free

    live = [u for u in sorted(ready, key=lambda u: u.seq) if u.live_final]
    if live:
        return _pack_short(live[0], live, [by_job[job] for job in order], full_sec, fits)
    lead = by_job[order[0]]
    first = lead[0]
    lead_buckets = _bucketize_by_duration(lead, full_sec)
    if first not in lead_buckets[SHORT]:
        oldest_short = min((u.seq for u in lead_buckets[SHORT]), default=float("inf"))
        alone = sorted((u for u in lead_buckets[LONG] + lead_buckets[LOCAL] if u.seq < oldest_short), key=lambda u: u.seq)
        same_mode = [u for u in alone if (u in lead_buckets[LOCAL]) == local_mode]
        return [(same_mode or alone)[0]]
    return _pack_short(first, [], [by_job[job] for job in order], full_sec, fits)


def _pack_short(first: Unit, ahead: list[Unit], jobs_in_order: list[list[Unit]], full_sec: float,
                fits: Callable[[int, float], bool]) -> list[Unit]:  # fmt: skip
    """The batch _make_batches puts `first` in, packed from the short units of `ahead` and then
    of each job in turn, until there are two batches' worth to choose from (`first` runs alone
    if it is not short); `full_sec` and `fits` are the memory's limits (see _plan_next)."""
    if _bucket_of(first.duration, full_sec) != SHORT:
        return [first]
    pool: list[Unit] = [u for u in ahead if _bucket_of(u.duration, full_sec) == SHORT]
    taken = set(map(id, pool))
    for units in jobs_in_order:
        if len(pool) >= 2 * config.CFG.batch_max_items:
            break
        pool += [u for u in _bucketize_by_duration(units, full_sec)[SHORT] if id(u) not in taken]
    return next(batch for batch in _make_batches(pool, fits) if first in batch)


def _padding_efficiency(batches: Iterable[Sequence[_Timed]]) -> float:
    real = padded = 0.0
    for batch in batches:
        real += sum(p.duration for p in batch)
        padded += len(batch) * max(p.duration for p in batch)
    return real / padded if padded else 1.0


def _maybe_set_local_attention(model: Any, duration: float, rows: int = 1) -> None:
    """Full attention where `rows` rows of `duration` seconds fit in memory with it and
    `duration` is within LOCAL_ATTENTION_AFTER_SEC; local attention otherwise (its memory grows
    with the length, full attention's with its square). The switch itself (about 2 s on the
    real model) happens only when the mode changes (model.set_attention)."""
    plan = memory.planner().plan([duration] * rows)
    asr.set_attention(model, plan.mode == memory.LOCAL)


def _run_batch(
    model: Any, audio: Any, lengths: list[int], timestamps: bool, boosts: list[Any], scripts: list[Any] | None = None,
    scored: list[bool] | None = None,
) -> list[Any]:
    """One planned batch through the model, admitted by memory first (memory.MemoryPlanner.admit):
    rows that do not fit now wait for a pass of their own after the shorter ones; a row that
    does not fit even alone, after a wait for memory, gets out_of_memory, which cuts its item
    smaller (_resplit_on_oom): the kernel's OOM killer never has to. The encoder is set up for
    each pass's longest row; a failing pass is retried in halves (engine.run_resilient).
    `scripts`: each row's language hint's scripts (None: decoded as always); `scored`: the rows
    that get confidence."""
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    outs: dict[int, Any] = {}
    while len(outs) < len(order):
        rest = order[len(outs) :]
        plan = memory.planner().admit([lengths[r] / SAMPLE_RATE for r in rest])
        if not plan.fits:
            outs[rest[0]] = ItemError("out_of_memory", f"not enough memory for this audio in one pass ({plan.line()})")
            continue
        rows = rest[: plan.rows]
        ran = engine.run_resilient(model, audio[rows, : max(lengths[r] for r in rows)], [lengths[r] for r in rows],
                                   timestamps, [boosts[r] for r in rows], prepare=_maybe_set_local_attention,
                                   scripts=None if scripts is None else [scripts[r] for r in rows],
                                   scored=None if scored is None else [scored[r] for r in rows])  # fmt: skip
        outs.update(zip(rows, ran, strict=True))
    return [outs[r] for r in range(len(lengths))]


@shared
def model_thread() -> scheduler.Scheduler:
    """The one scheduler of this process: every job's units, planned by _plan_next (looked up at
    each call, so the planner a test installs is the one used)."""
    return scheduler.Scheduler(plan=lambda *args: _plan_next(*args), run=lambda *args: _run_batch(*args))


def _prepare_unit(job: Job, index: int, item: Any) -> tuple[Prepared, cf.Future | None]:
    """In a prepare thread: fetch and decode one item, then hand it straight to the scheduler
    from this thread (no hop through the event loop). A split item's pieces go later, one by
    one, from the job (future None)."""
    arrival = Arrival(job.scheduler)
    try:
        job.boosts[index] = job.boost_of(item)  # before the fetch: a bad list costs no download
        job.hints[index] = job.hint_of(item)  # so does a bad language hint
        prepared = _fetch_to_wav(index, item, job.workdir, job.stop, arrival.announce)
        if job.speakers is not None:
            job.keep(prepared.wav)  # before the scheduler may read it and let it go
        if prepared.duration > memory.planner().limits().piece_sec:
            return prepared, None
        unit = job.speech_of(prepared)
        if unit is None:  # VAD heard no speech: answered without the model
            job.discard(prepared.wav)
            done: cf.Future = cf.Future()
            silent = Transcript("")
            if index in job.vad_probs:  # scored: how sure VAD is that there is none
                silent = confidence.with_vad(dataclasses.replace(silent, tokens=Tokens()), job.vad_probs[index],
                                             vad.VAD_FRAME / SAMPLE_RATE)  # fmt: skip
            done.set_result(UnitResult(silent, None))
            return prepared, done
        # an item that may still be split (should it run out of memory) keeps its WAV until its
        # result is in; a shorter one's WAV goes as soon as the model has read it
        return prepared, job.submit(unit, final=prepared.duration <= config.CFG.piece_min_sec)
    finally:
        arrival.done()


async def _transcribe_item(job: Job, index: int, item: Any) -> Transcript | ItemError:
    """One input: fetched, decoded and submitted on the prepare pool; its result awaited here
    (in pieces past MAX_SINGLE_PASS_SEC, or once it ran out of memory whole). Any failure
    becomes this item's error."""
    prepared = None
    try:
        async with jobs.shared_admission().held(job):
            prepared, future = await jobs.in_pool(job, _prepare_unit, job, index, item)
        job.prepared[index] = prepared
        labels = job.diarize(prepared)  # beside the transcription, on its own pool
        if future is None:
            out = await _transcribe_split(job, prepared, _piece_sec(prepared), prepared)
        else:
            out = await job.result_of(future, prepared)
            if isinstance(out, ItemError) and out.code == "out_of_memory":  # the whole item in pieces (no clip)
                out = await _resplit_on_oom(job, prepared, out, prepared)
            elif index in job.clips and isinstance(out, Transcript):
                out = vad.on_timeline(job.clips[index], out)
                if index in job.vad_probs:  # no_speech_prob from VAD rather than the decoder
                    out = confidence.with_vad(out, job.vad_probs[index], vad.VAD_FRAME / SAMPLE_RATE)
        out = await jobs.labelled(job, out, labels)
        await job.detect_language(index, out)  # off the model thread, on the final text and segments
    except ItemError as exc:
        # Kept as this item's result: without its traceback, whose frames (this one included,
        # which holds it in `out`) would make a cycle that keeps the whole job alive.
        out = exc.with_traceback(None)
    except Exception:  # a bug in one item's path costs that item, not the job
        log.exception("item %d failed", index)
        out = errors.bug("in its path")
    if prepared is not None:
        job.discard(prepared.wav)  # (already gone for a short item, read by the model)
    await job.settle(index)
    return out


def _piece_sec(item: Prepared) -> float:
    """The piece length of a long item: MAX_SINGLE_PASS_SEC, or less where one pass of that
    (with local attention) does not fit the memory there is, never under PIECE_MIN_SEC. Decided
    on the whole item before VAD (its speech is never longer, so a clip of an item within this
    fits too); the attention mode is decided later, on what the model really gets."""
    lim = memory.planner().limits()
    if item.duration > lim.piece_sec and lim.piece_sec < config.CFG.max_single_pass_sec:
        log.info("item %d: %.0f s in pieces of at most %.0f s (%s)", item.index, item.duration, lim.piece_sec, lim.line())
    return lim.piece_sec


async def _transcribe_split(job: Job, item: Prepared, piece_sec: float, whole: Prepared) -> Transcript | ItemError:
    """`item` (a whole item or a piece of `whole`) in pieces of at most `piece_sec`, cut at
    pauses, sent to the scheduler one after the other (other jobs' clips run in between); the
    text is joined and each piece's timestamps shifted by where it starts, so the result is on
    `item`'s timeline. Only one piece is in memory at a time."""
    find_pause = pieces.vad_pause if job.vad else pieces.quietest_pause
    cuts = [*await jobs.in_pool(job, pieces.split_points, item, piece_sec, find_pause), item.frames]
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
        if part.tokens is not None:  # scored: the pieces' tokens in order, the most speech-like piece
            joined.tokens = (joined.tokens or Tokens()) + part.tokens
            joined.no_speech_prob = min((x for x in (joined.no_speech_prob, part.no_speech_prob) if x is not None),
                                        default=None)  # fmt: skip
    return joined


async def _resplit_on_oom(job: Job, item: Prepared, out: Transcript | ItemError, whole: Prepared) -> Transcript | ItemError:
    """A unit that ran out of GPU memory alone is run again in two smaller pieces (each one split
    again should it still not fit), as long as the pieces stay over PIECE_MIN_SEC: only audio
    that fails at the floor gets out_of_memory."""
    piece_sec = item.duration * RESPLIT_FRACTION
    if not isinstance(out, ItemError) or out.code != "out_of_memory" or piece_sec < config.CFG.piece_min_sec:
        return out
    log.warning("%.0f s of item %d ran out of memory; retrying it in pieces of at most %.0f s", item.duration,
                item.index, piece_sec)  # fmt: skip
    return await _transcribe_split(job, item, piece_sec, whole)


# --- Known speakers: each reference fetched, decoded and checked like an item, then embedded ---


async def _enrol(job: Job, known: Sequence[KnownSpeaker]) -> None:
    """The job's voiceprints (job.voiceprints), one per known speaker, before any item is
    diarized: each reference is fetched and decoded on the prepare pool as an input is (any
    source an input may be), into the job's dir, then checked and embedded in the same thread
    (at most 10 s of audio: under a second of CAM++ on a CPU; on the diarize pool it could wait
    behind another job's hour). A reference the client got wrong stops the job (JobError
    invalid_input naming its field); a speaker model that cannot load only means no names
    (every item then says why it has no labels)."""
    if not known or config.CFG.skip_model_load:  # a dry run loads no speaker model
        return
    folder = job.workdir / "known"
    folder.mkdir(exist_ok=True)
    prints = await asyncio.gather(*(jobs.in_pool(job, _enrol_one, job, n, speaker, folder)
                                    for n, speaker in enumerate(known)))  # fmt: skip
    job.voiceprints = [p for p in prints if p is not None]


def _enrol_one(job: Job, n: int, speaker: KnownSpeaker, folder: Path) -> Voiceprint | None:
    wav = None
    try:
        prepared = _fetch_to_wav(n, speaker.item, folder, job.stop)
        wav = prepared.wav
        return speakers.enrol(speaker, prepared.wav, prepared.frames, job.stop)
    except KnownSpeakerError as exc:
        raise JobError("invalid_input", f"invalid input: {exc}", exc.param) from None
    except ItemError as exc:
        if exc.code == "diarize_failed":
            log.warning("known speaker %d not enrolled: %s", n, exc.message)
            return None
        code = errors.CODES.get(exc.code)
        why = f"{speaker.param}: the reference for '{speaker.name}': {exc.message}"
        if code is not None and code.client_fault:
            raise JobError("invalid_input", f"invalid input: {why}", speaker.param) from None
        raise JobError(exc.code if code is not None else "internal_error", why, speaker.param) from None
    finally:
        if wav is not None:
            job.discard(wav)


async def transcribe_batched(job: Job) -> dict[int, Transcript | ItemError]:
    """Transcribe every item of one job; results by input index.

    Each item goes to the shared scheduler as soon as it is fetched and decoded, so the model
    works while later downloads run, and this job's clips share batches with other jobs' clips.
    """
    outs = await asyncio.gather(*(_transcribe_item(job, i, item) for i, item in enumerate(job.inputs)))
    return dict(enumerate(outs))


async def _post_progress(job: dict[str, Any], update: dict[str, Any]) -> None:
    """The SDK's progress_update posts from a thread of its own, which could land after the
    job's result; this awaits the same post (the SDK's send_result) instead. Off Runpod (no
    RUNPOD_WEBHOOK_POST_OUTPUT) it only logs."""
    if not config.CFG.progress_url:
        log.debug("progress (not posted, no RUNPOD_WEBHOOK_POST_OUTPUT): %s", update)
        return
    from runpod.http_client import AsyncClientSession
    from runpod.serverless.modules.rp_http import send_result

    try:
        async with AsyncClientSession() as session:
            await send_result(session, {"status": "IN_PROGRESS", "output": update}, job)
    except Exception as exc:  # noqa: BLE001 - progress is best effort; the job goes on
        log.warning("progress post failed: %s", errors.short(exc))


# -- the job runner: one for every transport ------------------------------------------------


def ensure_model() -> Any:
    """Start this process as a worker, once: every log line made safe (LOG_LEVEL), the temp
    dirs of dead workers removed (disk.remove_dead_workers_dirs), then the model loaded and its
    memory model fitted (model.ensure_model). main() calls it before the SDK takes a job; a job
    run in-process without main() calls it on its way in. No library's telemetry is on by then."""
    privacy.telemetry_off()
    patches.configure_logging()
    _started()
    model = asr.ensure_model()
    if model is not None:
        language.preload()  # py3langid (~1 s), on a thread of its own: the first item need not wait
    return model


@shared
def _started() -> bool:
    disk.remove_dead_workers_dirs()
    return True


async def run_job(
    job_input: Any, events: Events | None = None, uploads: Uploads | None = None, job_id: str = ""
) -> dict[str, Any]:
    """One native job, whatever brought it (Runpod's queue, the OpenAI route, the HTTP server):
    {"inputs": [...], "timestamps", "output_format", "boost_phrases", "boost_weight", "vad",
    "diarize", "num_speakers", "min_speakers", "max_speakers", "known_speakers", "language", "languages"} in
    (request.FIELDS),
    {"results": [...], "stats": {...}} out; raises errors.JobError (its code, its message) when
    the job cannot run at all: invalid input, no model, a sick worker, no temp dir.

    Validation, the shared scheduler, per-item errors, temp cleanup and stats all happen here;
    progress and each item's (or piece's) text go to `events` as they happen. A stop is the
    task's cancellation (a Runpod stop, an HTTP client gone): CancelledError goes up, and on the
    way the job's units leave the scheduler, its downloads and ffmpeg runs stop and its temp dir
    goes. `uploads` holds files that came with the request; the job takes over their dir."""
    started = time.monotonic()
    try:
        params, error = request.check_input(job_input)
        if error:
            raise JobError("invalid_input", error)
        if not asr.MODEL.loaded:
            await asyncio.get_running_loop().run_in_executor(None, ensure_model)
        if asr.MODEL.error:
            raise JobError("model_unavailable", asr.MODEL.error)
        if asr.state().gpu_fault:
            raise JobError("gpu_failed", engine.gpu_fault_error().message)
        if asr.state().model_thread_died:
            raise JobError("model_failed", engine.model_failed_error().message)
        try:
            boost = await request.job_boost(params)
        except ValueError as exc:
            raise JobError("invalid_input", f"invalid input: {exc}") from None
        run = jobs.Job(params, model_thread(), boost, events, uploads.take() if uploads is not None else None, job_id)
    finally:
        if uploads is not None:
            uploads.discard()  # whatever the job did not take over
    try:
        await _enrol(run, params["known_speakers"])
        outputs = await transcribe_batched(run)
        return output.response(run, outputs, params, started)
    finally:
        await run.close()


async def handler(job: dict[str, Any]) -> dict[str, Any] | str:
    """Runpod entry: {"input": {"inputs": [...], ...}} (see run_job), or Runpod's OpenAI route
    {"input": {"openai_route": "/v1/...", "openai_input": {...}}} (docs/openai.md). A job that
    cannot run is answered {"error": message} (with refresh_worker where the worker is sick);
    nothing is raised to the SDK, whose own error would carry a traceback."""
    job_input = job.get("input")

    async def post_progress(kind: str, payload: dict[str, Any]) -> None:
        if kind == "progress":
            await _post_progress(job, payload)

    try:
        if isinstance(job_input, dict) and "openai_route" in job_input:
            return await openai_api.openai_queue_job(job_input, run_job, post_progress)
        return await run_job(job_input, post_progress, job_id=str(job.get("id", "")))
    except JobError as exc:
        answer: dict[str, Any] = {"error": exc.message}
        if exc.code in ("gpu_failed", "model_failed"):
            answer["refresh_worker"] = True
        return answer
    except Exception:  # a bug: logged in full (redacted), answered without traceback or paths
        log.exception("job %s failed", job.get("id", ""))
        return {"error": "internal_error: the worker failed on this job (a bug, logged on the worker)"}


def worker_health() -> str:
    """What /ping says (HTTP mode): "loading" until the model is loaded (or its load failed: the
    worker then answers every request with the cause), "unhealthy" after a GPU fault or once the
    model thread has died (nothing would ever run again), else "ready"."""
    if not asr.MODEL.loaded:
        return "loading"
    thread = model_thread().thread
    if not asr.worker_healthy() or (thread is not None and not thread.is_alive()):
        return "unhealthy"
    return "ready"


def http_app(load_model: bool = True) -> Any:
    """The worker's HTTP API (FastAPI; docs/openai.md, docs/realtime.md), wired to this file's job
    runner, health and scheduler; with `load_model`, the model loads in the background once it
    listens."""
    from parakeet_worker import http_server  # only here: the queue worker never imports the HTTP layer

    return http_server.create_app(run_job, worker_health, ensure_model if load_model else None, realtime_sessions())


def realtime_sessions() -> Any:
    """Live sessions (GET /v1/realtime) on this process's scheduler: their turns batch with every
    job's items (realtime_engine), their turn detection is the worker's silero model."""
    from parakeet_worker import realtime_engine, realtime_ws

    settings = realtime_ws.RealtimeSettings.from_config(config.CFG)
    return realtime_ws.SessionManager(settings, realtime_engine.SchedulerEngine(model_thread), vad.ensure_vad,
                                      _realtime_refusal)  # fmt: skip


def _start_http() -> None:
    """The HTTP server's start, in a background thread once it listens: the model, then silero
    (live sessions' turn detection; loaded now, not on the event loop by the first session)."""
    ensure_model()
    if asr.loaded_model() is not None:
        vad.ensure_vad()


def _realtime_refusal() -> tuple[int, str, str] | None:
    """Why a live session cannot start now (HTTP status, message, code), or None."""
    health = worker_health()
    if health == "loading":
        return 503, "the model is still loading; retry in a few seconds", "model_loading"
    if asr.MODEL.error:
        return 503, f"the model could not be loaded on this worker: {asr.MODEL.error}", "model_unavailable"
    if health == "unhealthy":
        return 503, "this worker is unhealthy (a GPU fault); retry on another", "unavailable"
    return None


def _concurrency(current: int) -> int:
    """The SDK's concurrency_modifier. It resizes its job queue only while no job is in flight,
    so the number is fixed once, at start: MAX_CONCURRENT_JOBS."""
    return config.CFG.max_concurrent_jobs


def main(argv: list[str]) -> None:
    """WORKER_MODE=http: the worker's own HTTP server (http_server.py, for load-balancing endpoints),
    which loads the model in the background once it listens. Otherwise RUNPOD_SERVERLESS=1: the
    Runpod worker loop; or the SDK's local paths: `--test_input '{...}'`, `--rp_serve_api`, or
    test_input.json in the working directory. The model is loaded here, before the SDK takes
    its first job. First of all, every library's telemetry is switched off (privacy.py)."""
    privacy.telemetry_off()
    if config.CFG.worker_mode == "http":
        from parakeet_worker import http_server

        http_server.serve(run_job, worker_health, _start_http, realtime_sessions())
        return
    local_args = any(a.startswith(("--test_input", "--rp_")) for a in argv)
    if not config.CFG.runpod_serverless and not local_args and not Path("test_input.json").is_file():
        sys.exit("nothing to run: set RUNPOD_SERVERLESS=1, pass --test_input '{...}' or --rp_serve_api")
    ensure_model()
    patches.finish_taken_jobs()
    patches.limit_job_takes()
    if config.CFG.vad and asr.loaded_model() is not None:  # VAD on by default: its model loads now, not on a job
        vad.ensure_vad()
    runpod.serverless.start({"handler": handler, "concurrency_modifier": _concurrency})


if __name__ == "__main__":
    main(sys.argv[1:])
