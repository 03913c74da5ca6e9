"""The engine: one thread owns the model and generates for every request, several at a time.

Requests wait in a queue. When the engine is free it takes the oldest request and every
other waiting request that can share its batch (the same sampling settings; see
:func:`batch_key`), up to ``max_batch``, after waiting ``batch_wait_s`` for more to arrive,
and runs them as one batch on the model's KV-cached generation loop
(:func:`metamorph_core.generation.stream_encoded`: one forward pass per step for all of
them). While the batch runs, requests that arrive join it at the next step boundary
(continuous batching): between two steps the loop asks for waiting requests with the batch's
settings, up to ``max_batch`` running, in arrival order, stopping at the first waiting request
with other settings, which runs once this batch has drained (so no request waits behind an
endless stream of others). Finished rows leave the batch at once. A request whose client has
gone, or whose deadline has passed, stops at the next step and frees its row. Models whose
cache cannot grow by rows (a sliding-window or static cache) batch at batch boundaries only.

Events reach the request's asyncio queue as they happen: text pieces, each image as it
completes (decoded to pixels by the attached decoder with the request's own
:class:`~metamorph_core.decoding.DecodeConfig` fields when it asks for pixels), then the
result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from metamorph_core.generation import (
    DoneEvent,
    EncodedPrompt,
    GenerationConfig,
    ImageEvent,
    TextEvent,
    check_cache,
    stream_encoded,
    to_pil,
)


class QueueFull(Exception):
    """The engine's queue holds ``max_queue`` requests already."""


@dataclass
class Failed:
    """The engine could not finish a request: ``status`` 503 when it timed out waiting in the
    queue or the server shuts down, 500 for an error of the model (not of the request)."""

    message: str
    status: int = 500


@dataclass
class Job:
    """One prompt to generate for: encoded, with its own token budget and decoding."""

    prompt: EncodedPrompt
    config: GenerationConfig  # sampling; max_new_tokens is this job's budget
    force_image: bool = False
    # pixels for each image: DecodeConfig fields over the decoder's own sampling ({}: its
    # default); None: no pixels, visual tokens only
    decoding: dict[str, Any] | None = None
    deadline: float | None = None  # time.monotonic() after which the job stops
    cancelled: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    timed_out: bool = False

    def emit(self, event: Any) -> None:
        if self.loop is not None and self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def should_stop(self) -> bool:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.timed_out = True
        return self.timed_out or self.cancelled.is_set()


def batch_key(job: Job) -> tuple[Any, ...]:
    """What jobs must share to run in one batch: the generation loop takes one sampling
    config for all rows (the token budget is per job, decoding is done per job). Seeded
    sampling runs alone (a row's generator is seeded with the seed plus its row)."""
    c = job.config
    seeded = c.do_sample and c.seed is not None
    cfg = dataclasses.replace(
        c,
        max_new_tokens=1,
        decode_images=False,
        decoding=None,
        seed=c.seed if c.do_sample else None,
    )
    return (cfg, job.force_image, id(job) if seeded else None)


@dataclass
class Stats:
    """What the engine has done: batches run, the requests in them (``joined``: those that
    joined a running batch), the most requests generated together, those stopped early (their
    client left, or their time ran out) and batches that failed."""

    batches: int = 0
    jobs: int = 0
    joined: int = 0
    largest_batch: int = 0
    cancelled: int = 0
    timed_out: int = 0
    failures: int = 0


