"""Fair sharing between jobs, written once: the two rules every shared resource of the worker uses.

- `FairShare` (start-time fair queuing, a virtual clock): for a resource whose work has a cost
  (model seconds for the scheduler, estimated ffmpeg milliseconds for the decoder). Every owner
  (a job) has the service it has received so far; the next piece of work goes to the owner that
  has received the least. An owner that comes (back) starts at the service of the owner served
  last (the clock), not at zero: it cannot claim what it was owed while idle, and a stream of
  new owners cannot hold back an old one for ever.
- `FairSlots`: for a resource of a fixed number of places (download slots, places in the prepare
  pool). An owner with none in use may always start one; a free place goes to the waiting owner
  that holds the fewest, the longest waiting first.

Bookkeeping only: no locks, clocks or threads; the owners of the resources hold their own locks.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence


class FairShare:
    """The service each owner with work waiting has received, and the virtual clock."""

    def __init__(self) -> None:
        self.served: dict[Hashable, float] = {}
        self.clock = 0.0

    def arrive(self, owner: Hashable, waiting: bool) -> None:
        """`owner` has new work; `waiting`: it already had work waiting or running."""
        if not waiting:
            self.served[owner] = max(self.served.get(owner, 0.0), self.clock)

    def charge(self, costs: Iterable[tuple[Hashable, float]]) -> None:
        """Work is about to run, (owner, cost) for each part: the clock moves to the least-served
        of these owners, and each pays for its part."""
        costs = list(costs)
        if costs:
            self.clock = max(self.clock, min(self.served.get(owner, 0.0) for owner, _ in costs))
        for owner, cost in costs:
            self.served[owner] = self.served.get(owner, 0.0) + cost

    def forget(self, owner: Hashable) -> None:
        """`owner` has no work left: it starts again from the clock when it comes back."""
        self.served.pop(owner, None)


class FairSlots:
    """`total` places shared by owners: which waiting owner may take one now."""

    def __init__(self, total: int):
        self.total = total
        self.held_by: dict[Hashable, int] = {}

    def choose(self, waiting: Sequence[Hashable]) -> int | None:
        """Of the owners waiting, in arrival order, the position of the one that may take a place
        now, or None: the first that holds none; else, while places are free, the one that holds
        the fewest (the longest waiting first)."""
        for n, owner in enumerate(waiting):
            if not self.held_by.get(owner):
                return n
        if not waiting or sum(self.held_by.values()) >= self.total:
            return None
        return min(range(len(waiting)), key=lambda n: self.held_by.get(waiting[n], 0))

    def take(self, owner: Hashable) -> None:
        self.held_by[owner] = self.held_by.get(owner, 0) + 1

    def give_back(self, owner: Hashable) -> None:
        self.held_by[owner] -= 1
        if not self.held_by[owner]:
            del self.held_by[owner]
