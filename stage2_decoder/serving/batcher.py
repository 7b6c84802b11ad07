"""Dynamic batching: concurrent requests share one model call, run in a worker thread.

Each request hands in its items and a key (the decode settings: only requests with equal keys can
share a batch). The worker takes the oldest waiting request, then keeps gathering requests with the
same key until the batch holds `max_batch_images` items or `max_wait_ms` have passed since it began
gathering, makes ONE call `run(items, key)` and hands each request back its own slice of the results.
With a `prepare` step (the CPU encoder), each request's items are prepared as soon as it joins the
batch, while the worker waits for more, and `run` gets the prepared items: the time spent waiting for
company is spent on work that does not gain from a larger batch. With batching on, the passes of
`prepare` run in `prepare_threads` threads of their own (a batch's images spread over the cores), and
`run` in one more, so one batch is prepared while the one before it runs (at most one waits between).
It waits only for the company it can expect: until the batch holds as many requests as the previous
one did (their clients tend to send again), so a lone client's requests run at once; requests already
queued always join.

What the queue holds is bounded: `submit` refuses (QueueFull) a request whose items would take the
items accepted and not yet answered past `max_queue_images`. A request whose future was cancelled
(its client left, its deadline passed) or whose `deadline` has passed is dropped before the model
sees it. When a batch of several requests fails (an exception, an out-of-memory), each request is
run again alone, so only the one at fault fails. Requests are never split, so one larger than the
limit runs as a batch of its own. With `enabled=False` every request is run alone, in arrival order
(one-request-at-a-time, the baseline `bench/serve.py` compares against).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("capcache.serve")
MAX_WAIT_MS = 10_000  # a batch that waits longer for company is a configuration mistake
WAKE = object()  # put in the queue by the runner thread when it has run a batch


@dataclass
class BatcherConfig:
    max_batch_images: int = 16  # B: images in one model call at most
    max_wait_ms: float = 50.0  # T: how long the first request of a batch waits for company
    enabled: bool = True  # False: one request per model call
    max_queue_images: int = 256  # items accepted and not yet answered, at most

    def __post_init__(self):
        if self.max_batch_images < 1:
            raise ValueError(f"max_batch_images must be >= 1, got {self.max_batch_images}")
        if not (math.isfinite(self.max_wait_ms) and 0 <= self.max_wait_ms <= MAX_WAIT_MS):
            raise ValueError(f"max_wait_ms must be between 0 and {MAX_WAIT_MS}, got {self.max_wait_ms}")
        if self.max_queue_images < 1:
            raise ValueError(f"max_queue_images must be >= 1, got {self.max_queue_images}")


class QueueFull(RuntimeError):
    """The queue holds too many items to take this request now."""

class DeadlineExceeded(TimeoutError):
    """A request's deadline passed before the model reached it."""

@dataclass(eq=False)  # a job is itself: comparing fields would compare requests' image arrays
class _Job:
    items: list  # one request's inputs, whatever `run` takes (images, feature rows)
    key: Hashable
    deadline: float | None = None  # time.monotonic() after which it is dropped unrun
    future: concurrent.futures.Future[Sequence] = field(default_factory=concurrent.futures.Future)
    prepared: list | None = None  # prepare(items), once it has run
    preparing: concurrent.futures.Future | None = None  # the prepare pass holding its items
    span: tuple[int, int] = (0, 0)  # where its items are in that pass, and how many items the pass has


@dataclass
class BatchStats:
    requests: int = 0  # requests answered
    calls: int = 0  # model calls made
    images: int = 0  # images in them
    largest: int = 0  # the most images one call held
    refused: int = 0  # requests refused with QueueFull
    dropped: int = 0  # requests dropped unrun: cancelled or past their deadline
    retried: int = 0  # batches that failed and were run again one request at a time


