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
import logging
import threading
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)

CLOSE_S = 5.0  # how long close() waits for the loop's tasks to end, then for its thread


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
        """Cancels what runs on the loop, waits for it to finish (at most CLOSE_S: its `finally` blocks, its
        calls' cancellations), then stops the loop and waits for its thread (at most CLOSE_S again). A
        caller of `run` still waiting, from another thread, gets CancelledError."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.close was called from its own loop")
        with self._lock:
            self._closing = True  # from here no run() hands the loop a coroutine
        if self.loop.is_closed():
            return
        if self._thread.is_alive():
            finished = asyncio.run_coroutine_threadsafe(_cancel_others(CLOSE_S), self.loop)
            try:
                finished.result(CLOSE_S + 1)
            except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
                log.warning("the loop %s did not finish its tasks within %.0f s", self._thread.name, CLOSE_S)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(CLOSE_S)
        with self._lock:
            stranded = list(self._pending)
        for future in stranded:
            future.cancel()
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_others(timeout: float) -> None:
    """Cancels every other task of the running loop and waits up to `timeout` s for them to end. The tasks
    of coroutines handed to the loop before this one were created before it ran (call_soon order), so none
    is left pending, its coroutine never started."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    for task in others:
        task.cancel()
    if others:
        await asyncio.wait(others, timeout=timeout)
