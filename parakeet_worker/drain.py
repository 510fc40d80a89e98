"""SIGTERM in HTTP mode: drain, answer everyone in JSON, exit 0.

What uvicorn does alone (measured on cafde99): at SIGTERM it closes its sockets, waits
`timeout_graceful_shutdown`, then cancels the requests still running, which answers each with a
plain-text 500 ("Internal Server Error") and a started SSE stream with nothing (the client sees
the connection end: "Response ended prematurely"); then the process dies with `terminate
called without an active exception` (SIGABRT, exit 134) whenever a job was still in the model.

Why it aborts (gdb, `thread apply all bt` at the abort): the model thread is a daemon thread;
when the main thread finalizes Python, CPython 3.11 ends each daemon thread that next tries to
take the GIL with pthread_exit(). glibc unwinds that thread's stack with a forced unwind, and
the model thread was inside torch (THPVariable_matmul, GIL released by pybind11's
gil_scoped_release): the unwind reaches that object's destructor, which is noexcept, and the C++
runtime calls std::terminate(). Any daemon thread inside a C++ library that releases the GIL can
do it (the CAM++ speaker model too). CPython 3.14 parks such threads instead (gh-87135).

So here: the first SIGTERM (or SIGINT) starts a `Drain`: new requests get a JSON 503 at once
and /ping says 503 (the server keeps listening so that they can be told), requests in flight go
on for up to SHUTDOWN_GRACE_SEC; those still running then are stopped (their jobs cancelled,
temp dirs removed) and answered with a JSON 503, or a final SSE error event. Then uvicorn shuts
down, and `exit_now` ends the process with os._exit(0) after flushing logs, skipping the
finalization that would abort: nothing is left for it to do (every request answered, every job
dir gone). A second SIGINT forces uvicorn's exit as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

log = logging.getLogger("parakeet-worker.http")

ANSWER_SEC = 10.0  # after the grace: how long stopped requests get to send their 503s
RECANCEL_SEC = 0.5  # how often work that outlived its cancellation is cancelled again
SHUTDOWN_CODE = "shutting_down"
SHUTDOWN_MESSAGE = "this worker is shutting down; retry the request (another worker will take it)"


class Drain:
    """The HTTP server's shutdown state (event loop only). `draining`: SIGTERM came, new
    requests are refused; `stopping`: the grace is over, the requests still tracked are being
    cancelled (a route that sees its work cancelled while `stopping` answers 503)."""

    def __init__(self, grace_sec: float):
        self.grace_sec = grace_sec
        self.draining = False
        self.stopping = False
        self.work: set[asyncio.Future[Any]] = set()

    def track(self, work: asyncio.Future[Any]) -> asyncio.Future[Any]:
        """Count `work` (a request's body reading and job, as one task) as in flight until it is
        done; cancelled at once if the grace is already over."""
        self.work.add(work)
        work.add_done_callback(self.work.discard)
        if self.stopping:
            work.cancel()
        return work

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            log.warning("shutting down: %d request(s) in flight get up to %g s (SHUTDOWN_GRACE_SEC)",
                        len(self.work), self.grace_sec)  # fmt: skip

    async def finish(self) -> None:
        """Wait for the work in flight, up to the grace; then cancel what is left and give
        the routes ANSWER_SEC to answer it."""
        self.begin()
        deadline = time.monotonic() + self.grace_sec
        while self.work and time.monotonic() < deadline:
            await asyncio.wait(set(self.work), timeout=max(0.0, deadline - time.monotonic()))
        self.stopping = True
        if self.work:
            log.warning("shutting down: stopping %d request(s) still running after %g s", len(self.work),
                        self.grace_sec)  # fmt: skip
        deadline = time.monotonic() + ANSWER_SEC
        while self.work and time.monotonic() < deadline:
            for work in list(self.work):  # again each turn: a cancellation can be lost (gh-86296)
                work.cancel()
            await asyncio.wait(set(self.work), timeout=min(RECANCEL_SEC, max(0.0, deadline - time.monotonic())))


def draining_server(config: Any, drain: Drain, also: Callable[[], Awaitable[None]] | None = None) -> Any:
    """A uvicorn.Server whose first SIGTERM or SIGINT runs `drain`, and `also` beside it (live
    sessions: each gets the text of what it had buffered, then a clean close), before uvicorn's
    own shutdown, which then finds nothing in flight (and would cut every WebSocket at once,
    1012). uvicorn is imported here, not at import."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if drain.draining or self.loop is None:  # a second signal, or one before start-up: uvicorn's way
                super().handle_exit(sig, frame)
                return
            drain.begin()
            self.loop.call_soon_threadsafe(self._drain)

        def _drain(self) -> None:
            task = asyncio.ensure_future(self._both())
            task.add_done_callback(lambda _: setattr(self, "should_exit", True))

        async def _both(self) -> None:
            work = [drain.finish()] if also is None else [drain.finish(), also()]
            for failed in await asyncio.gather(*work, return_exceptions=True):
                if isinstance(failed, BaseException):
                    log.error("draining failed: %s", failed)

    return DrainingServer(config)


def exit_now(code: int = 0) -> NoReturn:
    """End the process at once, logs flushed, without Python's finalization (see above: a
    daemon thread inside torch would abort it)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing more to flush
            pass
    os._exit(code)
