"""Virtual time and threads that take turns: what makes a simulated run follow its seed.

Every thread of a simulated worker (its loop, its lanes, its lease keeper) is a real
thread, but only the one holding the baton runs; it gives the baton back whenever it
waits on the clock. The scheduler then wakes one of the threads whose wait is over,
chosen by the seeded random generator, and moves the clock to the next wake-up when
none is due. So the interleaving, and with it the whole run, is the seed's.

A thread that blocks outside the clock while holding the baton (a real lock, a real
queue) would stop the world: the scheduler notices (``SimStuck``) instead of hanging.
"""

from __future__ import annotations

import random
import sys
import threading
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from typing import Any

QUANTUM = 0.001
"""The shortest wait: a thread that waits ``0`` still lets the others run first."""

REAL_TIMEOUT = 5.0
"""Real seconds a thread may run without giving the baton back before the run is stuck."""


class SimStuck(Exception):
    """A simulated thread blocked outside the virtual clock."""


class Killed(BaseException):
    """Raised in the threads of a killed replica when the run is torn down. A
    BaseException, so that no ``except Exception`` of the worker's takes it."""


class SimThread:
    def __init__(self, scheduler: Scheduler, target: Callable[[], None], name: str, group: str):
        self.scheduler = scheduler
        self.target = target
        self.name = name
        self.group = group
        self.wake_at = 0.0
        self.waiting: object | None = None
        """What the thread is blocked on (``Scheduler.block``), if anything."""
        self.started = False
        self.done = False
        self.dead = False
        self.error: BaseException | None = None
        self._turn = threading.Lock()  # held until this thread's turn: released to give it
        self._turn.acquire()
        self._thread = threading.Thread(target=self._body, name=f"sim-{name}", daemon=True)

    # -- the Startable protocol of parts.py --------------------------------------

    def start(self) -> None:
        self.wake_at = self.scheduler.now
        self.started = True
        self.scheduler.threads.append(self)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        while not self.done:
            self.scheduler.sleep(0.01)

    def is_alive(self) -> bool:
        return self.started and not self.done

    # -- turns ---------------------------------------------------------------------------

    def _body(self) -> None:
        self.scheduler._by_ident[threading.get_ident()] = self
        self._turn.acquire()
        try:
            if not self.dead:
                self.target()
        except Killed:
            pass  # its replica was killed: the thread just ends
        except BaseException as exc:  # a bug in the worker or the simulator: the run fails
            self.error = exc
        finally:
            self.done = True
            self.scheduler._hand_back()

    def run_turn(self) -> None:
        self._turn.release()
        if not self.scheduler._back.acquire(timeout=REAL_TIMEOUT):
            frame = sys._current_frames().get(self._thread.ident or 0)
            where = "".join(traceback.format_stack(frame)[-6:]) if frame else "?"
            raise SimStuck(f"{self.name} blocked outside the virtual clock:\n{where}")

    def wait_turn(self) -> None:
        if self.dead:
            raise Killed
        self.scheduler._hand_back()
        self._turn.acquire()
        if self.dead:
            raise Killed


