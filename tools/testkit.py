"""What tests/, bench/ and tools/ share, written once: word error counting, the ffmpeg encode
helper, a local HTTP server on 127.0.0.1, and a fake Runpod job queue for the SDK's real worker
loop. Nothing here talks to any address but 127.0.0.1."""

from __future__ import annotations
