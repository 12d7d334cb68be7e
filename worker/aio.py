"""An event loop on a thread of its own, for ``async def`` handlers.

Lanes (threads) hand their coroutine to the loop and wait for its result, so an async
handler's awaits overlap with those of the other lanes in flight.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable
from typing import Any


class EventLoopThread:
    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="async-handlers", daemon=True
        )
        self._thread.start()

    def run(self, awaitable: Awaitable[Any]) -> None:
        """Run ``awaitable`` on the loop and wait for it; its exception is raised here."""

        async def wrapped() -> None:
            await awaitable

        asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
