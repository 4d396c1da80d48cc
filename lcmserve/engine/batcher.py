"""Dynamic batching: one engine worker fed by a bounded queue of row requests.

Requests are grouped by bucket (model, steps, width, height), because rows of one batch
must share steps and resolution. A bucket's batch goes when it holds ``max_batch_size``
rows or its oldest request has waited ``max_queue_delay_ms``. Rows keep their own prompt,
seed and guidance, so an image does not depend on its batch mates; rows of different
requests are packed first come, first served, and a request larger than one batch is split
over consecutive batches.

A request may bring a step hook (``submit(..., on_step=...)``): it hears each denoising step
of the batches it runs in, with its own rows' slice of the x0 estimate only, so nobody else
pays for previews. Every batch runs with the batcher's own step callback, which also lets
``close`` end a batch between steps: without it, a worker still inside the engine when the
interpreter exits aborts the process.

The engine call is blocking torch code, so this is plain threads: ``submit`` may be called
from any thread (the async server wraps the returned Future with ``asyncio.wrap_future``)
and one worker thread calls the engine. Failures use the taxonomy of :mod:`lcmserve.errors`:

- queue full -> ``OverloadedError`` with a ``retry_after_s`` hint, raised by ``submit``;
- draining or closed -> ``UnavailableError``;
- deadline passed before the request ran -> ``DeadlineExceededError``; it never runs;
- the engine raised -> ``EngineError`` for that batch's requests only; the worker goes on;
- still running when ``close``'s grace ran out -> ``UnavailableError``; the batch is abandoned
  at its next step and the worker stops.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Protocol

from lcmserve.engine.request import Row
from lcmserve.errors import (
    DeadlineExceededError,
    EngineError,
    InvalidInputError,
    LCMServeError,
    OverloadedError,
    UnavailableError,
    check_float,
    check_int,
)

logger = logging.getLogger(__name__)

# The worker looks at a non-empty queue at least this often: is_cancelled() callables can
# only be polled, and an injected clock may move without waking the worker.
POLL_S = 0.05
# Engine seconds per batch assumed by estimates until a batch has been timed.
DEFAULT_BATCH_S = 1.0
MAX_RETRY_AFTER_S = 60.0
# Recent batches whose pace the estimates follow.
RECENT_BATCHES = 8
# close() waits this long, beyond two steps' estimate, for an abandoned batch to unwind: the
# estimate is a median and a step may come out slower.
ABANDON_MARGIN_S = 1.0
# Failure label of requests whose client went away; not an error the client sees.
CANCELLED = "cancelled"


class RunBatch(Protocol):
    """The engine: one image per row, all rows sharing steps and resolution (``LCMSampler.run_rows``).

    Returns an object with ``.images`` indexable by row (a [B, ...] tensor or a sequence of
    length B), and optionally ``.truncated`` (one bool per row) and ``.times``. The engine
    calls ``on_step(i, x0)`` after step i (from 0) with the batch's x0 estimate ([B, ...]),
    and lets what it raises propagate: that is how ``close`` ends a batch early.
    """

    def __call__(self, rows: list[Row], steps: int, width: int, height: int, *,
                 on_step: Callable[[int, Any], None]) -> Any: ...


#: A request's step hook: ``hook(i, first_row, x0_rows)`` after engine step i (from 0), where
#: ``x0_rows`` is the slice of the batch's x0 estimate holding the request's rows
#: ``first_row .. first_row + len(x0_rows) - 1``. Runs on the worker thread, inside the engine call.
StepHook = Callable[[int, int, Any], None]


@dataclass(frozen=True)
class BatcherConfig:
    """How the batcher groups rows and how much it holds; ranges are checked at construction."""

    #: Rows per engine call, at most; a bucket holding this many rows goes at once. >= 1.
    max_batch_size: int = 8
    #: How long the oldest request of a partial batch waits for batch mates; 0 sends at once. >= 0.
    max_queue_delay_ms: float = 10.0
    #: Rows waiting in all buckets together, at most; beyond it submit raises OverloadedError.
    #: >= max_batch_size, or no batch could ever fill.
    max_queue_rows: int = 256
    #: Deadline, counted from submit, of requests that bring none (queue time included); None: none.
    default_timeout_s: float | None = None
    #: How long close() lets queued and running work finish before failing it with UnavailableError.
    drain_grace_s: float = 30.0

    def __post_init__(self) -> None:
        check_int("max_batch_size", self.max_batch_size, 1)
        check_float("max_queue_delay_ms", self.max_queue_delay_ms, 0)
        check_int("max_queue_rows", self.max_queue_rows, 1)
        if self.default_timeout_s is not None:
            check_float("default_timeout_s", self.default_timeout_s, 0, open_low=True)
        check_float("drain_grace_s", self.drain_grace_s, 0)
        if self.max_queue_rows < self.max_batch_size:
            raise InvalidInputError.out_of_range(
                "max_queue_rows", self.max_queue_rows,
                f">= max_batch_size ({self.max_batch_size}), or no batch could ever fill",
            )


@dataclass(frozen=True)
class BucketKey:
    """What all rows of one batch share: the model, the number of steps and the resolution."""

    model: str
    steps: int
    width: int
    height: int


@dataclass(frozen=True)
class RowsResult:
    """One request's images in row order (``images[i]`` is row i's slice of its batch) and its timings."""

    images: list[Any]
    truncated: list[bool]
    queue_wait_s: float  # submit -> start of its first batch
    batch_sizes: tuple[int, ...]  # rows in each batch it ran in; several when it was split
    engine_s: float  # engine seconds of those batches, summed


@dataclass(frozen=True)
class BatchInfo:
    """What the worker reports after each engine call, for metrics."""

    key: BucketKey
    rows: int
    queue_wait_s: tuple[float, ...]  # one per request in the batch: submit -> this batch's start
    engine_s: float
    times: Any = None  # the engine's stage times (StageTimes) when it reports them
    error: str | None = None  # the failure type when the engine raised


@dataclass(frozen=True)
class BatcherStats:
    """A snapshot for gauges and counters; ``failures`` counts requests per failure type."""

    state: str  # "new", "running", "draining" or "closed"
    queued_requests: int
    queued_rows: int
    in_flight_rows: int
    batches: int
    rows_run: int
    failures: dict[str, int]


@dataclass(eq=False)
class _Pending:
    """One accepted request and what it has collected so far."""

    key: BucketKey
    rows: tuple[Row, ...]
    future: Future
    enqueued_at: float
    seq: int
    deadline: float | None
    is_cancelled: Callable[[], bool] | None
    on_step: StepHook | None = None
    next_row: int = 0  # rows handed to batches so far
    rows_done: int = 0
    started_at: float | None = None
    images: list[Any] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    engine_s: float = 0.0

    def __post_init__(self) -> None:
        self.images = [None] * len(self.rows)
        self.truncated = [False] * len(self.rows)

    @property
    def rows_left(self) -> int:
        return len(self.rows) - self.next_row

    def client_gone(self) -> bool:
        if self.future.cancelled():
            return True
        if self.is_cancelled is None:
            return False
        try:
            return bool(self.is_cancelled())
        except Exception:  # a broken probe must not drop work the client may still want
            logger.exception("is_cancelled() raised; keeping the request")
            return False

    def result(self) -> RowsResult:
        return RowsResult(
            images=list(self.images), truncated=list(self.truncated),
            queue_wait_s=self.started_at - self.enqueued_at,
            batch_sizes=tuple(self.batch_sizes), engine_s=self.engine_s,
        )


@dataclass
class _Slice:
    pending: _Pending
    start: int
    stop: int


@dataclass
class _Batch:
    key: BucketKey
    slices: list[_Slice]
    started_at: float

    @property
    def rows(self) -> list[Row]:
        return [row for s in self.slices for row in s.pending.rows[s.start : s.stop]]

    @property
    def n_rows(self) -> int:
        return sum(s.stop - s.start for s in self.slices)


class _Abandoned(Exception):
    """Raised by the batcher's step callback to leave a batch that ``close`` gave up on."""


