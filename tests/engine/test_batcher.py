"""The batcher with fake engines: grouping, packing, limits, deadlines, cancellation, faults, drain.

No model and no GPU. A fake clock makes batching decisions deterministic; threads meet on
events, never on sleeps, except where a test shows that nothing happens while the clock
stands still, or times an engine that sleeps a known time per row and step.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from lcmserve.engine.batcher import Batcher, BatcherConfig, BucketKey
from lcmserve.engine.request import Row
from lcmserve.errors import (
    DeadlineExceededError,
    EngineError,
    InvalidInputError,
    OverloadedError,
    UnavailableError,
)

pytestmark = pytest.mark.timeout(60)

WAIT_S = 5.0  # generous: only reached when something is broken
KEY = BucketKey("tiny-sd", 4, 64, 64)


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Out:
    images: Any
    truncated: list[bool] | None = None
    times: Any = None


class FakeEngine:
    """Records each call; row i's 'image' is what the engine saw of it."""

    def __init__(self, fail_steps: int | None = None, during=None) -> None:
        self.calls: list[tuple[int, int, int, list[Row]]] = []
        self.fail_steps = fail_steps
        self.during = during  # called inside the engine call, e.g. to move a clock or block

    def __call__(self, rows, steps, width, height, on_step=None):
        self.calls.append((steps, width, height, list(rows)))
        if self.during is not None:
            self.during()
        if steps == self.fail_steps:
            raise RuntimeError("boom")
        images = [(r.prompt, r.seed, r.guidance_scale, steps, width, height) for r in rows]
        return Out(images, truncated=[r.prompt.startswith("long") for r in rows], times="stage-times")

    @property
    def sizes(self) -> list[int]:
        return [len(call[3]) for call in self.calls]

    @property
    def seeds(self) -> list[int]:
        return [r.seed for call in self.calls for r in call[3]]


