"""Handlers the benchmark routes to. Each records the ids it ran, in this process, so
the benchmark can check at the end that every id ran exactly once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

from worker import Context, Message

_lock = threading.Lock()
runs: Counter[str] = Counter()
first_run = 0.0
last_run = 0.0


def _record(id: str) -> None:
    global first_run, last_run
    now = time.perf_counter()
    with _lock:
        if not runs:
            first_run = now
        runs[id] += 1
        last_run = now


def reset() -> None:
    global first_run, last_run
    with _lock:
        runs.clear()
        first_run = last_run = 0.0


def noop(message: Message, ctx: Context) -> None:
    _record(message.id)


def sleeps_10ms(message: Message, ctx: Context) -> None:
    time.sleep(0.01)
    _record(message.id)


async def sleeps_10ms_async(message: Message, ctx: Context) -> None:
    await asyncio.sleep(0.01)
    _record(message.id)
