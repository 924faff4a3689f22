"""Where a single_task cycle's time goes on the client: a cProfile of its decorated call against
Redis, by function and by package.

(The client's CPU per cycle of every contender is measured in the latency rounds themselves, see
measure.run_interleaved. An earlier stub-client measurement answered the library's private script
protocol, which changes with the library; it is gone.)"""

from __future__ import annotations

import cProfile
import os
import pstats
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from single_task import single_run


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
    by_package: dict[str, float] = field(default_factory=dict)  # own µs per cycle, summed per package


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
    by_package: dict[str, float] = {}
    for (filename, _line, _name), (_cc, _ncalls, tottime, _cumtime, _callers) in raw.items():
        group = _package(filename)
        by_package[group] = by_package.get(group, 0.0) + tottime / cycles * 1e6
    rows.sort(key=lambda r: -r.own_us)
    return Profile(cycles, wall / cycles * 1e6, rows[:top],
                   dict(sorted(by_package.items(), key=lambda kv: -kv[1])))


def _package(filename: str) -> str:
    """Which code a profiled function belongs to: single_task.py, a site-package, or the stdlib."""
    if os.path.basename(filename) == "single_task.py":
        return "single_task.py"
    marker = "site-packages" + os.sep
    if marker in filename:
        return filename.split(marker, 1)[1].split(os.sep, 1)[0]
    if filename.startswith("<") or filename == "~":
        return "builtins (C functions: sockets, os, time, …)"
    if os.sep + "bench" + os.sep in filename:
        return "bench (the cycle loop)"
    return "Python standard library"


def _short(filename: str) -> str:
    marker = "site-packages" + os.sep
    if marker in filename:
        return filename.split(marker, 1)[1]
    return os.path.basename(filename) if os.sep in filename else filename
