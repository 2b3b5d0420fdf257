"""The endpoint's dynamic batching (inference/serve/batching.py) on a real asyncio loop, without Ray: a batch forms
when the model is free, from every request that waited while the previous one ran."""

from __future__ import annotations

import asyncio

import pytest

from inference.serve.batching import Batcher


class Model:
    """A model that takes `seconds` per batch, one batch at a time, and records the batches it ran."""

    def __init__(self, seconds: float, fail_on: int | None = None):
        self.seconds, self.fail_on = seconds, fail_on
        self.batches: list[list[int]] = []
        self.running = 0

    async def run(self, items: list[int]) -> list[object]:
        self.running += 1
        assert self.running == 1, "two batches ran at once"
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        self.running -= 1
        if self.fail_on in items:
            raise RuntimeError("model failure")
        return [x * 10 if x >= 0 else ValueError(f"bad item {x}") for x in items]


def test_requests_arriving_during_a_batch_form_the_next_one_whole():
    async def scenario():
        model = Model(0.3)
        batcher = Batcher(model.run, max_batch_size=8, wait_s=0.02)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)                       # the first batch (one request) is running
        later = []
        for i in range(1, 8):                            # arrive one by one during it, 20 ms apart
            later.append(asyncio.ensure_future(batcher.submit(i)))
            await asyncio.sleep(0.02)
        results = await asyncio.gather(first, *later)
        return model.batches, results

    batches, results = asyncio.run(scenario())
    assert results == [i * 10 for i in range(8)]
    assert batches == [[0], [1, 2, 3, 4, 5, 6, 7]], batches    # not cut into 20 ms slices while the model ran


def test_a_lone_request_waits_at_most_the_wait_and_a_full_batch_not_at_all():
    async def scenario():
        model = Model(0.0)
        batcher = Batcher(model.run, max_batch_size=4, wait_s=0.2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await batcher.submit(1)
        lone = loop.time() - t0
        t0 = loop.time()
        await asyncio.gather(*(batcher.submit(i) for i in range(4)))
        full = loop.time() - t0
        return lone, full, model.batches

    lone, full, batches = asyncio.run(scenario())
    assert 0.15 <= lone < 1.0 and full < 0.1, (lone, full)
    assert batches == [[1], [0, 1, 2, 3]]


def test_requests_that_waited_for_the_model_do_not_wait_for_company():
    """Under load the missing requests of a batch are in the one that just ended: the next batch starts at once,
    not after the wait (which a request finding the model idle does take)."""
    async def scenario():
        model = Model(0.3)
        batcher = Batcher(model.run, max_batch_size=8, wait_s=0.4)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        first = asyncio.ensure_future(batcher.submit(0))     # finds the model idle: waits 0.4 s, runs 0.4-0.7 s
        await asyncio.sleep(0.5)
        queued = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]   # wait for the model
        await first
        done_first = loop.time() - t0
        await asyncio.gather(*queued)
        return done_first, loop.time() - t0, model.batches

    done_first, done_queued, batches = asyncio.run(scenario())
    assert batches == [[0], [1, 2]], batches
    assert done_first >= 0.65, done_first
    assert done_queued - done_first < 0.55, (done_first, done_queued)   # a 0.3 s run, no 0.4 s wait before it


def test_errors_reach_their_callers_and_cancelled_requests_are_skipped():
    async def scenario():
        model = Model(0.1, fail_on=99)
        batcher = Batcher(model.run, max_batch_size=8, wait_s=0.0)
        busy = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.02)
        gone = asyncio.ensure_future(batcher.submit(5))   # waits for the model, then its client leaves
        bad = asyncio.ensure_future(batcher.submit(-1))
        await asyncio.sleep(0.02)
        gone.cancel()
        out = await asyncio.gather(busy, bad, return_exceptions=True)
        failing = await asyncio.gather(batcher.submit(99), batcher.submit(3), return_exceptions=True)
        return out, failing, model.batches

    (ok, bad), failing, batches = asyncio.run(scenario())
    assert ok == 0 and isinstance(bad, ValueError)
    assert batches[:2] == [[0], [-1]], batches              # the cancelled request never reached the model
    assert all(isinstance(r, RuntimeError) for r in failing)  # a failing batch fails each of its callers


def test_max_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(Model(0).run, max_batch_size=0, wait_s=0.01)
