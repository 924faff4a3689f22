"""Celery end-to-end: a real worker drains no-op tasks, undecorated, under the floor lock inline, and
decorated with ``@single_run``.

A *run* is one fresh worker and one queue filled *before* the worker starts: a short warm-up of every
variant, then ``rounds`` rounds, each holding one segment of ``tasks`` tasks per variant (the
variants' order rotating from round to round), with a mark task between segments. The mark notes
``time.monotonic_ns()`` (one clock for every process on the machine), so each segment's rate is
its task count over the time between its two marks: the worker's start-up is not counted, the
publisher does not compete with the worker for the two cores, and the three variants are drained
by the same worker process, interleaved segment by segment. Each round gives one ratio per pair of
variants; the report shows their spread over all rounds of all runs, not just one ratio.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import redis

from bench.measure import percentile
from support.worker import CeleryWorker

VARIANTS = ("plain", "floor", "locked")  # undecorated, floor lock inline, @single_run


@dataclass
class PoolResult:
    pool: str
    concurrency: int
    runs: int = 0
    # rates[variant][run][round]: tasks/s of one segment
    rates: dict[str, list[list[float]]] = field(default_factory=lambda: {v: [] for v in VARIANTS})
    publish_s: list[float] = field(default_factory=list)
    error: Optional[str] = None

    def all_rates(self, variant: str) -> list[float]:
        return [r for run in self.rates[variant] for r in run]

    def median(self, variant: str) -> float:
        return percentile(self.all_rates(variant), 0.5)

    def ratio(self, variant: str = "locked", base: str = "plain") -> float:
        """Median rate over median rate."""
        return self.median(variant) / self.median(base)

    def round_ratios(self, variant: str = "locked", base: str = "floor") -> list[float]:
        """One ratio per round (same run, same round), in order."""
        out = []
        for run_v, run_b in zip(self.rates[variant], self.rates[base]):
            out += [a / b for a, b in zip(run_v, run_b) if b]
        return out

    def run_ratios(self, variant: str = "locked", base: str = "floor") -> list[float]:
        """Per run: the median of that run's round ratios."""
        out = []
        for run_v, run_b in zip(self.rates[variant], self.rates[base]):
            ratios = [a / b for a, b in zip(run_v, run_b) if b]
            if ratios:
                out.append(percentile(ratios, 0.5))
        return out


def _app(url: str) -> Any:
    os.environ["SINGLE_TASK_TEST_URL"] = url
    from bench import celery_app

    if url != celery_app.URL:
        raise RuntimeError(f"bench.celery_app was imported for {celery_app.URL}, not {url}")
    return celery_app


def _one_run(url: str, pool: str, concurrency: int, run: int, rounds: int, tasks: int, warmup: int,
             timeout: float, res: PoolResult) -> None:
    mod = _app(url)
    client = redis.Redis.from_url(url)
    tag = f"{pool}-{run}-{os.getpid()}"
    queue = f"bench-e2e-{tag}"
    segments: list[tuple[int, str]] = []  # (round, variant), in queue order
    mark_names: list[str] = []
    t0 = time.monotonic()
    with mod.app.producer_or_acquire() as producer:
        def send(task: Any, *args: Any) -> None:
            task.apply_async(args, queue=queue, producer=producer)

        for variant in VARIANTS:  # warm-up: imports, connections, script cache; not timed
            task = getattr(mod, variant)
            for n in range(warmup):
                send(task, n)
        mark_names.append(f"{tag}:0")
        send(mod.mark, mark_names[-1])
        for r in range(rounds):
            shift = (run * rounds + r) % len(VARIANTS)
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                task = getattr(mod, variant)
                for n in range(tasks):
                    send(task, n)
                segments.append((r, variant))
                mark_names.append(f"{tag}:{len(segments)}")
                send(mod.mark, mark_names[-1])
    res.publish_s.append(time.monotonic() - t0)
    marks = [mod.MARK_PREFIX + m for m in mark_names]
    client.delete(*marks)
    worker = CeleryWorker("bench.celery_app", url, pool=pool, concurrency=concurrency, queues=queue)
    worker.start()
    try:
        deadline = time.monotonic() + timeout
        while client.get(marks[-1]) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{pool}: run {run + 1} not drained within {timeout:.0f}s")
            time.sleep(0.1)
    finally:
        worker.stop()
    try:
        os.unlink(worker.logfile)
    except OSError:
        pass
    stamps = [int(v) if v is not None else None for v in client.mget(marks)]
    client.delete(queue, *marks)
    per_variant: dict[str, list[float]] = {v: [0.0] * rounds for v in VARIANTS}
    for i, (r, variant) in enumerate(segments):
        a, b = stamps[i], stamps[i + 1]
        if a is None or b is None or b <= a:
            raise RuntimeError(f"{pool}: run {run + 1}, segment {i + 1}: marks missing or out of order")
        per_variant[variant][r] = tasks / ((b - a) / 1e9)
    for variant in VARIANTS:
        res.rates[variant].append(per_variant[variant])
    res.runs += 1


def run_e2e(url: str, pools: list[tuple[str, int, int, int, int]], warmup: int, timeout: float = 600.0,
            log: Any = None) -> list[PoolResult]:
    """``pools``: (pool, concurrency, runs, rounds, tasks per segment) each."""
    results = []
    for pool, concurrency, runs, rounds, tasks in pools:
        res = PoolResult(pool, concurrency)
        results.append(res)
        for run in range(runs):
            if log is not None:
                log(f"  {pool}: run {run + 1}/{runs}, {rounds} rounds × {len(VARIANTS)} variants × {tasks} tasks")
            try:
                _one_run(url, pool, concurrency, run, rounds, tasks, warmup, timeout, res)
            except Exception as exc:
                res.error = f"{type(exc).__name__}: {exc}"
                break
    return results