class Scheduler:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.now = 0.0
        self.threads: list[SimThread] = []
        self._back = threading.Lock()  # held while a thread has the turn: released to end it
        self._back.acquire()
        self.running: SimThread | None = None
        self._by_ident: dict[int, SimThread] = {}
        self.on_tick: list[Callable[[], None]] = []
        """Called by the controller before each turn (faults, traffic, checks)."""

    def spawn(self, target: Callable[[], None], name: str, group: str | None = None) -> SimThread:
        """A thread not started yet, in ``group`` (by default the caller's)."""
        if group is None:
            group = self.current().group
        return SimThread(self, target, name, group)

    def current(self) -> SimThread:
        thread = self._by_ident.get(threading.get_ident())
        if thread is None:
            raise RuntimeError("called outside a simulated thread")
        return thread

    def sleep(self, seconds: float) -> None:
        me = self.current()
        me.wake_at = self.now + max(seconds, QUANTUM)
        me.wait_turn()

    def block(self, on: object, deadline: float = float("inf")) -> None:
        """Wait until ``wake(on)`` or the clock reaches ``deadline``."""
        me = self.current()
        me.waiting = on
        me.wake_at = max(deadline, self.now + QUANTUM)
        try:
            me.wait_turn()
        finally:
            me.waiting = None

    def wake(self, on: object) -> None:
        """Make every thread blocked on ``on`` due now."""
        for thread in self.threads:
            if thread.waiting is on:
                thread.wake_at = min(thread.wake_at, self.now)

    def kill(self, group: str) -> None:
        """Stop every thread of ``group`` where it is, for good (a crashed process). Its
        threads are not run again; ``close`` unwinds them at the end of the run."""
        for thread in self.threads:
            if thread.group == group:
                thread.dead = True

    def park(self) -> None:
        """The calling thread waits forever (its process died under it)."""
        me = self.current()
        me.dead = True
        self._hand_back()
        me._turn.acquire()
        raise Killed

    def _hand_back(self) -> None:
        self._back.release()

    def run(self, until: float, finished: Callable[[], bool]) -> None:
        """Give turns until ``finished()`` or the clock passes ``until``."""
        while not finished():
            for tick in self.on_tick:
                tick()
            if len(self.threads) > 64:
                self.threads = [t for t in self.threads if not t.done]
            live = [t for t in self.threads if not t.done and not t.dead]
            due = [t for t in live if t.wake_at <= self.now]
            if not due:
                if not live:
                    return
                self.now = min(t.wake_at for t in live)
                if self.now > until:
                    return
                continue
            thread = self.rng.choice(due)
            self.running = thread
            thread.run_turn()
            self.running = None
            if thread.error is not None:
                raise thread.error

    def close(self) -> None:
        """Unwind every thread still parked (killed replicas, a run cut short)."""
        for thread in self.threads:
            if not thread.done:
                thread.dead = True
                thread._turn.release()
                self._back.acquire(timeout=REAL_TIMEOUT)
                thread._thread.join(REAL_TIMEOUT)


class SimClock:
    """The Clock of idempotent_worker/parts.py on a scheduler's virtual time."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    def monotonic(self) -> float:
        return self._scheduler.now

    def sleep(self, seconds: float) -> None:
        self._scheduler.sleep(seconds)

    def wait_event(self, event: threading.Event, seconds: float) -> bool:
        if not event.is_set():
            self._scheduler.sleep(seconds)
        return event.is_set()

    def wait_futures(
        self, futures: Iterable[Future[None]], seconds: float
    ) -> tuple[set[Future[None]], set[Future[None]]]:
        pending = set(futures)
        deadline = self._scheduler.now + seconds
        waiting = object()
        for future in pending:
            future.add_done_callback(lambda _: self._scheduler.wake(waiting))
        while True:
            done = {f for f in pending if f.done()}
            if done or self._scheduler.now >= deadline:
                return done, pending - done
            self._scheduler.block(waiting, deadline)

    def lock(self) -> Any:
        return _SimLock(self)


class _SimLock:
    """A lock whose waiters block on the scheduler (only one thread runs at a time, so a
    flag is enough)."""

    def __init__(self, clock: SimClock) -> None:
        self._scheduler = clock._scheduler
        self._held = False

    def __enter__(self) -> bool:
        while self._held:
            self._scheduler.block(self)
        self._held = True
        return True

    def __exit__(self, *exc: object) -> None:
        self._held = False
        self._scheduler.wake(self)


class SimPool(Executor):
    """A route's lanes: at most ``workers`` tasks at once, each on a simulated thread."""

    def __init__(self, scheduler: Scheduler, workers: int, name: str) -> None:
        self._scheduler = scheduler
        self._workers = workers
        self._name = name
        self._running = 0
        self._tasks: list[SimThread] = []
        self._queue: list[tuple[Future[Any], Callable[[], Any]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.append((future, lambda: fn(*args, **kwargs)))
        if self._running < self._workers:
            self._running += 1
            thread = self._scheduler.spawn(self._work, f"{self._name}-{len(self._tasks)}")
            self._tasks.append(thread)
            thread.start()
        return future

    def _work(self) -> None:
        """Run queued tasks until none is left."""
        try:
            while self._queue:
                future, call = self._queue.pop(0)
                try:
                    future.set_result(call())
                except Exception as exc:
                    future.set_exception(exc)
        finally:
            self._running -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if wait:
            for task in self._tasks:
                task.join()
