"""Many jobs at once through the runpod SDK's real worker loop: `python handler.py` as the image
runs it, polling a fake Runpod job queue on 127.0.0.1 (tools/testkit.py). Jobs share the model,
and each keeps its own promises: results in input order, its own words, its own options and
errors, its temp dir removed, and nothing posted after it was stopped."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import subprocess
from pathlib import Path

import pytest
import soundfile as sf
from conftest import DATA_ROOT, encode, hold_model, run_job, speech_file, until, words_of

from parakeet_worker import config as settings
from parakeet_worker.audio import disk
from parakeet_worker.config import Config
from tools.testkit import FakeRunpodQueue, loopback_only_env, start_worker, stop_worker, wait_for

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
         "yes", "no", "up", "down", "left", "right", "stop", "go", "hello", "world"]  # fmt: skip


TRIPLES = list(itertools.permutations(WORDS, 3))


def phrase(n: int) -> str:
    """A different three-word phrase for each n (97 is prime to the 6,840 triples)."""
    return " ".join(TRIPLES[n * 97 % len(TRIPLES)])


def one_clip(text: str, **params) -> dict:
    return {"inputs": [{"source": str(speech_file(text, "wav"))}], **params}


def job_dirs(tmp: Path) -> list[Path]:
    return sorted(tmp.rglob("job-*"))


class Worker:
    def __init__(self, tmp: Path, hook: str | None = None, **env: str):
        self.tmp = tmp / "worker-tmp"
        self.log = tmp / "worker.log"
        self.queue = FakeRunpodQueue()
        base = loopback_only_env()
        base.update(WORKER_TMP_DIR=str(self.tmp), LOG_LEVEL="INFO", **env)
        self.proc = start_worker(self.queue, base, self.log, hook)

    def run(self, *job_inputs: dict, timeout: float = 300) -> list[dict]:
        ids = [self.queue.add(job) for job in job_inputs]
        try:
            return self.queue.wait_done(ids, timeout)
        except TimeoutError:
            pytest.fail(f"no results; worker log:\n{self.log.read_text()[-4000:]}")

    def close(self) -> None:
        answered = bool(self.queue.results)
        code = stop_worker(self.proc)
        self.queue.close()
        if answered:  # up and running: SIGTERM ends the SDK's loop and the process cleanly
            assert code == 0, self.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def queue_worker(tmp_path_factory):
    w = Worker(tmp_path_factory.mktemp("queue-worker"))
    yield w
    w.close()


def test_32_one_clip_jobs_at_once_each_get_their_own_words(queue_worker):
    texts = [phrase(n) for n in range(32)]
    assert len(set(texts)) == 32
    outs = queue_worker.run(*(one_clip(t) for t in texts))
    for text, out in zip(texts, outs, strict=True):
        assert "error" not in out, out
        (result,) = out["output"]["results"]
        assert words_of(result["text"]) == text.split(), (text, result)
        stats = out["output"]["stats"]
        assert stats["items"] == 1 and len(stats["batch_sizes"]) == 1 and 1 <= stats["batch_sizes"][0] <= 16
    # the SDK took jobs in batches, of at most JOB_TAKE_MAX
    assert max(queue_worker.queue.batch_sizes_asked) == min(Config().max_concurrent_jobs, Config().job_take_max)
    assert job_dirs(queue_worker.tmp) == []


def test_good_bad_timestamped_and_srt_jobs_at_once(queue_worker):
    good = one_clip("seven eight nine")
    stamped = one_clip("left right", timestamps=True)
    srt = one_clip("hello world stop", output_format="srt")
    text = {"inputs": [{"source": str(speech_file("yes no", "flac"))}, {"source": str(DATA_ROOT / "absent.wav")}],
            "output_format": "text"}  # fmt: skip
    invalid = {"inputs": [{"source": "samples/hello.mp3"}], "output_format": "docx"}
    empty = {"inputs": []}
    outs = queue_worker.run(good, stamped, srt, text, invalid, empty)

    assert words_of(outs[0]["output"]["results"][0]["text"]) == ["seven", "eight", "nine"]
    assert "timestamps" not in outs[0]["output"]["results"][0]  # not asked: not given, though batches are shared
    words = outs[1]["output"]["results"][0]["timestamps"]["word"]
    assert [w["word"] for w in words] == ["left", "right"] and words[0]["start"] < words[1]["start"]
    subtitles = outs[2]["output"]["results"][0]["subtitles"]
    assert re.match(r"1\n00:00:\d\d,\d{3} --> 00:00:\d\d,\d{3}\nhello world stop\n", subtitles), subtitles
    first, missing = outs[3]["output"]["results"]
    assert words_of(first["text"]) == ["yes", "no"] and missing["code"] == "not_found"
    assert outs[3]["output"]["text"] == "yes no\n" and outs[3]["output"]["stats"]["failed"] == 1
    assert "output_format" in outs[4]["error"] and "output" not in outs[4]
    assert "inputs" in outs[5]["error"]
    assert job_dirs(queue_worker.tmp) == []


def test_a_stopped_job_goes_and_the_others_are_unaffected(queue_worker, http_server):
    """Runpod stops a job (/job-stop): its download stops, its temp dir goes, nothing more is
    posted for it, and jobs beside and after it are answered as usual."""
    url = f"{http_server.url}/trickle/stopped.wav"  # a byte every 0.2 s for 30 s
    stopped = queue_worker.queue.add({"inputs": [{"source": str(speech_file("nine nine", "wav"))}, {"source": url}]})
    alongside = queue_worker.queue.add(one_clip("go left"))
    queue_worker.queue.wait_taken([stopped, alongside])
    (beside,) = queue_worker.queue.wait_done([alongside])
    # its clip is done (one progress post says so), its download goes on
    wait_for(lambda: stopped in queue_worker.queue.progress, 60, "the stopped job's first item")
    assert len(job_dirs(queue_worker.tmp)) == 1
    queue_worker.queue.stop(stopped)
    wait_for(lambda: job_dirs(queue_worker.tmp) == [], 20, "the stopped job to clean up")  # well before the 30 s trickle ends
    (after,) = queue_worker.run(one_clip("three up"))
    assert words_of(beside["output"]["results"][0]["text"]) == ["go", "left"]
    assert words_of(after["output"]["results"][0]["text"]) == ["three", "up"]
    assert stopped not in queue_worker.queue.results
    # one progress post, after its first item; nothing once it was stopped
    assert [(p["items_done"], p["items_total"]) for p in queue_worker.queue.progress[stopped]] == [(1, 2)]
    assert job_dirs(queue_worker.tmp) == []


def test_model_failures_in_a_batch_shared_by_jobs(tmp_path):
    """Four jobs share one batch; one clip makes the model fail: only that clip's job gets an
    error for it. Then a GPU fault: its job asks Runpod to replace the worker (stopPod), and so
    does every job after it, without running the model again."""
    texts = ["one two", "three four", "five six", "seven eight"]
    clips = [speech_file(t, "wav") for t in texts]
    bad = speech_file("nine zero nine", "wav")
    sick = speech_file("stop stop go", "wav")
    poison = {sf.info(str(clips[2])).frames: "cuDNN error: CUDNN_STATUS_EXECUTION_FAILED",
              sf.info(str(sick)).frames: "CUDA error: an illegal memory access was encountered"}  # fmt: skip
    held = tmp_path / "model-held"
    w = Worker(tmp_path, "poisoned-batch", PW_POISON=json.dumps(poison), PW_HOLD="4", PW_HELD=str(held))
    try:
        w.queue.add(one_clip("hello"))
        wait_for(held.exists, 300, "the first job's batch to hold the model")
        outs = w.run(*(one_clip(t) for t in texts))
        for i, (text, out) in enumerate(zip(texts, outs, strict=True)):
            (result,) = out["output"]["results"]
            assert out["output"]["stats"]["batch_sizes"] == [4], out  # one batch for the four jobs
            if i == 2:
                assert result["code"] == "transcription_failed" and "CUDNN_STATUS" in result["error"]
            else:
                assert words_of(result["text"]) == text.split()
            assert "stopPod" not in out
        fault, after = w.run({"inputs": [{"source": str(sick)}]}), None
        (fault,) = fault
        assert fault["output"]["results"][0]["code"] == "gpu_failed" and fault.get("stopPod") is True, fault
        (after,) = w.run({"inputs": [{"source": str(bad)}]})
        assert "GPU failed" in after["error"] and after.get("stopPod") is True, after
    finally:
        w.close()
    assert job_dirs(w.tmp) == []


# --- the temp-disk bound, in-process -----------------------------------------------------------


def bytes_under(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_intake_waits_at_the_temp_disk_bound_and_every_item_comes_back(worker, config, monkeypatch):
    """With room for two decoded clips, six clips go through a held model: intake stops at two
    WAVs (reserved before ffmpeg runs), each WAV is deleted once the model has read it, and all
    six come back right."""
    w = worker
    texts = ["one two three", "four five six", "seven eight nine", "up down", "left right", "stop go"]
    paths = [speech_file(t, "wav") for t in texts]
    largest = max(disk.wav_bytes_estimate(p) for p in paths)
    bound = 2 * largest + 1000
    config(tmp_max_bytes=bound)
    entered, release = hold_model(w, monkeypatch)
    tmp_root = Path(settings.CFG.tmp_dir)

    async def main():
        task = asyncio.ensure_future(w.handler({"id": "bounded", "input": {"inputs": [{"source": str(p)} for p in paths]}}))
        await until(entered.is_set, "the model call")
        # the model holds one clip (read, its WAV gone); intake fills the bound and waits
        await until(lambda: len(w.model_thread().ready) >= 2, "two ready units", 60)
        on_disk = sorted(tmp_root.rglob("*.wav"))
        used = bytes_under(tmp_root)
        release.set()
        return await task, on_disk, used

    out, on_disk, used = asyncio.run(main())
    assert len(w.model_thread().ready) == 0
    assert len(on_disk) == 2 and used <= bound, (on_disk, used, bound)
    assert [words_of(r["text"]) for r in out["results"]] == [t.split() for t in texts]
    assert disk.budget().used == 0
    assert list(tmp_root.rglob("*")) == []


def test_audio_longer_than_its_estimate_is_decoded_again_whole(worker, tmp_path, caplog):
    """A VBR mp3 of four minutes, nearly all silence (8 kbit/s frames), declares no length to us
    and decodes to ~30x its size, more than the 16x reserved for it: ffmpeg stops at the
    reservation, and the item is decoded again with room for the longest audio: nothing is cut."""
    w = worker
    speech = speech_file("nine eight seven", "wav")
    padded = tmp_path / "padded.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(speech), "-af", "apad=whole_dur=240",
                    str(padded)], check=True)  # fmt: skip
    mp3 = DATA_ROOT / "low-rate-4min.mp3"
    encode(padded, mp3, codec=["-c:a", "libmp3lame", "-q:a", "2"], rate=16000, channels=1)  # VBR: silence at 8 kbit/s
    assert disk.wav_bytes_estimate(mp3) < 240 * disk.WAV_BYTES_PER_SEC
    with caplog.at_level("INFO", logger="parakeet-worker"):
        (result,) = run_job(w, [{"source": str(mp3)}])["results"]
    assert words_of(result["text"]) == ["nine", "eight", "seven"]
    assert result["duration"] == pytest.approx(240, abs=0.1)
    assert any("decoding it again" in r.getMessage() for r in caplog.records)
