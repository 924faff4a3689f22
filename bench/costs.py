"""Where a single_task cycle's time goes: its own Python (against a stub client that answers
instantly), and a cProfile of real cycles against Redis."""

from __future__ import annotations

import cProfile
import os
import pstats
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import redis

from bench.measure import percentile
from single_task import single_run


class StubClient:
    """Answers single_task's script calls at once, as an idle Redis would: free key, then released.

    With ``busy=True`` every acquire finds the key held (the skip path).
    """

    def __init__(self, busy: bool = False) -> None:
        self.busy = busy

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        op = keys_and_args[numkeys]
        if op == "a":
            return [0, 29000, 0] if self.busy else [1, b"1700000000000000"]
        return 1

    def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        return self.evalsha("", numkeys, *keys_and_args)


def _median_ns(cycle: Callable[[], None], n: int) -> float:
    for _ in range(min(n, 1000)):
        cycle()
    clock = time.perf_counter_ns
    samples = []
    for _ in range(n):
        t0 = clock()
        cycle()
        samples.append(clock() - t0)
    return percentile(samples, 0.5)


@dataclass
class PythonCost:
    """single_task's own Python per cycle, in microseconds, with no I/O at all."""

    decorated_us: float
    with_us: float
    skip_us: float


def python_cost(n: int) -> PythonCost:
    stub, busy = StubClient(), StubClient(busy=True)

    @single_run(key="bench:stub", client=stub)
    def job() -> int:
        return 1

    @single_run(key="bench:stub-busy", client=busy)
    def skipped() -> int:
        return 1

    def with_block() -> None:
        with single_run(key="bench:stub-with", client=stub):
            pass

    def decorated() -> None:
        job()

    def skip() -> None:
        skipped()

    return PythonCost(
        decorated_us=_median_ns(decorated, n) / 1000,
        with_us=_median_ns(with_block, n) / 1000,
        skip_us=_median_ns(skip, n) / 1000,
    )


@dataclass
class ProfileRow:
    function: str
    where: str
    calls_per_cycle: float
    own_us: float  # time in the function itself, per cycle (under the profiler)
    cumulative_us: float


@dataclass
class Profile:
    cycles: int
    wall_us_per_cycle: float  # under the profiler (its overhead included)
    rows: list[ProfileRow] = field(default_factory=list)


def profile_decorated(host: str, port: int, cycles: int, top: int = 14) -> Profile:
    """cProfile of ``cycles`` uncontended decorated calls; the top functions by own time."""

    @single_run(key="bench:profile", client=redis.Redis(host=host, port=port))
    def job() -> int:
        return 1

    for _ in range(200):
        job()
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    for _ in range(cycles):
        job()
    profiler.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(profiler)
    rows = []
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in raw.items():
        where = f"{_short(filename)}:{line}" if line else _short(filename)
        rows.append(ProfileRow(name, where, ncalls / cycles, tottime / cycles * 1e6, cumtime / cycles * 1e6))
    rows.sort(key=lambda r: -r.own_us)
    return Profile(cycles, wall / cycles * 1e6, rows[:top])


def _short(filename: str) -> str:
    marker = "site-packages" + os.sep
    if marker in filename:
        return filename.split(marker, 1)[1]
    return os.path.basename(filename) if os.sep in filename else filename
