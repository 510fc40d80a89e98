"""ffmpeg: any format to 16 kHz mono s16 WAV, one process group a run, bounded in time and in
bytes; only whitelisted demuxers and protocols, so no file can make ffmpeg open another."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from signal import SIGKILL

import soundfile as sf

from parakeet_worker import config, errors
from parakeet_worker.audio import disk, headers
from parakeet_worker.config import SAMPLE_RATE
from parakeet_worker.errors import ItemError

log = logging.getLogger("parakeet-worker")


# --- ffmpeg: any format to 16 kHz mono WAV, one process group a run, bounded in time and bytes


# Demuxers ffmpeg may use. No playlists (hls), no concat, no image2: a file of ours must never
# make ffmpeg open another file.
FFMPEG_FORMATS = (
    "wav,w64,mp3,flac,ogg,mov,mp4,m4a,matroska,webm,aac,aiff,caf,amr,ac3,eac3,wv,ape,asf,au,avi,"
    "flv,mpeg,mpegts,dts,tta,voc,mpc,mpc8,gsm,rm,smjpeg,xwma"
)


def ffmpeg_bin() -> str:
    """ffmpeg from FFMPEG_BIN, PATH, or the imageio-ffmpeg wheel (which ships a binary)."""
    found = config.CFG.ffmpeg_bin or shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # noqa: BLE001
        raise ItemError("internal_error", "ffmpeg is not installed on this worker") from None


def ffmpeg_cmd(pairs: Sequence[tuple[Path, Path]], limits: Sequence[int | None] | None = None) -> list[str]:
    """One ffmpeg command decoding the first audio stream of each source to its own 16 kHz mono
    s16 WAV. Whitelists are per input: no file of ours may make ffmpeg open another one.
    `limits` caps each WAV's bytes (-fs): what the temp-disk budget reserved for it."""
    cmd = [ffmpeg_bin(), "-nostdin", "-hide_banner", "-loglevel", "error"]
    for src, _ in pairs:
        cmd += ["-protocol_whitelist", "file,pipe", "-format_whitelist", FFMPEG_FORMATS, "-i", f"file:{src}"]
    for n, (src, dest) in enumerate(pairs):
        cmd += [
            "-map", f"{n}:a:0", "-vn", "-sn", "-dn", *_mixdown(src), "-ac", "1", "-ar", str(SAMPLE_RATE),
            "-c:a", "pcm_s16le", "-t", f"{config.CFG.max_audio_sec + 1:.3f}",
            *(["-fs", str(limits[n])] if limits and limits[n] else []), "-f", "wav", "-y", f"file:{dest}",
        ]  # fmt: skip
    return cmd


def _mixdown(src: Path) -> list[str]:
    """ffmpeg's -ac 1 mixes down only layouts it knows: from 1 to 8 channels, and 16. A header
    that declares more (9, 32, 64 channels of PCM) gets an explicit mix, every channel at the
    same weight (pan's "<" keeps the sum of the weights at 1)."""
    channels = headers.declared_channels(src)
    if channels is None or channels <= 8 or channels > 255:
        return []
    return ["-af", "pan=mono|c0<" + "+".join(f"c{c}" for c in range(channels))]


STOP_POLL_SEC = 0.1  # how often a decode that can be stopped looks at its stop event


