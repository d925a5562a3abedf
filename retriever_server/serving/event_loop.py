"""An asyncio event loop in a thread of its own, for blocking callers of asyncio gRPC.

A blocking gRPC channel drives each `.future()` call with a thread it starts for the call, when no
other call of that channel is in flight: two futures per fan-out request start two threads. Calls
made from one long-lived loop thread instead cost a wake-up of that thread and one of the caller.
`RetrieverClient` runs its channels and the failover policy (`failover.call_async`, as the router
does) on such a loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future] = set()  # what callers of run() wait for
        self._closing = False
        self._thread.start()

    def run(self, coroutine: Coroutine) -> Any:
        """The coroutine's result (or its exception), run on the loop; callable from any other thread. A
        caller that stops waiting (Ctrl-C) cancels the coroutine, and with it the calls it made."""
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("LoopThread.run was called from its own loop: await the coroutine instead")
        with self._lock:
            if self._closing:
                coroutine.close()
                raise concurrent.futures.CancelledError("the loop is closed")
            future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
            self._pending.add(future)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # done already: nothing; else the task is cancelled on the loop
            raise
        finally:
            with self._lock:
                self._pending.discard(future)

    def close(self) -> None:
        """Stops the loop and waits for its thread (at most 5 s). A caller of `run` still waiting, from
        another thread, gets CancelledError: the stopped loop will never finish its coroutine."""
        with self._lock:
            self._closing = True
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        with self._lock:
            stranded = list(self._pending)
        for future in stranded:
            future.cancel()
        if not self._thread.is_alive():
            self.loop.close()
