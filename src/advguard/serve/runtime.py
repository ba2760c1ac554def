"""What keeps the service responsive under load: one inference thread fed by a queue that
batches whatever waits (the model, the detector and the query codes of the watch, each once
per batch), and a token bucket per client (spent by :mod:`advguard.serve.http`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from advguard.detection import Verdicts
from advguard.serve.matching import Bank


@dataclass(frozen=True)
class Judged:
    """What the inference thread returns for a batch: the verdicts and, where the query watch
    is on, the queries' codes (:func:`advguard.serve.queries.encode`) prepared for the scan
    (:func:`advguard.serve.matching.prepare`: what an admission would otherwise do under the
    store's lock, one request at a time)."""

    verdicts: Verdicts
    queries: Bank | None = None

    def rows(self, start: int, end: int) -> Judged:
        return Judged(self.verdicts.rows(start, end),
                      None if self.queries is None else self.queries[start:end])


class Batcher:
    """One worker thread runs ``fn`` on batches; whatever requests wait when it is free are
    concatenated into its next batch (up to ``max_images``)."""

    def __init__(self, fn: Callable[[torch.Tensor], Judged], max_images: int = 256) -> None:
        self.fn = fn
        self.max_images = max_images
        self.pool: ThreadPoolExecutor | None = None
        self.queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future[Judged]]] = (
            asyncio.Queue())
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="advguard-inference")
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        while not self.queue.empty():  # requests still waiting are answered, not left hanging
            _, future = self.queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("the service is shutting down"))
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    async def submit(self, x: torch.Tensor) -> Judged:
        future: asyncio.Future[Judged] = asyncio.get_running_loop().create_future()
        await self.queue.put((x, future))
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            n = len(items[0][0])
            while n < self.max_images and not self.queue.empty():
                items.append(self.queue.get_nowait())
                n += len(items[-1][0])
            batch = torch.cat([x for x, _ in items])
            try:
                v = await loop.run_in_executor(self.pool, self.fn, batch)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for _, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for x, future in items:
                end = start + len(x)
                if not future.done():
                    future.set_result(v.rows(start, end))
                start = end


class RateLimiter:
    """A token bucket per client: ``rate`` tokens per second, bursts of ``burst``; a request
    spends ``cost`` tokens (1 per request, or 1 per image)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, tuple[float, float]] = {}

    def allow(self, client: str, now: float, cost: int = 1) -> bool:
        tokens, last = self.buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < cost:
            self.buckets[client] = (tokens, now)
            return False
        self.buckets[client] = (tokens - cost, now)
        return True
