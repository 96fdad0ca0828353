"""Task helpers: work started after an answer, kept until it ends; a request ended by its client.

`Background`: asyncio holds only weak references to tasks; without this set one
could vanish mid-flight (cache fills, reloads, closing old snapshots), and
shutdown could not wait for them.

`Disconnect`: a request waiting on an upstream or a coalesced flight would go on
for nobody once its client left; this cancels it, and tells that cancel apart
from any other (a shutdown's, which must propagate).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from types import TracebackType
from typing import Any

from gateway.types import Message, Receive


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


class Disconnect:
    """`with Disconnect(receive) as d:` cancels the task on http.disconnect; that cancel is swallowed.

    After the block, `d.gone` says whether the client left.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.gone = False
        self._active = False

    def __enter__(self) -> Disconnect:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._active = True
        self._watcher = asyncio.ensure_future(self._receive())
        self._watcher.add_done_callback(self._on_message)
        return self

    def _on_message(self, fut: asyncio.Future[Message]) -> None:
        left = not fut.cancelled() and fut.exception() is None and fut.result()["type"] == "http.disconnect"
        if self._active and left:
            self.gone = True
            self._task.cancel()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self._active = False
        self._watcher.cancel()
        if kind is asyncio.CancelledError and self.gone:
            self._task.uncancel()
            return True
        return False