class _Pace:
    """Engine seconds per row and step of recent batches, for estimates of how long queued work takes.

    Per row and step, because batches differ in both (a warm-up of one row and one step
    against full batches of several steps); the median of recent batches, so that one slow
    batch (a warm-up that built a graph) does not swing it. A GPU runs a full batch for less
    per row than a small one, so after small batches estimates err long, not short.
    """

    def __init__(self) -> None:
        self._recent: deque[float] = deque(maxlen=RECENT_BATCHES)

    def add(self, rows: int, steps: int, engine_s: float) -> None:
        if rows > 0 and steps > 0:
            self._recent.append(engine_s / (rows * steps))

    def batch_s(self, rows: int, steps: int) -> float:
        """Estimated engine seconds of one batch of ``rows`` rows and ``steps`` steps."""
        if not self._recent:
            return DEFAULT_BATCH_S
        return statistics.median(self._recent) * rows * steps


def _set_exception(future: Future, error: BaseException) -> None:
    try:
        future.set_exception(error)
    except InvalidStateError:  # cancelled, or already failed by close(): nobody waits for it
        pass


def _set_result(future: Future, result: Any) -> None:
    try:
        future.set_result(result)
    except InvalidStateError:
        pass


class Batcher:
    """Groups row requests into engine batches on one worker thread; see the module docstring.

    ``clock`` (monotonic seconds) times the queue and deadlines; inject one for tests.
    ``on_batch(BatchInfo)`` is called after every engine call and ``on_failure(type)`` once
    per request that is refused (overloaded, draining), dropped or failed (``type`` is the
    error's ``type`` string, or ``"cancelled"``); invalid submissions are the caller's to
    count. Both run before the futures concerned resolve (but a cancelled Future is counted
    after its cancel, on the cancelling thread), and must be cheap and thread-safe.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        config: BatcherConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_batch: Callable[[BatchInfo], None] | None = None,
        on_failure: Callable[[str], None] | None = None,
        name: str = "lcmserve-batcher",
    ) -> None:
        self.config = config or BatcherConfig()
        self._run_batch = run_batch
        self._clock = clock
        self._on_batch = on_batch
        self._on_failure = on_failure
        self._name = name
        # One condition guards all state below; futures are resolved outside it, since
        # their callbacks (asyncio's, the caller's) are not ours to run under our lock.
        self._cond = threading.Condition()
        self._buckets: dict[BucketKey, deque[_Pending]] = {}
        self._queued_rows = 0
        self._in_flight: _Batch | None = None
        self._state = "new"
        self._thread: threading.Thread | None = None
        self._seq = 0
        self._batches = 0
        self._rows_run = 0
        self._failures: dict[str, int] = {}
        self._pace = _Pace()
        # Set by close() once its grace ran out: the step callback then leaves the running batch.
        # Read without the lock between steps; a bool assignment is atomic.
        self._abandon = False

    # 1. lifecycle ---------------------------------------------------------------------------
    def start(self) -> "Batcher":
        """Start the worker; requests submitted before this wait in the queue."""
        with self._cond:
            if self._state == "running":
                return self
            if self._state != "new":
                raise RuntimeError(f"start() on a {self._state} batcher: a batcher does not restart; make a new one")
            self._state = "running"
            # daemon: a process that forgets close() can still exit; close() is the clean way
            self._thread = threading.Thread(target=self._worker_loop, name=self._name, daemon=True)
            self._thread.start()
        return self

    def drain(self) -> None:
        """Take no new work (submit raises UnavailableError); queued work still runs, without waiting to fill."""
        with self._cond:
            if self._state in ("new", "running"):
                logger.info("draining: %d requests (%d rows) queued", self._queued_requests(), self._queued_rows)
                self._state = "draining"
                self._cond.notify_all()

    def close(self, grace_s: float | None = None) -> bool:
        """Drain, wait up to ``grace_s`` for queued and running work, then fail what is left and stop the worker.

        Returns True when everything finished within the grace. What is left fails with
        UnavailableError at once. A batch still in the engine is abandoned: the worker leaves it
        at its next step (the step callback raises) and ends, and close() waits for that, about
        one step. After close() returns ``worker_alive()`` is False, unless the engine ran on
        without reporting a step (that is logged; ``join`` waits longer).
        """
        grace_s = self.config.drain_grace_s if grace_s is None else grace_s
        check_float("grace_s", grace_s, 0)
        self.drain()
        self.join(grace_s)
        leftovers, step_s = self._shut()
        leftovers = [p for p in dict.fromkeys(leftovers) if not p.future.done()]
        for p in leftovers:
            self._record_failure(UnavailableError.type)
            _set_exception(p.future, UnavailableError(
                f"the batcher closed before this request finished (drain grace_s={grace_s}); retry on another replica"
            ))
        if leftovers:
            logger.warning("closed after grace_s=%s with %d requests unfinished", grace_s, len(leftovers))
        bound_s = 2 * step_s + ABANDON_MARGIN_S
        if not self.join(bound_s) and self._thread is not threading.current_thread():
            logger.warning("the worker is still inside the engine %.1f s after the grace; it stops at the batch's "
                           "next step (a backend that replays a captured loop reports steps only at the end)", bound_s)
        return not leftovers

    def _shut(self) -> tuple[list[_Pending], float]:
        """Close the queue and abandon the running batch; (the requests unfinished, seconds of one step of the batch)."""
        with self._cond:
            leftovers = [p for queue in self._buckets.values() for p in queue]
            step_s = 0.0
            if self._in_flight is not None:
                leftovers += [s.pending for s in self._in_flight.slices]
                steps = self._in_flight.key.steps
                step_s = self._pace.batch_s(self._in_flight.n_rows, steps) / steps
            self._buckets.clear()
            self._queued_rows = 0
            self._state = "closed"
            self._abandon = True
            self._cond.notify_all()
        return leftovers, step_s

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait up to ``timeout_s`` (None: without limit) for the worker to end; True once it has, or never started.

        Called on the worker itself (from a hook) it does not wait, and says False.
        """
        thread = self._thread
        if thread is None:
            return True
        if thread is not threading.current_thread():
            thread.join(timeout_s)
        return not thread.is_alive()

    def worker_alive(self) -> bool:
        """Whether the worker thread runs: False before start() and once it ended (after close())."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "Batcher":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # 2. submitting --------------------------------------------------------------------------
    def submit(
        self,
        key: BucketKey,
        rows: Sequence[Row],
        *,
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        on_step: StepHook | None = None,
    ) -> Future:
        """Queue ``rows`` (one image each) for bucket ``key``; the Future resolves to a RowsResult.

        ``deadline`` is absolute, in seconds of the batcher's clock (``time.monotonic``
        unless one was injected); None takes ``config.default_timeout_s`` from now.
        ``is_cancelled()`` is polled while the request waits and must be cheap and
        thread-safe; cancelling the Future works too, and frees its queue rows at once. Raises
        OverloadedError (its ``retry_after_s`` estimates when the queue ahead will have run)
        when the queue cannot take the rows, UnavailableError once draining has begun.
        ``on_step`` (a ``StepHook``) hears every denoising step of this request's rows; if it
        raises, this request alone fails with EngineError and its batch mates go on.
        """
        rows = tuple(rows)
        if not rows:
            raise InvalidInputError("rows: a request needs at least one row", param="rows")
        if len(rows) > self.config.max_queue_rows:
            raise InvalidInputError.out_of_range(
                "rows", len(rows), f"at most max_queue_rows={self.config.max_queue_rows} rows per request"
            )
        now = self._clock()
        if deadline is None and self.config.default_timeout_s is not None:
            deadline = now + self.config.default_timeout_s
        future: Future = Future()
        dropped: list[tuple[_Pending, LCMServeError | None]] = []
        with self._cond:
            error = self._admit_locked(rows, now, dropped)
            if error is None:
                self._seq += 1
                pending = _Pending(key, rows, future, now, self._seq, deadline, is_cancelled, on_step)
                self._buckets.setdefault(key, deque()).append(pending)
                self._queued_rows += len(rows)
                self._cond.notify_all()
        self._drop(dropped)
        if error is not None:
            self._record_failure(error.type)
            raise error
        future.add_done_callback(lambda f: self._unqueue_if_cancelled(pending))
        return future

    def _admit_locked(self, rows: tuple[Row, ...], now: float, dropped: list) -> LCMServeError | None:
        """The error that refuses these rows, or None to accept them."""
        if self._state not in ("new", "running"):
            return UnavailableError(f"the batcher is {self._state} and takes no new work; retry on another replica")
        limit = self.config.max_queue_rows
        if self._queued_rows + len(rows) > limit:
            # cancelled and expired requests may still hold rows: free them before refusing
            self._sweep_locked(now, dropped)
        excess = self._queued_rows + len(rows) - limit
        if excess > 0:
            retry_after_s = self._retry_after_s_locked(now)
            return OverloadedError(
                f"queue full: {self._queued_rows} of max_queue_rows={limit} rows are waiting and this request "
                f"adds {len(rows)}; retry after {retry_after_s:.1f} s",
                retry_after_s=retry_after_s,
            )
        return None

    def _retry_after_s_locked(self, now: float) -> float:
        """How long until the queue ahead and the batch in flight have run, at the pace of recent batches.

        The whole queue, not only the rows a refused request lacks: under a burst, rows freed
        earlier are taken by other clients, and a shorter hint brings the client back to another 429.
        """
        size = self.config.max_batch_size
        total_s = 0.0
        for key, queue in self._buckets.items():
            full, rest = divmod(sum(p.rows_left for p in queue), size)
            total_s += full * self._pace.batch_s(size, key.steps)
            total_s += self._pace.batch_s(rest, key.steps) if rest else 0.0
        batch = self._in_flight
        if batch is not None:
            total_s += max(0.0, self._pace.batch_s(batch.n_rows, batch.key.steps) - (now - batch.started_at))
        return min(MAX_RETRY_AFTER_S, max(0.1, total_s))

    def _unqueue_if_cancelled(self, pending: _Pending) -> None:
        """A request whose Future was cancelled leaves the queue now, so that queue depth is right at once.

        Only one side removes a request from its bucket and counts it (here, or the worker when
        it saw the cancel first), so its rows are subtracted once.
        """
        if not pending.future.cancelled():
            return
        with self._cond:
            queue = self._buckets.get(pending.key)
            removed = queue is not None and pending in queue
            if removed:
                queue.remove(pending)
                if not queue:  # the worker reads queue[0] of every bucket
                    del self._buckets[pending.key]
                self._queued_rows -= pending.rows_left
                self._cond.notify_all()
        if removed:
            logger.debug("dropped a request of %d rows: its client went away", len(pending.rows))
            self._record_failure(CANCELLED)

    # 3. stats ---------------------------------------------------------------------------------
    def stats(self) -> BatcherStats:
        """Queue depth, in-flight rows and counters, read atomically."""
        with self._cond:
            in_flight = self._in_flight
            return BatcherStats(
                state=self._state,
                queued_requests=self._queued_requests(),
                queued_rows=self._queued_rows,
                in_flight_rows=0 if in_flight is None else in_flight.n_rows,
                batches=self._batches,
                rows_run=self._rows_run,
                failures=dict(self._failures),
            )

    def _queued_requests(self) -> int:
        return sum(len(queue) for queue in self._buckets.values())

    def _record_failure(self, error_type: str) -> None:
        with self._cond:
            self._failures[error_type] = self._failures.get(error_type, 0) + 1
        self._call_hook(self._on_failure, error_type)

    def _record_batch(self, info: BatchInfo) -> None:
        with self._cond:
            self._batches += 1
            if info.error is None:
                self._rows_run += info.rows
                self._pace.add(info.rows, info.key.steps, info.engine_s)
        self._call_hook(self._on_batch, info)

    @staticmethod
    def _call_hook(hook: Callable[[Any], None] | None, arg: Any) -> None:
        if hook is None:
            return
        try:
            hook(arg)
        except Exception:  # metrics must never take the worker down
            logger.exception("batcher hook %r raised; ignored", hook)

    # 4. the worker ----------------------------------------------------------------------------
    def _worker_loop(self) -> None:
        logger.info("%s started: %s", self._name, self.config)
        while (batch := self._next_batch()) is not None:
            try:
                self._run(batch)
            except Exception as exc:  # a bug of ours must not kill the only worker
                logger.exception("batcher failed around a batch of %d rows", len(batch.rows))
                self._fail_batch(batch, exc)
            finally:
                with self._cond:
                    self._in_flight = None
        logger.info("%s stopped", self._name)

    def _next_batch(self) -> _Batch | None:
        """Block until a batch is ready and take it; None once drained or closed."""
        while True:
            dropped: list[tuple[_Pending, LCMServeError | None]] = []
            with self._cond:
                now = self._clock()
                # 1. expired and abandoned requests leave first, so they never reach the engine
                self._sweep_locked(now, dropped)
                # 2. the ready bucket whose oldest request came first gives the batch
                batch = self._take_ready_locked(now, dropped)
                if batch is None and not dropped:
                    if self._state == "closed" or (self._state == "draining" and not self._buckets):
                        return None
                    # 3. sleep until a batch may be due, a deadline passes, or someone notifies
                    self._cond.wait(self._wait_timeout_locked(now))
                    continue
            self._drop(dropped)
            if batch is not None:
                return batch

    def _sweep_locked(self, now: float, dropped: list) -> None:
        """Remove requests that must not run; those whose caller still waits go to ``dropped``."""
        for key, queue in list(self._buckets.items()):
            keep: deque[_Pending] = deque()
            for p in queue:
                if p.future.done() and not p.future.cancelled():
                    pass  # failed with an earlier part of it, or by close(): its caller was told
                elif p.client_gone():
                    dropped.append((p, None))
                elif p.deadline is not None and now >= p.deadline:
                    dropped.append((p, DeadlineExceededError(
                        f"deadline passed after {now - p.enqueued_at:.3f} s in the queue (budget "
                        f"{p.deadline - p.enqueued_at:.3f} s); give a longer timeout or retry when less busy"
                    )))
                else:
                    keep.append(p)
                    continue
                self._queued_rows -= p.rows_left
            if keep:
                self._buckets[key] = keep
            else:
                del self._buckets[key]

    def _ready_key_locked(self, now: float) -> BucketKey | None:
        """The bucket to run next: full, overdue or draining, oldest head first."""
        delay_s = self.config.max_queue_delay_ms / 1000
        draining = self._state not in ("new", "running")
        best, best_age = None, None
        for key, queue in self._buckets.items():
            head = queue[0]
            ready = (
                draining  # no batch mates are coming: waiting would only add latency
                or now - head.enqueued_at >= delay_s
                or sum(p.rows_left for p in queue) >= self.config.max_batch_size
            )
            age = (head.enqueued_at, head.seq)
            if ready and (best_age is None or age < best_age):
                best, best_age = key, age
        return best

    def _take_ready_locked(self, now: float, dropped: list) -> _Batch | None:
        """Take up to max_batch_size rows, FIFO, from the ready bucket; None when none is ready."""
        key = self._ready_key_locked(now)
        if key is None:
            return None
        queue = self._buckets[key]
        slices: list[_Slice] = []
        room = self.config.max_batch_size
        while queue and room:
            p = queue[0]
            # once running, a Future can no longer be cancelled: the engine cannot stop mid-batch
            if p.started_at is None and not p.future.set_running_or_notify_cancel():
                queue.popleft()
                self._queued_rows -= p.rows_left
                dropped.append((p, None))
                continue
            if p.started_at is None:
                p.started_at = now
            n = min(room, p.rows_left)
            slices.append(_Slice(p, p.next_row, p.next_row + n))
            p.next_row += n
            room -= n
            self._queued_rows -= n
            if not p.rows_left:
                queue.popleft()
        if not queue:
            del self._buckets[key]
        if not slices:
            return None
        self._in_flight = _Batch(key, slices, now)
        return self._in_flight

    def _wait_timeout_locked(self, now: float) -> float | None:
        """Seconds until the next flush or deadline, at most POLL_S; None (until notified) when idle."""
        if not self._buckets:
            return None
        delay_s = self.config.max_queue_delay_ms / 1000
        due = [queue[0].enqueued_at + delay_s for queue in self._buckets.values()]
        due += [p.deadline for queue in self._buckets.values() for p in queue if p.deadline is not None]
        return min(POLL_S, max(0.0, min(due) - now))

    def _drop(self, dropped: list[tuple[_Pending, LCMServeError | None]]) -> None:
        """Tell callers whose requests left the queue without running (None: the client went away)."""
        for p, error in dropped:
            if error is None:
                logger.debug("dropped a request of %d rows: its client went away", len(p.rows))
                self._record_failure(CANCELLED)
                if not p.future.cancel():  # already running: part of it ran in an earlier batch
                    _set_exception(p.future, CancelledError("the client went away"))
            else:
                logger.debug("dropped a request of %d rows: %s", len(p.rows), error)
                self._record_failure(error.type)
                _set_exception(p.future, error)

    def _run(self, batch: _Batch) -> None:
        """Run one batch on the engine and hand each request its rows."""
        key, rows = batch.key, batch.rows
        waits = tuple(batch.started_at - s.pending.enqueued_at for s in batch.slices)
        t0 = self._clock()
        # 1. the engine call; whatever it raises fails this batch only
        try:
            out = self._run_batch(rows, key.steps, key.width, key.height, on_step=self._step_hook(batch))
            images = out.images
            truncated = getattr(out, "truncated", None)
            if len(images) != len(rows) or (truncated is not None and len(truncated) != len(rows)):
                raise ValueError(f"run_batch returned {len(images)} images for {len(rows)} rows")
        except Exception as exc:
            engine_s = self._clock() - t0
            if self._abandon:  # close() gave up on this batch and has told its requests (503)
                logger.info("left a batch of %d rows (%s) after %.3f s: closing", len(rows), key, engine_s)
                self._record_batch(BatchInfo(key, len(rows), waits, engine_s, error=UnavailableError.type))
                return
            logger.error("engine failed on a batch of %d rows (%s): %r", len(rows), key, exc, exc_info=exc)
            self._record_batch(BatchInfo(key, len(rows), waits, engine_s, error=EngineError.type))
            self._fail_batch(batch, exc)
            return
        engine_s = self._clock() - t0
        # 2. hand each request its rows; a split request completes with its last rows
        done = []
        offset = 0
        for s in batch.slices:
            p = s.pending
            for i in range(s.start, s.stop):
                p.images[i] = images[offset]
                p.truncated[i] = False if truncated is None else bool(truncated[offset])
                offset += 1
            p.rows_done += s.stop - s.start
            p.batch_sizes.append(len(rows))
            p.engine_s += engine_s
            if p.rows_done == len(p.rows):
                done.append(p)
        # 3. metrics first, so a caller that sees its result also sees the batch counted
        self._record_batch(BatchInfo(key, len(rows), waits, engine_s, getattr(out, "times", None)))
        logger.debug("ran %d rows of %s in %.3f s", len(rows), key, engine_s)
        for p in done:
            _set_result(p.future, p.result())

    def _step_hook(self, batch: _Batch) -> Callable[[int, Any], None]:
        """The engine's ``on_step(i, x0)``: leaves an abandoned batch, else hands each hooked request its rows' slice.

        A batch without hooked requests pays a flag check per step, nothing more.
        """
        listeners: list[tuple[_Pending, int, int, int]] = []
        offset = 0
        for s in batch.slices:
            if s.pending.on_step is not None:
                listeners.append((s.pending, s.start, offset, offset + s.stop - s.start))
            offset += s.stop - s.start

        def on_step(i: int, x0: Any) -> None:
            if self._abandon:
                raise _Abandoned(f"the batcher closed during step {i + 1}")
            for p, first_row, lo, hi in listeners:
                if p.future.done() or p.client_gone():  # failed already, or nobody is listening
                    continue
                try:
                    p.on_step(i, first_row, x0[lo:hi])
                except Exception as exc:
                    logger.exception("the step hook of a request of %d rows raised; failing that request", len(p.rows))
                    error = EngineError(f"the request's step hook failed at step {i + 1}: {exc!r}")
                    error.__cause__ = exc
                    self._record_failure(error.type)
                    _set_exception(p.future, error)

        return on_step

    def _fail_batch(self, batch: _Batch, cause: BaseException) -> None:
        """Fail every request of ``batch`` with its own EngineError caused by ``cause``."""
        key, n_rows = batch.key, sum(s.stop - s.start for s in batch.slices)
        for s in batch.slices:
            if s.pending.future.done():
                continue
            # one instance per request: an exception object raised in several threads
            # would collect all their tracebacks
            error = EngineError(
                f"the engine failed on a batch of {n_rows} rows ({key.model}, {key.steps} steps, "
                f"{key.width}x{key.height}): {cause!r}"
            )
            error.__cause__ = cause
            self._record_failure(error.type)
            _set_exception(s.pending.future, error)


__all__ = ["BatchInfo", "Batcher", "BatcherConfig", "BatcherStats", "BucketKey", "RowsResult", "RunBatch",
           "StepHook"]
