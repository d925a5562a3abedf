"""An asyncio event loop in a thread of its own, for blocking callers of asyncio gRPC.

A blocking gRPC channel drives each `.future()` call with a thread it starts for the call, when no
other call of that channel is in flight: two futures per fan-out request start two threads. Calls
made from one long-lived loop thread instead cost a wake-up of that thread and one of the caller.
`RetrieverClient` runs its channels and the failover policy (`failover.call_async`, as the router
does) on such a loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any


class LoopThread:
    """A daemon thread running an event loop; `run(coroutine)` blocks until its result.

    Example:
        >>> loop = LoopThread("client")
        >>> loop.run(asyncio.sleep(0, "done"))
        'done'
        >>> loop.close()
    """

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine) -> Any:
        """The coroutine's result (or its exception), run on the loop; callable from any other thread. A
        caller that stops waiting (Ctrl-C) cancels the coroutine, and with it the calls it made."""
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("LoopThread.run was called from its own loop: await the coroutine instead")
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # done already: nothing; else the task is cancelled on the loop
            raise

    def close(self) -> None:
        """Stops the loop and waits for its thread (at most 5 s)."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()
