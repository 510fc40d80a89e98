"""A process that owns one job dir (parakeet_worker.jobdirs) until it is killed: the dead-worker
clean-up tests start it, read the dir it prints, then kill it or leave it running.

    python tests/jobdir_owner.py ROOT [NAME]

With NAME the process makes no dir of its own: it holds the ``.owner`` lock of ROOT/NAME, which
the test made with an owner record of its choosing (another pid namespace, say)."""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path


def main(root: str, name: str | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from parakeet_worker.audio.jobdirs import LOCK_NAME, JobDirs

    if name is None:
        folder = JobDirs().make(Path(root))
    else:
        folder = Path(root) / name
        folder.mkdir(parents=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    (folder / "0.wav").write_bytes(b"\0" * 4096)  # what a job leaves: a decoded WAV
    print(folder, flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main(*sys.argv[1:3])
