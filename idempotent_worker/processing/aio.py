"""An event loop on a thread of its own, for handlers that return an awaitable.

Lanes (threads) hand their coroutine to the loop and wait for its result, so an async
handler's awaits overlap with those of the other lanes in flight. The thread starts with
the first awaitable: whether a handler is asynchronous is known only from what a call
returns (a plain decorator around an ``async def`` looks synchronous).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Awaitable
from concurrent.futures import Future
from typing import Any


class EventLoopThread:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, awaitable: Awaitable[Any]) -> Any:
        """Run ``awaitable`` on the loop and wait for it: its result, or its exception
        raised here. It runs in a copy of this thread's context (contextvars: the
        current trace span, so that what the handler traces nests under it)."""
        context = contextvars.copy_context()
        done: Future[Any] = Future()

        async def wrapped() -> Any:
            return await awaitable

        def finished(task: asyncio.Task[Any]) -> None:
            if task.cancelled():
                done.set_exception(asyncio.CancelledError())
            elif (error := task.exception()) is not None:
                done.set_exception(error)
            else:
                done.set_result(task.result())

        def start() -> None:
            loop.create_task(wrapped(), context=context).add_done_callback(finished)

        loop = self._started()
        loop.call_soon_threadsafe(start)
        return done.result()

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="async-handlers", daemon=True
                )
                self._thread.start()
            return self._loop

    def close(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
