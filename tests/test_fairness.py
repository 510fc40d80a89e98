"""Fair under mixed load, through the runpod SDK's real worker loop (`python handler.py` polling
the fake Runpod queue on 127.0.0.1): one job's long file, big backlog or slow downloads never
hold up the other jobs' clips. Nothing here waits on a timer: a script in the worker holds the
model thread inside chosen batches until the test lets it go (files as signals), so the order
the test asserts is the order the scheduler chose."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DATA_ROOT, speech_file, words_of
from test_concurrency import Worker, job_dirs, one_clip, phrase, wait_for

from parakeet_worker import errors
from parakeet_worker.audio import decoder, download, ffmpeg
from tools import synth

WORDS = ["one", "hello", "seven", "stop", "three", "world", "nine", "left", "go", "five", "up", "eight", "no", "two"]


@pytest.fixture(scope="module")
def long_file():
    """~60 s of words 3.5-4.5 s apart (pauses between them)."""
    rng = np.random.default_rng(11)
    offsets = list(np.cumsum(rng.uniform(3.5, 4.5, len(WORDS))) - 2.0)
    return synth.write(DATA_ROOT / "fair-long.wav", synth.place_words(WORDS, offsets)), offsets


@pytest.fixture(scope="module")
def fair_worker(tmp_path_factory):
    """Pieces of at most 20 s (so the demo model shows a long file's pieces in seconds), split
    again down to 5 s when out of memory."""
    tmp = tmp_path_factory.mktemp("fair-worker")
    flags = tmp / "flags"
    flags.mkdir()
    w = Worker(tmp, "hold-and-fail", PW_FLAGS=str(flags), MAX_SINGLE_PASS_SEC="20", PIECE_MIN_SEC="5", SHORT_MAX_SEC="10",
               LOCAL_ATTENTION_AFTER_SEC="600")  # fmt: skip
    w.flags = flags
    yield w
    w.close()


def test_clips_finish_while_a_long_file_is_still_being_transcribed(fair_worker, long_file):
    """A 60-s file in pieces: eight one-clip jobs that come while its first piece runs are all
    answered while the file's next piece is held, and the file comes back whole afterwards."""
    w, (path, offsets) = fair_worker, long_file
    long_id = w.queue.add({"inputs": [{"source": str(path)}], "timestamps": True}, job_id="hold-8-long")
    wait_for((w.flags / "hold-8-long.running").exists, 300, "the long file's first piece")
    texts = [phrase(n) for n in range(8)]
    clips = [w.queue.add(one_clip(t)) for t in texts]
    for text, out in zip(texts, w.queue.wait_done(clips, 300), strict=True):
        assert words_of(out["output"]["results"][0]["text"]) == text.split(), out
    assert long_id not in w.queue.results  # the rest of the file is still to come
    (w.flags / "hold-8-long.release").touch()
    (out,) = w.queue.wait_done([long_id], 300)
    result = out["output"]["results"][0]
    assert [x["word"] for x in result["timestamps"]["word"]] == WORDS, result
    for stamp, offset in zip(result["timestamps"]["word"], offsets, strict=True):
        assert abs(stamp["start"] - offset) <= 0.5  # on the file's own timeline
    assert len(out["output"]["stats"]["batch_sizes"]) >= 3  # it ran in pieces
    assert job_dirs(w.tmp) == []


def test_clips_after_a_500_input_job_are_not_served_after_all_of_it(fair_worker):
    """A job of 500 clips is taken first; its first batch holds the model until four one-clip
    jobs wait too. Those four are answered while every later batch of the big job alone is
    held: they did not wait for its backlog. Then the big job comes back whole."""
    w = fair_worker
    sources = [speech_file(t, "wav") for t in ("one", "two", "three", "four", "five")]
    big = {"inputs": [{"source": str(sources[n % 5])} for n in range(500)]}
    big_id = w.queue.add(big, job_id="hold-4-big")
    wait_for((w.flags / "hold-4-big.running").exists, 300, "the big job's first batch")
    texts = [phrase(n) for n in range(100, 104)]
    clips = [w.queue.add(one_clip(t)) for t in texts]
    for text, out in zip(texts, w.queue.wait_done(clips, 300), strict=True):
        assert words_of(out["output"]["results"][0]["text"]) == text.split(), out
    assert big_id not in w.queue.results
    (w.flags / "hold-4-big.release").touch()
    (out,) = w.queue.wait_done([big_id], 600)
    results = out["output"]["results"]
    assert [words_of(r["text"]) for r in results] == [[("one", "two", "three", "four", "five")[n % 5]] for n in range(500)]
    assert job_dirs(w.tmp) == []


def test_out_of_memory_on_a_long_piece_ends_in_a_whole_transcript(fair_worker, long_file):
    """The model runs out of memory on every row over 12 s of this job: its 20-s pieces are cut
    again at pauses until they fit, and the job gets the whole text, every word once, in order,
    on the file's timeline."""
    w, (path, offsets) = fair_worker, long_file
    job = w.queue.add({"inputs": [{"source": str(path)}], "timestamps": True}, job_id="oom-long")
    (out,) = w.queue.wait_done([job], 300)
    result = out["output"]["results"][0]
    assert "error" not in result, result
    assert result["text"].split() == WORDS
    for stamp, offset in zip(result["timestamps"]["word"], offsets, strict=True):
        assert abs(stamp["start"] - offset) <= 0.5
    assert len(out["output"]["stats"]["batch_sizes"]) >= 5  # 60 s in pieces of 12 s at most
    assert job_dirs(w.tmp) == []


def test_fast_downloads_proceed_while_slow_ones_trickle(tmp_path, http_server):
    """Two download slots. Three jobs whose URLs trickle a byte every 0.2 s for as long as they
    are read take both slots first; a job with a good URL is answered while they still trickle,
    and so are the good items of a job whose other items trickle (for 30 s, then break off).
    Then the trickling jobs are stopped, and their downloads and temp dirs go."""
    w = Worker(tmp_path, DOWNLOAD_WORKERS="2", DOWNLOAD_SLOT_SEC="1", DOWNLOAD_TOTAL_SEC="600",
               DOWNLOAD_READ_TIMEOUT="5")  # fmt: skip
    try:
        slow = [w.queue.add({"inputs": [{"source": f"{http_server.url}/trickle-forever/s{n}.wav"}]}) for n in range(3)]
        w.queue.wait_taken(slow)
        wait_for(lambda: sum(http_server.hits.get(f"/trickle-forever/s{n}.wav", 0) for n in range(3)) == 3, 120,
                 "the slow downloads")  # fmt: skip
        good = http_server.add(speech_file("go left", "wav"), "fair-good.wav")
        (fast,) = w.run({"inputs": [{"source": good}]})
        assert words_of(fast["output"]["results"][0]["text"]) == ["go", "left"]
        mixed = [{"source": f"{http_server.url}/trickle/m{n}.wav"} for n in range(2)]
        mixed += [{"source": http_server.add(speech_file(t, "wav"), f"fair-{n}.wav")}
                  for n, t in enumerate(["one two", "three four", "five six"])]  # fmt: skip
        (both,) = w.run({"inputs": mixed}, timeout=300)
        results = both["output"]["results"]
        assert [r["code"] for r in results[:2]] == ["download_failed"] * 2, results[:2]
        assert [words_of(r["text"]) for r in results[2:]] == [["one", "two"], ["three", "four"], ["five", "six"]]
        assert not any(j in w.queue.results for j in slow)  # still trickling all along
        for job in slow:
            w.queue.stop(job)
        wait_for(lambda: job_dirs(w.tmp) == [], 60, "the stopped jobs to clean up")
        assert not any(j in w.queue.results for j in slow)
    finally:
        w.close()


def test_download_slots_are_shared_fairly_and_given_back(worker):
    """Two slots, both held by job A: job B (none running) may still start one; A's third
    waits, and gets in when one of A's downloads gives its slot back early (as a slow one does
    after DOWNLOAD_SLOT_SEC); a stopped job's wait ends at once."""
    import threading

    slots = download.DownloadSlots(2)
    a, b, c = threading.Event(), threading.Event(), threading.Event()
    first, second = slots.held(a), slots.held(a)
    give_back = first.__enter__()
    second.__enter__()
    with slots.held(b):  # B had none running: it starts at once, past the bound
        assert slots.slots.held_by == {a: 2, b: 1}
    started = threading.Event()

    def third() -> None:
        with slots.held(a):
            started.set()

    thread = threading.Thread(target=third, daemon=True)
    thread.start()
    wait_for(lambda: len(slots.waiting) == 1, 30, "A's third download to wait")
    assert not started.is_set()
    give_back()  # A's first download is slow: it goes on without its slot
    thread.join(30)
    assert started.is_set()
    stopped = threading.Event()
    cancelled: list = []

    def waits_then_stops() -> None:
        try:
            with slots.held(a, c):
                pass
        except errors.ItemError as exc:
            cancelled.append(exc.code)
        stopped.set()

    slots.slots.held_by[b] = 2  # the bound is reached by others: A (1 running) must wait
    thread = threading.Thread(target=waits_then_stops, daemon=True)
    thread.start()
    wait_for(lambda: len(slots.waiting) == 1, 30, "the wait")
    c.set()
    slots.wake()
    thread.join(30)
    assert cancelled == ["cancelled"]


def test_a_stopped_job_ends_at_once_while_another_jobs_ffmpeg_runs(worker, monkeypatch):
    """One ffmpeg slot, taken by job A's file, whose decode is held. Job B's two clips wait
    for the slot; Runpod stops B (its task is cancelled, as the SDK does): B's waits end and its
    clean-up finishes, temp dir gone, while A's decode is still held. Then A finishes as usual."""
    import asyncio
    import threading

    from conftest import TMP_ROOT, until

    monkeypatch.setattr(decoder.shared_decoder, "value", decoder.Decoder(1))
    release, held = threading.Event(), threading.Event()
    real = ffmpeg.to_wavs

    def holding(pairs, *args, **kwargs):
        if any("fair-held" in str(src) for src, _ in pairs):
            held.set()
            release.wait(600)
        return real(pairs, *args, **kwargs)

    monkeypatch.setattr(ffmpeg, "to_wavs", holding)
    a_clip = speech_file("seven eight", "wav", name="fair-held")
    b_clips = [speech_file(t, "wav") for t in ("one two", "three four")]

    async def main():
        a = asyncio.ensure_future(worker.handler({"id": "a", "input": {"inputs": [{"source": str(a_clip)}]}}))
        await until(held.is_set, "A's decode")
        dirs_before = set(TMP_ROOT.glob("job-*"))
        b = asyncio.ensure_future(worker.handler({"id": "b", "input": {"inputs": [{"source": str(p)} for p in b_clips]}}))
        await until(lambda: len(decoder.shared_decoder().pending) == 2, "B's clips waiting for ffmpeg")
        (b_dir,) = set(TMP_ROOT.glob("job-*")) - dirs_before
        b.cancel()
        try:  # B's end must not wait for A's decode (held for 10 minutes unless released)
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(b, 120)
            assert not b_dir.exists() and not release.is_set()  # B is gone, A's decode still held
            assert decoder.shared_decoder().pending == []
        finally:
            release.set()
        return await a

    out = asyncio.run(main())
    assert words_of(out["results"][0]["text"]) == ["seven", "eight"]
