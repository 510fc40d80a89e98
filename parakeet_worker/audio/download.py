"""Downloads: through the Runpod SDK's SSRF-safe fetch, retried, held to their deadlines and to
their job's life, DOWNLOAD_WORKERS at a time shared fairly by jobs (fairshare.FairSlots)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests
from runpod.serverless.utils.rp_ssrf import SSRFError, iter_content_capped, safe_get

from parakeet_worker import config, errors
from parakeet_worker.audio import disk
from parakeet_worker.audio.disk import DISK_FULL_ERRNOS
from parakeet_worker.errors import ItemError
from parakeet_worker.fairshare import FairSlots
from parakeet_worker.state import shared

log = logging.getLogger("parakeet-worker")


# --- Downloads: SSRF-safe, retried, held to their deadlines and their job's life -------------


class _Retry(Exception):
    """A download failure worth another try (connection error, 429, 5xx)."""


def fetch_url(
    url: str, dest: Path, stop: threading.Event | None = None, on_size: Callable[[int], None] | None = None
) -> Path:
    """Stream `url` to `dest` through the Runpod SDK's SSRF-safe fetch, with retries. `stop`
    ends it early (its job was stopped) and stands for the job in the fair share of download
    slots; `on_size` hears the bytes written so far. DOWNLOAD_TOTAL_SEC runs from when the item
    has its slot (not while it waits for one) and covers every attempt, connect and response
    headers included. A failed download leaves no partial file behind (it would hold disk that
    other items need)."""
    last = "no attempt made"
    try:
        with shared_slots().held(stop, stop) as give_back:
            deadline = time.monotonic() + config.CFG.download_total_sec
            give_back_at = time.monotonic() + config.CFG.download_slot_sec
            for attempt in range(config.CFG.download_retries + 1):
                if attempt:
                    pause = min(2.0 ** (attempt - 1) * 0.5, 8.0)
                    if time.monotonic() + pause > deadline:
                        break
                    if stop is not None and stop.wait(pause):
                        raise errors.cancelled()
                    if stop is None:
                        time.sleep(pause)
                if stop is not None and stop.is_set():
                    raise errors.cancelled()
                try:
                    return _download_once(url, dest, deadline, stop, on_size, (give_back_at, give_back))
                except _Retry as exc:
                    last = str(exc)
                    log.warning("download attempt %d of %s failed: %s", attempt + 1, url, last)  # redacted: SafeLogRecords
        raise ItemError("download_failed", f"{last} (after {config.CFG.download_retries + 1} attempts)")
    except BaseException:
        with contextlib.suppress(OSError):  # a read-only temp dir: _fetch_to_wav says so
            dest.unlink(missing_ok=True)
        raise


class DownloadSlots:
    """DOWNLOAD_WORKERS downloads start at once, shared fairly by jobs: a free slot goes to the
    waiting job that holds the fewest (the longest waiting first), and a job with no download
    running may always start one. A download still running after DOWNLOAD_SLOT_SEC gives its slot
    back and goes on without one: a slow source (a trickle can last DOWNLOAD_TOTAL_SEC) holds a
    slot for seconds, never the other items' downloads, of its own job or any other. So the slots
    bound how many downloads compete for the network at first, and the prepare pool bounds how
    many run in all. A wait ends at once when its job is stopped (see wake)."""

    def __init__(self, total: int):
        self.slots = FairSlots(total)
        self.cond = threading.Condition()
        self.waiting: list[tuple[int, Any]] = []  # (ticket, owner), in arrival order
        self.tickets = itertools.count()

    def _may_start(self, ticket: int, owner: Any) -> bool:
        """A job with no download running may always start one; else this wait must be the one
        the fair share picks."""
        if not self.slots.held_by.get(owner):
            return True
        chosen = self.slots.choose([w[1] for w in self.waiting])
        return chosen is not None and self.waiting[chosen][0] == ticket

    @contextlib.contextmanager
    def held(self, owner: Any, stop: threading.Event | None = None) -> Iterator[Callable[[], None]]:
        """Wait for a slot; yields the function that gives it back early (idempotent)."""
        with self.cond:
            ticket = next(self.tickets)
            self.waiting.append((ticket, owner))
            try:
                while not self._may_start(ticket, owner):
                    if stop is not None and stop.is_set():
                        raise errors.cancelled()
                    self.cond.wait()
            finally:
                self.waiting.remove((ticket, owner))
            self.slots.take(owner)
        given_back = [False]

        def give_back() -> None:
            with self.cond:
                if not given_back[0]:
                    given_back[0] = True
                    self.slots.give_back(owner)
                    self.cond.notify_all()

        try:
            yield give_back
        finally:
            give_back()

    def wake(self) -> None:
        """A job was stopped: its waits look at their stop signal now."""
        with self.cond:
            self.cond.notify_all()


@shared
def shared_slots() -> DownloadSlots:
    """The worker's DOWNLOAD_WORKERS download slots, for every job."""
    return DownloadSlots(config.CFG.download_workers)


