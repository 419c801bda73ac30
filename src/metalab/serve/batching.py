"""Micro-batching: predictions that arrive while the model is busy are computed together.

Requests queue while a batch runs; when it finishes, everything waiting (up to ``max_items``
queries) becomes the next batch, one call of ``run``. Nothing waits on a timer, so a lone
request is answered as fast as without batching, and under load the model makes fewer,
larger passes (one encoder call for all waiting sentences, one predictor call per task).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

__all__ = ["MicroBatcher"]


class MicroBatcher:
    """Runs ``run(requests) -> answers`` (one answer per request, in order) on ``executor``,
    batching the requests that wait; with ``enabled=False`` each request runs alone."""

    def __init__(self, run: Callable[[Sequence[Any]], list[Any]], executor: Executor,
                 max_items: int = 64, enabled: bool = True) -> None:
        self.run, self.executor = run, executor
        self.max_items, self.enabled = max_items, enabled
        self._waiting: deque[tuple[Any, int, asyncio.Future]] = deque()
        self._draining = False
        self._drainer: asyncio.Task | None = None  # kept so the running task is not collected
        self.batches = self.requests = 0

    async def submit(self, request: Any, size: int = 1) -> Any:
        """The answer to ``request`` (``size`` queries); raises what ``run`` raised."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((request, size, future))
        if not self._draining:
            self._draining = True
            self._drainer = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                batch = [self._waiting.popleft()]
                items = batch[0][1]
                while (self.enabled and self._waiting
                       and items + self._waiting[0][1] <= self.max_items):
                    items += self._waiting[0][1]
                    batch.append(self._waiting.popleft())
                self.batches += 1
                self.requests += len(batch)
                try:
                    answers = await loop.run_in_executor(
                        self.executor, self.run, [request for request, _, _ in batch])
                except Exception as error:  # every request of the batch gets the error
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (_, _, future), answer in zip(batch, answers, strict=True):
                    if not future.done():
                        future.set_result(answer)
        finally:
            self._draining = False
