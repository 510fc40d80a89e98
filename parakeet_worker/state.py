"""How process-wide state is held: one style for every piece of it.

Each piece of mutable state (a model, a pool, the scheduler, the disk budget) has one owner, the
module that defines it, and is made on first use by a function of that module decorated with
`shared`: importing a module builds nothing and reads no setting, and the object is built from
the config in force when it is first needed. A model whose load can fail is a `LoadOnce`: it
is loaded once per process, and a failure is kept (its message), not retried, so the worker
stays up and answers with the cause instead of crash-looping on restarts.

Tests that change the config call `reset()` on the owner (e.g. `decoder.shared_decoder.reset()`)
so the next use builds it again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class shared(Generic[T]):
    """`@shared def thing() -> Thing: ...`: thing() builds it once (thread-safe), then returns it."""

    def __init__(self, build: Callable[[], T]):
        self.build = build
        self.lock = threading.Lock()
        self.value: T | None = None
        self.__doc__ = build.__doc__
        self.__name__ = build.__name__

    def __call__(self) -> T:
        value = self.value
        if value is None:
            with self.lock:
                if self.value is None:
                    self.value = self.build()
                value = self.value
        return value

    def built(self) -> T | None:
        """The object if it was built already, else None (builds nothing)."""
        return self.value

    def reset(self) -> None:
        """Forget the object: the next call builds a new one (tests, after a config change)."""
        with self.lock:
            self.value = None


class LoadOnce(Generic[T]):
    """Something loaded once per process, whose failure is kept: `get()` returns it, or None
    after a failed load (then `error` says why); `loaded` tells whether a load was tried."""

    def __init__(self, load: Callable[[], T], describe: Callable[[BaseException], str]):
        self.load = load
        self.describe = describe  # the kept message of a failed load
        self.lock = threading.Lock()
        self.value: T | None = None
        self.error: str | None = None
        self.loaded = False

    def get(self) -> T | None:
        with self.lock:
            if not self.loaded:
                try:
                    self.value = self.load()
                except Exception as exc:  # noqa: BLE001 - kept, and said by every use
                    self.error = self.describe(exc)
                    self.on_failure(exc)
                self.loaded = True
            return self.value

    def on_failure(self, exc: BaseException) -> None:
        import logging

        logging.getLogger("parakeet-worker").error("%s", self.error, exc_info=exc)

    def reset(self) -> None:
        """Forget the load (tests): the next get() loads again."""
        with self.lock:
            self.value, self.error, self.loaded = None, None, False
