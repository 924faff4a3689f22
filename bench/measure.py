"""Timing and counting tools: percentiles, the interleaved runner, and the command counters.

Three independent counts explain a cycle's cost:

* ``WireCounter`` sees what this process writes to its TCP sockets (``socket.socket`` itself is
  patched, so it does not matter which redis-py layer, or which library, does the writing): a
  *round trip* is a burst of writes on one socket that the next read on that socket ends, and the
  RESP bytes name each command as sent.
* ``commandstats`` deltas are what the server executed. Redis counts the commands that a Lua
  script calls under their own names too, *and* includes their time in the script's own ``usec``;
  so the server time of a cycle is the time of the commands the client sent (``top_usec``), of
  which the script-internal commands are a part (``inner_usec``), never the sum of both.
* ``INFO cpu`` deltas are the server process's CPU time (user + sys) over the same window: what the
  cycle costs the server including reading the request and writing the reply, which commandstats
  leaves out.
"""

from __future__ import annotations

import _socket
import socket
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import redis

Cycle = Callable[[], None]


def percentile(samples: list[int] | list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between closest ranks."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


@dataclass
class Timed:
    """Per-cycle wall times (ns) of one contender, per round too, and why it stopped, if it did.

    ``round_medians`` is the median cycle (ns) of each round's batch, ``cpu_per_cycle`` this
    process's CPU time (user + sys, all threads) per cycle in each round's batch (ns).
    """

    samples: list[int] = field(default_factory=list)
    round_medians: list[float] = field(default_factory=list)
    cpu_per_cycle: list[float] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def median_us(self) -> float:
        return percentile(self.samples, 0.5) / 1000.0

    @property
    def p99_us(self) -> float:
        return percentile(self.samples, 0.99) / 1000.0

    @property
    def cpu_us(self) -> float:
        """Median over the rounds of the client process's CPU per cycle."""
        return percentile(self.cpu_per_cycle, 0.5) / 1000.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Timed:
        return cls(**data)

    def extend(self, other: Timed) -> None:
        self.samples += other.samples
        self.round_medians += other.round_medians
        self.cpu_per_cycle += other.cpu_per_cycle
        self.error = self.error or other.error


def round_ratios(t: Timed, base: Timed) -> list[float]:
    """Per-round ratio of the two contenders' batch medians (rounds both completed)."""
    return [a / b for a, b in zip(t.round_medians, base.round_medians) if b]


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
    clock, cpu = time.perf_counter_ns, time.process_time_ns
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            timed = results[name]
            if timed.error is not None:
                continue
            cycle = cycles[name]
            batch_samples: list[int] = []
            append = batch_samples.append
            try:
                c0 = cpu()
                for _ in range(batch):
                    t0 = clock()
                    cycle()
                    append(clock() - t0)
                c1 = cpu()
            except Exception as exc:
                timed.error = f"{type(exc).__name__}: {exc}"
                timed.samples += batch_samples
                continue
            timed.samples += batch_samples
            timed.round_medians.append(percentile(batch_samples, 0.5))
            timed.cpu_per_cycle.append((c1 - c0) / batch)
        if after_round is not None:
            after_round()
    return results


# -- counting -----------------------------------------------------------------------------------------


def _resp_commands(buf: bytearray) -> tuple[list[str], int]:
    """Command names of the complete RESP arrays at the start of ``buf``, and the bytes they span."""
    names: list[str] = []
    pos, end = 0, len(buf)
    while pos < end:
        if buf[pos:pos + 1] != b"*":
            return names, end  # not a command array (inline command?): drop it rather than guess
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            break
        count = int(buf[pos + 1:nl])
        p = nl + 2
        first: Optional[bytes] = None
        complete = True
        for i in range(count):
            nl = buf.find(b"\r\n", p)
            if nl < 0:
                complete = False
                break
            length = int(buf[p + 1:nl])
            if nl + 2 + length + 2 > end:
                complete = False
                break
            if i == 0:
                first = bytes(buf[nl + 2:nl + 2 + length])
            p = nl + 2 + length + 2
        if not complete:
            break
        names.append((first or b"?").decode(errors="replace").upper())
        pos = p
    return names, pos


class _SocketState:
    __slots__ = ("buffer", "writing")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.writing = False


class WireCounter:
    """Counts round trips and commands written to every TCP socket of this process while active.

    Patches ``socket.socket``'s send and receive methods (counting phases only; never while
    timing). ``by_thread`` counts round trips per thread name.
    """

    def __init__(self) -> None:
        self.round_trips = 0
        self.commands: Counter[str] = Counter()
        self.by_thread: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._states: dict[int, _SocketState] = {}
        self._saved: dict[str, Any] = {}

    def _sent(self, sock: socket.socket, data: Any) -> None:
        with self._lock:
            state = self._states.get(id(sock))
            if state is None:
                state = self._states[id(sock)] = _SocketState()
            if not state.writing:
                state.writing = True
                self.round_trips += 1
                self.by_thread[threading.current_thread().name] += 1
            state.buffer += bytes(data)
            names, used = _resp_commands(state.buffer)
            del state.buffer[:used]
            self.commands.update(names)

    def _received(self, sock: socket.socket) -> None:
        state = self._states.get(id(sock))
        if state is not None:
            state.writing = False

    def __enter__(self) -> WireCounter:
        cls = socket.socket
        self._saved = {name: cls.__dict__.get(name) for name in ("sendall", "send", "recv", "recv_into")}
        base = _socket.socket
        counter = self

        def sendall(sock: socket.socket, data: Any, *args: Any) -> Any:
            counter._sent(sock, data)
            return base.sendall(sock, data, *args)

        def send(sock: socket.socket, data: Any, *args: Any) -> Any:
            sent = base.send(sock, data, *args)
            counter._sent(sock, memoryview(data)[:sent])
            return sent

        def recv(sock: socket.socket, *args: Any) -> Any:
            data = base.recv(sock, *args)
            if data:
                counter._received(sock)
            return data

        def recv_into(sock: socket.socket, *args: Any) -> Any:
            n = base.recv_into(sock, *args)
            if n:
                counter._received(sock)
            return n

        for name, fn in (("sendall", sendall), ("send", send), ("recv", recv), ("recv_into", recv_into)):
            setattr(cls, name, fn)
        return self

    def __exit__(self, *exc: object) -> None:
        cls = socket.socket
        for name, value in self._saved.items():
            if value is None:
                if name in cls.__dict__:
                    delattr(cls, name)
            else:
                setattr(cls, name, value)


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


def server_cpu(client: redis.Redis) -> float:
    """The server process's CPU seconds so far (user + sys), from INFO cpu."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def split_server_time(client_sent: dict[str, float], delta: dict[str, tuple[int, int]]) -> tuple[float, float]:
    """(usec of the commands the client sent, usec of those that ran inside scripts), in total.

    A command name the client sent n times and the server ran m >= n times was sent n times and
    run m - n times from inside a script; its usec is split in that proportion (subcommands such
    as ``CLIENT|SETINFO`` are matched on their first word).
    """
    by_base: dict[str, list[tuple[int, int]]] = {}
    for name, (calls, usec) in delta.items():
        by_base.setdefault(name.split("|", 1)[0], []).append((calls, usec))
    top = inner = 0.0
    for base, entries in by_base.items():
        calls = sum(c for c, _ in entries)
        usec = sum(u for _, u in entries)
        sent = min(float(client_sent.get(base, 0.0)), float(calls))
        share = sent / calls if calls else 0.0
        top += usec * share
        inner += usec * (1 - share)
    return top, inner


@dataclass
class Counts:
    """Commands per cycle, as sent by the client and as executed by the server, and server time."""

    cycles: int
    round_trips: float
    client: dict[str, float]
    server: dict[str, float]
    server_usec: float  # commandstats usec per cycle of the commands sent (scripts include their inner commands)
    inner_usec: float  # of which: commands run inside scripts
    server_cpu_usec: float  # INFO cpu (user + sys) per cycle: includes reading requests and writing replies

    @property
    def client_total(self) -> float:
        return sum(self.client.values())

    @property
    def server_total(self) -> float:
        return sum(self.server.values())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Counts:
        return cls(**data)


def count_commands(cycle: Cycle, probe: redis.Redis, cycles: int) -> Counts:
    """Run ``cycles`` cycles under all counters; the cycle must have been warmed up already."""
    probe.ping()
    before, cpu0 = commandstats(probe), server_cpu(probe)
    with WireCounter() as wire:
        for _ in range(cycles):
            cycle()
    cpu1, after = server_cpu(probe), commandstats(probe)
    delta = stats_delta(before, after)
    top, inner = split_server_time(dict(wire.commands), delta)
    return Counts(
        cycles=cycles,
        round_trips=wire.round_trips / cycles,
        client={k: v / cycles for k, v in wire.commands.items()},
        server={k: calls / cycles for k, (calls, _) in delta.items()},
        server_usec=top / cycles,
        inner_usec=inner / cycles,
        server_cpu_usec=(cpu1 - cpu0) * 1e6 / cycles,
    )


def format_counts(per_cycle: dict[str, float]) -> str:
    """'EVALSHA 2, GET 1' with fractional counts shown to two places."""
    parts = []
    for name, value in sorted(per_cycle.items(), key=lambda kv: (-kv[1], kv[0])):
        shown = f"{value:.0f}" if abs(value - round(value)) < 0.005 else f"{value:.2f}"
        parts.append(f"{name} {shown}")
    return ", ".join(parts) or "-"
