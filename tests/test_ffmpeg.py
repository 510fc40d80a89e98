"""ffmpeg that hangs, is stopped, or meets a file that decodes to far more than its size says:
real ffmpeg, hung on a FIFO (it blocks opening one until a writer comes, which never does)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import speech_file

from parakeet_worker import errors
from parakeet_worker.audio import decoder as decoding
from parakeet_worker.audio import ffmpeg, headers


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "hangs.fifo"
    os.mkfifo(path)
    return path


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def gone(pids, within: float = 10.0) -> bool:
    """Whether all of `pids` have died, waiting up to `within` s: a killed process closes its
    files (ending our wait on its pipe) a moment before it is dead."""
    deadline = time.monotonic() + within
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def ffmpeg_pids_reading(path: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if str(path).encode() in cmdline and b"ffmpeg" in cmdline and alive(int(proc.name)):
                pids.append(int(proc.name))
    return pids


def in_thread(fn, limit: float):
    """Run fn() in a thread; (its result or exception, seconds taken). Fails the test if it is
    still running after `limit` seconds."""
    box: dict = {}

    def run():
        try:
            box["out"] = fn()
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            box["out"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"still running after {limit} s"
    return box["out"], time.monotonic() - started


def test_timeout_kills_the_whole_process_group(worker, config, monkeypatch, tmp_path, fifo):
    """FFMPEG_BIN is a wrapper that runs ffmpeg as its child: on the timeout the child dies too
    (killing only the wrapper left it running, and the worker waiting on its pipe)."""
    pidfile = tmp_path / "ffmpeg.pid"
    wrapper = tmp_path / "ffmpeg-wrapper.sh"
    wrapper.write_text(f'#!/bin/sh\n"{shutil.which("ffmpeg")}" "$@" &\necho $! > "{pidfile}"\nwait\n')
    wrapper.chmod(0o755)
    config(ffmpeg_timeout_sec=1.0, ffmpeg_bin=str(wrapper))  # FFMPEG_BIN
    try:
        out, _ = in_thread(lambda: ffmpeg.to_wav(fifo, tmp_path / "out.wav"), limit=60)
        assert isinstance(out, errors.ItemError) and out.code == "decode_timeout", out
        assert gone([int(pidfile.read_text())]), "the wrapper's ffmpeg outlived the timeout"
    finally:
        if pidfile.exists() and alive(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), 9)


def test_stop_kills_a_running_decode(worker, config, tmp_path, fifo):
    """A set stop event ends an ffmpeg running alone on one file: cancelled, process gone, long
    before FFMPEG_TIMEOUT_SEC."""
    config(ffmpeg_timeout_sec=300.0)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    out, took = in_thread(lambda: ffmpeg.to_wav(fifo, tmp_path / "out.wav", stop=stop), limit=60)
    assert isinstance(out, errors.ItemError) and out.code == "cancelled", out
    assert gone(ffmpeg_pids_reading(fifo))
    assert not (tmp_path / "out.wav").exists()
    assert took < 60


def test_stop_through_the_decoder(worker, config, tmp_path, fifo):
    """_Decoder.decode(stop=...): a running decode is killed; one whose job was cancelled
    before it started never starts an ffmpeg at all."""
    config(ffmpeg_timeout_sec=300.0)
    decoder = decoding.Decoder(slots=1)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    out, _ = in_thread(lambda: decoder.decode(fifo, tmp_path / "a.wav", stop=stop), limit=60)
    assert isinstance(out, errors.ItemError) and out.code == "cancelled", out
    assert gone(ffmpeg_pids_reading(fifo))

    good = speech_file("one two three", "mp3")
    out, _ = in_thread(lambda: decoder.decode(good, tmp_path / "b.wav", stop=stop), limit=60)
    assert isinstance(out, errors.ItemError) and out.code == "cancelled", out
    assert not (tmp_path / "b.wav").exists(), "ffmpeg ran for a cancelled item"
    assert decoder.running == 0 and decoder.pending == []
    assert decoder.decode(good, tmp_path / "c.wav", stop=threading.Event())[0] > 0  # an unset event: decoded


def test_hung_file_in_a_group_costs_one_timeout(worker, config, monkeypatch, tmp_path, fifo):
    """A file that hangs ffmpeg in a grouped run: the group is given up early and each file
    run alone, so the good ones decode and the hung one costs FFMPEG_TIMEOUT_SEC once, not
    twice (group run, then alone)."""
    timeout = 8.0
    config(ffmpeg_timeout_sec=timeout)
    limits: list[float] = []  # the time limit of each ffmpeg run, as _run_ffmpeg applies it
    real = ffmpeg.run_ffmpeg

    def recording(pairs, *args, **kwargs):
        started = time.monotonic()
        try:
            return real(pairs, *args, **kwargs)
        except errors.ItemError as exc:
            if exc.code == "decode_timeout":
                limits.append(time.monotonic() - started)
            raise

    monkeypatch.setattr(ffmpeg, "run_ffmpeg", recording)
    goods = [speech_file("one two three", "mp3"), speech_file("seven eight", "wav")]
    pairs = [(fifo, tmp_path / "hung.wav")] + [(g, tmp_path / f"{i}.wav") for i, g in enumerate(goods)]
    out, took = in_thread(lambda: ffmpeg.to_wavs(pairs), limit=120)
    assert isinstance(out[0], errors.ItemError) and out[0].code == "decode_timeout", out
    assert all(isinstance(r, tuple) and r[0] > 0 for r in out[1:]), out
    assert len(limits) == 2 and limits[0] < timeout / 2 <= timeout <= limits[1], limits  # short group, then one full
    assert took < 2 * timeout, took


@pytest.mark.parametrize(
    ("name", "lavfi", "args", "seconds"),
    [
        ("bomb.flac", "anullsrc=r=96000:cl=7.0", ["-c:a", "flac"], 120),
        ("bomb.ogg", "anullsrc=r=48000:cl=stereo", ["-c:a", "libopus", "-b:a", "6k", "-frame_duration", "120"], 400),
    ],
)
def test_cost_estimate_reads_the_header_not_just_the_size(worker, tmp_path, name, lavfi, args, seconds):
    """Silence compresses to almost nothing: a small file that decodes to minutes of
    many-channel audio is estimated by the samples its header declares, so it runs in an ffmpeg
    of its own instead of holding up a group of small files."""
    bomb = tmp_path / name
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", lavfi, "-t", str(seconds),
                    *args, str(bomb)], check=True)  # fmt: skip
    assert bomb.stat().st_size < 300_000
    cost = headers.decode_cost_ms(bomb)
    assert cost > decoding.Decoder.GROUP_BELOW_MS, cost
    small = speech_file("one two three", "mp3")
    decoder = decoding.Decoder(slots=1)
    decoder.pending = sorted(
        [decoding.Decode(small, tmp_path / f"s{i}.wav", headers.decode_cost_ms(small)) for i in range(3)]
        + [decoding.Decode(bomb, tmp_path / "bomb.wav", cost)],
        key=lambda d: d.cost_ms, reverse=True,
    )  # fmt: skip
    assert [d.src for d in decoder._take()] == [bomb]
    assert [d.src for d in decoder._take()] == [small] * 3


def test_decoder_takes_turns_by_job_costliest_first_within_each(worker, tmp_path):
    """Job A queued three costly files, then job B one: B's file does not wait for all of A's
    (fair by decode time given), and A's files still go costliest first; a cheap file of a job
    C that comes later goes before the costly ones still waiting."""
    decoder = decoding.Decoder(slots=1)
    a, b = threading.Event(), threading.Event()
    big = decoding.Decoder.GROUP_BELOW_MS  # never grouped
    decoder.pending = [decoding.Decode(Path(f"a{n}"), tmp_path / f"a{n}.wav", big + n, owner=a) for n in (1, 3, 2)]
    decoder.pending.append(decoding.Decode(Path("b"), tmp_path / "b.wav", big + 100, owner=b))
    order = [[d.src.name for d in decoder._take()] for _ in range(2)]
    decoder.pending.append(decoding.Decode(Path("c"), tmp_path / "c.wav", big - 1, owner=threading.Event()))
    order += [[d.src.name for d in decoder._take()] for _ in range(3)]
    assert order == [["a3"], ["b"], ["c"], ["a2"], ["a1"]]
    assert decoder.pending == [] and decoder.fair.served == {}


def test_a_stopped_jobs_wait_for_ffmpeg_ends_at_once(worker, config, tmp_path, fifo):
    """One ffmpeg slot, held by another job's file that hangs: a stopped job's item leaves its
    wait for the slot as soon as the stop is signalled, without waiting for that run."""
    config(ffmpeg_timeout_sec=300.0)
    decoder = decoding.Decoder(slots=1)
    other, mine = threading.Event(), threading.Event()
    holder = threading.Thread(target=lambda: decoder.decode(fifo, tmp_path / "hung.wav", stop=other), daemon=True)
    holder.start()
    _wait_for(lambda: decoder.running == 1)
    good = speech_file("one two three", "mp3")
    waiting = threading.Thread(target=lambda: box.update(out=_catch(lambda: decoder.decode(good, tmp_path / "w.wav",
                                                                                              stop=mine))), daemon=True)  # fmt: skip
    box: dict = {}
    waiting.start()
    _wait_for(lambda: decoder.pending)
    mine.set()
    decoder.wake()
    waiting.join(30)
    assert not waiting.is_alive() and box["out"].code == "cancelled", box
    assert holder.is_alive() and decoder.running == 1  # the other job's run goes on
    other.set()
    holder.join(60)
    assert not holder.is_alive() and decoder.running == 0 and decoder.pending == []


def _catch(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - handed back to the test
        return exc


def _wait_for(condition, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
