"""A full temp disk, or a temp dir that cannot be made: the items it hits say `disk_full`, the
others are transcribed, and the job always answers. Real tmpfs mounts stand in for the disk."""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest
import soundfile as sf
from conftest import DATA_ROOT, call_handler, run_job, speech_file, tmpfs, words_of

from parakeet_worker import errors
from parakeet_worker.audio import decoder, disk

GOOD_TEXT = "one two three"


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill `disk` with one file until at most `leave` bytes are free."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                st = os.statvfs(disk)
                room = st.f_bavail * st.f_frsize - leave
                if room <= 0:
                    break
                f.write(b"\0" * min(room, 1 << 16))
                f.flush()
    return filler


def test_full_disk_is_disk_full_on_each_item_it_hits(worker, config, http_server):
    """Nothing fits: the download, the base64 item and the local file (whose WAV ffmpeg cannot
    write) each get disk_full, not not_audio or internal_error, and nothing is left behind."""
    good = speech_file(GOOD_TEXT, "mp3")
    wav = speech_file(GOOD_TEXT, "wav")
    with tmpfs("size=256k") as disk:
        config(tmp_dir=str(disk / "worker"))
        filler = fill(disk)
        inputs = [
            {"source": http_server.add(good, "disk-good.mp3")},
            {"audio_base64": base64.b64encode(wav.read_bytes()).decode()},
            {"source": str(good)},
        ]
        results = run_job(worker, inputs)["results"]
        for result in results:
            assert result.get("code") == "disk_full", result
            assert "ran out of disk space" in result["error"] and "text" not in result
        assert sorted(p.name for p in disk.rglob("*")) == [filler.name, "worker"]  # no job dir, no partial file


def test_disk_full_costs_only_the_items_it_hits(worker, config, monkeypatch):
    """Room for one short clip's WAV but not a long one's: the long item gets disk_full and
    frees what it wrote, the short one is transcribed."""
    good = speech_file(GOOD_TEXT, "mp3")
    long_flac = DATA_ROOT / "long-tone.flac"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "sine=f=440:r=16000",
                    "-t", "30", "-c:a", "flac", str(long_flac)], check=True)  # fmt: skip
    short_wav_bytes = 44 + 2 * round(sf.info(str(speech_file(GOOD_TEXT, "wav"))).duration * 16000)
    # one ffmpeg at a time: two decodes sharing the last bytes would make the outcome a race
    config(prepare_workers=1)
    monkeypatch.setattr(decoder.shared_decoder, "value", None)  # made again, for one slot
    with tmpfs("size=512k") as disk:
        config(tmp_dir=str(disk))
        fill(disk, leave=short_wav_bytes + 64 * 1024)
        assert os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize < 30 * 16000 * 2  # the long WAV cannot fit
        results = run_job(worker, [{"source": str(long_flac)}, {"source": str(good)}])["results"]
        assert results[0].get("code") == "disk_full", results[0]
        assert words_of(results[1]["text"]) == GOOD_TEXT.split(), results[1]
        assert [p.name for p in disk.iterdir()] == ["filler"]


def test_make_job_dir(worker, config, tmp_path):
    """_make_job_dir: a fresh dir under WORKER_TMP_DIR (made if missing), or a JobError that
    names WORKER_TMP_DIR (not its path) and the cause, never an OSError."""
    config(tmp_dir=str(tmp_path / "a" / "b"))
    first, second = disk.make_job_dir(), disk.make_job_dir()
    assert first != second and first.parent == second.parent == tmp_path / "a" / "b"
    assert first.is_dir() and [p.name for p in first.iterdir()] == [".owner"]  # its owner's lock (audio.jobdirs)

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config(tmp_dir=str(blocker / "tmp"))
    with pytest.raises(errors.JobError, match=r"under WORKER_TMP_DIR: Not a directory") as failed:
        disk.make_job_dir()
    assert str(tmp_path) not in failed.value.message  # the server's path: in the log only

    with tmpfs("size=1m,nr_inodes=8") as small:
        config(tmp_dir=str(small / "worker"))
        disk.make_job_dir()  # still room for one
        with contextlib.suppress(OSError):
            for n in range(100):  # use up the inodes
                (small / f"f{n}").touch()
        with pytest.raises(OSError) as full:
            (small / "one-more").touch()
        assert full.value.errno == errno.ENOSPC
        with pytest.raises(errors.JobError, match="ran out of disk space or inodes"):
            disk.make_job_dir()


def test_handler_answers_when_its_temp_dir_cannot_be_made(worker, config, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config(tmp_dir=str(blocker / "tmp"))
    out = call_handler(worker, {"id": "no-tmp", "input": {"inputs": [{"source": "samples/hello.mp3"}]}})
    assert set(out) == {"error"} and "WORKER_TMP_DIR" in out["error"], out