def _download_once(
    url: str, dest: Path, deadline: float, stop: threading.Event | None = None,
    on_size: Callable[[int], None] | None = None, give_back: tuple[float, Callable[[], None]] | None = None,
) -> Path:
    """One attempt; `give_back` is (when, how) the download gives its slot back if still running."""
    timeout = (config.CFG.download_connect_timeout, config.CFG.download_read_timeout)
    too_slow = ItemError("download_timeout", f"download took over {config.CFG.download_total_sec:g} s")
    with _cut_off_at(deadline, stop, give_back) as expired:
        try:
            response = safe_get(url, timeout=timeout, max_bytes=config.CFG.max_download_bytes)
        except SSRFError as exc:
            raise _ssrf_item_error(exc) from None
        except (requests.RequestException, ValueError) as exc:
            if stop is not None and stop.is_set():
                raise errors.cancelled() from None
            if expired.is_set():  # connect and headers took the whole DOWNLOAD_TOTAL_SEC
                raise too_slow from None
            if isinstance(exc, requests.ConnectionError):
                raise _Retry(f"could not connect: {errors.short(exc)}") from None
            if isinstance(exc, requests.Timeout):
                raise ItemError("download_timeout", f"no response within {config.CFG.download_read_timeout:g} s: {errors.short(exc)}") from None
            if isinstance(exc, requests.RequestException):
                raise ItemError("download_failed", errors.short(exc)) from None
            # the URL was checked (_check_url): a redirect's Location was not
            raise ItemError("download_failed", f"the server redirected to a malformed URL: {errors.short(exc)}") from None
        with response:
            if response.status_code == 429 or response.status_code >= 500:
                raise _Retry(f"HTTP {response.status_code} from {url}")
            if response.status_code >= 400:
                raise ItemError("download_failed", f"HTTP {response.status_code} from {url}")
            _read_body(response, dest, deadline, stop, on_size, expired, too_slow)
    return dest


def _read_body(
    response: requests.Response, dest: Path, deadline: float, stop: threading.Event | None,
    on_size: Callable[[int], None] | None, expired: threading.Event, too_slow: ItemError,
) -> None:
    try:
        with open(dest, "wb") as out:
            for chunk in iter_content_capped(response, 1 << 20, config.CFG.max_download_bytes):
                out.write(chunk)
                if time.monotonic() > deadline:
                    raise too_slow
                if stop is not None and stop.is_set():
                    raise errors.cancelled()
                if on_size is not None:
                    on_size(out.tell())
    except SSRFError as exc:
        raise _ssrf_item_error(exc) from None
    except (requests.RequestException, OSError) as exc:
        if stop is not None and stop.is_set():
            raise errors.cancelled() from None
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            raise disk.disk_full("writing the download") from None
        if expired.is_set():
            raise too_slow from None
        code = "download_timeout" if "timed out" in str(exc).lower() else "download_failed"
        raise ItemError(code, f"download broke off: {errors.short(exc)}") from None
    if stop is not None and stop.is_set():
        raise errors.cancelled()
    if expired.is_set():  # the cut-off can end the body early without an exception
        raise too_slow


# The sockets a download thread connects, seen through Python's audit hooks (the SDK's fetch
# makes its own sessions and connections, so there is no other way to reach them before the
# response headers are in).


class _Connects:
    """Which sockets each download thread connects (threading.local), seen through an audit hook
    installed once per process (a hook cannot be removed; it costs a string comparison per
    audited event)."""

    def __init__(self) -> None:
        self.local = threading.local()
        sys.addaudithook(self._note)

    def _note(self, event: str, args: tuple[Any, ...]) -> None:
        if event == "socket.connect":
            sockets = getattr(self.local, "sockets", None)
            if sockets is not None:
                sockets.append(args[0])


@shared
def _connects() -> _Connects:
    return _Connects()


@contextlib.contextmanager
def _cut_off_at(
    deadline: float, stop: threading.Event | None = None, give_back: tuple[float, Callable[[], None]] | None = None
) -> Iterator[threading.Event]:
    """Hold one download attempt to its deadline, and to its job's life, from the connect to the
    body's last byte. requests bounds each read, not the whole, so a server that sends a byte
    every few seconds (of headers or of body) would hold the item, and a download slot, for
    ever. At the deadline, or when `stop` is set, a watcher shuts down every socket this thread
    connected meanwhile, which wakes the blocked read; the event it sets tells why it ended.
    The same watcher gives the download slot back at `give_back`'s time (see DownloadSlots)."""
    connects = _connects()
    expired, done = threading.Event(), threading.Event()
    sockets: list[socket.socket] = []
    connects.local.sockets = sockets

    def watch() -> None:
        while not done.wait(0.1):
            if give_back is not None and time.monotonic() >= give_back[0]:
                give_back[1]()
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                expired.set()
                for sock in list(sockets):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                return

    watcher = threading.Thread(target=watch, name="download-deadline", daemon=True)
    watcher.start()
    try:
        yield expired
    finally:
        connects.local.sockets = None
        done.set()


def _ssrf_item_error(exc: SSRFError) -> ItemError:
    """Map the SDK's SSRFError to a code by the start of its message (the rest quotes the URL)."""
    text = str(exc)
    if text.startswith("download exceeds size cap"):
        return ItemError("too_large", f"download is over the {config.CFG.max_download_bytes}-byte cap")
    if text.startswith(("redirect without Location", "exceeded maximum redirects", "could not resolve host",
                        "no addresses resolved", "no candidate addresses")):  # fmt: skip
        return ItemError("download_failed", text)
    return ItemError("forbidden_url", text)