def run_ffmpeg(
    pairs: Sequence[tuple[Path, Path]], timeout: float | None = None, stop: threading.Event | None = None,
    limits: Sequence[int | None] | None = None,
) -> tuple[int, str]:
    """Run ffmpeg on `pairs`; (exit code, stderr). Raises decode_timeout past `timeout` seconds
    (FFMPEG_TIMEOUT_SEC by default), and cancelled within STOP_POLL_SEC of `stop` being set.

    ffmpeg runs in a process group of its own, and on a timeout or a stop the whole group is
    killed: with a wrapper script as FFMPEG_BIN, killing the wrapper alone would leave its
    ffmpeg running, and holding the pipe this waits on."""
    limit = config.CFG.ffmpeg_timeout_sec if timeout is None else timeout
    proc = subprocess.Popen(
        ffmpeg_cmd(pairs, limits), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + limit
    while True:
        left = deadline - time.monotonic()
        try:
            _, stderr = proc.communicate(timeout=max(0.0, min(left, STOP_POLL_SEC) if stop is not None else left))
            return proc.returncode, stderr.decode("utf-8", "replace").strip()
        except subprocess.TimeoutExpired:
            if stop is not None and stop.is_set():
                _kill_group(proc)
                raise errors.cancelled("while ffmpeg decoded this item") from None
            if time.monotonic() >= deadline:
                _kill_group(proc)
                raise ItemError("decode_timeout", f"ffmpeg took over {limit:g} s") from None


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill `proc`'s process group (it leads its own) and reap it. The leader is not yet reaped
    here, so its pid, the group's id, cannot have been reused."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=5.0)  # a child that left the group may still hold the pipe
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    proc.wait()


def _wav_frames(dest: Path) -> int:
    try:
        return sf.info(str(dest)).frames
    except RuntimeError as exc:
        dest.unlink(missing_ok=True)
        if disk.fs_full(dest.parent):  # a WAV cut short by a full disk reads as "Format not recognised"
            raise disk.disk_full("decoding it") from None
        raise ItemError("not_audio", f"ffmpeg wrote no readable audio: {without_paths(str(exc), dest)}") from None


def without_paths(text: str, *paths: Path) -> str:
    """ffmpeg's (or soundfile's) message without the worker's own file names: they name the job's
    temp dir ("file:/tmp/parakeet-worker/job-x1y2/0.src: Invalid data ..."), which is no business
    of the client's; the input is "the audio". The message's own words stay."""
    for path in paths:
        for name in (f"file:{path}", str(path)):
            text = text.replace(name, "the audio")
        text = text.replace(str(path.parent) + "/", "")
    return text


def to_wav(
    src: Path, dest: Path, stop: threading.Event | None = None, limit: int | None = None
) -> tuple[int, str | None]:
    """Decode the first audio stream of `src` to 16 kHz mono s16 WAV; return (frames, warning).
    On an error the partial WAV is removed at once: it may be what filled the disk."""
    try:
        code, stderr = run_ffmpeg([(src, dest)], stop=stop, limits=[limit])
    except ItemError:
        dest.unlink(missing_ok=True)
        raise
    tail = without_paths(stderr, src, dest)[-400:]
    if disk.says_disk_full(stderr):
        dest.unlink(missing_ok=True)
        raise disk.disk_full("decoding it")
    if code != 0:
        dest.unlink(missing_ok=True)
        if "matches no streams" in stderr:
            raise ItemError("no_audio", "the file has no audio stream")
        raise ItemError("not_audio", f"ffmpeg could not decode it as audio: {tail or 'exit ' + str(code)}")
    return _wav_frames(dest), (f"decoder reported errors, transcribed what decoded: {tail}" if tail else None)


# A grouped run holds several files whose decoding was estimated at under GROUP_MAX_MS (about
# 0.3 s) in all, so one still running after this long holds a file that is costlier than its
# header and size said (or hangs). It is killed and its files decoded alone, each with the full
# FFMPEG_TIMEOUT_SEC: a hung file then costs one timeout, plus this, never two.
GROUP_TIMEOUT_SEC = 10.0


def to_wavs(
    pairs: Sequence[tuple[Path, Path]], stops: Sequence[threading.Event | None] | None = None,
    limits: Sequence[int | None] | None = None,
) -> list[tuple[int, str | None] | ItemError]:
    """Several small files in one ffmpeg process: starting ffmpeg (~50 ms, 200 shared libraries)
    costs more than decoding a short clip. Anything but a clean run is redone file by file, so
    each error and warning lands on its own item. `stops` (one per pair, or None) can cancel the
    files' runs alone; a grouped run, bounded by GROUP_TIMEOUT_SEC, does not look at them."""
    if len(pairs) > 1:
        try:
            code, stderr = run_ffmpeg(pairs, timeout=min(GROUP_TIMEOUT_SEC, config.CFG.ffmpeg_timeout_sec / 4), limits=limits)
            if code == 0 and not stderr:
                return [(_wav_frames(dest), None) for _, dest in pairs]
        except ItemError:
            pass
        for _, dest in pairs:  # a full disk may be why it failed: free it before the reruns
            dest.unlink(missing_ok=True)
    out: list[tuple[int, str | None] | ItemError] = []
    for n, (src, dest) in enumerate(pairs):
        try:
            out.append(to_wav(src, dest, stops[n] if stops else None, limits[n] if limits else None))
        except ItemError as exc:
            out.append(exc)
    return out
