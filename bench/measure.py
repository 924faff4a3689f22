"""Timing and counting tools: percentiles, the interleaved runner, and two command counters.

Two independent counts explain a cycle's cost:

* ``WireCounter`` sees what redis-py writes to its sockets: every ``send_packed_command`` is one
  round trip (a pipeline is one send), and the RESP bytes name each command as sent.
* ``commandstats`` deltas are what the server executed. Redis counts commands that a Lua script
  calls under their own names too, so for a script-based lock the server count is higher than
  what the client sent; the difference is the work done inside scripts.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import redis
from redis.connection import AbstractConnection

Cycle = Callable[[], None]


def percentile(samples: list[int], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between closest ranks."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Timed:
    """Per-cycle wall times (ns) of one contender, and why it stopped, if it did."""

    samples: list[int] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def median_us(self) -> float:
        return percentile(self.samples, 0.5) / 1000.0

    @property
    def p99_us(self) -> float:
        return percentile(self.samples, 0.99) / 1000.0


def run_interleaved(cycles: dict[str, Cycle], rounds: int, batch: int, warmup: int = 20,
                    after_round: Optional[Callable[[], None]] = None) -> dict[str, Timed]:
    """Time ``batch`` cycles of each contender per round, contenders in turn, for ``rounds`` rounds.

    The starting contender rotates each round, so no one always runs right after the same
    neighbour. A contender that raises is dropped from later rounds, with its error kept.
    ``after_round`` (untimed) runs after the warm-up and after every round, e.g. to empty a queue.
    """
    results = {name: Timed() for name in cycles}
    names = list(cycles)
    for name in names:
        try:
            for _ in range(warmup):
                cycles[name]()
        except Exception as exc:
            results[name].error = f"{type(exc).__name__}: {exc}"
    if after_round is not None:
        after_round()
    clock = time.perf_counter_ns
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            timed = results[name]
            if timed.error is not None:
                continue
            cycle = cycles[name]
            samples = timed.samples
            try:
                for _ in range(batch):
                    t0 = clock()
                    cycle()
                    samples.append(clock() - t0)
            except Exception as exc:
                timed.error = f"{type(exc).__name__}: {exc}"
        if after_round is not None:
            after_round()
    return results


def _resp_commands(data: bytes) -> list[str]:
    """Command names in a buffer of RESP arrays of bulk strings, as redis-py sends them."""
    names: list[str] = []
    pos = 0
    end = len(data)
    while pos < end:
        if data[pos:pos + 1] != b"*":
            break  # not a command array: stop rather than guess
        nl = data.index(b"\r\n", pos)
        count = int(data[pos + 1:nl])
        pos = nl + 2
        first: Optional[bytes] = None
        for i in range(count):
            nl = data.index(b"\r\n", pos)
            length = int(data[pos + 1:nl])
            value = data[nl + 2:nl + 2 + length]
            pos = nl + 2 + length + 2
            if i == 0:
                first = value
        names.append((first or b"?").decode(errors="replace").upper())
    return names


class WireCounter:
    """Counts round trips and commands written by every redis-py connection in this process.

    Patches ``AbstractConnection.send_packed_command`` while active (counting phases only; never
    while timing). ``by_thread`` counts round trips per thread name.
    """

    def __init__(self) -> None:
        self.round_trips = 0
        self.commands: Counter[str] = Counter()
        self.by_thread: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._original: Any = None

    def __enter__(self) -> WireCounter:
        original: Any = AbstractConnection.send_packed_command
        counter = self

        def counting_send(conn: Any, command: Any, check_health: bool = True) -> Any:
            if isinstance(command, (bytes, str)):
                command = [command]
            data = b"".join(c.encode() if isinstance(c, str) else bytes(c) for c in command)
            with counter._lock:
                counter.round_trips += 1
                counter.by_thread[threading.current_thread().name] += 1
                counter.commands.update(_resp_commands(data))
            return original(conn, command, check_health)

        self._original = original
        AbstractConnection.send_packed_command = counting_send  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        AbstractConnection.send_packed_command = self._original  # type: ignore[method-assign]


def commandstats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """{command: (calls, usec)} from INFO commandstats."""
    stats = client.info("commandstats")
    out: dict[str, tuple[int, int]] = {}
    for name, value in stats.items():
        if name.startswith("cmdstat_") and isinstance(value, dict):
            out[name[len("cmdstat_"):].upper()] = (int(value["calls"]), int(value["usec"]))
    return out


def stats_delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Per-command (calls, usec) executed between two snapshots, without the INFO calls themselves."""
    delta: dict[str, tuple[int, int]] = {}
    for name, (calls, usec) in after.items():
        c0, u0 = before.get(name, (0, 0))
        if calls - c0 and name != "INFO":
            delta[name] = (calls - c0, usec - u0)
    return delta


@dataclass
class Counts:
    """Commands per cycle, as sent by the client and as executed by the server."""

    cycles: int
    round_trips: float
    client: dict[str, float]
    server: dict[str, float]
    server_usec: float  # server time per cycle, all commands (scripts include their inner commands)

    @property
    def client_total(self) -> float:
        return sum(self.client.values())

    @property
    def server_total(self) -> float:
        return sum(self.server.values())


def count_commands(cycle: Cycle, probe: redis.Redis, cycles: int) -> Counts:
    """Run ``cycles`` cycles under both counters; the cycle must have been warmed up already."""
    before = commandstats(probe)
    with WireCounter() as wire:
        for _ in range(cycles):
            cycle()
    after = commandstats(probe)
    delta = stats_delta(before, after)
    return Counts(
        cycles=cycles,
        round_trips=wire.round_trips / cycles,
        client={k: v / cycles for k, v in wire.commands.items()},
        server={k: calls / cycles for k, (calls, _) in delta.items()},
        server_usec=sum(usec for _, usec in delta.values()) / cycles,
    )


def format_counts(per_cycle: dict[str, float]) -> str:
    """'EVALSHA 2, GET 1' with fractional counts shown to two places."""
    parts = []
    for name, value in sorted(per_cycle.items(), key=lambda kv: (-kv[1], kv[0])):
        shown = f"{value:.0f}" if abs(value - round(value)) < 0.005 else f"{value:.2f}"
        parts.append(f"{name} {shown}")
    return ", ".join(parts) or "-"
