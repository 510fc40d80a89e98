"""One job on the worker: its state (Job), the prepare pool and the fair admission to it, its
progress reports, its speakers beside its transcription, and the heap trim at its end.

A job is an async function's worth of work: everything slow (downloads, ffmpeg, VAD, the model,
diarization) runs off the event loop, so the SDK keeps up to MAX_CONCURRENT_JOBS jobs in flight.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from parakeet_worker import config, errors
from parakeet_worker import model as asr
from parakeet_worker.analysis import boosting, language, script_mask, speakers, vad
from parakeet_worker.analysis.boosting import Boost
from parakeet_worker.analysis.known_speakers import Voiceprint
from parakeet_worker.analysis.speakers import SpeakerCount
from parakeet_worker.audio import decoder, disk, download
from parakeet_worker.config import SAMPLE_RATE
from parakeet_worker.errors import ItemError
from parakeet_worker.fairshare import FairSlots
from parakeet_worker.scheduler import BatchInfo, Scheduler, Unit, UnitResult
from parakeet_worker.state import shared
from parakeet_worker.transcript import Prepared, Transcript

log = logging.getLogger("parakeet-worker")


class Admission:
    """How many items of each job are in the prepare pool at once (fetching, decoding, or
    waiting for either), so that a job of hundreds of inputs cannot fill the pool's queue ahead
    of every later job: at most 4 x max(PREPARE_WORKERS, DOWNLOAD_WORKERS) in all, shared like
    the download slots (fairshare.FairSlots: a job with none in the pool may always start one;
    a free place goes to the waiting job with the fewest). The pool has a thread for each of
    those, plus one for every job's first. Used on the event loop only."""

    def __init__(self, total: int):
        self.slots = FairSlots(total)
        self.waiting: list[tuple[Any, asyncio.Future]] = []  # in arrival order

    def _grant(self) -> None:
        """Let in every waiter that may start now."""
        while (chosen := self.slots.choose([owner for owner, _ in self.waiting])) is not None:
            owner, future = self.waiting.pop(chosen)
            self.slots.take(owner)
            future.set_result(None)

    def _leave(self, owner: Any) -> None:
        self.slots.give_back(owner)
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
    return 4 * max(config.CFG.prepare_workers, config.CFG.download_workers)


@shared
def shared_admission() -> Admission:
    """The places in the prepare pool, shared by jobs."""
    return Admission(_prepare_shared())


@shared
def prepare_pool() -> cf.ThreadPoolExecutor:
    """Shared by jobs: downloads wait on the network; ffmpeg runs PREPARE_WORKERS at a time
    (decoder.Decoder). Threads mostly wait: on the network (DOWNLOAD_WORKERS at a time), for
    ffmpeg (PREPARE_WORKERS at a time) or for temp disk (WORKER_TMP_MAX_BYTES). Enough of them
    that items waiting for ffmpeg do not hold back the next downloads."""
    size = _prepare_shared() + config.CFG.max_concurrent_jobs  # see Admission
    return cf.ThreadPoolExecutor(max_workers=size, thread_name_prefix="prepare")