class Engine:
    """Generates for submitted jobs on ``model`` in a thread of its own (see the module)."""

    def __init__(
        self,
        model: Any,
        max_batch: int = 8,
        max_queue: int = 64,
        batch_wait_s: float = 0.01,
        log: Callable[[str], None] | None = None,
        thread: bool = True,
        continuous: bool = True,
        cache_implementation: str = "dynamic",
        compile: bool = False,
    ) -> None:
        """``thread``: generate in a thread of the engine's own, started now; ``False``: the
        caller runs :meth:`run` in a thread of its choice (``metamorph serve`` runs it in the
        main thread, where the model was loaded: torch's CPU kernels run ~1.5x slower at
        batch 1 from another thread, its OpenMP workers being tied to the thread that first
        used them). ``continuous``: requests join a running batch (else only the next one);
        ``cache_implementation`` and ``compile``: the generation options of every batch (a
        static cache takes no request mid-batch, so it turns ``continuous`` off)."""
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.continuous = continuous and cache_implementation == "dynamic"
        self.cache_implementation, self.compile = cache_implementation, compile
        check_cache(model, GenerationConfig(cache_implementation=cache_implementation))
        self.batch_wait_s, self.log = batch_wait_s, log
        self.stats = Stats()
        self._queue: deque[Job] = deque()
        self._lock = threading.Condition()
        self._closed = False
        self._running: list[Job] = []
        self._thread: threading.Thread | None = None
        if thread:
            self._thread = threading.Thread(target=self.run, name="metamorph-engine", daemon=True)
            self._thread.start()

    # -- the caller's side -------------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` (all or none); :class:`QueueFull` when there is no room."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._queue) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests wait already (--max-queue)")
            self._queue.extend(jobs)
            self._lock.notify()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        """Stop after the running batch; waiting jobs fail."""
        with self._lock:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._lock.notify()
        for job in left:
            job.emit(Failed("the server is shutting down", 503))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # -- the engine's side ---------------------------------------------------------------------
    def _next_batch(self) -> list[Job] | None:
        with self._lock:
            while not self._queue and not self._closed:
                self._lock.wait()
            if self._closed:
                return None
        if self.batch_wait_s:  # let requests sent together arrive together
            time.sleep(self.batch_wait_s)
        with self._lock:
            first = self._queue.popleft()
            key, batch, rest = batch_key(first), [first], deque()
            while self._queue:
                job = self._queue.popleft()
                if len(batch) < self.max_batch and batch_key(job) == key:
                    batch.append(job)
                else:
                    rest.append(job)
            self._queue.extendleft(reversed(rest))  # the others keep their order
        return batch

    def run(self) -> None:
        """Generate for submitted jobs until :meth:`close`. Interrupted (``KeyboardInterrupt``
        in the main thread), it answers the running batch's jobs 503 and re-raises."""
        try:
            self._serve()
        except BaseException:
            for job in self._running:
                job.emit(Failed("the server is shutting down", 503))
            raise

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            batch = [j for j in batch if not self._gone(j)]
            if not batch:
                continue
            self._running = batch
            self.stats.batches += 1
            self.stats.jobs += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            try:
                self._generate(batch)
            except Exception as e:  # a fault of the model or the library: the server lives on
                self.stats.failures += 1
                if self.log:
                    self.log(f"generation failed for a batch of {len(batch)}: {e!r}")
                for job in batch:
                    job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))

    def _gone(self, job: Job) -> bool:
        """Whether ``job`` ended while it waited: its client left, or its deadline passed."""
        if not job.should_stop():
            return False
        if job.timed_out:
            self.stats.timed_out += 1
            job.emit(Failed("the request timed out waiting in the queue (--timeout)", 503))
        else:
            self.stats.cancelled += 1
        return True

    def _admit(self, batch: list[Job], running: int) -> list[tuple[Any, int]]:
        """Waiting jobs that join ``batch`` now (appended to it), ``running`` rows in it: those
        with its settings, in arrival order, up to the first job with other settings."""
        key, joined = batch_key(batch[0]), []
        with self._lock:
            while self._queue and running + len(joined) < self.max_batch:
                if batch_key(self._queue[0]) != key:
                    break
                job = self._queue.popleft()
                if not self._gone(job):
                    joined.append(job)
        if joined:
            batch += joined
            self.stats.jobs += len(joined)
            self.stats.joined += len(joined)
            self.stats.largest_batch = max(self.stats.largest_batch, running + len(joined))
        return [(j.prompt, j.config.max_new_tokens) for j in joined]

    def _generate(self, batch: list[Job]) -> None:
        first = batch[0]
        config = dataclasses.replace(
            first.config,
            decode_images=False,
            decoding=None,
            cache_implementation=self.cache_implementation,
            compile=self.compile,
        )
        events = stream_encoded(
            self.model,
            [j.prompt for j in batch],
            config,
            first.force_image,
            max_new_tokens=[j.config.max_new_tokens for j in batch],
            should_stop=lambda i: batch[i].should_stop(),
            admit=(lambda running: self._admit(batch, running)) if self.continuous else None,
        )
        with torch.no_grad():
            for event in events:
                job = batch[event.sample]
                if isinstance(event, ImageEvent) and job.decoding is not None:
                    pixels = self.model.decode_images(event.tokens[None], None, **job.decoding)
                    event = dataclasses.replace(event, image=to_pil(pixels[0]))
                if isinstance(event, DoneEvent) and event.result.finish_reason == "cancelled":
                    if job.timed_out:
                        self.stats.timed_out += 1
                    else:
                        self.stats.cancelled += 1
                if isinstance(event, TextEvent | ImageEvent | DoneEvent):
                    job.emit(event)
