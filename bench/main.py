"""``python -m bench``: every phase of the benchmark, one run, one report.

Phases, in order (each on redis-servers this run started on free loopback ports):

1. 10,000 distinct keys acquired and released on a server of their own (early, so that their
   expiries pass while the rest runs; checked again at the end).
2. Lock cycle latency of every contender, interleaved round by round, in child processes: once
   with redis-py's pure-Python parser and once with hiredis (when installed), legs alternating;
   the first leg of each also counts commands, round trips, server time (``INFO commandstats``)
   and server CPU per cycle. See ``bench/latency.py``.
3. Hand-off latency to a waiter in another process, interleaved.
4. A cProfile of single_task's decorated call (by function and by package).
5. Script cache: cold, warm, after a Redis restart, after SCRIPT FLUSH (a server of its own).
6. 1,000 leases held at once in one process: renewal traffic, threads, CPU.
7. Producer side: ``send_once`` refusing a duplicate, publishing, and plain ``delay()`` (a server
   of its own, no worker), interleaved.
8. ``replicas=1`` against a master with one real replica, next to ``replicas=0`` and the floor
   (a master and a replica of their own), interleaved.
9. What the producer-side features cost an uncontended call that uses none of them: the decorated
   call and the ``with`` block of single_task.py just before those features, after each of their
   four commits (from git), and of the working tree, interleaved in one child process (a server of
   its own). See ``bench/features.py``.
10. Celery end-to-end: real workers (solo, prefork) draining no-op tasks, undecorated vs the floor
    lock inline vs decorated, interleaved segment by segment in one worker per run.

A phase that fails is reported as failed, with its error, and the run goes on with the next one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Optional

from bench import costs, e2e, features, handoff, latency, producer, replicas, report, scale
from support.redis_server import RedisServer, redis_server_binary


@dataclass(frozen=True)
class Plan:
    rounds: int  # latency: rounds of interleaving per parser (split over the legs)
    legs: int  # latency: child processes per parser, alternating with the other parser's
    batch: int  # latency: cycles per contender per round
    count_cycles: int  # cycles per contender under the command and server-time counters
    handoff_rounds: int
    profile_cycles: int
    held_leases: int
    held_ttl: float
    held_window_s: float
    many_keys: int
    many_keys_ttl: float
    expiry_wait_s: float  # longest wait at the end for the many keys' expiries (0: not waited)
    e2e_pools: tuple[tuple[str, int, int, int, int], ...]  # (pool, concurrency, runs, rounds, tasks per segment)
    e2e_warmup: int  # tasks of each variant before the first mark of a run
    side_rounds: int  # rounds of the send_once and replicas phases
    producer_batch: int  # send_once phase: calls per contender per round
    replica_batch: int  # replicas=1 phase: cycles per contender per round
    features_rounds: int  # producer features phase: rounds of interleaving
    features_batch: int  # producer features phase: cycles per contender per round
    features_windows: int  # producer features phase: counted windows per contender (count_cycles each)


FULL = Plan(rounds=320, legs=4, batch=25, count_cycles=1000, handoff_rounds=60, profile_cycles=20_000,
            held_leases=1000, held_ttl=3.0, held_window_s=5.0, many_keys=10_000, many_keys_ttl=1.0,
            expiry_wait_s=90.0, e2e_pools=(("solo", 1, 3, 5, 2000), ("prefork", 2, 1, 3, 2000)), e2e_warmup=100,
            side_rounds=60, producer_batch=50, replica_batch=100, features_rounds=120, features_batch=25,
            features_windows=3)
QUICK = Plan(rounds=4, legs=2, batch=20, count_cycles=50, handoff_rounds=4, profile_cycles=2000,
             held_leases=200, held_ttl=3.0, held_window_s=1.5, many_keys=1000, many_keys_ttl=1.0,
             expiry_wait_s=0.0, e2e_pools=(("solo", 1, 1, 2, 100), ("prefork", 2, 1, 1, 100)), e2e_warmup=20,
             side_rounds=6, producer_batch=10, replica_batch=20, features_rounds=3, features_batch=10,
             features_windows=1)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
PHASES = 10


@dataclass
class PhaseError:
    """What a phase raised instead of returning its result."""

    phase: str
    error: str
    where: str  # the last frames of the traceback

    def __str__(self) -> str:
        return f"{self.error} ({self.where})" if self.where else self.error


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke test); writes no file")
    parser.add_argument("--output", help=f"write the Markdown here (default: {RESULTS} for a full run)")
    parser.add_argument("--skip-e2e", action="store_true", help="leave out the Celery end-to-end phase")
    return parser.parse_args(argv)


def _phase(data: dict[str, Any], key: str, n: int, label: str, fn: Callable[[], Any]) -> None:
    _log(f"{n}/{PHASES} {label}")
    started = time.monotonic()
    try:
        data[key] = fn()
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)[-2:]
        where = " ← ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(frames))
        data[key] = PhaseError(label, f"{type(exc).__name__}: {exc}", where)
        _log(f"  phase failed: {data[key]}")
    data.setdefault("phase_seconds", {})[key] = time.monotonic() - started


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    plan = QUICK if args.quick else FULL
    command = "python -m bench" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    # Expected outcomes (a busy key, a dropped rerun at teardown) log WARNINGs in some libraries;
    # printing them would time the terminal. Logging is turned off below ERROR for all alike.
    logging.disable(logging.WARNING)
    started = time.monotonic()
    data: dict[str, Any] = {"plan": plan, "command": command, "binary": redis_server_binary(),
                            "loadavg_start": os.getloadavg(), "hiredis": latency.hiredis_installed()}
    with ExitStack() as servers:
        main_server = servers.enter_context(RedisServer())
        keys_server = servers.enter_context(RedisServer())
        cache_server = servers.enter_context(RedisServer())
        data["redis_version"] = main_server.client().info("server")["redis_version"]
        host, port = "127.0.0.1", main_server.port

        _phase(data, "many_keys", 1, f"{plan.many_keys} distinct keys (ttl {plan.many_keys_ttl}s)",
               lambda: scale.many_keys(keys_server, plan.many_keys, plan.many_keys_ttl))

        _phase(data, "latency", 2, f"cycle latency, {plan.rounds} interleaved rounds of {plan.batch} per parser, "
                                   f"in {plan.legs} legs each",
               lambda: latency.measure_latency(host, port, plan.rounds, plan.batch, plan.count_cycles, plan.legs,
                                               _log))

        _phase(data, "handoff", 3, f"hand-off latency, {plan.handoff_rounds} interleaved rounds",
               lambda: handoff.measure_handoffs(host, port, plan.handoff_rounds))

        _phase(data, "profile", 4, "a profile of single_task's decorated call",
               lambda: costs.profile_decorated(host, port, plan.profile_cycles))

        _phase(data, "cache", 5, "script cache: cold, warm, restart, SCRIPT FLUSH",
               lambda: scale.script_cache(cache_server))

        def held() -> Any:
            main_server.client().flushall()
            return scale.held_leases(main_server, plan.held_leases, plan.held_ttl, plan.held_window_s)

        _phase(data, "held", 6, f"{plan.held_leases} leases held at once", held)

        def send() -> Any:
            with RedisServer() as broker:
                return producer.measure_producer(broker, plan.side_rounds, plan.producer_batch, plan.count_cycles)

        _phase(data, "producer", 7, f"producer side: send_once vs delay(), {plan.side_rounds} interleaved rounds "
                                    f"of {plan.producer_batch}", send)

        _phase(data, "replicas", 8, f"replicas=1 against a master with one replica, {plan.side_rounds} interleaved "
                                    f"rounds of {plan.replica_batch}",
               lambda: replicas.measure_replicas(plan.side_rounds, plan.replica_batch, plan.count_cycles))

        def features_off() -> Any:
            with RedisServer() as server:
                return features.measure_features("127.0.0.1", server.port, plan.features_rounds,
                                                 plan.features_batch, plan.count_cycles, plan.features_windows)

        _phase(data, "features", 9, f"producer features unused: before them, after them, HEAD, "
                                    f"{plan.features_rounds} interleaved rounds of {plan.features_batch}", features_off)

        if args.skip_e2e:
            data["e2e"] = None
        else:
            def celery_e2e() -> Any:
                main_server.client().flushall()
                return e2e.run_e2e(main_server.url, list(plan.e2e_pools), plan.e2e_warmup, log=_log)

            _phase(data, "e2e", 10, "Celery end-to-end: " + "; ".join(
                f"{p} {runs} run(s) × {rounds} rounds × {tasks} tasks per variant"
                for p, _c, runs, rounds, tasks in plan.e2e_pools), celery_e2e)

        if plan.expiry_wait_s:
            _log("waiting for the many keys' expiries to pass")
        if not isinstance(data.get("many_keys"), PhaseError):
            try:
                scale.after_expiry(keys_server, data["many_keys"], plan.expiry_wait_s)
            except Exception as exc:
                data["many_keys"].error = f"after the expiries: {type(exc).__name__}: {exc}"

    data["loadavg_end"] = os.getloadavg()
    data["seconds"] = time.monotonic() - started
    text = report.render(data)
    print(text)
    output = args.output or (None if args.quick else RESULTS)
    if output:
        with open(output, "w") as f:
            f.write(text)
        _log(f"written to {output}")
    return 0