async def in_pool(job: Job, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn` on the prepare pool without blocking the event loop; the job keeps the future
    so that its temp dir outlives every thread still writing into it."""
    future = prepare_pool().submit(fn, *args)
    job.threads.append(future)
    return await asyncio.wrap_future(future)


def diarize_unit(job: Job, item: Prepared) -> speakers.Diarization:
    try:
        assert job.speakers is not None
        return speakers.diarize(item.wav, item.start, item.frames, job.speakers, job.stop, job.vad, job.voiceprints)
    finally:
        job.unkeep(item.wav)


async def labelled(job: Job, out: Transcript | ItemError, labels: cf.Future | None) -> Transcript | ItemError:
    """An item's transcript with its speakers; a failed diarization costs only the labels."""
    if labels is None:
        return out
    if isinstance(out, ItemError):  # no transcript to label: a diarization not yet begun is dropped
        labels.cancel()
        return out
    try:
        found: speakers.Diarization | ItemError = await asyncio.wrap_future(labels)
    except ItemError as exc:
        found = exc
    except Exception as exc:  # the transcript stands without speakers
        log.exception("diarization failed")
        found = ItemError("diarize_failed", f"{type(exc).__name__}: {errors.short(exc)}")
    if isinstance(found, ItemError):
        return dataclasses.replace(out, warning=_noted(out.warning, f"no speaker labels: {found.message}"))
    labelled_out = speakers.with_speakers(out, found.turns)
    return dataclasses.replace(labelled_out, warning=_noted(out.warning, found.warning))


def _noted(warning: str | None, note: str | None) -> str | None:
    return "; ".join(w for w in (warning, note) if w) or None


class Progress:
    """Reports a job's progress (items and audio seconds done, batches) to the job's event sink
    (the queue handler posts it through the SDK's result channel) while the job runs. Each item
    awaits its own report, so no post can land after the job's final result; a report that says
    nothing new, or that everything is done (the result says that), is not sent. It keeps no
    reference to its job (the job is passed in): a Job <-> Progress cycle kept every finished
    job, its request (base64 audio included) and its results alive until the garbage
    collector's next full pass."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.last: dict[str, Any] | None = None

    async def report(self, job: Job) -> None:
        async with self.lock:
            numbers = job.progress_numbers()
            if numbers is None or numbers == self.last:
                return
            self.last = numbers
            await job.emit("progress", numbers)


# What a job tells its transport while it runs: ("progress", numbers) and ("text", {"index",
# "text"}) for each item or piece of a split item as its text becomes final (in piece order).
Events = Callable[[str, dict[str, Any]], Awaitable[None]]


MALLOC_TRIM_EVERY_SEC = 5.0


class Heap:
    """Handing the heap memory that freed objects leave behind back to the OS (glibc's
    malloc_trim): without it a burst's peak stays resident, as glibc keeps freed memory in its
    arenas for reuse. Measured: ~430 ms the first time after a burst freed ~400 MB, ~20 ms when
    there is little to give back; a no-op where the C library is not glibc (docs/operations.md,
    "Memory over days"). Jobs in flight are counted on the event loop only."""

    def __init__(self) -> None:
        self.jobs_in_flight = 0
        self.lock = threading.Lock()
        self.last_trim = 0.0
        self.libc: Any = None

    def maybe_trim(self) -> None:
        """After a job's end, beside its answer: trim once no job is in flight (the end of a
        burst), and under steady traffic, which is never idle, at most every
        MALLOC_TRIM_EVERY_SEC. One trim at a time."""
        now = time.monotonic()
        if self.jobs_in_flight > 0 and now - self.last_trim < MALLOC_TRIM_EVERY_SEC:
            return
        if self.lock.acquire(blocking=False):
            try:
                self.last_trim = now
                self.trim()
            finally:
                self.lock.release()

    def trim(self) -> None:
        if self.libc is None:
            try:
                import ctypes

                self.libc = ctypes.CDLL("libc.so.6")
                self.libc.malloc_trim.argtypes = [ctypes.c_size_t]
            except (OSError, AttributeError):
                self.libc = False
        if self.libc:
            self.libc.malloc_trim(0)


@shared
def heap() -> Heap:
    return Heap()


class Job:
    """One job on the worker: its inputs, temp dir, stop signal, the batches that carried its
    items, and its progress.

    Threads: it is made, awaited and closed on the event loop. Its prepare threads (one per
    item in flight) call boost_of, speech_of, submit, keep and discard and write `boosts`,
    `clips`, `speech_sec` and `vad_probs` for their own item's index only; the model thread
    calls discard() once it has read a WAV; diarize threads call unkeep(). `kept` is the one
    structure several threads change, under `kept_lock`; `stop` (a threading.Event) is how
    close() reaches them all."""

    def __init__(self, params: dict[str, Any], scheduler: Scheduler, boost: Boost | None = None,
                 events: Events | None = None, workdir: Path | None = None, job_id: str = ""):  # fmt: skip
        self.scheduler = scheduler  # the model thread every job shares
        self.id = job_id  # Runpod's job id (empty over HTTP): for logs and fault-injecting tests
        self.events = events
        self.inputs: list[Any] = params["inputs"]
        self.speakers: SpeakerCount | None = params.get("speakers")  # None: not diarized
        self.voiceprints: list[Voiceprint] = []  # the known speakers', once enrolled (handler.enrol)
        # Diarized text is split by speaker at word times, so diarize needs them too.
        self.timestamps = params["timestamps"] or params["output_format"] in ("srt", "vtt") or self.speakers is not None
        self.boost = boost  # the job's boost_phrases at boost_weight (None: no boosting)
        self.weight: float = params["boost_weight"]
        self.boosts: dict[int, Boost | None] = {}  # by input index, once its item is checked
        self.hint: tuple[str, ...] | None = params.get("language_hint")  # the job's language(s), checked
        self.hints: dict[int, tuple[str, ...] | None] = {}  # by input index, once its item is checked
        self.languages: dict[int, language.ItemLanguage] = {}  # by input index, once transcribed
        self.workdir = workdir or disk.make_job_dir()  # first: a JobError here leaves nothing to clean up
        self.stop = threading.Event()
        self.threads: list[cf.Future] = []
        self.prepared: dict[int, Prepared] = {}
        self.batches: dict[int, BatchInfo] = {}
        self.finished: set[int] = set()
        self.partial: dict[int, float] = {}  # seconds done inside split items still running
        self.vad: bool = params["vad"] and not config.CFG.skip_model_load  # a dry run loads no VAD either
        self.clips: dict[int, Prepared] = {}  # by input index: the speech-only clip the model got
        self.confidence: bool = bool(params.get("confidence"))  # words' and segments' confidence
        self.logprobs: bool = bool(params.get("logprobs"))  # each token's log-probability
        self.vad_probs: dict[int, Any] = {}  # by input index, where VAD ran and confidence is on
        self.speech_sec: dict[int, float] = {}  # by input index, where VAD ran: speech it found
        self.progress = Progress()
        heap().jobs_in_flight += 1
        self.kept: dict[Path, bool] = {}  # WAVs a diarization still reads -> whether discard came
        self.kept_lock = threading.Lock()

    def boost_of(self, item: Any) -> Boost | None:
        """How one input is boosted: its own boost_phrases when it has them (an empty list: not
        at all), else the job's. In a prepare thread: a new list's tree is built here."""
        if not isinstance(item, dict) or "boost_phrases" not in item:
            return self.boost
        try:
            return boosting.resolve_boost(asr.loaded_model(), boosting.clean_phrases(item["boost_phrases"]), self.weight)
        except ValueError as exc:
            raise ItemError("invalid_boost", str(exc)) from None

    def hint_of(self, item: Any) -> tuple[str, ...] | None:
        """The languages one input is hinted to be in: its own `language` or `languages` when it
        has either (null or []: none), else the job's. ItemError invalid_language for a hint the
        model cannot take."""
        if not isinstance(item, dict) or ("language" not in item and "languages" not in item):
            return self.hint
        try:
            return language.check_hint(item.get("language"), item.get("languages"), language.spoken())
        except language.HintError as exc:
            raise ItemError("invalid_language", str(exc)) from None

    def scripts_of(self, index: int) -> frozenset[str] | None:
        """The scripts an item's decoding is kept to (its hint's), or None: decoded as always."""
        hint = self.hints.get(index)
        if not hint or not script_mask.can_mask(asr.loaded_model()):
            return None
        return script_mask.hint_scripts(hint)

    async def detect_language(self, index: int, out: Transcript | ItemError) -> None:
        """Label a transcribed item and its segments with their languages, on the event loop's
        executor (never the model thread, never holding a batch). A dry run labels nothing; a
        failure costs the labels only."""
        if isinstance(out, ItemError) or asr.loaded_model() is None:
            return
        segments = [s.text for s in out.segments]
        try:
            self.languages[index] = await asyncio.get_running_loop().run_in_executor(
                None, language.label, out.text, segments, self.hints.get(index), language.spoken()
            )
        except Exception as exc:  # noqa: BLE001 - the transcript stands without its language
            log.warning("language detection failed on item %d: %s", index, errors.short(exc))

    def speech_of(self, item: Prepared) -> Prepared | None:
        """In a prepare thread: what of a decoded item the model is given. With VAD off, all
        of it; on, its speech-only clip, or None when it holds no speech. A VAD failure costs
        the item nothing: it is given whole, with a warning."""
        if not self.vad:
            return item
        try:
            regions, probs = vad.speech_and_probs(item, self.stop)
        except ItemError:
            raise
        except Exception as exc:  # noqa: BLE001 - transcribed without VAD instead
            log.warning("voice activity detection failed on item %d: %s", item.index, errors.short(exc))
            note = f"voice activity detection failed ({type(exc).__name__}: {errors.short(exc, 200)}); transcribed without it"
            item.warning = f"{item.warning}; {note}" if item.warning else note
            return item
        clip = vad.speech_clip(item, regions)
        self.speech_sec[item.index] = clip.duration
        if self.scored:
            self.vad_probs[item.index] = probs
        if not regions:
            return None
        self.clips[item.index] = clip
        return clip

    def submit(self, item: Prepared, final: bool = True) -> cf.Future:
        """Hand one unit to the scheduler (from any thread); a piece of a split item carries its
        item's boosting too."""
        if self.stop.is_set():
            raise errors.cancelled()
        unit = Unit(item, self, self.timestamps, final, boost=self.boosts.get(item.index),
                    scripts=self.scripts_of(item.index), confidence=self.scored)  # fmt: skip
        return self.scheduler.submit(unit)

    @property
    def scored(self) -> bool:
        """Whether this job's units are scored (analysis.confidence): it asked for confidence or
        for token log-probabilities."""
        return self.confidence or self.logprobs

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
            part: dict[str, Any] = {"index": item.index, "text": result.out.text}
            if self.logprobs and result.out.tokens is not None:
                part["tokens"] = result.out.tokens  # a streamed delta's logprobs
            await self.emit("text", part)
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
            log.warning("a %s event was lost: %s", kind, errors.short(exc))

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
        job's dir is removed, see remove_job_dir)."""
        with self.kept_lock:
            if wav in self.kept:
                self.kept[wav] = True
                return
        with contextlib.suppress(OSError):
            wav.unlink(missing_ok=True)
        disk.budget().release(wav)

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
        if config.CFG.skip_model_load:  # a dry run loads no speaker model either
            self.unkeep(item.wav)
            future: cf.Future = cf.Future()
            future.set_exception(ItemError("dry_run", "SKIP_MODEL_LOAD=1, no speaker model loaded"))
            return future
        future = speakers.diarize_pool().submit(diarize_unit, self, item)
        self.threads.append(future)
        return future

    async def close(self) -> None:
        """Whatever way the job ends (result, error, or stopped by Runpod): its waiting units
        leave the scheduler, its waits (download slot, ffmpeg slot, disk) end at once, its
        downloads and ffmpeg runs stop, its temp dir goes. The clean-up runs on a thread of its
        own: it waits for this job's threads only, never behind other jobs' clean-ups in the
        event loop's small default executor."""
        self.stop.set()
        for waits in (decoder.shared_decoder(), disk.budget(), download.shared_slots()):
            waits.wake()
        heap().jobs_in_flight -= 1

        def clean() -> None:
            for future in self.threads:
                future.cancel()
            cf.wait(self.threads)  # nothing may still write into workdir, or submit, once it goes
            self.threads.clear()  # a failed one's exception holds frames that hold this job
            self.scheduler.withdraw(self)
            disk.budget().release_under(self.workdir)
            disk.remove_job_dir(self.workdir)

        await asyncio.shield(_on_own_thread(clean, "job-close"))
        asyncio.get_running_loop().run_in_executor(None, heap().maybe_trim)  # not awaited: the answer does not wait for it


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
