"""Celery end-to-end: a real worker drains a queue of no-op tasks, undecorated vs decorated.

Each run fills a fresh queue *before* its worker starts: a start mark, N tasks, a done mark. The
rate is N over the time between the two marks, so the worker's start-up is not counted and the
publisher does not compete with the worker for the two cores. Runs alternate variants round by
round (rotating which goes first), each with a worker of its own. Besides undecorated and
decorated, a third variant takes the floor lock inline (SET NX PX, then EVALSHA compare-and-delete),
to show what the cheapest correct lock costs end to end on the same machine.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import redis

from support.worker import CeleryWorker

VARIANTS = ("plain", "floor", "locked")  # undecorated, floor lock inline, @single_run


@dataclass
class PoolResult:
    pool: str
    concurrency: int
    rates: dict[str, list[float]] = field(default_factory=lambda: {v: [] for v in VARIANTS})
    error: Optional[str] = None

    def median(self, variant: str) -> float:
        values = sorted(self.rates[variant])
        if not values:
            return float("nan")
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    def ratio(self, variant: str = "locked") -> float:
        return self.median(variant) / self.median("plain")


def _app(url: str) -> Any:
    os.environ["SINGLE_TASK_TEST_URL"] = url
    from bench import celery_app

    if url != celery_app.URL:
        raise RuntimeError(f"bench.celery_app was imported for {celery_app.URL}, not {url}")
    return celery_app


def _one_run(url: str, pool: str, concurrency: int, variant: str, tasks: int, tag: str, timeout: float) -> float:
    mod = _app(url)
    client = redis.Redis.from_url(url)
    queue = f"bench-e2e-{tag}"
    marks = [mod.MARK_PREFIX + f"{tag}:start", mod.MARK_PREFIX + f"{tag}:done"]
    client.delete(*marks)
    task = {"plain": mod.plain, "floor": mod.floor, "locked": mod.locked}[variant]
    with mod.app.producer_or_acquire() as producer:
        mod.mark.apply_async((f"{tag}:start",), queue=queue, producer=producer)
        for n in range(tasks):
            task.apply_async((n,), queue=queue, producer=producer)
        mod.mark.apply_async((f"{tag}:done",), queue=queue, producer=producer)
    worker = CeleryWorker("bench.celery_app", url, pool=pool, concurrency=concurrency, queues=queue)
    worker.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            start, done = client.mget(marks)
            if start is not None and done is not None:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{pool}/{variant}: {tasks} tasks not drained within {timeout:.0f}s")
            time.sleep(0.05)
    finally:
        worker.stop()
    try:
        os.unlink(worker.logfile)
    except OSError:
        pass
    client.delete(queue, *marks)
    seconds = (int(done) - int(start)) / 1e9
    return tasks / seconds


def run_e2e(
    url: str, tasks: int, rounds: int, pools: list[tuple[str, int]], timeout: float = 240.0
) -> list[PoolResult]:
    results = [PoolResult(pool, concurrency) for pool, concurrency in pools]
    for r in range(rounds):
        for res in results:
            if res.error:
                continue
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
            for variant in order:
                try:
                    tag = f"{res.pool}-{variant}-{r}"
                    rate = _one_run(url, res.pool, res.concurrency, variant, tasks, tag, timeout)
                except Exception as exc:
                    res.error = f"{type(exc).__name__}: {exc}"
                    break
                res.rates[variant].append(rate)
    return results