class BlockingEngine(FakeEngine):
    """Holds each call until released, so a test can act while a batch is in flight."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        super().__init__(during=self._block)

    def _block(self) -> None:
        self.entered.set()
        self.release.wait(WAIT_S)


class SleepingEngine(FakeEngine):
    """Takes ``row_step_s`` seconds per row and step, and reports each step like the sampler."""

    def __init__(self, row_step_s: float) -> None:
        super().__init__()
        self.row_step_s = row_step_s
        self.entered = threading.Event()

    def __call__(self, rows, steps, width, height, on_step=None):
        self.entered.set()
        for i in range(steps):
            time.sleep(self.row_step_s * len(rows))
            on_step(i, [(r.seed, i) for r in rows])
        return super().__call__(rows, steps, width, height)


def rows(n: int, prompt: str = "a cat", seed: int = 0, guidance: float = 8.0) -> list[Row]:
    return [Row(prompt, seed + i, guidance) for i in range(n)]


@pytest.fixture
def make():
    """Build batchers that are closed (and their blocked engines released) after the test."""
    made = []

    def factory(engine, *, clock=None, on_batch=None, on_failure=None, **config) -> Batcher:
        kwargs = {"on_batch": on_batch, "on_failure": on_failure}
        if clock is not None:
            kwargs["clock"] = clock
        batcher = Batcher(engine, BatcherConfig(**config), **kwargs)
        made.append((batcher, engine))
        return batcher

    yield factory
    for batcher, engine in made:
        if isinstance(engine, BlockingEngine):
            engine.release.set()
        batcher.close(grace_s=WAIT_S)


# 1. batching -------------------------------------------------------------------------------
def test_full_batches_go_at_once_and_the_rest_waits_for_the_delay(make):
    clock, engine = FakeClock(), FakeEngine()
    b = make(engine, clock=clock, max_batch_size=4, max_queue_delay_ms=1000)
    futures = [b.submit(KEY, rows(1, seed=i)) for i in range(10)]
    b.start()
    for f in futures[:8]:
        assert f.result(WAIT_S).batch_sizes == (4,)
    time.sleep(0.2)  # several worker polls while the clock stands still
    assert engine.sizes == [4, 4]
    assert not futures[8].done() and not futures[9].done()
    clock.advance(1.0)
    assert futures[9].result(WAIT_S).batch_sizes == (2,)
    assert engine.sizes == [4, 4, 2]
    assert engine.seeds == list(range(10))


def test_partial_batch_collects_mates_until_the_delay(make):
    clock, engine = FakeClock(), FakeEngine()
    b = make(engine, clock=clock, max_batch_size=8, max_queue_delay_ms=50).start()
    first = b.submit(KEY, rows(1, seed=0))
    time.sleep(0.15)
    assert not first.done()
    second = b.submit(KEY, rows(2, seed=10))
    clock.advance(0.06)
    a, c = first.result(WAIT_S), second.result(WAIT_S)
    assert engine.sizes == [3]
    assert a.batch_sizes == c.batch_sizes == (3,)
    assert a.queue_wait_s == pytest.approx(0.06) and c.queue_wait_s == pytest.approx(0.06)


def test_partial_batch_flushes_on_the_real_clock(make):
    engine = FakeEngine()
    b = make(engine, max_batch_size=8, max_queue_delay_ms=20).start()
    result = b.submit(KEY, rows(1)).result(WAIT_S)
    assert result.batch_sizes == (1,)
    assert result.queue_wait_s >= 0.02


def test_buckets_never_share_a_batch(make):
    engine = FakeEngine()
    b = make(engine, clock=FakeClock(), max_batch_size=8, max_queue_delay_ms=0)
    keys = {
        "a": KEY,
        "b": BucketKey("tiny-sd", 2, 64, 64),
        "c": BucketKey("tiny-sd", 4, 128, 64),
        "d": BucketKey("other", 4, 64, 64),
    }
    futures = [b.submit(key, rows(2, prompt=tag)) for _ in range(2) for tag, key in keys.items()]
    b.start()
    for f in futures:
        f.result(WAIT_S)
    assert engine.sizes == [4, 4, 4, 4]  # each bucket packs its two requests, oldest bucket first
    for (steps, width, height, batch_rows), (tag, key) in zip(engine.calls, keys.items()):
        assert (steps, width, height) == (key.steps, key.width, key.height)
        assert {r.prompt for r in batch_rows} == {tag}


def test_rows_keep_their_own_prompt_seed_and_guidance(make):
    engine = FakeEngine()
    b = make(engine, clock=FakeClock(), max_batch_size=8, max_queue_delay_ms=0)
    asks = [rows(3, "a cat", 10, 1.5), rows(1, "long dog", 20, 7.0), rows(2, "a fox", 30, 0.0)]
    futures = [b.submit(KEY, r) for r in asks]
    b.start()
    for ask, future in zip(asks, futures):
        result = future.result(WAIT_S)
        assert result.images == [(r.prompt, r.seed, r.guidance_scale, 4, 64, 64) for r in ask]
        assert result.truncated == [r.prompt.startswith("long") for r in ask]
        assert result.batch_sizes == (6,)
    assert engine.sizes == [6]


def test_tensor_images_are_sliced_per_row(make):
    def engine(batch_rows, steps, width, height, on_step):
        return Out(torch.tensor([[r.seed, r.guidance_scale] for r in batch_rows]))

    b = make(engine, clock=FakeClock(), max_batch_size=4, max_queue_delay_ms=0)
    first, second = b.submit(KEY, rows(2, seed=5, guidance=2.0)), b.submit(KEY, rows(1, seed=9, guidance=3.0))
    b.start()
    assert torch.equal(torch.stack(first.result(WAIT_S).images), torch.tensor([[5.0, 2.0], [6.0, 2.0]]))
    assert torch.equal(torch.stack(second.result(WAIT_S).images), torch.tensor([[9.0, 3.0]]))
    assert first.result().truncated == [False, False]  # the engine gave no flags


def test_large_request_is_split_and_packed_with_the_next(make):
    engine = FakeEngine()
    b = make(engine, clock=FakeClock(), max_batch_size=4, max_queue_delay_ms=0)
    big, small = b.submit(KEY, rows(10, seed=0)), b.submit(KEY, rows(2, seed=100))
    b.start()
    big_result, small_result = big.result(WAIT_S), small.result(WAIT_S)
    assert engine.sizes == [4, 4, 4]
    assert [image[1] for image in big_result.images] == list(range(10))
    assert big_result.batch_sizes == (4, 4, 4)
    assert [image[1] for image in small_result.images] == [100, 101]
    assert [r.seed for r in engine.calls[2][3]] == [8, 9, 100, 101]


class SteppingEngine(FakeEngine):
    """Reports steps like the sampler: on_step(i, x0) with x0[b] = (row b's seed, step i), when given one."""

    def __init__(self) -> None:
        super().__init__()
        self.got_hook: list[bool] = []

    def __call__(self, rows, steps, width, height, on_step=None):
        self.got_hook.append(on_step is not None)
        for i in range(steps if on_step is not None else 0):
            assert on_step(i, [(r.seed, i) for r in rows]) is None
        return super().__call__(rows, steps, width, height)


def test_step_hooks_get_only_their_own_rows(make):
    engine = SteppingEngine()
    b = make(engine, clock=FakeClock(), max_batch_size=4, max_queue_delay_ms=0)
    heard: dict[str, list] = {"big": [], "small": []}

    def hook(name):
        return lambda i, first_row, x0: heard[name].append((i, first_row, list(x0)))

    plain = b.submit(KEY, rows(1, seed=50))  # shares the first batch, asks for nothing
    big = b.submit(KEY, rows(5, seed=0), on_step=hook("big"))  # 3 rows in batch 1, 2 in batch 2
    small = b.submit(KEY, rows(1, seed=90), on_step=hook("small"))
    b.start()
    for f in (plain, big, small):
        f.result(WAIT_S)
    steps = KEY.steps
    assert heard["big"] == [(i, 0, [(s, i) for s in (0, 1, 2)]) for i in range(steps)] + [
        (i, 3, [(s, i) for s in (3, 4)]) for i in range(steps)]
    assert heard["small"] == [(i, 0, [(90, i)]) for i in range(steps)]
    assert engine.sizes == [4, 3] and engine.got_hook == [True, True]


def test_batches_without_hooks_get_the_batchers_own_step_callback(make):
    # it lets close() leave the batch between steps, and costs a flag check per step
    engine = SteppingEngine()
    b = make(engine, max_queue_delay_ms=0).start()
    assert [image[1] for image in b.submit(KEY, rows(2, seed=3)).result(WAIT_S).images] == [3, 4]
    assert engine.got_hook == [True]


def test_raising_step_hook_fails_only_its_request(make):
    failures = []
    b = make(SteppingEngine(), clock=FakeClock(), max_batch_size=4, max_queue_delay_ms=0,
             on_failure=failures.append)

    def broken(i, first_row, x0):
        if i == 1:
            raise RuntimeError("preview decode failed")

    mate = b.submit(KEY, rows(2, seed=10))
    bad = b.submit(KEY, rows(1, seed=20), on_step=broken)
    b.start()
    with pytest.raises(EngineError, match="step hook failed at step 2") as info:
        bad.result(WAIT_S)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert [image[1] for image in mate.result(WAIT_S).images] == [10, 11]
    assert failures == ["internal_error"]
    assert b.submit(KEY, rows(1, seed=30), on_step=lambda *a: None).result(WAIT_S).images[0][1] == 30


# 2. limits ---------------------------------------------------------------------------------
def test_overload_refuses_new_work_and_keeps_accepted_work(make):
    failures = []
    engine = FakeEngine()
    b = make(engine, clock=FakeClock(), max_batch_size=2, max_queue_rows=4, max_queue_delay_ms=0,
             on_failure=failures.append)
    accepted = [b.submit(KEY, rows(3, seed=0)), b.submit(KEY, rows(1, seed=3))]
    with pytest.raises(OverloadedError, match="max_queue_rows=4") as err:
        b.submit(KEY, rows(1, seed=4))
    assert err.value.retry_after_s > 0
    assert failures == ["overloaded"]
    stats = b.stats()
    assert (stats.state, stats.queued_requests, stats.queued_rows) == ("new", 2, 4)
    b.start()
    assert [f.result(WAIT_S).images[-1][1] for f in accepted] == [2, 3]
    assert sorted(engine.seeds) == [0, 1, 2, 3]


def test_retry_after_is_the_time_the_queue_ahead_takes(make):
    # a warm-up of one row and one step first: the hint must scale its pace to full batches
    engine = SleepingEngine(row_step_s=0.02)
    b = make(engine, max_batch_size=4, max_queue_rows=16, max_queue_delay_ms=0).start()
    b.submit(BucketKey("tiny-sd", 1, 64, 64), rows(1)).result(WAIT_S)
    accepted = []
    with pytest.raises(OverloadedError) as err:
        for i in range(10):
            accepted.append(b.submit(KEY, rows(4, seed=10 * i)))
    refused_at = time.monotonic()
    for f in accepted:
        f.result(WAIT_S)
    took_s = time.monotonic() - refused_at
    assert len(accepted) >= 4 and took_s > 1.0  # four full batches of four steps, at least
    assert took_s / 2 <= err.value.retry_after_s <= 2 * took_s


def test_request_that_could_never_fit_is_invalid(make):
    b = make(FakeEngine(), max_batch_size=2, max_queue_rows=4)
    with pytest.raises(InvalidInputError, match="max_queue_rows=4") as err:
        b.submit(KEY, rows(5))
    assert err.value.param == "rows"
    with pytest.raises(InvalidInputError, match="at least one row"):
        b.submit(KEY, [])


# 3. deadlines and cancellation ---------------------------------------------------------------
def test_expired_request_never_runs(make):
    clock, engine = FakeClock(), FakeEngine()
    b = make(engine, clock=clock, max_queue_delay_ms=0)
    late = b.submit(KEY, rows(2, seed=0), deadline=clock() + 1.0)
    on_time = b.submit(KEY, rows(1, seed=50), deadline=clock() + 10.0)
    clock.advance(2.0)
    b.start()
    with pytest.raises(DeadlineExceededError, match="deadline passed"):
        late.result(WAIT_S)
    assert on_time.result(WAIT_S).images[0][1] == 50
    assert engine.seeds == [50]


def test_default_timeout_applies_to_requests_without_a_deadline(make):
    clock, engine = FakeClock(), FakeEngine()
    b = make(engine, clock=clock, max_queue_delay_ms=0, default_timeout_s=1.0)
    future = b.submit(KEY, rows(1))
    clock.advance(1.5)
    b.start()
    with pytest.raises(DeadlineExceededError):
        future.result(WAIT_S)
    assert engine.calls == []


def test_deadline_is_checked_again_before_each_part_of_a_split_request(make):
    clock = FakeClock()
    engine = FakeEngine(during=lambda: clock.advance(10.0))  # each batch takes 10 s
    b = make(engine, clock=clock, max_batch_size=2, max_queue_delay_ms=0)
    split = b.submit(KEY, rows(4, seed=0), deadline=clock() + 5.0)
    after = b.submit(KEY, rows(1, seed=9))
    b.start()
    with pytest.raises(DeadlineExceededError):
        split.result(WAIT_S)
    assert after.result(WAIT_S).images[0][1] == 9
    assert engine.seeds == [0, 1, 9]  # rows 2 and 3 were never run


def test_cancelled_requests_are_dropped_before_running(make):
    failures = []
    engine = FakeEngine()
    b = make(engine, clock=FakeClock(), max_queue_delay_ms=0, on_failure=failures.append)
    by_future = b.submit(KEY, rows(1, seed=0))
    client_gone = threading.Event()
    by_probe = b.submit(KEY, rows(1, seed=1), is_cancelled=client_gone.is_set)
    kept = b.submit(KEY, rows(1, seed=2))
    assert by_future.cancel()
    client_gone.set()
    b.start()
    assert kept.result(WAIT_S).images[0][1] == 2
    assert by_future.cancelled() and by_probe.cancelled()
    with pytest.raises(CancelledError):
        by_probe.result(0)
    assert engine.seeds == [2]
    assert failures == ["cancelled", "cancelled"]


def test_cancelled_request_frees_its_queue_rows(make):
    b = make(FakeEngine(), max_batch_size=2, max_queue_rows=2)
    b.submit(KEY, rows(2)).cancel()
    gone = threading.Event()
    b.submit(KEY, rows(2), is_cancelled=gone.is_set)  # takes the freed rows
    gone.set()
    b.submit(KEY, rows(2))  # and frees them again
    assert b.stats().queued_rows == 2


def test_cancel_frees_queue_rows_at_once_while_a_batch_runs(make):
    failures = []
    engine = BlockingEngine()
    b = make(engine, max_batch_size=2, max_queue_delay_ms=0, on_failure=failures.append).start()
    running = b.submit(KEY, rows(2, seed=0))
    assert engine.entered.wait(WAIT_S)
    cancelled = b.submit(KEY, rows(2, seed=10))
    alone = b.submit(BucketKey("tiny-sd", 2, 64, 64), rows(1, seed=30))  # the only request of its bucket
    kept = b.submit(KEY, rows(1, seed=20))
    assert b.stats().queued_rows == 4
    # 1. the worker is inside the engine, yet the count drops at once
    assert cancelled.cancel() and alone.cancel()
    stats = b.stats()
    assert (stats.queued_requests, stats.queued_rows) == (1, 1)
    assert failures == ["cancelled", "cancelled"]
    # 2. the worker neither runs nor counts them again
    engine.release.set()
    assert kept.result(WAIT_S).images[0][1] == 20
    assert [image[1] for image in running.result(WAIT_S).images] == [0, 1]
    stats = b.stats()
    assert (stats.queued_requests, stats.queued_rows, stats.failures) == (0, 0, {"cancelled": 2})
    assert engine.seeds == [0, 1, 20]
    assert b.submit(KEY, rows(2, seed=40)).result(WAIT_S).batch_sizes == (2,)


# 4. faults ---------------------------------------------------------------------------------
def test_failing_batch_fails_only_its_requests_and_the_worker_goes_on(make):
    batches, failures = [], []
    engine = FakeEngine(fail_steps=2)
    b = make(engine, clock=FakeClock(), max_queue_delay_ms=0, on_batch=batches.append, on_failure=failures.append)
    bad_key = BucketKey("tiny-sd", 2, 64, 64)
    bad = [b.submit(bad_key, rows(1, seed=0)), b.submit(bad_key, rows(2, seed=1))]
    good = b.submit(KEY, rows(1, seed=7))
    b.start()
    errors = []
    for f in bad:
        with pytest.raises(EngineError, match="boom") as err:
            f.result(WAIT_S)
        assert isinstance(err.value.__cause__, RuntimeError)
        errors.append(err.value)
    assert errors[0] is not errors[1]
    assert good.result(WAIT_S).images[0][1] == 7
    assert b.submit(KEY, rows(1, seed=8)).result(WAIT_S).images[0][1] == 8
    assert failures == ["internal_error", "internal_error"]
    assert [(info.rows, info.error) for info in batches] == [(3, "internal_error"), (1, None), (1, None)]
    assert b.stats().failures == {"internal_error": 2}


def test_engine_returning_too_few_images_is_an_engine_error(make):
    b = make(lambda batch_rows, *shape, on_step: Out(images=[]), max_queue_delay_ms=0).start()
    with pytest.raises(EngineError, match="0 images for 2 rows"):
        b.submit(KEY, rows(2)).result(WAIT_S)


def test_raising_hook_does_not_stop_the_worker(make):
    def broken(info):
        raise ValueError("metrics backend down")

    b = make(FakeEngine(), max_queue_delay_ms=0, on_batch=broken).start()
    assert b.submit(KEY, rows(1, seed=1)).result(WAIT_S).images[0][1] == 1
    assert b.submit(KEY, rows(1, seed=2)).result(WAIT_S).images[0][1] == 2


# 5. stats ----------------------------------------------------------------------------------
def test_stats_and_batch_hook(make):
    clock, batches = FakeClock(), []
    b = make(FakeEngine(), clock=clock, max_queue_delay_ms=0, on_batch=batches.append)
    futures = [b.submit(KEY, rows(1)), b.submit(KEY, rows(2))]
    stats = b.stats()
    assert (stats.state, stats.queued_requests, stats.queued_rows, stats.in_flight_rows) == ("new", 2, 3, 0)
    clock.advance(0.5)
    b.start()
    for f in futures:
        f.result(WAIT_S)
    [info] = batches
    assert (info.key, info.rows, info.times, info.error) == (KEY, 3, "stage-times", None)
    assert info.queue_wait_s == pytest.approx((0.5, 0.5))
    stats = b.stats()
    assert (stats.state, stats.queued_rows, stats.batches, stats.rows_run) == ("running", 0, 1, 3)


# 6. lifecycle ------------------------------------------------------------------------------
def test_drain_refuses_new_work_and_finishes_queued_and_in_flight(make):
    engine = BlockingEngine()
    b = make(engine, max_batch_size=8, max_queue_delay_ms=0).start()
    in_flight = b.submit(KEY, rows(1, seed=0))
    assert engine.entered.wait(WAIT_S)
    queued = b.submit(KEY, rows(2, seed=10))
    b.drain()
    with pytest.raises(UnavailableError, match="draining"):
        b.submit(KEY, rows(1))
    stats = b.stats()
    assert (stats.state, stats.in_flight_rows, stats.queued_rows) == ("draining", 1, 2)
    engine.release.set()
    assert b.close(grace_s=WAIT_S)
    assert in_flight.result(0).images[0][1] == 0
    assert [image[1] for image in queued.result(0).images] == [10, 11]
    assert b.stats().state == "closed"


def test_drain_runs_queued_partial_batches_without_waiting(make):
    engine = BlockingEngine()
    b = make(engine, max_batch_size=8, max_queue_delay_ms=60_000).start()
    in_flight = b.submit(KEY, rows(8, seed=0))  # a full batch goes at once
    assert engine.entered.wait(WAIT_S)
    queued = b.submit(KEY, rows(1, seed=50))  # would wait a minute for mates
    engine.release.set()
    assert b.close(grace_s=WAIT_S)
    assert in_flight.result(0).batch_sizes == (8,)
    assert queued.result(0).images[0][1] == 50


def test_close_after_grace_fails_what_is_left(make):
    failures = []
    engine = BlockingEngine()
    b = make(engine, max_batch_size=1, max_queue_delay_ms=0, on_failure=failures.append).start()
    in_flight = b.submit(KEY, rows(1, seed=0))
    assert engine.entered.wait(WAIT_S)
    queued = b.submit(KEY, rows(1, seed=1))
    assert not b.close(grace_s=0.05)
    for f in (in_flight, queued):
        with pytest.raises(UnavailableError, match="grace_s=0.05"):
            f.result(0)
    assert failures == ["unavailable", "unavailable"]
    # an engine that reports no step cannot be left early: the worker ends with its batch,
    # whose result has nowhere to go
    assert b.worker_alive()
    engine.release.set()
    assert b.join(WAIT_S) and not b.worker_alive()
    assert failures == ["unavailable", "unavailable"]


def test_close_leaves_the_running_batch_at_its_next_step(make):
    failures, batches = [], []
    engine = SleepingEngine(row_step_s=0.1)
    long_key = BucketKey("tiny-sd", 50, 64, 64)  # a batch of one row takes 5 s
    b = make(engine, max_batch_size=1, max_queue_delay_ms=0, on_failure=failures.append,
             on_batch=batches.append).start()
    running, queued = b.submit(long_key, rows(1, seed=0)), b.submit(long_key, rows(1, seed=1))
    assert engine.entered.wait(WAIT_S)
    started = time.monotonic()
    assert not b.close(grace_s=0.2)
    # the grace, then about one step: far less than the batch
    assert time.monotonic() - started < 1.5
    assert not b.worker_alive() and b.join(0)
    for f in (running, queued):
        with pytest.raises(UnavailableError, match="grace_s=0.2"):
            f.result(0)
    assert failures == ["unavailable", "unavailable"]
    assert engine.calls == []  # the engine call never returned
    assert [(info.rows, info.error) for info in batches] == [(1, "unavailable")]
    assert b.stats().rows_run == 0


def test_context_manager_starts_and_closes(make):
    engine = FakeEngine()
    with Batcher(engine, BatcherConfig(max_queue_delay_ms=0)) as b:
        assert b.submit(KEY, rows(1, seed=3)).result(WAIT_S).images[0][1] == 3
        assert b.worker_alive()
    assert b.stats().state == "closed" and not b.worker_alive()
    with pytest.raises(UnavailableError):
        b.submit(KEY, rows(1))
    with pytest.raises(RuntimeError, match="does not restart"):
        b.start()


# 7. configuration ----------------------------------------------------------------------------
BAD_CONFIG = [
    ("max_batch_size", 0, ">= 1"),
    ("max_batch_size", 2.5, "integer"),
    ("max_batch_size", True, "integer"),
    ("max_queue_delay_ms", -1, ">= 0"),
    ("max_queue_delay_ms", math.nan, "finite"),
    ("max_queue_delay_ms", math.inf, "finite"),
    ("max_queue_rows", 0, ">= 1"),
    ("default_timeout_s", 0, "> 0"),
    ("default_timeout_s", "5", "number"),
    ("drain_grace_s", -0.5, ">= 0"),
]


@pytest.mark.parametrize("name,value,allowed", BAD_CONFIG)
def test_config_errors_name_the_field(name, value, allowed):
    with pytest.raises(InvalidInputError, match=allowed) as err:
        BatcherConfig(**{name: value})
    assert isinstance(err.value, ValueError)
    assert err.value.param == name
    assert str(err.value).startswith(name) and repr(value) in str(err.value)


def test_queue_must_hold_a_full_batch():
    with pytest.raises(InvalidInputError, match=r"max_batch_size \(8\)") as err:
        BatcherConfig(max_batch_size=8, max_queue_rows=4)
    assert err.value.param == "max_queue_rows"