class DynamicBatcher:
    """Gathers concurrent `submit`s into batched `run(items, key) -> results` calls (one result per item)."""

    def __init__(self, run: Callable[[list, Hashable], Sequence], cfg: BatcherConfig | None = None,
                 prepare: Callable[[list], Sequence] | None = None, prepare_threads: int = 1):
        """prepare_threads: `prepare` passes running at once (with batching on)."""
        self.run, self.cfg, self.prepare, self.prepare_threads = run, cfg or BatcherConfig(), prepare, prepare_threads
        self._prep_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.stats = BatchStats()
        self._queue: queue.Queue = queue.Queue()  # jobs, None (stop) and WAKE
        self._held: deque[_Job] = deque()  # taken from the queue but waiting for a batch with their key
        self._thread: threading.Thread | None = None
        self._runner: threading.Thread | None = None  # runs prepared batches while the next is gathered
        self._pipelined = False  # whether the runner thread runs the batches
        self._runner_busy = threading.Event()  # set from a batch's hand-over until the runner has run it
        self._runs: queue.Queue[list[_Job] | None] = queue.Queue(maxsize=1)
        self._lock = threading.Lock()
        self._stopping = False
        self._last_requests = 0  # requests in the previous batch
        self._pending = 0  # items accepted and not yet answered (queued, held or running)

    @property
    def pending_images(self) -> int:
        return self._pending

    def full(self, more: int = 1) -> bool:
        """Whether `more` items would take the queue past its bound."""
        return self._pending + more > self.cfg.max_queue_images

    def start(self) -> "DynamicBatcher":
        with self._lock:
            if self._thread is None:
                self._pipelined = self.prepare is not None and self.cfg.enabled
                if self._pipelined:
                    self._prep_pool = concurrent.futures.ThreadPoolExecutor(self.prepare_threads, "caption-prepare")
                    self._runner = threading.Thread(target=self._run_prepared, name="caption-runner", daemon=True)
                    self._runner.start()
                self._thread = threading.Thread(target=self._work, name="caption-batcher", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        """Finish the requests already submitted, then end the worker thread."""
        with self._lock:
            thread, self._thread = self._thread, None
            runner, self._runner = self._runner, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)
        if runner is not None:  # the batcher thread handed it its last batch, then None
            runner.join(timeout)
        if self._prep_pool is not None:
            self._prep_pool.shutdown(wait=False, cancel_futures=True)
            self._prep_pool = None

    def submit(self, items: list, key: Hashable = None, deadline: float | None = None) -> concurrent.futures.Future:
        """Queue one request; the future resolves to its results (or the exception its run raised).

        Raises QueueFull when its items do not fit in the queue's bound. Cancelling the future before
        the model reaches the request drops it; so does `deadline` (a time.monotonic() value) passing.
        """
        if self._thread is None:
            raise RuntimeError("the batcher is not running (call start())")
        job = _Job(list(items), key, deadline)
        with self._lock:
            # a request larger than the whole bound still runs when it is alone
            if self._pending and self._pending + len(job.items) > self.cfg.max_queue_images:
                self.stats.refused += 1
                raise QueueFull(f"{self._pending} images are waiting (at most {self.cfg.max_queue_images})")
            self._pending += len(job.items)
        job.future.add_done_callback(lambda _f, n=len(job.items): self._release(n))
        self._queue.put(job)
        return job.future

    def _release(self, n: int) -> None:
        with self._lock:
            self._pending -= n

    async def __call__(self, items: list, key: Hashable = None, deadline: float | None = None) -> list:
        """`submit` for asyncio code: awaits the results without blocking the event loop; cancelling the
        awaiting task cancels the request (dropped if the model has not reached it)."""
        return await asyncio.wrap_future(self.submit(items, key, deadline))

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
        return None if job is WAKE else job

    def _gather(self, batch: list[_Job]) -> list[_Job]:
        """Fill `batch` (its first job already in it) with same-key jobs; returns it. The caller keeps the list,
        so a failure half-way still answers every job taken into it."""
        first = batch[0]
        n = len(first.items)
        if not self.cfg.enabled:
            return batch
        # same-key jobs already held join first (they are older than anything in the queue)
        for job in list(self._held):
            if job.key == first.key and n + len(job.items) <= self.cfg.max_batch_images:
                self._held.remove(job)
                batch.append(job)
                n += len(job.items)
        # the clients the previous batch answered tend to come back, spread over some ms: wait (at most
        # T) until as many requests as it held are here; whatever is already queued joins regardless.
        # While the runner thread is busy the batch could not start anyway: it keeps gathering until then
        deadline = time.monotonic() + self.cfg.max_wait_ms / 1000
        while n < self.cfg.max_batch_images and not self._stopping:
            self._prepare(batch)  # what joined, while the rest of the batch comes
            if len(batch) >= self._last_requests:
                deadline = 0.0
            busy = self._runner_busy.is_set()  # the runner puts WAKE in the queue when it is free again
            try:
                job = self._queue.get(timeout=None if busy else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is WAKE:
                continue
            if job is None:
                self._stopping = True
                break
            if job.future.cancelled():  # its client left while it queued: it takes no place in the batch
                self.stats.dropped += 1
                continue
            if job.key == first.key and n + len(job.items) <= self.cfg.max_batch_images:
                batch.append(job)
                n += len(job.items)
            else:
                self._held.append(job)
                if job.key == first.key:  # the batch is as full as this job lets it be
                    break
        return batch

    def _live(self, batch: list[_Job]) -> list[_Job]:
        """The jobs still wanted, marked running; cancelled ones and those past their deadline are dropped."""
        now, live = time.monotonic(), []
        for job in batch:
            if job.future.done() and not job.future.cancelled():  # its prepare step failed: answered
                continue
            if job.future.set_running_or_notify_cancel():  # False: cancelled
                if job.deadline is None or now <= job.deadline:
                    live.append(job)
                    continue
                job.future.set_exception(DeadlineExceeded("the request waited past its deadline"))
            self.stats.dropped += 1
        return live

    def _prepare(self, batch: list[_Job]) -> None:
        """Start one `prepare` pass over the items of the jobs in `batch` that are still wanted and not yet
        in a pass (in the pool with batching on, else here and now)."""
        now = time.monotonic()
        jobs = [job for job in batch if job.preparing is None and not job.future.done()
                and (job.deadline is None or now <= job.deadline)]
        if self.prepare is None or not jobs:
            return
        items = [it for job in jobs for it in job.items]
        n = len(items)
        if self._prep_pool is not None and not self._alone(batch):
            done = self._prep_pool.submit(self.prepare, items)
        else:
            done = concurrent.futures.Future()
            try:
                done.set_result(self.prepare(items))
            except BaseException as e:  # noqa: BLE001 - handed to the jobs in _collect
                done.set_exception(e)
        start = 0
        for job in jobs:
            job.preparing, job.span, start = done, (start, n), start + len(job.items)

    def _alone(self, batch: list[_Job]) -> bool:
        """One request, nothing else to do and the previous batch alone too (one client): it runs here,
        start to end (hand-overs cost a lone request several ms); the pool and the runner are for when
        requests overlap."""
        return (len(batch) == 1 and self._last_requests <= 1 and self._queue.empty()
                and not self._runner_busy.is_set())

    def _collect(self, batch: list[_Job]) -> None:
        """Wait for the prepare passes of `batch`; a job whose pass failed is prepared again alone, and
        gets the exception when that fails too (so only the request at fault fails)."""
        for job in batch:
            if job.preparing is None or job.future.done():
                continue
            start, n = job.span
            try:
                out = list(job.preparing.result())
                if len(out) != n:
                    raise RuntimeError(f"prepare returned {len(out)} results for {n} items")
                job.prepared = out[start:start + len(job.items)]
                continue
            except BaseException as e:  # noqa: BLE001
                error = e
            if n > len(job.items):  # a pass shared with other requests: this request's items alone
                try:
                    job.prepared = list(self.prepare(job.items))
                    continue
                except BaseException as e:  # noqa: BLE001
                    error = e
            if not job.future.done():
                job.future.set_exception(error)

    def _call(self, jobs: list[_Job]) -> list:
        items = [it for job in jobs for it in (job.items if self.prepare is None else job.prepared)]
        results = list(self.run(items, jobs[0].key))
        if len(results) != len(items):
            raise RuntimeError(f"batched call returned {len(results)} results for {len(items)} items")
        self.stats.calls += 1
        self.stats.images += len(items)
        self.stats.largest = max(self.stats.largest, len(items))
        return results

    def _answer(self, jobs: list[_Job], results: list) -> None:
        start = 0
        for job in jobs:
            job.future.set_result(results[start:start + len(job.items)])
            start += len(job.items)
        self.stats.requests += len(jobs)

    def _run_batch(self, batch: list[_Job]) -> None:
        try:
            self._answer(batch, self._call(batch))
            self._last_requests = len(batch)
            return
        except BaseException as e:  # noqa: BLE001 - handed to the request at fault, the worker goes on
            if len(batch) == 1:
                batch[0].future.set_exception(e)
                return
            log.warning("a batch of %d requests failed (%s: %s); running each alone", len(batch),
                        type(e).__name__, e)
        self.stats.retried += 1
        for job in batch:  # one failing request (or a batch too large for memory) fails only itself
            try:
                self._answer([job], self._call([job]))
            except BaseException as e:  # noqa: BLE001
                job.future.set_exception(e)

    def _run_prepared(self) -> None:
        """The runner thread: the batches the batcher thread prepared, in order, until None."""
        while (batch := self._runs.get()) is not None:
            try:
                batch = self._live(batch)  # a client may have left while its batch waited for this thread
                if batch:
                    self._run_batch(batch)
            except Exception as e:  # noqa: BLE001 - a bug here must not leave later requests waiting forever
                log.error("batcher error: %s: %s", type(e).__name__, e)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
            finally:
                if self._runs.empty():
                    self._runner_busy.clear()
                    self._queue.put(WAKE)

    def _work(self) -> None:
        try:
            self._gather_and_hand_on()
        finally:
            if self._pipelined:
                self._runs.put(None)

    def _gather_and_hand_on(self) -> None:
        self._stopping = False
        while True:
            first = self._next(None if not self._stopping else 0)
            if first is None:
                if self._stopping and not self._held:
                    return
                continue
            batch = [first]
            try:
                self._gather(batch)
                self._prepare(batch)
                self._collect(batch)
                if self._pipelined and not self._alone(batch):
                    self._runner_busy.set()
                    self._runs.put(batch)
                elif batch := self._live(batch):
                    self._run_batch(batch)
            except Exception as e:  # noqa: BLE001 - a bug here must not leave later requests waiting forever
                log.error("batcher error: %s: %s", type(e).__name__, e)
                for job in [*batch, *self._held]:
                    if not job.future.done():
                        job.future.set_exception(e)
                self._held.clear()
