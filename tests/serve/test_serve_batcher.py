"""MicroBatcher on its own: grouping by key, batch limits, chunking, admission, cancellation, errors, close."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from serve_support import WAIT_S, wait_until

from mae_deploy.serve.batcher import BatcherClosed, MicroBatcher, QueueFull


class Recorder:
    """A runner call that records each batch's shapes and can be held closed."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.gate = threading.Event()
        self.gate.set()
        self.inside = 0

    def __call__(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        self.inside += 1
        self.gate.wait(WAIT_S)
        self.inside -= 1
        self.calls.append((x.shape, ids.shape))
        return x.sum(axis=(1, 2)) + ids.shape[1]  # one value per row, depends on the row and on K


def _work(rows: int, k: int, start: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(rows * 6, dtype=np.float32).reshape(rows, 2, 3) + start
    return x, np.zeros((rows, k), np.int64)


@pytest.fixture
def rec():
    return Recorder()


def test_work_queued_while_the_runner_is_busy_runs_together_grouped_by_key(rec):
    b = MicroBatcher({"encoder": rec}, max_batch_size=8).start()
    try:
        rec.gate.clear()
        first = b.submit("encoder", _work(1, 4))
        wait_until(lambda: rec.inside == 1, what="the first call")
        jobs = [(_work(1, 4, i), b.submit("encoder", _work(1, 4, i))) for i in range(3)]
        jobs += [(_work(2, 9, i), b.submit("encoder", _work(2, 9, i))) for i in range(2)]
        rec.gate.set()
        for (x, ids), futures in jobs:
            np.testing.assert_array_equal(futures[0].result(WAIT_S), rec(x, ids))
        first[0].result(WAIT_S)
    finally:
        b.close()
    batches = rec.calls[:4]  # the four calls above; rec(x, ids) in the checks adds more records afterwards
    assert batches[0] == ((1, 2, 3), (1, 4))
    assert batches[1] == ((3, 2, 3), (3, 4))  # three K=4 requests in one call
    assert batches[2] == ((4, 2, 3), (4, 9))  # two K=9 requests (2 rows each) in another


def test_large_work_is_split_into_max_batch_chunks(rec):
    b = MicroBatcher({"encoder": rec}, max_batch_size=32).start()
    try:
        x, ids = _work(70, 4)
        out = b.run("encoder", (x, ids), timeout=WAIT_S)
    finally:
        b.close()
    assert [c[0][0] for c in rec.calls] == [32, 32, 6]
    np.testing.assert_array_equal(out, x.sum(axis=(1, 2)) + 4)


def test_queue_limit_cancellation_and_close(rec):
    b = MicroBatcher({"encoder": rec}, max_batch_size=4, max_queue=3).start()
    rec.gate.clear()
    running = b.submit("encoder", _work(1, 4))
    wait_until(lambda: rec.inside == 1, what="the first call")
    kept = b.submit("encoder", _work(2, 4))
    dropped = b.submit("encoder", _work(1, 4))
    with pytest.raises(QueueFull, match="3 images are queued"):
        b.submit("encoder", _work(1, 4))
    assert dropped[0].cancel()  # its request timed out: it must cost no runner time
    rec.gate.set()
    kept[0].result(WAIT_S)
    running[0].result(WAIT_S)
    b.close(WAIT_S)
    assert [c[0][0] for c in rec.calls] == [1, 2]
    with pytest.raises(BatcherClosed):
        b.submit("encoder", _work(1, 4))


def test_a_failing_batch_fails_each_of_its_requests_and_the_thread_lives():
    def boom(x, ids):
        if x.shape[0] == 1:
            raise ValueError("bad batch")
        return x[:, 0, 0]

    b = MicroBatcher({"encoder": boom}).start()
    try:
        with pytest.raises(ValueError, match="bad batch"):
            b.run("encoder", _work(1, 4), timeout=WAIT_S)
        assert b.run("encoder", _work(2, 4), timeout=WAIT_S).shape == (2,)
    finally:
        b.close()


def test_max_delay_holds_a_partial_batch_until_it_fills(rec):
    b = MicroBatcher({"encoder": rec}, max_batch_size=2, max_delay_s=WAIT_S).start()
    try:
        one = b.submit("encoder", _work(1, 4))
        assert not one[0].done() and rec.calls == []
        two = b.submit("encoder", _work(1, 4))  # fills the batch: it runs at once, long before the delay ends
        one[0].result(WAIT_S), two[0].result(WAIT_S)
    finally:
        b.close()
    assert rec.calls == [((2, 2, 3), (2, 4))]


def test_async_run_and_timeout_cancels(rec):
    b = MicroBatcher({"encoder": rec}).start()

    async def main():
        out = await b.run_async("encoder", _work(3, 4), timeout=WAIT_S)
        rec.gate.clear()
        with pytest.raises(asyncio.TimeoutError):
            await b.run_async("encoder", _work(1, 4), timeout=0.05)
        return out

    try:
        assert asyncio.run(main()).shape == (3,)
    finally:
        rec.gate.set()
        b.close()


def test_async_run_reports_the_runner_time_of_its_chunks():
    """on_ran gets the summed duration of the runner calls that carried the work (two chunks here)."""
    import time

    def slow(x, ids):
        time.sleep(0.02)
        return x.sum(axis=(1, 2))

    b = MicroBatcher({"encoder": slow}, max_batch_size=2).start()
    seen: list[float] = []
    try:
        out = asyncio.run(b.run_async("encoder", _work(3, 4), timeout=WAIT_S, on_ran=seen.append))
    finally:
        b.close()
    assert out.shape == (3,)
    assert len(seen) == 1 and 0.04 <= seen[0] < WAIT_S  # two calls of at least 20 ms each


def test_flush_runs_a_held_partial_batch_at_once(rec):
    b = MicroBatcher({"encoder": rec}, max_batch_size=8, max_delay_s=600.0).start()
    try:
        held = b.submit("encoder", _work(1, 4))
        assert not held[0].done()
        b.flush()  # draining: a batch that waits for company would hold shutdown for max_delay_s
        held[0].result(WAIT_S)
    finally:
        b.close()
