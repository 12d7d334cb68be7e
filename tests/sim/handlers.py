"""Handlers of every shape a user can write, for the simulator's routes. Each does what
the running world (tests/sim/world.py) decides for the message: succeed with outputs,
fail, take long, or kill its replica."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from tests.sim import world


def plain(message: Any, ctx: Any) -> None:
    world.current().run_handler(message, ctx, blocking=True)


async def coroutine(message: Any, ctx: Any) -> None:
    await asyncio.sleep(0)
    world.current().run_handler(message, ctx, blocking=False)


def _timed(function: Any) -> Any:
    """A plain decorator, as tracing and retry decorators are written: it returns what
    the function returns (here a coroutine) without knowing it is one."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    return wrapper


@_timed
async def decorated(message: Any, ctx: Any) -> None:
    await asyncio.sleep(0)
    world.current().run_handler(message, ctx, blocking=False)


class _AsyncCallable:
    async def __call__(self, message: Any, ctx: Any) -> None:
        await asyncio.sleep(0)
        world.current().run_handler(message, ctx, blocking=False)


callable_object = _AsyncCallable()


def _with_options(options: str, message: Any, ctx: Any) -> None:
    world.current().run_handler(message, ctx, blocking=options == "blocking")


partial = functools.partial(_with_options, "blocking")


def batch(messages: list[tuple[Any, Any]]) -> Any:
    return world.current().run_batch(messages, blocking=True)


async def batch_coroutine(messages: list[tuple[Any, Any]]) -> Any:
    await asyncio.sleep(0)
    return world.current().run_batch(messages, blocking=False)


@_timed
async def batch_decorated(messages: list[tuple[Any, Any]]) -> Any:
    await asyncio.sleep(0)
    return world.current().run_batch(messages, blocking=False)


BATCH_SHAPES = ["batch", "batch_coroutine", "batch_decorated"]
SHAPES = ["plain", "coroutine", "decorated", "callable_object", "partial"]
BLOCKING = {"plain", "partial"}
"""Shapes that run on a lane's thread, where the simulated clock can pass (a slow
handler, a crash); the others run on the event loop's thread."""
