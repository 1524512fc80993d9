"""LLM calls of many jobs on one asyncio loop, without Django.

The worker's database thread hands in claimed rows as ready-to-start calls
and sets each job's cap (its grant on this worker); the loop starts the
next call of a job the moment one of its calls ends, up to that cap, so a
slot is a call in flight rather than a row waiting for the database
thread. Results go onto a queue the database thread reads.

A lock makes "start a call" exclusive with "lower a cap" and "stop a job":
once `lower_cap` or `stop` returns, no call of that job starts beyond it.
"""

import asyncio
import collections
import functools
import threading
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

Call = Callable[[], Awaitable[Any]]


class LoopThread:
    """An asyncio loop on a daemon thread, fed from the calling thread."""

    def __init__(self, name: str = "llm-calls"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def close(self, cleanup: Callable[[], Awaitable[None]] | None = None) -> None:
        """Cancel every task on the loop (closing their connections), run
        `cleanup` there, then stop the loop and its thread."""
        asyncio.run_coroutine_threadsafe(_cancel_everything(cleanup), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


async def _cancel_everything(cleanup) -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if cleanup is not None:
        await cleanup()


@dataclass
class _Lane:
    """One job's calls on this worker."""

    cap: int = 0
    in_flight: int = 0
    stopped: bool = False
    reserve: collections.deque = field(default_factory=collections.deque)
    tasks: set = field(default_factory=set)


class CallPool:
    """Calls of many jobs, each job up to its own cap. `results` receives
    (job, row, answer) for every call that ends without being cancelled;
    `answer` is what the call returned or the exception it raised.
    `is_fatal(answer)` says whether an answer ends its job: the job's other
    calls are then stopped at once, before the answer is even recorded."""

    def __init__(self, loop: asyncio.AbstractEventLoop, results, is_fatal: Callable[[Any], bool]):
        self._loop = loop
        self._results = results
        self._is_fatal = is_fatal
        self._lock = threading.Lock()
        self._lanes: dict[Hashable, _Lane] = {}

    # From the database thread.

    def add(self, job: Hashable, calls: list[tuple[Any, Call]]) -> None:
        """Rows ready to call: (row, a function that starts its call)."""
        with self._lock:
            lane = self._lanes.setdefault(job, _Lane())
            if lane.stopped:
                return
            lane.reserve.extend(calls)
        self._loop.call_soon_threadsafe(self._fill)

    def counts(self, job: Hashable) -> tuple[int, int]:
        """The job's calls in flight, and its rows waiting for a slot."""
        with self._lock:
            lane = self._lanes.get(job)
            return (lane.in_flight, len(lane.reserve)) if lane else (0, 0)

    def total_in_flight(self) -> int:
        with self._lock:
            return sum(lane.in_flight for lane in self._lanes.values())

    def lower_cap(self, job: Hashable, cap: int) -> int:
        """Start no call of the job beyond `cap` from now on; returns its calls in flight."""
        with self._lock:
            lane = self._lanes.setdefault(job, _Lane())
            lane.cap = min(lane.cap, cap)
            return lane.in_flight

    def set_cap(self, job: Hashable, cap: int) -> None:
        with self._lock:
            lane = self._lanes.setdefault(job, _Lane())
            raised = cap > lane.cap
            lane.cap = cap
        if raised:
            self._loop.call_soon_threadsafe(self._fill)

    def stop(self, job: Hashable) -> None:
        """No call of the job starts after this returns, and its calls in
        flight are cancelled (which closes their connections); their answers
        are never delivered. Other jobs' calls are not touched."""
        with self._lock:
            lane = self._lanes.setdefault(job, _Lane())
            lane.stopped = True
            lane.reserve.clear()
        self._loop.call_soon_threadsafe(self._cancel_lane, job)

    def forget(self, job: Hashable) -> None:
        """Drop a stopped job's lane once it has nothing in flight."""
        with self._lock:
            lane = self._lanes.get(job)
            if lane is not None and lane.stopped and lane.in_flight == 0:
                del self._lanes[job]

    # On the event loop.

    def _cancel_lane(self, job: Hashable) -> None:
        lane = self._lanes.get(job)
        for task in list(lane.tasks if lane else ()):
            task.cancel()

    def _fill(self) -> None:
        started = []
        with self._lock:
            for job, lane in self._lanes.items():
                while not lane.stopped and lane.in_flight < lane.cap and lane.reserve:
                    row, call = lane.reserve.popleft()
                    lane.in_flight += 1
                    started.append((job, lane, row, call))
        for job, lane, row, call in started:
            task = self._loop.create_task(call())
            lane.tasks.add(task)
            task.add_done_callback(functools.partial(self._done, job, lane, row))

    def _done(self, job: Hashable, lane: _Lane, row, task: asyncio.Task) -> None:
        lane.tasks.discard(task)
        # The result is queued before the call stops counting as in flight,
        # so a worker that sees nothing in flight has every result queued.
        if not task.cancelled():
            answer = task.exception() or task.result()
            if self._is_fatal(answer):
                with self._lock:
                    lane.stopped = True
                    lane.reserve.clear()
                self._cancel_lane(job)
            self._results.put((job, row, answer))
        with self._lock:
            lane.in_flight -= 1
        self._fill()
