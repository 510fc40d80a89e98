"""Nothing hangs or dies silently: a bug in the model thread's planning costs nothing; a model
thread that dies anyway answers every job and asks for a new worker; odd inputs get codes of
their own. All in-process, through the real handler, scheduler, ffmpeg and demo model."""

from __future__ import annotations

import asyncio
import base64
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import DATA_ROOT, call_handler, run_job, speech_file, temp_leftovers, tmpfs, words_of

from parakeet_worker import model as asr
from parakeet_worker.audio import disk

TEXTS = ["one two three", "four five six", "seven eight nine"]


def clip_job(job_id: str, *texts: str) -> dict:
    return {"id": job_id, "input": {"inputs": [{"source": str(speech_file(t, "wav"))} for t in texts]}}


def test_a_planning_bug_costs_no_item(worker, monkeypatch):
    real = worker._plan_next
    calls = []

    def buggy(ready, *rest):
        calls.append(len(ready))
        if len(calls) <= 2:
            raise RuntimeError("planner bug")
        return real(ready, *rest)

    monkeypatch.setattr(worker, "_plan_next", buggy)
    out = asyncio.run(asyncio.wait_for(worker.handler(clip_job("planned", *TEXTS)), 120))  # a dead thread: no answer
    assert [words_of(r["text"]) for r in out["results"]] == [t.split() for t in TEXTS]
    assert len(calls) >= 3 and asr.worker_healthy()
    assert "refresh_worker" not in out and temp_leftovers() == []


class ThreadKiller(BaseException):
    """Escapes every `except Exception`, as nothing in the worker should."""


def test_a_dead_model_thread_answers_every_job_and_asks_for_a_new_worker(worker, monkeypatch):
    monkeypatch.setattr(asr.state(), "model_thread_died", None)  # restored (healthy) after the test

    def killer(*args):
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
    assert not asr.worker_healthy()
    assert asr.state().unhealthy.startswith("ThreadKiller")
    later = call_handler(worker, clip_job("c", TEXTS[1]))
    assert later["refresh_worker"] is True and "model thread died" in later["error"], later
    assert temp_leftovers() == []
    monkeypatch.undo()  # healthy again: the next job starts a new model thread
    assert words_of(run_job(worker, [{"source": str(speech_file(TEXTS[2], "wav"))}])["results"][0]["text"]) == TEXTS[2].split()


# --- odd inputs get codes of their own ------------------------------------------------------


def test_proc_paths_are_forbidden(worker):
    """/proc/1/root and /proc/1/cwd cannot be resolved (EACCES in a container) or resolve
    outside the roots: forbidden_path either way, not an internal error."""
    inputs = [{"source": "/proc/1/root/etc/passwd"}, {"source": "/proc/1/cwd/handler.py"},
              {"source": "file:///proc/1/root/etc/passwd"}, {"source": str(speech_file(TEXTS[0], "wav"))}]  # fmt: skip
    results = run_job(worker, inputs)["results"]
    for result in results[:3]:
        assert result.get("code") == "forbidden_path", result
    assert words_of(results[3]["text"]) == TEXTS[0].split()


def spoiled_job_dir(worker, monkeypatch, spoil) -> None:
    """The next job's temp dir is made for real, then `spoil(dir)` runs before any item writes."""
    real = disk.make_job_dir

    def made() -> Path:
        workdir = real()
        spoil(workdir)
        return workdir

    monkeypatch.setattr(disk, "make_job_dir", made)


def sources_of_every_kind(http_server) -> list[dict]:
    clip = speech_file(TEXTS[1], "wav")
    return [
        {"source": http_server.add(clip, "spoiled.wav")},
        {"audio_base64": base64.b64encode(clip.read_bytes()).decode()},
        {"source": str(speech_file(TEXTS[1], "mp3"))},
    ]


def test_temp_dir_removed_mid_job(worker, monkeypatch, http_server):
    spoiled_job_dir(worker, monkeypatch, shutil.rmtree)
    results = run_job(worker, sources_of_every_kind(http_server))["results"]
    for result in results:
        assert result.get("code") == "temp_dir_gone", result
        assert "removed while the job ran" in result["error"]


def test_read_only_temp_dir(worker, config, monkeypatch, http_server):
    with tmpfs("size=4m") as disk:
        config(tmp_dir=str(disk))
        spoiled_job_dir(worker, monkeypatch, lambda d: remount(disk, "ro"))
        try:
            results = call_handler(worker, {"id": "ro", "input": {"inputs": sources_of_every_kind(http_server)}})["results"]
        finally:
            remount(disk, "rw")
        for result in results:
            assert result.get("code") == "temp_not_writable", result
        assert [p.name for p in disk.iterdir()] != []  # its job dir could not go while read-only...
        monkeypatch.undo()
        config(tmp_dir=str(disk))
        run_job_in(worker, disk, [{"source": str(speech_file(TEXTS[0], "wav"))}])
        assert list(disk.iterdir()) == []  # ...and goes with the next job's end


def run_job_in(worker, disk: Path, inputs: list[dict]) -> dict:
    out = call_handler(worker, {"id": "after", "input": {"inputs": inputs}})
    assert "error" not in out and all("error" not in r for r in out["results"]), out
    return out


def remount(disk: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)


@pytest.mark.parametrize("channels", [9, 32, 64])
def test_any_channel_count_is_mixed_down(worker, channels):
    speech, rate = sf.read(str(speech_file(TEXTS[2], "wav")), dtype="float32")
    path = DATA_ROOT / f"speech-{channels}ch.wav"
    sf.write(path, np.repeat(speech[:, None], channels, axis=1), rate, subtype="PCM_16")
    result = run_job(worker, [{"source": str(path)}])["results"][0]
    assert words_of(result.get("text", "")) == TEXTS[2].split(), result
