"""Work started after an answer (cache fills, reloads, closing old snapshots), kept until it ends.

asyncio holds only weak references to tasks: without this set one could vanish
mid-flight, and shutdown could not wait for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class Background:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self) -> None:
        """Until every task started so far has ended."""
        if self._tasks:
            await asyncio.gather(*self._tasks)
