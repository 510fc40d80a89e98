"""Nothing hangs or dies silently: a bug in the model thread's planning costs nothing; a model
thread that dies anyway answers every job and asks for a new worker; odd inputs get codes of
their own. All in-process, through the real handler, scheduler, ffmpeg and demo model."""

from __future__ import annotations

import asyncio

from conftest import call_handler, run_job, speech_file, temp_leftovers, words_of

TEXTS = ["one two three", "four five six", "seven eight nine"]


def clip_job(job_id: str, *texts: str) -> dict:
    return {"id": job_id, "input": {"inputs": [{"source": str(speech_file(t, "wav"))} for t in texts]}}


def test_a_planning_bug_costs_no_item(worker, monkeypatch):
    real = worker._plan_next
    calls = []

    def buggy(ready, local_mode):
        calls.append(len(ready))
        if len(calls) <= 2:
            raise RuntimeError("planner bug")
        return real(ready, local_mode)

    monkeypatch.setattr(worker, "_plan_next", buggy)
    out = asyncio.run(asyncio.wait_for(worker.handler(clip_job("planned", *TEXTS)), 120))  # a dead thread: no answer
    assert [words_of(r["text"]) for r in out["results"]] == [t.split() for t in TEXTS]
    assert len(calls) >= 3 and worker.worker_healthy()
    assert "refresh_worker" not in out and temp_leftovers() == []


class ThreadKiller(BaseException):
    """Escapes every `except Exception`, as nothing in the worker should."""


def test_a_dead_model_thread_answers_every_job_and_asks_for_a_new_worker(worker, monkeypatch):
    monkeypatch.setattr(worker._STATE, "model_thread_died", None)  # restored (healthy) after the test

    def killer(ready, local_mode):
        raise ThreadKiller("injected into planning")

    monkeypatch.setattr(worker, "_plan_next", killer)

    async def both() -> list[dict]:
        jobs = [clip_job("a", *TEXTS), clip_job("b", TEXTS[0])]
        return list(await asyncio.wait_for(asyncio.gather(*(worker.handler(j) for j in jobs)), 120))

    outs = asyncio.run(both())
    for out in outs:
        assert out["refresh_worker"] is True, out
        assert out["results"] and all(r["code"] == "model_failed" for r in out["results"]), out
        assert "ThreadKiller" in out["results"][0]["error"]
    assert not worker.worker_healthy()
    assert worker._STATE.unhealthy.startswith("ThreadKiller")
    later = call_handler(worker, clip_job("c", TEXTS[1]))
    assert later["refresh_worker"] is True and "model thread died" in later["error"], later
    assert temp_leftovers() == []
    monkeypatch.undo()  # healthy again: the next job starts a new model thread
    assert words_of(run_job(worker, [{"source": str(speech_file(TEXTS[2], "wav"))}])["results"][0]["text"]) == TEXTS[2].split()
