"""``python -m bench``: every phase of the benchmark, one run, one report.

Phases, in order (each on redis-servers this run started on free loopback ports):

1. 10,000 distinct keys acquired and released on a server of their own (early, so that their
   expiries pass while the rest runs; checked again at the end).
2. Commands and round trips per cycle of every contender (counting only, not timed).
3. Cycle latency of every contender, interleaved round by round.
4. Hand-off latency to a waiter in another process, interleaved.
5. single_task's own Python cost (stub client) and a cProfile of its decorated call.
6. Script cache: cold, warm, after a Redis restart, after SCRIPT FLUSH (a server of its own).
7. 1,000 leases held at once in one process: renewal traffic, threads, CPU.
8. Producer side: ``send_once`` refusing a duplicate, publishing, and plain ``delay()`` (a server
   of its own, no worker), interleaved.
9. ``replicas=1`` against a master with one real replica, next to ``replicas=0`` and the floor
   (a master and a replica of their own), interleaved.
10. Celery end-to-end: real workers (solo, prefork) draining no-op tasks, decorated vs not.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Optional

from bench import contenders, costs, e2e, handoff, producer, replicas, report, scale
from bench.measure import Counts, Timed, count_commands, run_interleaved
from support.redis_server import RedisServer, redis_server_binary


@dataclass(frozen=True)
class Plan:
    rounds: int  # latency: rounds of interleaving
    batch: int  # latency: cycles per contender per round
    count_cycles: int  # cycles per contender under the command counters
    handoff_rounds: int
    profile_cycles: int
    stub_cycles: int
    held_leases: int
    held_ttl: float
    held_window_s: float
    many_keys: int
    many_keys_ttl: float
    expiry_wait_s: float  # longest wait at the end for the many keys' expiries (0: not waited)
    e2e_tasks: int
    e2e_rounds: int
    producer_batch: int  # send_once phase: calls per contender per round (plan.rounds rounds)
    replica_batch: int  # replicas=1 phase: cycles per contender per round (plan.rounds rounds)


FULL = Plan(rounds=60, batch=100, count_cycles=500, handoff_rounds=60, profile_cycles=20_000, stub_cycles=50_000,
            held_leases=1000, held_ttl=3.0, held_window_s=5.0, many_keys=10_000, many_keys_ttl=1.0,
            expiry_wait_s=90.0, e2e_tasks=3000, e2e_rounds=3, producer_batch=50, replica_batch=100)
QUICK = Plan(rounds=6, batch=20, count_cycles=50, handoff_rounds=4, profile_cycles=2000, stub_cycles=5000,
             held_leases=200, held_ttl=3.0, held_window_s=1.5, many_keys=1000, many_keys_ttl=1.0,
             expiry_wait_s=0.0, e2e_tasks=300, e2e_rounds=1, producer_batch=10, replica_batch=20)

E2E_POOLS = [("solo", 1), ("prefork", 2)]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke test); writes no file")
    parser.add_argument("--output", help=f"write the Markdown here (default: {RESULTS} for a full run)")
    parser.add_argument("--skip-e2e", action="store_true", help="leave out the Celery end-to-end phase")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    plan = QUICK if args.quick else FULL
    command = "python -m bench" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    # Expected outcomes (a busy key, a dropped rerun at teardown) log WARNINGs in some libraries;
    # printing them would time the terminal. Logging is turned off below ERROR for all alike.
    logging.disable(logging.WARNING)
    started = time.monotonic()
    data: dict[str, Any] = {"plan": plan, "command": command, "binary": redis_server_binary(),
                            "loadavg_start": os.getloadavg()}
    with ExitStack() as servers:
        main_server = servers.enter_context(RedisServer())
        keys_server = servers.enter_context(RedisServer())
        cache_server = servers.enter_context(RedisServer())
        data["redis_version"] = main_server.client().info("server")["redis_version"]
        host, port = "127.0.0.1", main_server.port

        _log(f"1/10 {plan.many_keys} distinct keys (ttl {plan.many_keys_ttl}s)")
        data["many_keys"] = scale.many_keys(keys_server, plan.many_keys, plan.many_keys_ttl)

        _log("2/10 commands and round trips per cycle")
        data["counts"], data["unavailable"] = _count_phase(host, port, main_server, plan)

        _log(f"3/10 cycle latency, {plan.rounds} interleaved rounds of {plan.batch}")
        data["timed"] = _timing_phase(host, port, plan)

        _log(f"4/10 hand-off latency, {plan.handoff_rounds} interleaved rounds")
        data["handoff"] = handoff.measure_handoffs(host, port, plan.handoff_rounds)

        _log("5/10 single_task's own Python cost, and a profile")
        data["python_cost"] = costs.python_cost(plan.stub_cycles)
        data["profile"] = costs.profile_decorated(host, port, plan.profile_cycles)

        _log("6/10 script cache: cold, warm, restart, SCRIPT FLUSH")
        data["cache"] = scale.script_cache(cache_server)

        _log(f"7/10 {plan.held_leases} leases held at once")
        main_server.client().flushall()
        data["held"] = scale.held_leases(main_server, plan.held_leases, plan.held_ttl, plan.held_window_s)

        _log(f"8/10 producer side: send_once vs delay(), {plan.rounds} interleaved rounds of {plan.producer_batch}")
        with RedisServer() as broker:
            data["producer"] = producer.measure_producer(broker, plan.rounds, plan.producer_batch, plan.count_cycles)

        _log(f"9/10 replicas=1 against a master with one replica, {plan.rounds} interleaved rounds of "
             f"{plan.replica_batch}")
        data["replicas"] = replicas.measure_replicas(plan.rounds, plan.replica_batch, plan.count_cycles)

        if args.skip_e2e:
            data["e2e"] = None
        else:
            _log(f"10/10 Celery end-to-end: {plan.e2e_tasks} tasks x {plan.e2e_rounds} rounds per pool and variant")
            main_server.client().flushall()
            data["e2e"] = e2e.run_e2e(main_server.url, plan.e2e_tasks, plan.e2e_rounds, E2E_POOLS)

        if plan.expiry_wait_s:
            _log("waiting for the many keys' expiries to pass")
        scale.after_expiry(keys_server, data["many_keys"], plan.expiry_wait_s)

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


def _count_phase(host: str, port: int, server: RedisServer, plan: Plan) -> tuple[dict[str, Counts], dict[str, str]]:
    probe = server.client()
    counts: dict[str, Counts] = {}
    with ExitStack() as stack:
        env = contenders.Env(host, port, stack)
        cycles, unavailable = contenders.build_all(env, "count")
        for name, cycle in cycles.items():
            try:
                for _ in range(5):
                    cycle()
                counts[name] = count_commands(cycle, probe, plan.count_cycles)
            except Exception as exc:
                unavailable[name] = f"failed while counting: {type(exc).__name__}: {exc}"
    return counts, unavailable


def _timing_phase(host: str, port: int, plan: Plan) -> dict[str, Timed]:
    with ExitStack() as stack:
        env = contenders.Env(host, port, stack)
        cycles, _ = contenders.build_all(env, "time")
        return run_interleaved(cycles, plan.rounds, plan.batch)
