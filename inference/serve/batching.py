"""Dynamic batching that forms a batch when the model is free.

Ray Serve's @serve.batch seals a batch `batch_wait_timeout_s` after its first request even while the previous batch
is still running, so under load the requests that arrive during one forward pass are cut into several small
batches that then wait in line (benchmarks/bench_serve.py at concurrency 8, 64 px, with @serve.batch behind the
ingress: 30 of 42 batches held one request, a mean of 2.3 of the 8 allowed). Here the requests that arrive while a
batch runs wait in a queue, and when the run ends up to `max_batch_size` of them form the next batch at once,
without waiting for more: under load the missing requests belong to the batch that just ended, so a wait would only
idle the model (it did: 20 ms per batch, a fifth of the model's time at 32 px). Only a request that finds the model
idle waits, up to `wait_s`, for company. One batch runs at a time (one model per replica).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


class Batcher:
    """submit(item) -> the result for that item of `run(items)`, which takes a list and returns one result (or an
    exception instance, raised to that item's caller) per item, in order."""

    def __init__(self, run: Callable[[list[Any]], Awaitable[list[Any]]], max_batch_size: int, wait_s: float):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self.queue: asyncio.Queue[tuple[Any, asyncio.Future, float]] = asyncio.Queue()
        self.worker: asyncio.Task | None = None
        self.free_since = 0.0         # when the last batch ended (perf_counter)
        self.wait_seconds = 0.0       # total time batches spent waiting for more requests (formation)

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self.worker is None or self.worker.done():
            self.worker = loop.create_task(self._loop())
        future = loop.create_future()
        self.queue.put_nowait((item, future, time.perf_counter()))
        return await future           # a cancelled caller's future is skipped when its batch forms

    def _take(self, batch: list) -> None:
        while len(batch) < self.max_batch_size and not self.queue.empty():
            entry = self.queue.get_nowait()
            if not entry[1].done():
                batch.append(entry)

    async def _form(self) -> list[tuple[Any, asyncio.Future, float]]:
        batch: list[tuple[Any, asyncio.Future, float]] = []
        while not batch:
            entry = await self.queue.get()
            if not entry[1].done():
                batch.append(entry)
        self._take(batch)
        # Requests that waited while the last batch ran go at once: under load the others are in the batch that
        # just ended (their clients have not sent again yet), so waiting for them would only idle the model. Only
        # a request that found the model idle waits, up to wait_s, for company.
        found_idle = batch[0][2] >= self.free_since
        if found_idle and len(batch) < self.max_batch_size and self.wait_s > 0:
            t0 = time.perf_counter()
            deadline = t0 + self.wait_s
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    entry = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
                if not entry[1].done():
                    batch.append(entry)
                self._take(batch)
            self.wait_seconds += time.perf_counter() - t0
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._form()
            try:
                results = await self.run([item for item, _, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} gave {len(results)} results")
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
                results = [exc] * len(batch)
            self.free_since = time.perf_counter()
            for (_, future, _), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
