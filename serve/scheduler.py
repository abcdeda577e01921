"""Continuous batching: one thread owns one ``Batch`` and keeps its rows busy with whatever requests are waiting.

    scheduler = Scheduler(generator)
    scheduler.start()
    ticket = scheduler.submit(sequence)        # on the event loop; raises Overloaded when too many wait
    kind, value = await ticket.events.get()    # ("text", piece) ... then ("done", GenerationResult)
    scheduler.cancel(ticket)                   # the client went away: its row is free at the next step
    scheduler.stop()

Requests reach the thread through a thread-safe queue. Between two engine steps the thread drops cancelled
requests, fills free rows from the waiting requests (first come, first served) and steps the batch once; a
finished sequence leaves its row inside ``Batch.step``, so a long generation never holds up a short one for more
than one step. Each ``Sequence`` keeps its own sampling parameters and random generator, so a request's output does
not depend on what it shares the batch with. Events go back to the asyncio side with ``call_soon_threadsafe``
into the ticket's own ``asyncio.Queue``.

Event kinds, in order: any number of ``("text", piece)``, then exactly one of ``("done", GenerationResult)``,
``("error", message)`` (the engine failed), ``("stopped", message)`` (the scheduler stopped first) or
``("cancelled", None)`` (after ``cancel``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading

from .batch import Batch, Sequence
from .generator import Generator

log = logging.getLogger(__name__)

# Prompt tokens all prefilling rows together may write per step (vLLM's max_num_batched_tokens): decoding rows run
# in a call of their own, so an uncapped long prompt would still hold their next token back for its whole prefill;
# chunks of it keep them ticking.
PREFILL_CHUNK = 256
# How long the idle thread waits for work before looking at the stop flag again.
IDLE_POLL_S = 0.1


class Overloaded(RuntimeError):
    """Too many requests are waiting for a row."""


class Stopped(RuntimeError):
    """The scheduler no longer takes requests (the server is shutting down)."""


class Ticket:
    """One submitted request: its sequence and the queue its events arrive in (read on the event loop)."""

    def __init__(self, seq: Sequence, loop: asyncio.AbstractEventLoop):
        self.seq = seq
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set on the event loop, read by the scheduler thread between steps
        self.closed = False  # a final event was sent: nothing more will come
        self._loop = loop

    def _send(self, kind: str, value=None) -> None:
        """From the scheduler thread."""
        self.closed = kind != "text"
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed (server gone): nobody is left to read it
            pass


class Scheduler:
    def __init__(self, generator: Generator, max_waiting: int = 256):
        self.generator = generator
        self.max_waiting = max_waiting
        self.batch = Batch(generator.engine, generator.spec.max_batch, generator.pad_token_id,
                           max_step_tokens=PREFILL_CHUNK, prefix_cache=generator.prefix_cache)
        self._inbox: queue.Queue[Ticket | None] = queue.Queue()  # None wakes the thread to stop
        self._waiting: collections.deque[Ticket] = collections.deque()  # owned by the thread
        self._running: dict[int, Ticket] = {}  # row -> ticket, owned by the thread
        self._stopping = threading.Event()
        self.rows = generator.spec.max_batch
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self.cancelled_total = 0  # requests dropped by cancel(), for metrics

    # --- the event-loop side

    @property
    def waiting(self) -> int:
        """Requests submitted but not yet in a row."""
        return self._inbox.qsize() + len(self._waiting)

    @property
    def active(self) -> int:
        """Requests in a row of the batch."""
        return len(self._running)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def start(self) -> None:
        self._thread.start()
        log.info("scheduler started: %d rows, max_context %d", self.rows,
                 self.generator.spec.max_context)

    def submit(self, seq: Sequence) -> Ticket:
        """Queue a sequence; call on the event loop that reads the ticket."""
        if not self.running:
            raise Stopped("the server is shutting down")
        if self.waiting >= self.max_waiting:
            raise Overloaded(f"{self.waiting} requests are already waiting for one of {self.rows} "
                             "rows; retry later")
        ticket = Ticket(seq, asyncio.get_running_loop())
        self._inbox.put(ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop generating for a ticket (a no-op once it has finished). Its row frees at the next step boundary."""
        if not ticket.closed and not ticket.cancelled:
            ticket.cancelled = True
            ticket.events.put_nowait(("cancelled", None))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking requests; requests still waiting or running get a ("stopped", message) event."""
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the scheduler thread is still in an engine step after %.0f s", timeout)

    # --- the scheduler thread

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._take_new(block=not self._running)
                self._drop_cancelled()
                self._admit()
                if self._running:
                    self._step()
        finally:
            self._take_new(block=False)
            for ticket in [*self._running.values(), *self._waiting]:
                ticket._send("stopped", "the server shut down before this request finished")
            log.info("scheduler stopped")

    def _take_new(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_POLL_S) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _drop_cancelled(self) -> None:
        for row, ticket in list(self._running.items()):
            if ticket.cancelled:
                self.batch.release(row)
                del self._running[row]
                self.cancelled_total += 1
                log.debug("cancelled a request in row %d after %d tokens", row, len(ticket.seq.token_ids))
        kept = [ticket for ticket in self._waiting if not ticket.cancelled]
        self.cancelled_total += len(self._waiting) - len(kept)
        self._waiting = collections.deque(kept)

    def _admit(self) -> None:
        while self._waiting and self.batch.free_rows:
            ticket = self._waiting.popleft()
            try:
                row = self.batch.add(ticket.seq)  # copies its cached prefix in: an engine call
            except Exception as e:  # fails this request, not the server (as a failed step)
                log.exception("loading a cached prefix failed")
                ticket._send("error", f"the engine failed: {e}")
                continue
            self._running[row] = ticket

    def _step(self) -> None:
        try:
            sampled = self.batch.step()
        except Exception as e:  # an engine failure fails the requests in the batch, not the server
            log.exception("engine step failed")
            for row, ticket in self._running.items():
                self.batch.release(row)
                ticket._send("error", f"the engine failed: {e}")
            self._running.clear()
            return
        sampled = {id(seq) for seq in sampled}
        for row, ticket in list(self._running.items()):
            if id(ticket.seq) not in sampled:  # still prefilling its prompt
                continue
            piece = ticket.seq.take_text()
            if piece:
                ticket._send("text", piece)
            if ticket.seq.finished:  # Batch.step has already freed its row
                del self._running[row]
                ticket._send("done", ticket.seq.result())
