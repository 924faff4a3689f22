"""Scale and resilience: many leases held at once, many keys, and an emptied script cache."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from bench.measure import WireCounter, commandstats, stats_delta
from single_task import Lease, single_run
from support.redis_server import RedisServer


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _thread_cpu_seconds(native_id: Optional[int]) -> float:
    """utime + stime of one thread of this process, from /proc (clock ticks, 10 ms on Linux)."""
    if native_id is None:
        return float("nan")
    try:
        with open(f"/proc/self/task/{native_id}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # fields 14 and 15 of stat, counted after ')'


def _threads_cpu_seconds(native_ids: list[Optional[int]]) -> float:
    return sum(_thread_cpu_seconds(n) for n in native_ids)


@dataclass
class HeldResult:
    leases: int
    ttl: float
    window_s: float
    threads_before: int = 0
    threads_holding: int = 0
    acquire_s: float = 0.0
    renewals: int = 0  # scripts executed by the server in window 1 (nothing else runs then)
    counted_renewals: int = 0  # the same in window 2, while round trips are counted
    renew_round_trips: int = 0  # sends by the watchdog thread in window 2
    renew_threads: int = 0  # distinct threads that sent anything in window 2
    watchdog_cpu_s: float = float("nan")
    lost: int = 0
    alive_at_end: int = 0
    alive_by: str = ""
    error: Optional[str] = None


SCRIPT_COMMANDS = ("EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO", "FCALL", "FCALL_RO")


def _scripts_run(delta: dict[str, tuple[int, int]]) -> int:
    """Scripts (or functions) the server ran: each renewal is one, however the library names it."""
    return sum(delta.get(name, (0, 0))[0] for name in SCRIPT_COMMANDS)


def held_leases(server: RedisServer, count: int, ttl: float, window_s: float) -> HeldResult:
    """Hold ``count`` leases in one thread of this process; watch renewal for ``window_s``."""
    res = HeldResult(count, ttl, window_s)
    client = server.client()
    probe = server.client()
    lost: list[Lease] = []
    keys = [f"bench:held:{i}" for i in range(count)]
    try:
        with contextlib.ExitStack() as stack:
            res.threads_before = _os_threads()
            threads_before = set(threading.enumerate())
            t0 = time.monotonic()
            leases = [stack.enter_context(single_run(key=key, ttl=ttl, client=client, on_lost=lost.append))
                      for key in keys]
            res.acquire_s = time.monotonic() - t0
            res.threads_holding = _os_threads()
            # The library's watchdog: a thread named so, or else the threads the leases started.
            native = [t.native_id for t in threading.enumerate() if "watchdog" in t.name.lower()] or [
                t.native_id for t in threading.enumerate() if t not in threads_before]
            # Window 1, nothing patched: server-side renewals and the watchdog thread's CPU time.
            cpu0 = _threads_cpu_seconds(native)
            before = commandstats(probe)
            time.sleep(window_s)
            after = commandstats(probe)
            res.watchdog_cpu_s = _threads_cpu_seconds(native) - cpu0
            res.renewals = _scripts_run(stats_delta(before, after))
            # Window 2, under the wire counter: which threads send, and in how many round trips.
            before = commandstats(probe)
            with WireCounter() as wire:
                time.sleep(window_s)
            after = commandstats(probe)
            res.counted_renewals = _scripts_run(stats_delta(before, after))
            # Nothing else in this process sends during the window (this thread sleeps).
            res.renew_round_trips = wire.round_trips
            res.renew_threads = len(wire.by_thread)
            # Alive by the server's word: the lease's own Redis key (Lease.redis_key, public) has a ttl.
            # Without that attribute, by the holder's word (Lease.lost).
            redis_keys = [getattr(lease, "redis_key", None) for lease in leases]
            if all(isinstance(k, str) for k in redis_keys):
                pipe = probe.pipeline(transaction=False)
                for k in redis_keys:
                    pipe.pttl(str(k))
                res.alive_at_end = sum(1 for pttl in pipe.execute() if pttl > 0)
                res.alive_by = "the server (PTTL of each Lease.redis_key)"
            else:
                res.alive_at_end = sum(1 for lease in leases if not lease.lost)
                res.alive_by = "the holder (not Lease.lost)"
        res.lost = len(lost)
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


@dataclass
class KeysResult:
    keys: int
    ttl: float
    used_before: int = 0
    used_after_release: int = 0
    dbsize_after_release: int = 0
    without_expiry: int = 0
    max_pttl_ms: int = 0
    released_at: float = 0.0
    used_after_expiry: Optional[int] = None
    dbsize_after_expiry: Optional[int] = None
    waited_s: float = 0.0
    seconds: float = 0.0
    error: Optional[str] = None


def many_keys(server: RedisServer, count: int, ttl: float) -> KeysResult:
    """Acquire and release ``count`` distinct keys through a decorated function; read memory."""
    res = KeysResult(count, ttl)
    probe = server.client()
    try:
        probe.flushall()
        res.used_before = int(probe.info("memory")["used_memory"])

        @single_run(key="bench:many:{i}", ttl=ttl, client=server.url)
        def job(i: int) -> int:
            return i

        t0 = time.monotonic()
        for i in range(count):
            if job(i) != i:
                raise RuntimeError(f"key {i} did not run")
        res.seconds = time.monotonic() - t0
        res.released_at = time.monotonic()
        res.used_after_release = int(probe.info("memory")["used_memory"])
        res.dbsize_after_release = int(probe.dbsize())
        pipe = probe.pipeline(transaction=False)
        names = list(probe.scan_iter(count=1000))
        for name in names:
            pipe.pttl(name)
        ttls = pipe.execute() if names else []
        res.without_expiry = sum(1 for t in ttls if t == -1)
        res.max_pttl_ms = max((t for t in ttls if t > 0), default=0)
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


def after_expiry(server: RedisServer, res: KeysResult, max_wait_s: float) -> None:
    """Wait (at most ``max_wait_s``) for the expiries to pass, then read memory and key count again."""
    if res.error:
        return
    probe = server.client()
    due = res.released_at + res.max_pttl_ms / 1000.0 + 1.0
    start = time.monotonic()
    if due - start > max_wait_s:
        return  # not waited: reported as such
    while True:
        now = time.monotonic()
        if now >= due and int(probe.dbsize()) == 0:
            break
        if now > start + max_wait_s:
            break
        time.sleep(0.25)
    res.waited_s = time.monotonic() - start
    res.dbsize_after_expiry = int(probe.dbsize())
    res.used_after_expiry = int(probe.info("memory")["used_memory"])


@dataclass
class CacheStep:
    what: str
    round_trips: int
    client_commands: dict[str, int]
    server_commands: dict[str, int]
    error: Optional[str] = None


@dataclass
class CacheResult:
    steps: list[CacheStep] = field(default_factory=list)
    error: Optional[str] = None


HANDSHAKE = {"HELLO", "CLIENT", "SELECT", "AUTH"}


def script_cache(server: RedisServer) -> CacheResult:
    """Round trips of a decorated call with a cold, warm, restarted and flushed script cache.

    The lease client is single_task's own, built from the URL, as most users will have it.
    """
    res = CacheResult()

    @single_run(key="bench:cache", client=server.url)
    def job() -> int:
        return 1

    def step(what: str) -> None:
        probe = server.client()
        probe.ping()  # connect the probe before the first snapshot
        before = commandstats(probe)
        error = None
        with WireCounter() as wire:
            try:
                if job() != 1:
                    error = "did not run"
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        delta = stats_delta(before, commandstats(probe))
        res.steps.append(CacheStep(what, wire.round_trips, dict(wire.commands),
                                   {k: calls for k, (calls, _) in delta.items()}, error))
        probe.close()

    try:
        step("first call (fresh server: script not cached)")
        step("second call")
        server.restart()
        step("first call after a Redis restart (cache and connection gone)")
        step("second call after the restart")
        server.client().script_flush()
        step("first call after SCRIPT FLUSH (connection kept)")
        step("second call after SCRIPT FLUSH")
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res
