"""The parts the loop is built from, so that tests can give it others.

The worker takes its Kafka clients, its clock, its thread pools and its background
threads from a :class:`Parts`; the defaults are confluent-kafka's clients, the system
clock and real threads. The loop's simulator (tests/sim) gives it an in-memory broker,
a virtual clock and threads that take turns, so that a run is decided by its seed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Executor, Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol


class Clock(Protocol):
    """Time as the loop sees it."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...

    def wait_event(self, event: threading.Event, seconds: float) -> bool:
        """Wait up to ``seconds`` for ``event``; whether it is set."""
        ...

    def wait_futures(
        self, futures: Iterable[Future[None]], seconds: float
    ) -> tuple[set[Future[None]], set[Future[None]]]:
        """Wait up to ``seconds`` for one of ``futures`` to end (or raise): (done, pending)."""
        ...

    def lock(self) -> AbstractContextManager[Any]:
        """A lock that may be held across waits on this clock (a store call that waits
        out an outage)."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def wait_event(self, event: threading.Event, seconds: float) -> bool:
        return event.wait(seconds)

    def wait_futures(
        self, futures: Iterable[Future[None]], seconds: float
    ) -> tuple[set[Future[None]], set[Future[None]]]:
        done, pending = wait(futures, timeout=seconds, return_when=FIRST_EXCEPTION)
        return done, pending

    def lock(self) -> AbstractContextManager[Any]:
        return threading.Lock()


class Startable(Protocol):
    def start(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...


def _thread(target: Callable[[], None], name: str) -> Startable:
    return threading.Thread(target=target, name=name, daemon=True)


def _pool(workers: int, name: str) -> Executor:
    return ThreadPoolExecutor(workers, thread_name_prefix=name)


def _consumer(config: dict[str, Any]) -> Any:
    from confluent_kafka import Consumer

    return Consumer(config)


def _producer(config: dict[str, Any]) -> Any:
    from confluent_kafka import Producer

    return Producer(config)


@dataclass(frozen=True, slots=True)
class Parts:
    consumer: Callable[[dict[str, Any]], Any] = _consumer
    """A confluent-kafka ``Consumer`` (or one that answers the same calls) from its config."""
    producer: Callable[[dict[str, Any]], Any] = _producer
    """A confluent-kafka ``Producer`` (or the like) from its config."""
    clock: Clock = field(default_factory=SystemClock)
    pool: Callable[[int, str], Executor] = _pool
    """An executor of ``workers`` threads named ``name``, for a route's lanes."""
    thread: Callable[[Callable[[], None], str], Startable] = _thread
    """A background thread (the lease keeper's), not started."""
    exit: Callable[[int], None] = os._exit
    """Ends the process at once with a status (a handler past its timeout)."""


SYSTEM = Parts()
