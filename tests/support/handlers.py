"""Handlers the tests route to. Each run appends the message id to the ledger file
named by ``LEDGER_PATH``, so a test can count how often each id's handler ran,
whether the handler ran in this process or in a worker subprocess.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
import uuid
from typing import ClassVar

from idempotent_worker import Context, Message, PermanentFailure


def _record(message: Message) -> None:
    line = f"{message.id}\n".encode()
    fd = os.open(os.environ["LEDGER_PATH"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one small O_APPEND write: atomic across processes
    finally:
        os.close(fd)


def ledger(message: Message, ctx: Context) -> None:
    _record(message)


def ledger_and_emit(message: Message, ctx: Context) -> None:
    _record(message)
    ctx.emit(message.value, key=message.key)


def flaky(message: Message, ctx: Context) -> None:
    """Fails on the first ``fail-times`` attempts (a header), then succeeds."""
    if ctx.attempt <= int(message.headers.get("fail-times", b"0")):
        raise RuntimeError(f"flaky failure on attempt {ctx.attempt}")
    _record(message)


def always_fails(message: Message, ctx: Context) -> None:
    raise RuntimeError("this handler always fails")


def rejects(message: Message, ctx: Context) -> None:
    raise PermanentFailure("rejected on sight")


def slow(message: Message, ctx: Context) -> None:
    """Sleeps for the number of seconds in the value, then records the run."""
    time.sleep(float(message.value or b"0"))
    _record(message)


def slow_then_emit(message: Message, ctx: Context) -> None:
    """Sleeps for the number of seconds in the value, records the run, emits the value."""
    slow(message, ctx)
    ctx.emit(message.value, key=message.key)


def crashes_on_poison(message: Message, ctx: Context) -> None:
    """Records the run, then kills the whole process if the id is ``POISON_ID``."""
    _record(message)
    if message.id == os.environ.get("POISON_ID"):
        os._exit(70)


class Lanes:
    """What ``in_lanes`` handlers saw, in this process: the order per Kafka key, and the
    most handlers running at once."""

    lock = threading.Lock()
    order: ClassVar[dict[bytes, list[str]]] = {}
    running = 0
    most = 0

    @classmethod
    def reset(cls) -> None:
        with cls.lock:
            cls.order.clear()
            cls.running = cls.most = 0

    @classmethod
    def enter(cls, message: Message) -> None:
        with cls.lock:
            cls.order.setdefault(message.key or b"", []).append(message.id)
            cls.running += 1
            cls.most = max(cls.most, cls.running)

    @classmethod
    def leave(cls) -> None:
        with cls.lock:
            cls.running -= 1


def in_lanes(message: Message, ctx: Context) -> None:
    Lanes.enter(message)
    time.sleep(0.02)
    _record(message)
    Lanes.leave()


async def in_lanes_async(message: Message, ctx: Context) -> None:
    Lanes.enter(message)
    await asyncio.sleep(0.02)
    _record(message)
    Lanes.leave()


def reply_once(message: Message, ctx: Context) -> None:
    """Records the run and replies with a value no second run could repeat."""
    _record(message)
    ctx.emit(f"reply to {message.id}, run {uuid.uuid4().hex}", key=message.key)
    ctx.emit(b"audit", topic=os.environ.get("AUDIT_TOPIC") or None)


def rejects_listed(message: Message, ctx: Context) -> None:
    """Fails permanently for the ids in ``REJECT_IDS``; records the others."""
    if message.id in os.environ.get("REJECT_IDS", "").split(","):
        raise PermanentFailure(f"{message.id} rejected")
    _record(message)


def applies_in_order(message: Message, ctx: Context) -> None:
    """Sequence routes: records ``<entity>@<version> <start> <end>`` once the run is done,
    so that a test can check the order and the overlap of one entity's runs."""
    start = time.time()
    line = f"{message.id} {start:.6f} {time.time():.6f}\n".encode()
    fd = os.open(os.environ["LEDGER_PATH"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _timed(handler):  # type: ignore[no-untyped-def]
    """A plain decorator, written as timing and retry decorators are: it returns whatever
    the wrapped function returns (for an ``async def``, its coroutine)."""

    @functools.wraps(handler)
    def wrapper(message: Message, ctx: Context):  # type: ignore[no-untyped-def]
        return handler(message, ctx)

    return wrapper


@_timed
async def decorated_async(message: Message, ctx: Context) -> None:
    await asyncio.sleep(0)
    _record(message)


class _AsyncCall:
    async def __call__(self, message: Message, ctx: Context) -> None:
        await asyncio.sleep(0)
        _record(message)


async_callable = _AsyncCall()


async def _with_suffix(suffix: str, message: Message, ctx: Context) -> None:
    await asyncio.sleep(0)
    _record(message)


async_partial = functools.partial(_with_suffix, "")


def _record_call(batch: list[tuple[Message, Context]]) -> None:
    """Batch routes: one line per call, ``<partition>:<offset>`` of each message."""
    line = " ".join(f"{m.partition}:{m.offset}" for m, _ in batch) + "\n"
    fd = os.open(os.environ["LEDGER_PATH"] + ".calls", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def batch_ledger_and_emit(batch: list[tuple[Message, Context]]) -> None:
    _record_call(batch)
    for message, ctx in batch:
        _record(message)
        ctx.emit(message.value, key=message.key)


async def batch_ledger_and_emit_async(batch: list[tuple[Message, Context]]) -> None:
    await asyncio.sleep(0)
    batch_ledger_and_emit(batch)


def batch_mixed(batch: list[tuple[Message, Context]]) -> list[Exception | None] | None:
    """Per message, by its headers: ``fail-times`` (fails its first attempts), ``reject``
    (fails for good); the whole call raises while a message with ``fail-call`` is on its
    first attempt. Records and emits the others."""
    _record_call(batch)
    if any("fail-call" in m.headers and ctx.attempt == 1 for m, ctx in batch):
        raise RuntimeError("the whole call failed")
    results: list[Exception | None] = []
    for message, ctx in batch:
        if "reject" in message.headers:
            results.append(PermanentFailure(f"{message.id} rejected"))
        elif ctx.attempt <= int(message.headers.get("fail-times", b"0")):
            results.append(RuntimeError(f"{message.id} failed on attempt {ctx.attempt}"))
        else:
            _record(message)
            ctx.emit(message.value, key=message.key)
            results.append(None)
    return results


async def traced_async(message: Message, ctx: Context) -> None:
    """Traces its own work through the OpenTelemetry API, as instrumented libraries do,
    then records the run and emits the value."""
    from opentelemetry import trace

    await asyncio.sleep(0)
    with trace.get_tracer("tests").start_as_current_span("user-work"):
        await asyncio.sleep(0)
    _record(message)
    ctx.emit(message.value, key=message.key)
