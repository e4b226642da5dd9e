"""The one line every generation waits in, whatever door it came through.

The page and gradio_client's `/infer`, MCP and the OpenAI route all take a ticket here before they
generate. The scheduler owns:
- admission: at most `max_queue` tickets wait (running ones not counted); one more is refused at
  once with `Busy`, as is every new one once the server is closing;
- order: first come, first served across the doors, `slots` generations at once (1, or the number
  of Ray Serve replicas);
- leaving: a waiting ticket whose caller goes away (its task is cancelled) leaves the line at once
  and never generates;
- timing: when each ticket joined, started and finished, so queue wait and generation time are
  measured apart.

It lives on the server's event loop: every method is called from it (the generation itself runs
in a worker thread; its end is reported back to the loop).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


class Busy(RuntimeError):
    """The line is full, or the server is closing; the caller should try again later."""


_numbers = itertools.count(1)


@dataclass(eq=False)
class Ticket:
    """A place in line. `waited` is the seconds from joining to starting."""

    route: str
    number: int = field(default_factory=lambda: next(_numbers))
    joined: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: bool = False
    _turn: asyncio.Future | None = field(default=None, repr=False)
    _moved: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def waited(self) -> float:
        return (self.started if self.started is not None else time.monotonic()) - self.joined


class Scheduler:
    def __init__(self, *, slots: int = 1, max_queue: int):
        if slots < 1 or max_queue < 1:
            raise ValueError(f"slots and max_queue must be at least 1, got {slots} and {max_queue}")
        self.slots = slots
        self.max_queue = max_queue
        self.closed = False
        self.last_finished: float | None = None  # time.monotonic() when a generation last ended
        self._line: deque[Ticket] = deque()
        self._running: set[Ticket] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def waiting(self) -> int:
        """Tickets in line, not yet started."""
        return len(self._line)

    @property
    def running(self) -> int:
        return len(self._running)

    def admit(self, route: str) -> Ticket:
        """A ticket at the end of the line; Busy when the line is full or the server is closing."""
        if self.closed:
            raise Busy("the server is shutting down: try again when it is back")
        if len(self._line) >= self.max_queue:
            raise Busy(f"the server is busy ({len(self._line)} requests waiting): try again shortly")
        ticket = Ticket(route=route, _turn=asyncio.get_running_loop().create_future())
        self._line.append(ticket)
        self._idle.clear()
        self._advance()
        return ticket

    async def turn(self, ticket: Ticket, on_position: Callable[[int], None] | None = None) -> None:
        """Wait until `ticket` may run. `on_position(ahead)` hears how many are ahead of it each time
        that changes. Cancelled while waiting (the caller left): the ticket leaves the line."""
        reported = None
        try:
            while not ticket._turn.done():
                ahead = self._line.index(ticket) + len(self._running)  # waiting before it, and generating
                if on_position is not None and ahead != reported:
                    on_position(ahead)
                    reported = ahead
                ticket._moved.clear()
                moved = asyncio.ensure_future(ticket._moved.wait())
                try:
                    await asyncio.wait((ticket._turn, moved), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    moved.cancel()
        except asyncio.CancelledError:
            self.leave(ticket)
            raise

    def leave(self, ticket: Ticket) -> None:
        """The ticket's generation ended, or its caller left before it started; the next one may go.
        Calling it again for the same ticket does nothing."""
        if ticket.finished:
            return
        ticket.finished = True
        if ticket in self._running:
            self._running.discard(ticket)
            self.last_finished = time.monotonic()
        else:
            self._line.remove(ticket)
        if not ticket._turn.done():
            ticket._turn.cancel()
        self._advance()

    def close(self) -> None:
        """Refuse new tickets; those already admitted still run (see `drained`)."""
        self.closed = True

    async def drained(self) -> None:
        """Wait until nothing waits or runs."""
        await self._idle.wait()

    def _advance(self) -> None:
        while self._line and len(self._running) < self.slots:
            ticket = self._line.popleft()
            ticket.started = time.monotonic()
            self._running.add(ticket)
            ticket._turn.set_result(None)
        for ticket in self._line:
            ticket._moved.set()
        if not self._line and not self._running:
            self._idle.set()
