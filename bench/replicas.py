"""``replicas=1``: an uncontended cycle against a master with one real replica attached.

A master and a replica (``--replicaof``, the pair tests/test_replicas.py starts) on servers of
their own. With ``replicas=1`` single_task sends the acquire script and ``WAIT 1 <timeout>`` in one
pipeline; the release is not waited for. Interleaved round by round, each contender on its own key
and its own client of the master:

* single_task with ``replicas=1``, and the same cycle with ``replicas=0`` on the same master (whose
  writes still reach the replica, asynchronously);
* the floor (SET NX PX + EVALSHA compare-and-delete, as in contenders.py), and the floor with
  ``WAIT 1`` pipelined after its SET: what making the acquisition wait for a replica costs
  without single_task.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Optional

from bench import contenders
from bench.contenders import COMPARE_AND_DELETE, TTL_MS, Env
from bench.measure import Counts, Cycle, Timed, count_commands, run_interleaved
from single_task import single_run
from support.redis_server import RedisServer

REPLICA_TIMEOUT_MS = 1000  # single_run's default replica_timeout (1.0 s), in WAIT's unit

FLOOR = "floor: SET NX PX + EVALSHA compare-and-delete"
FLOOR_WAIT = "floor + `WAIT 1 1000` pipelined with the SET"
ST0 = "single_task: `with single_run(..., replicas=0)`"
ST1 = "single_task: `with single_run(..., replicas=1)`"
NAMES = (FLOOR, FLOOR_WAIT, ST0, ST1)


@dataclass
class ReplicaResult:
    timed: dict[str, Timed] = field(default_factory=dict)
    counts: dict[str, Counts] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    sync_s: float = float("nan")  # from starting the replica to master_link_status:up
    lag_end: Optional[int] = None  # the replica's replication offset behind the master's, at the end
    error: Optional[str] = None


def build_floor_wait(env: Env, key: str) -> Cycle:
    client = env.client()
    sha = client.script_load(COMPARE_AND_DELETE)

    def cycle() -> None:
        token = contenders._token()
        pipe = client.pipeline(transaction=False)
        pipe.set(key, token, nx=True, px=TTL_MS)
        pipe.execute_command("WAIT", 1, REPLICA_TIMEOUT_MS)
        taken, acked = pipe.execute()
        if not taken or int(acked) < 1:
            raise RuntimeError(f"floor + WAIT: {key!r} taken={taken!r}, acked by {acked!r} replica(s)")
        if client.evalsha(sha, 1, key, token) != 1:
            raise RuntimeError(f"floor + WAIT: {key!r} was not ours at release")

    return cycle


def _build_st(replicas: int) -> Any:
    def build(env: Env, key: str) -> Cycle:
        client = env.client()

        def cycle() -> None:
            with single_run(key=key, client=client, replicas=replicas):
                pass

        return cycle

    return build


BUILDERS = {FLOOR: contenders.build_floor, FLOOR_WAIT: build_floor_wait, ST0: _build_st(0), ST1: _build_st(1)}


def start_replica(master: RedisServer, timeout: float = 10.0) -> tuple[RedisServer, float]:
    """A replica of ``master``, started and synced (master_link_status:up); and how long that took."""
    started = time.monotonic()
    replica = RedisServer("--replicaof", "127.0.0.1", str(master.port)).start()
    try:
        probe = replica.client()
        deadline = started + timeout
        while probe.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replica did not sync within {timeout:.0f}s")
            time.sleep(0.02)
        probe.close()
    except BaseException:
        replica.__exit__(None, None, None)
        raise
    return replica, time.monotonic() - started


def _offsets(master: Any, replica: Any) -> int:
    return int(master.info("replication")["master_repl_offset"]) - int(
        replica.info("replication")["slave_repl_offset"])


def measure_replicas(rounds: int, batch: int, count_cycles: int) -> ReplicaResult:
    result = ReplicaResult()
    try:
        with ExitStack() as stack:
            # No 5 s wait for more replicas before the initial (diskless) sync: only start-up changes.
            master = stack.enter_context(RedisServer("--repl-diskless-sync-delay", "0"))
            replica, result.sync_s = start_replica(master)
            stack.callback(replica.__exit__, None, None, None)
            _measure(result, master, replica, stack, rounds, batch, count_cycles)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _build(result: ReplicaResult, env: Env, phase: str) -> dict[str, Cycle]:
    cycles: dict[str, Cycle] = {}
    for i, (name, build) in enumerate(BUILDERS.items()):
        try:
            cycles[name] = build(env, f"bench:replicas:{phase}:{i}")
        except Exception as exc:
            result.unavailable[name] = f"failed to set up: {type(exc).__name__}: {exc}"
    return cycles


def _measure(result: ReplicaResult, master: RedisServer, replica: RedisServer, stack: ExitStack, rounds: int,
             batch: int, count_cycles: int) -> None:
    probe, replica_probe = master.client(), replica.client()
    if int(probe.info("replication")["connected_slaves"]) != 1:
        raise RuntimeError("the master does not see its replica")
    env = Env("127.0.0.1", master.port, stack)
    for name, cycle in _build(result, env, "count").items():
        try:
            for _ in range(5):
                cycle()
            result.counts[name] = count_commands(cycle, probe, count_cycles)
        except Exception as exc:
            result.unavailable[name] = f"failed while counting: {type(exc).__name__}: {exc}"
    result.timed = run_interleaved(_build(result, env, "time"), rounds, batch)
    time.sleep(0.1)
    result.lag_end = _offsets(probe, replica_probe)
