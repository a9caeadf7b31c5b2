"""Dynamic batching: requests that arrive within a few milliseconds share one `generate` call.

One worker task drains an asyncio queue. It takes the first waiting request, then keeps taking
more until it has `max_batch_size` of them or `max_wait_ms` has passed (only while traffic is
concurrent: after a batch of one, the next request starts at once), groups them by their
`DecodingOptions.key()` (beam search and greedy cannot share a `generate` call), and runs each
group as ONE call in a single background thread. A single thread on purpose: torch already
spreads one forward pass over every core, and two concurrent passes would only fight for them.

Images arrive here already decoded, so a bad upload is rejected before it can join a batch.
A request's images are queued all or none (`submit_many`): when they do not all fit, nothing is
queued and the caller answers 503 at once. A job whose caller has gone away (its future was
cancelled) is dropped before it reaches `generate`, and one that goes away during `generate`
has its row stopped there (the engine asks `cancelled` at every step).

Streaming (`submit_stream`): the caption function is given a listener (`_Relay`) that the
engine tells each image's new text at every decoding step, from the worker thread; the relay
hands it to the image's `Stream` on the event loop. Streamed and plain requests share batches.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from captioner.decoding import DecodingOptions
from captioner.serve.settings import ServerSettings

log = logging.getLogger(__name__)

# fn(images, decoding[, listener]) -> one caption per image, in order (a caption is a list of
# strings when decoding.num_return_sequences > 1). A fn with a third parameter gets the
# `engine.StreamListener` of the batch (`_Relay`).
Caption = str | list[str]
CaptionFn = Callable[..., list[Caption]]
DEFAULTS = ServerSettings()  # the limits' one default each


class QueueFullError(Exception):
    """More requests are waiting than the server agreed to hold; the client should retry."""


@dataclass
class _Job:
    image: Any
    decoding: DecodingOptions
    future: asyncio.Future = field(repr=False)
    events: asyncio.Queue | None = field(default=None, repr=False)  # a streamed job's
    forwarded: int = 0  # characters of text already streamed (a retried batch repeats them)
    told: bool = False  # its last event has been queued


class Stream:
    """One image's caption as it is generated: `async for text in stream` gives the new text,
    then `stream.caption` is the whole caption (the pieces join to it). `cancel()` (the client
    left) drops the image before `generate`, or stops its row there."""

    def __init__(self, job: _Job) -> None:
        self._job = job
        self.caption: Caption | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        assert self._job.events is not None
        while True:
            kind, value = await self._job.events.get()
            if kind == "text":
                yield value
            elif isinstance(value, BaseException):
                raise value
            else:
                self.caption = value
                return

    def cancel(self) -> None:
        self._job.future.cancel()


@dataclass
class BatchStats:
    """What the worker has done so far (served by /health, read by tests and the benchmark)."""

    batches: int = 0
    images: int = 0
    largest_batch: int = 0
    busy_s: float = 0.0
    abandoned: int = 0  # jobs dropped before generate because their caller went away


class Batcher:
    """Collects concurrent caption requests into batches for one `CaptionFn`.

    `max_batch_size=1` turns batching off (one `generate` call per image). `max_wait_ms=0` adds no
    waiting but still batches whatever is already queued when the previous call finishes. The
    wait applies only while traffic is concurrent (the last batch held more than one request):
    after a batch of one, the next request starts at once and whatever queues behind it meanwhile
    forms the next batch, so a lone client pays no wait.
    """

    def __init__(
        self,
        fn: CaptionFn,
        *,
        max_batch_size: int = DEFAULTS.max_batch_size,
        max_wait_ms: float = DEFAULTS.max_wait_ms,
        max_queue: int = DEFAULTS.max_queue,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        self.fn = fn
        self.listens = len(inspect.signature(fn).parameters) >= 3
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.stats = BatchStats()
        # Whether the last batch found company: a lone client never waits for others (its
        # latency is all the wait would change), concurrent ones wait up to max_wait_ms.
        self._crowded = True
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the worker on the running event loop (called from the app's lifespan)."""
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captioner-generate")
        self._task = asyncio.create_task(self._worker(), name="captioner-batcher")

    async def stop(self) -> None:
        """Stop the worker and fail anything still waiting, so no request hangs at shutdown."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            _fail(self._queue.get_nowait(), RuntimeError("server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._task = self._queue = self._executor = None

    @property
    def queued(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    def has_room(self, n: int) -> bool:
        """Whether `n` more images fit in the queue now (checked again when they are queued)."""
        return self.queued + n <= self.max_queue

    def retry_after_s(self) -> int:
        """A client's wait before retrying: the queue's work at the measured rate, 1-60 s."""
        per_image = self.stats.busy_s / self.stats.images if self.stats.images else 0.1
        return int(min(60, max(1, math.ceil(self.queued * per_image))))

    async def submit(self, image: Any, decoding: DecodingOptions | None = None) -> Caption:
        """Queue one decoded image and wait for its caption (default decoding when None)."""
        [result] = await self.submit_many([image], decoding)
        if isinstance(result, BaseException):
            raise result
        return result

    async def submit_many(
        self, images: Sequence[Any], decoding: DecodingOptions | None = None
    ) -> list[Caption | BaseException]:
        """Queue every image or none (QueueFullError), then wait for all of them: one caption,
        or the exception that captioning it raised, per image. Cancelling the caller cancels
        its jobs, which the worker then drops."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not called (run the app with its lifespan)")
        if not self.has_room(len(images)):
            waiting = self._queue.qsize()
            raise QueueFullError(
                f"{waiting} images are waiting and {len(images)} more would exceed the queue's "
                f"{self.max_queue}"
            )
        loop = asyncio.get_running_loop()
        decoding = decoding or DecodingOptions()
        futures = [loop.create_future() for _ in images]
        for image, future in zip(images, futures, strict=True):
            self._queue.put_nowait(_Job(image, decoding, future))  # room was checked above
        try:
            return await asyncio.gather(*futures, return_exceptions=True)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise

    def submit_stream(self, image: Any, decoding: DecodingOptions | None = None) -> Stream:
        """Queue one decoded image for a streamed caption (QueueFullError when there is no
        room); iterate the `Stream` for its text."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not called (run the app with its lifespan)")
        if not self.has_room(1):
            raise QueueFullError(f"{self._queue.qsize()} images are waiting")
        job = _Job(image, decoding or DecodingOptions(), asyncio.get_running_loop().create_future())
        job.events = asyncio.Queue()
        self._queue.put_nowait(job)
        return Stream(job)

    async def _collect(self) -> list[_Job]:
        """Wait for one job, then take more until the batch is full or the wait is over."""
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.max_wait_s if self._crowded else 0.0)
        while len(batch) < self.max_batch_size:
            try:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
        self._crowded = len(batch) > 1
        return batch

    async def _worker(self) -> None:
        while True:
            batch = await self._collect()
            groups: dict[Hashable, list[_Job]] = {}
            for job in batch:
                if not job.future.done():  # the client may have gone away while it waited
                    groups.setdefault(job.decoding.key(), []).append(job)
                else:
                    self.stats.abandoned += 1
            for jobs in groups.values():
                try:
                    await self._run(jobs)
                except Exception as err:  # never let the one worker die: every later request
                    log.exception("batch worker error")  # would wait forever
                    for job in jobs:
                        _fail(job, err)

    async def _run(self, jobs: list[_Job]) -> None:
        """Caption one group in the worker thread and resolve its futures; never raises."""
        live = [j for j in jobs if not j.future.done()]  # callers gone while a group ran
        self.stats.abandoned += len(jobs) - len(live)
        if not live:
            return
        jobs = live
        loop = asyncio.get_running_loop()
        images, decoding = [j.image for j in jobs], jobs[0].decoding
        start = time.perf_counter()
        args = (images, decoding, _Relay(jobs, loop)) if self.listens else (images, decoding)
        try:
            captions = await loop.run_in_executor(self._executor, self.fn, *args)
            if len(captions) != len(jobs):
                raise RuntimeError(f"caption fn returned {len(captions)} for {len(jobs)} images")
        except Exception as err:
            self.stats.busy_s += time.perf_counter() - start
            if len(jobs) > 1:
                # One input that breaks generation must not fail its neighbours: retry alone.
                log.warning("batch of %d failed (%s); retrying one by one", len(jobs), err)
                for job in jobs:
                    await self._run([job])
                return
            log.exception("captioning failed")
            _fail(jobs[0], err)
            return
        self.stats.busy_s += time.perf_counter() - start
        self.stats.batches += 1
        self.stats.images += len(jobs)
        self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
        for job, caption in zip(jobs, captions, strict=True):
            if not job.future.done():
                job.future.set_result(caption)
            _tell(job, "done", caption)


def _tell(job: _Job, kind: str, value: Any) -> None:
    """A streamed job's last event (its caption, or what failed it), once."""
    if job.events is not None and not job.told:
        job.told = True
        job.events.put_nowait((kind, value))


def _fail(job: _Job, err: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(err)
    _tell(job, "error", err)


class _Relay:
    """The `engine.StreamListener` of one batch, called from the worker thread: text goes to
    the streamed jobs' queues on the event loop; a job whose caller left is `cancelled`."""

    def __init__(self, jobs: list[_Job], loop: asyncio.AbstractEventLoop) -> None:
        self.jobs, self.loop = jobs, loop
        self.seen = [""] * len(jobs)

    def wants_text(self, index: int) -> bool:
        return self.jobs[index].events is not None and not self.jobs[index].future.done()

    def cancelled(self, index: int) -> bool:
        return self.jobs[index].future.done()  # nothing resolves a job while its batch runs

    def text(self, index: int, delta: str) -> None:
        job = self.jobs[index]
        self.seen[index] += delta
        new = self.seen[index][job.forwarded :]  # a batch retried alone says it all again
        if new and job.events is not None:
            job.forwarded += len(new)
            self.loop.call_soon_threadsafe(job.events.put_nowait, ("text", new))

    def done(self, index: int, caption: Any) -> None:
        # the row ended before its batch: its caller may answer now
        self.loop.call_soon_threadsafe(_tell, self.jobs[index], "done", caption)
