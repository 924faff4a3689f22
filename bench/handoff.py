"""Hand-off latency: from the moment a holder starts releasing to the moment a blocked waiter in
another process starts its body.

Both ends read ``time.monotonic_ns()``, which on Linux is CLOCK_MONOTONIC, one clock for every
process on the machine. Each sample: the holder (this process) takes the lock, tells the waiter
process to call; after a random 20-70 ms (so a polling waiter is caught at a random point of its
sleep) and, for waiters that block in Redis, once the server reports a blocked client, the holder
notes the time and releases. The waiter's body notes the time as its first statement.
Every library runs with its default wait settings.
"""

from __future__ import annotations

import multiprocessing
import random
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable, ContextManager, Optional

import redis

from bench.contenders import TTL_S, Unavailable, _import
from bench.measure import percentile
from single_task import single_run


@dataclass(frozen=True)
class Waiter:
    name: str
    mechanism: str
    blocks_in_redis: bool  # True: the waiter sits in BLPOP until told; False: it polls
    package: Optional[str] = None


WAITERS: list[Waiter] = [
    Waiter("single_task `on_busy=\"wait\"`", "BLPOP on a per-waiter list; the release script hands the key over",
           True),
    Waiter("python-redis-lock (blocking acquire)", "BLPOP on a signal list, then SET NX again", True,
           "python-redis-lock"),
    Waiter("redis-py `Lock` (blocking acquire)", "polls SET NX, sleeping 0.1 s between tries", False, "redis"),
    Waiter("pottery `Redlock` (blocking acquire)", "polls, sleeping uniform(0, 0.2) s between tries", False,
           "pottery"),
]

NOT_WAITING = {
    "celery-once": "no wait: raises AlreadyQueued (its `blocking` setting polls through redis-py `Lock`)",
    "celery-singleton": "no wait: returns the queued task's AsyncResult",
    "huey `lock_task`": "no wait: raises TaskLockedException",
    "dramatiq `ConcurrentRateLimiter`": "no wait: raises RateLimitExceeded or yields False",
}


def lock_for(kind: str, client: redis.Redis, key: str) -> Callable[[], ContextManager[Any]]:
    """A factory of context managers that acquire ``key`` blocking, with the library's defaults."""
    if kind.startswith("single_task"):
        return lambda: single_run(key=key, client=client, on_busy="wait")
    if kind.startswith("python-redis-lock"):
        redis_lock = _import("redis_lock")
        return lambda: redis_lock.Lock(client, key, expire=TTL_S)
    if kind.startswith("redis-py"):
        return lambda: client.lock(key, timeout=TTL_S)
    if kind.startswith("pottery"):
        pottery = _import("pottery")
        return lambda: pottery.Redlock(key=key, masters={client}, auto_release_time=TTL_S)
    raise ValueError(kind)


def _stamp() -> int:
    return time.monotonic_ns()


def _waiter_process(conn: Connection, host: str, port: int) -> None:
    """The waiter: for each (kind, key) it is sent, say 'calling', block, and report its body's start."""
    client = redis.Redis(host=host, port=port)
    decorated: dict[tuple[str, str], Callable[[], Optional[int]]] = {}
    while True:
        msg = conn.recv()
        if msg is None:
            return
        kind, key = msg
        try:
            if kind.startswith("single_task"):
                # The decorated function, as a task would use it: its body's first act is the stamp.
                job = decorated.get((kind, key))
                if job is None:
                    job = single_run(key=key, client=client, on_busy="wait")(_stamp)
                    decorated[(kind, key)] = job
                conn.send("calling")
                stamp = job()
                if stamp is None:
                    raise RuntimeError("the waiting call returned without running")
            else:
                make = lock_for(kind, client, key)
                conn.send("calling")
                with make():
                    stamp = time.monotonic_ns()
            conn.send(stamp)
        except Exception as exc:
            conn.send(f"error: {type(exc).__name__}: {exc}")


@dataclass
class HandoffResult:
    samples_ns: list[int] = field(default_factory=list)
    error: Optional[str] = None

    def ms(self, q: float) -> float:
        return percentile(self.samples_ns, q) / 1e6


def _blocked_clients(probe: redis.Redis) -> int:
    return int(probe.info("clients").get("blocked_clients", 0))


def measure_handoffs(host: str, port: int, rounds: int, seed: int = 7) -> dict[str, HandoffResult]:
    """``rounds`` samples per waiter kind, interleaved: one sample of each kind per round."""
    results = {w.name: HandoffResult() for w in WAITERS}
    holder_client = redis.Redis(host=host, port=port)
    probe = redis.Redis(host=host, port=port)
    makers: dict[str, Callable[[], ContextManager[Any]]] = {}
    for i, waiter in enumerate(WAITERS):
        try:
            makers[waiter.name] = lock_for(waiter.name, holder_client, f"bench:handoff:{i}")
        except Unavailable as exc:
            results[waiter.name].error = str(exc)
    rng = random.Random(seed)
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_waiter_process, args=(theirs, host, port), daemon=True, name="bench-waiter")
    proc.start()
    try:
        for _ in range(rounds):
            for i, waiter in enumerate(WAITERS):
                result = results[waiter.name]
                if waiter.name not in makers or result.error:
                    continue
                key = f"bench:handoff:{i}"
                try:
                    sample = _one_handoff(ours, makers[waiter.name], waiter, key, probe, rng)
                except Exception as exc:
                    result.error = f"{type(exc).__name__}: {exc}"
                    continue
                result.samples_ns.append(sample)
    finally:
        ours.send(None)
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return results


def _one_handoff(conn: Connection, make: Callable[[], ContextManager[Any]], waiter: Waiter, key: str,
                 probe: redis.Redis, rng: random.Random) -> int:
    with make():
        conn.send((waiter.name, key))
        if not conn.poll(10) or conn.recv() != "calling":
            raise RuntimeError("waiter did not start")
        time.sleep(rng.uniform(0.02, 0.07))
        if waiter.blocks_in_redis:
            deadline = time.monotonic() + 5
            while _blocked_clients(probe) < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError("waiter never blocked in Redis")
                time.sleep(0.001)
        released_at = time.monotonic_ns()
    if not conn.poll(30):
        raise RuntimeError("waiter did not get the lock within 30 s of the release")
    reply = conn.recv()
    if isinstance(reply, str):
        raise RuntimeError(reply)
    return int(reply) - released_at
