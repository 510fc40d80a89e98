"""Memory that does not grow: what a job creates is gone once the job ends, freed by reference
counting alone (the garbage collector is off while the jobs run), whatever the job was: one clip
or several, timestamps on or off (the decoder switches), boosted, with bad items, or stopped by
Runpod. bench/memory.py measures the worker's RSS over bursts and a long soak."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures as cf
import gc
import time
from collections import Counter

from conftest import DATA_ROOT, speech_file, temp_leftovers, until, words_of

from parakeet_worker import errors, scheduler, transcript
from parakeet_worker import job as jobs
from parakeet_worker.analysis import boosting
from parakeet_worker.model import DRY_RUN_TEXT
from tools.testkit import FakeRunpodQueue, loopback_only_env, start_worker, stop_worker


def per_job_types(worker) -> tuple[type, ...]:
    return (jobs.Job, jobs.Progress, transcript.Prepared, scheduler.Unit, scheduler.UnitResult, transcript.Transcript,
            boosting.Boost, errors.ItemError, transcript.Span, scheduler.BatchInfo, cf.Future, asyncio.Future)  # fmt: skip


def alive(types: tuple[type, ...]) -> Counter:
    return Counter(type(o).__name__ for o in gc.get_objects() if type(o) in types)


def mixed_jobs(group: int) -> list[dict]:
    """Eight jobs of every kind the worker runs (a ninth, stopped, is added by the test)."""
    clip, other = str(speech_file("three four", "wav")), str(speech_file("yes go", "wav"))
    inline = base64.b64encode(speech_file("left up", "wav").read_bytes()).decode()
    phrases = [["three four"], ["go"], ["left", "stop"]][group % 3]
    inputs = [
        {"inputs": [{"source": clip}]},
        {"inputs": [{"source": clip}], "timestamps": True},
        {"inputs": [{"source": clip}, {"source": other}, {"source": clip}], "output_format": "srt"},
        {"inputs": [{"source": clip}, {"source": other}], "boost_phrases": phrases, "timestamps": group % 2 == 0},
        {"inputs": [{"source": other, "boost_phrases": phrases[:1]}, {"source": clip, "boost_phrases": []}]},
        {"inputs": [{"audio_base64": "not base64!"}, {"source": other}, {"source": str(DATA_ROOT / "missing.wav")}]},
        {"inputs": [{"audio_base64": inline}], "timestamps": True},
        {"inputs": [{"source": other}, {"source": clip}], "output_format": "vtt"},
    ]
    return [{"id": f"mem-{group}-{n}", "input": job} for n, job in enumerate(inputs)]


async def run_group(worker, http_server, group: int) -> list[dict]:
    """The eight jobs at once, with a ninth that Runpod stops (its task cancelled, as the SDK
    does) while its second item's download trickles."""
    trickle = f"/trickle/mem-{group}.wav"
    stopped = {"id": f"mem-{group}-stopped", "input": {"inputs": [{"source": str(speech_file("nine", "wav"))},
                                                                  {"source": http_server.url + trickle}]}}  # fmt: skip
    task = asyncio.ensure_future(worker.handler(stopped))
    outs = await asyncio.gather(*(worker.handler(job) for job in mixed_jobs(group)))
    await until(lambda: http_server.hits.get(trickle), "the stopped job's download")
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("the stopped job was not cancelled")
    return outs  # its close() goes on, shielded; asyncio.run waits for it (the default executor)


def check_answers(outs: list[dict]) -> None:
    assert all("error" not in out for out in outs), outs
    assert words_of(outs[0]["results"][0]["text"]) == ["three", "four"]
    assert [w["word"] for w in outs[1]["results"][0]["timestamps"]["word"]] == ["three", "four"]
    assert "-->" in outs[2]["results"][2]["subtitles"]
    assert [r.get("code") for r in outs[5]["results"]] == ["invalid_source", None, "not_found"]
    assert words_of(outs[6]["results"][0]["text"]) == ["left", "up"]


def test_jobs_leave_nothing_alive(worker, http_server):
    """27 jobs in three rounds (after one round that builds both decoders and the trees): every
    _Job, progress, Prepared, Unit, future, result and error they made is freed by reference
    counting as soon as its job is answered or stopped; none waits for a cycle collection."""
    types = per_job_types(worker)
    check_answers(asyncio.run(run_group(worker, http_server, 0)))  # one-time things: decoders, trees
    gc.collect()
    before = alive(types)
    gc.disable()
    try:
        for group in range(1, 4):
            check_answers(asyncio.run(run_group(worker, http_server, group)))
        left = settled(types, before)
    finally:
        gc.enable()
    assert not left, f"still alive after their jobs ended (freed only by a cycle collection, or never): {dict(left)}"
    assert temp_leftovers() == []


def settled(types: tuple[type, ...], before: Counter, timeout: float = 60) -> Counter:
    """What is left beyond `before`, once the threads that ran the jobs let go: a pool thread
    drops its task a moment after the job that awaited it goes on, and the model thread its
    batch after delivering the results. Only reference counting can free anything here (the
    collector is off), so what is still there after `timeout` seconds is held for good."""
    deadline = time.monotonic() + timeout
    while (left := alive(types) - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left



def test_jobs_are_taken_a_few_at_a_time(tmp_path):
    """Through the SDK's real worker loop: with 12 free slots the worker asks for at most
    JOB_TAKE_MAX=3 jobs per take (a take's whole answer is parsed in memory at once), and every
    job is still taken and answered. A dry run: the model does not matter here."""
    queue = FakeRunpodQueue()
    env = {**loopback_only_env(), "SKIP_MODEL_LOAD": "1", "MAX_CONCURRENT_JOBS": "12", "JOB_TAKE_MAX": "3",
           "WORKER_TMP_DIR": str(tmp_path / "tmp")}  # fmt: skip
    proc = start_worker(queue, env, tmp_path / "worker.log")
    try:
        ids = [queue.add({"inputs": [{"source": "samples/digits.wav"}]}) for _ in range(20)]
        outs = queue.wait_done(ids, timeout=120)
    finally:
        stop_worker(proc)
        queue.close()
    assert all(out["output"]["results"][0]["text"] == DRY_RUN_TEXT for out in outs), outs[0]
    assert queue.batch_sizes_asked and max(queue.batch_sizes_asked) == 3, queue.batch_sizes_asked
