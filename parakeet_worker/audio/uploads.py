"""Uploads: files that come with an HTTP request (multipart), streamed into what becomes the
job's temp dir, never whole in memory, each capped and counted in the temp-disk budget."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from parakeet_worker import config
from parakeet_worker.audio import disk
from parakeet_worker.audio.disk import DISK_FULL_ERRNOS
from parakeet_worker.errors import ItemError
from parakeet_worker.transcript import Upload

log = logging.getLogger("parakeet-worker")


class Uploads:
    """Files that come with a request (HTTP multipart), streamed into what becomes the job's
    temp dir: never whole in memory, each capped by MAX_UPLOAD_BYTES and counted in the temp-disk
    bound as it arrives. Whatever happens, discard() (run_job calls it) leaves nothing behind
    but what a job took over."""

    def __init__(self) -> None:
        self.dir: Path | None = disk.make_job_dir()  # JobError: the server answers 503
        self.files: list[UploadFile] = []
        self.stop = threading.Event()  # ends a wait for temp disk once the request is gone

    def open(self, name: str) -> UploadFile:
        """A new file, the next input: <dir>/<index>.src."""
        assert self.dir is not None
        index = len(self.files)
        upload = UploadFile(self, name, self.dir / f"{index}.src", self.dir / f"{index}.wav")
        self.files.append(upload)
        return upload

    def take(self) -> Path:
        """The dir, now the job's (its close() removes it)."""
        assert self.dir is not None
        taken, self.dir = self.dir, None
        return taken

    def discard(self) -> None:
        self.stop.set()
        for upload in self.files:
            upload.f.close()
        if self.dir is not None:
            disk.budget().release_under(self.dir)
            disk.remove_job_dir(self.dir)
            self.dir = None


class UploadFile:
    """One upload being received: write() as its bytes arrive, then finish()."""

    def __init__(self, uploads: Uploads, name: str, path: Path, key: Path):
        self.uploads, self.name, self.key = uploads, name, key  # key: what _fetch_reserved counts it under
        self.f = open(path, "wb")
        self.written = 0
        self.block = bytearray()

    async def write(self, data: bytes) -> None:
        """ItemError too_large past MAX_UPLOAD_BYTES (the request's files then go), disk_full."""
        self.written += len(data)
        if self.written > config.CFG.max_upload_bytes:
            raise ItemError("too_large", f"the upload is over MAX_UPLOAD_BYTES={config.CFG.max_upload_bytes}")
        self.block += data
        if len(self.block) >= UPLOAD_BLOCK_BYTES:
            await self._flush()

    async def finish(self) -> Upload:
        await self._flush()
        self.f.close()
        return Upload(self.name)

    async def _flush(self) -> None:
        """Written off the event loop, after its bytes are reserved (waiting at the bound)."""
        block, self.block = bytes(self.block), bytearray()
        await asyncio.to_thread(self._write, block, self.written)

    def _write(self, block: bytes, total: int) -> None:
        disk.budget().reserve(self.key, total, self.uploads.stop)
        if self.uploads.stop.is_set():  # discarded meanwhile: this reservation must not outlive it
            disk.budget().release(self.key)
            raise ItemError("cancelled", "the request ended")
        try:
            self.f.write(block)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise disk.disk_full("receiving the upload") from None
            raise


UPLOAD_BLOCK_BYTES = 1 << 20
