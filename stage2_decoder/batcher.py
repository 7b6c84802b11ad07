"""Dynamic batching: concurrent requests share one model call, run in a worker thread.

Each request hands in its images and a key (the decode settings: only requests with equal keys can
share a batch). The worker takes the oldest waiting request, then keeps gathering requests with the
same key until the batch holds `max_batch_images` images or `max_wait_ms` have passed since it began
gathering, makes ONE call `run(images, key)` and hands each request back its own slice of the results.
It waits only for the company it can expect: until the batch holds as many requests as the previous
one did (their clients tend to send again), so a lone client's requests run at once; requests already
queued always join.
Requests are never split, so one larger than the limit runs as a batch of its own. With
`enabled=False` every request is run alone, in arrival order (one-request-at-a-time, the baseline
`bench/serve.py` compares against).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field


@dataclass
class BatcherConfig:
    max_batch_images: int = 16  # B: images in one model call at most
    max_wait_ms: float = 50.0  # T: how long the first request of a batch waits for company
    enabled: bool = True  # False: one request per model call

    def __post_init__(self):
        if self.max_batch_images < 1:
            raise ValueError(f"max_batch_images must be >= 1, got {self.max_batch_images}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


@dataclass
class _Job:
    items: list  # one request's inputs, whatever `run` takes (images, feature rows)
    key: Hashable
    future: concurrent.futures.Future[Sequence] = field(default_factory=concurrent.futures.Future)


@dataclass
class BatchStats:
    requests: int = 0  # requests answered
    calls: int = 0  # model calls made
    images: int = 0  # images in them
    largest: int = 0  # the most images one call held


class DynamicBatcher:
    """Gathers concurrent `submit`s into batched `run(items, key) -> results` calls (one result per item)."""

    def __init__(self, run: Callable[[list, Hashable], Sequence], cfg: BatcherConfig | None = None):
        self.run, self.cfg = run, cfg or BatcherConfig()
        self.stats = BatchStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._held: deque[_Job] = deque()  # taken from the queue but waiting for a batch with their key
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._last_requests = 0  # requests in the previous batch

    def start(self) -> "DynamicBatcher":
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="caption-batcher", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        """Finish the requests already submitted, then end the worker thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def submit(self, items: list, key: Hashable = None) -> concurrent.futures.Future:
        """Queue one request; the future resolves to its results (or the exception its batch raised)."""
        if self._thread is None:
            raise RuntimeError("the batcher is not running (call start())")
        job = _Job(list(items), key)
        self._queue.put(job)
        return job.future

    async def __call__(self, items: list, key: Hashable = None) -> list:
        """`submit` for asyncio code: awaits the results without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(items, key))

    def _next(self, timeout: float | None) -> _Job | None:
        """A held job first, else one from the queue (None: stop asked, or nothing within `timeout`)."""
        if self._held:
            return self._held.popleft()
        try:
            job = self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        if job is None:
            self._stopping = True
        return job

    def _gather(self, first: _Job) -> list[_Job]:
        batch, n = [first], len(first.items)
        if not self.cfg.enabled:
            return batch
        # same-key jobs already held join first (they are older than anything in the queue)
        for job in list(self._held):
            if job.key == first.key and n + len(job.items) <= self.cfg.max_batch_images:
                self._held.remove(job)
                batch.append(job)
                n += len(job.items)
        # the clients the previous batch answered tend to come back, spread over some ms: wait (at most
        # T) until as many requests as it held are here; whatever is already queued joins regardless
        deadline = time.monotonic() + self.cfg.max_wait_ms / 1000
        while n < self.cfg.max_batch_images and not self._stopping:
            if len(batch) >= self._last_requests:
                deadline = 0.0
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._stopping = True
                break
            if job.key == first.key and n + len(job.items) <= self.cfg.max_batch_images:
                batch.append(job)
                n += len(job.items)
            else:
                self._held.append(job)
                if job.key == first.key:  # the batch is as full as this job lets it be
                    break
        return batch

    def _work(self) -> None:
        self._stopping = False
        while True:
            first = self._next(None if not self._stopping else 0)
            if first is None:
                if self._stopping and not self._held:
                    return
                continue
            # a request whose client went away (its future cancelled) is dropped, not run
            batch = [job for job in self._gather(first) if job.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            items = [it for job in batch for it in job.items]
            try:
                results = list(self.run(items, batch[0].key))
                if len(results) != len(items):
                    raise RuntimeError(f"batched call returned {len(results)} results for {len(items)} items")
            except BaseException as e:  # noqa: BLE001 - handed to every waiting request, the worker goes on
                for job in batch:
                    job.future.set_exception(e)
                continue
            self._last_requests = len(batch)
            self.stats.calls += 1
            self.stats.images += len(items)
            self.stats.requests += len(batch)
            self.stats.largest = max(self.stats.largest, len(items))
            start = 0
            for job in batch:
                job.future.set_result(results[start:start + len(job.items)])
                start += len(job.items)
