"""Chaos run: real Celery workers, a real redis-server, faults on a schedule, and a verdict.

    python -m chaos.run            # the quick run (about a minute and a half), what CI runs
    python -m chaos.run --long     # the same with a longer flood and five times the faults

It starts three things of its own: the lock's redis-server (the one the faults hit), a second
redis-server as the Celery broker (so that the queue survives the lock server's restarts and the
number of tasks stays countable), and two prefork workers (concurrency 4) running chaos/app.py.
It floods tasks under the policies skip, wait, rerun and rerun with acks_late, injects faults,
waits for the queue to drain, then judges the record (chaos/check.py) and prints the verdict as
Markdown, which it also writes to chaos/RESULTS.md. Exit status 0 only if every check passed.
See chaos/README.md for what each check means.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import redis
from celery import Celery

from chaos import check
from chaos.app import POLICIES
from single_task import SingleTaskError, single_run
from support.redis_server import RedisServer
from support.worker import CeleryWorker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TTL = 2.0
SLACK = 0.5
PAUSE_S = 3.5  # > ttl, so every lease expires while the server is stopped; < the 10 s socket timeout
VISIBILITY_TIMEOUT = 60.0  # > the longest a message is held: a rerun chain under the flood reached 38 s
LEASE_PREFIX = "single_task:"

# The cycle of faults, at seconds into the flood. The quick run plays it once; the long run plays
# it five times, each cycle shuffled, 44 s apart. Faults never overlap, so each one's recovery is
# measured on its own. A whole worker is killed early so that its unacked messages come back
# (after VISIBILITY_TIMEOUT) while the flood is still on.
CYCLE: list[tuple[float, str]] = [
    (3.0, "child_kill"),
    (6.0, "worker_kill"),
    (14.0, "client_kill"),
    (17.0, "pause"),
    (24.0, "child_kill"),
    (27.0, "restart"),
    (32.0, "client_kill"),
    (35.0, "child_kill"),
    (39.0, "child_kill"),
]
CYCLE_S = 44.0



def holder_pid(holder: str) -> int | None:
    """The pid in a lease's holder field, which single_task writes as "pid@host"."""
    pid = holder.partition("@")[0]
    return int(pid) if pid.isdigit() else None


@dataclass
class Mode:
    name: str
    flood_s: float
    cycles: int


MODES = {"quick": Mode("quick", 44.0, 1), "long": Mode("long", 5 * CYCLE_S, 5)}

# A chain of reruns holds its message for as long as requests keep coming during its runs (each
# rerun has the holder's arguments: 4-5.5 s when the holder is a long one). An acks_late message
# held longer than the visibility timeout is delivered again while it runs, and the requests its
# second delivery owes are lost if that one is then killed (the first has acknowledged the
# message): with bursts alone, a chain of eleven long runs held one for 64 s. So the bursts on a
# durable key come in busy spells (a burst starts at most DURABLE_BUSY_S into one and lasts 2 s at
# most), each followed by DURABLE_REST_S without a call: longer than two of the longest runs plus
# a pause and a dead lease's ttl (2 x 5.5 + 3.5 + 2 = 16.5 s), so no chain spans two spells, and
# no message is held much past 5.5 (a run begun before the spell) + 24 + 2 + 16.5 = 48 s (< 60 s).
# The check "no acks_late message delivered twice while it ran" confirms it on every run.
DURABLE_BUSY_S = 24.0
DURABLE_REST_S = 20.0

# Per policy: burst size (min, max), seconds between bursts (min, max), share of long runs.
BURSTS = {
    "skip": ((1, 8), (0.5, 3.0), 0.2),
    "wait": ((1, 3), (2.0, 5.0), 0.1),
    "rerun": ((1, 8), (0.5, 6.0), 0.2),
    "rerun_durable": ((1, 8), (0.5, 6.0), 0.2),
}


def plan_flood(rng: random.Random, flood_s: float) -> list[dict[str, Any]]:
    """Bursts of calls per key, separated by quiet gaps (which is what makes a rerun check bite:
    the last request of a burst can only be kept by the holder running once more)."""
    sends: list[dict[str, Any]] = []
    for policy, (_task, prefix, nkeys) in POLICIES.items():
        (bmin, bmax), (gmin, gmax), long_share = BURSTS[policy]
        for n in range(nkeys):
            t = rng.uniform(0.0, 1.0)
            spell = t
            while t < flood_s:
                if policy == "rerun_durable" and t - spell > DURABLE_BUSY_S:
                    t += DURABLE_REST_S  # let every chain end before the next busy spell
                    spell = t
                    if t >= flood_s:
                        break
                for _ in range(rng.randint(bmin, bmax)):
                    if rng.random() < long_share:
                        seconds = rng.uniform(2.0 * TTL, 2.75 * TTL)  # renewal has to carry these
                    else:
                        seconds = rng.uniform(0.05, 0.6 * TTL)
                    sends.append({"t": t, "policy": policy, "key": f"{prefix}:{n}", "n": n,
                                  "seconds": round(seconds, 3), "id": f"c{len(sends)}"})
                    t += rng.uniform(0.0, 0.25)
                t += rng.uniform(gmin, gmax)
    sends.sort(key=lambda s: s["t"])
    return [s for s in sends if s["t"] < flood_s]


def plan_faults(rng: random.Random, mode: Mode) -> list[tuple[float, str]]:
    plan = []
    for c in range(mode.cycles):
        kinds = [k for _, k in CYCLE]
        if c:
            rng.shuffle(kinds)
            kinds.remove("worker_kill")
            kinds.insert(1, "worker_kill")  # keep it early in the cycle: its messages come back late
        plan += [(c * CYCLE_S + t, k) for (t, _), k in zip(CYCLE, kinds)]
    return plan


class Deadline(Exception):
    pass


class ChaosRun:
    def __init__(self, mode: Mode, seed: int, record_dir: str) -> None:
        self.mode, self.seed, self.dir = mode, seed, record_dir
        self.rng = random.Random(seed)
        self.lock = RedisServer()
        self.broker = RedisServer()
        self.workers: list[CeleryWorker] = []
        self.all_workers: list[CeleryWorker] = []
        self.sent: list[dict[str, Any]] = []
        self.faults: list[dict[str, Any]] = []
        self.kills: dict[int, float] = {}
        self.final_free_s: Optional[float] = None
        self.errors: list[str] = []
        self.t_start = 0.0

    # -- setup and teardown ------------------------------------------------------------------

    def start(self) -> None:
        self.lock.start()
        self.broker.start()
        self.producer = Celery("chaos-producer", broker=self.broker.url)
        self.producer.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
        self.probe_client = redis.Redis(host="127.0.0.1", port=self.lock.port, socket_timeout=1.0,
                                        socket_connect_timeout=1.0)
        self.watch = redis.Redis(host="127.0.0.1", port=self.lock.port, socket_timeout=2.0, decode_responses=True)
        self.brokerc = redis.Redis(host="127.0.0.1", port=self.broker.port, socket_timeout=5.0)
        starters = [threading.Thread(target=self._start_worker, args=(i,)) for i in range(2)]
        for s in starters:
            s.start()
        for s in starters:
            s.join(120)
        if len(self.workers) != 2:
            raise RuntimeError(f"workers did not start: {self.errors}")

    def _start_worker(self, index: int) -> Optional[CeleryWorker]:
        worker = CeleryWorker("chaos.app", self.broker.url, pool="prefork", concurrency=4,
                              name=f"chaos{index}-{time.monotonic_ns()}@%h",
                              env={"SINGLE_TASK_REDIS_URL": self.lock.url, "CHAOS_RECORD_DIR": self.dir,
                                   "CHAOS_TTL": str(TTL), "CHAOS_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT)})
        self.all_workers.append(worker)
        try:
            worker.start(timeout=90)
        except RuntimeError as exc:
            self.errors.append(str(exc))
            return None
        self.workers.append(worker)
        return worker

    def stop(self, keep_logs: bool) -> list[str]:
        for w in self.all_workers:
            w.stop(timeout=10)
        for server in (self.lock, self.broker):
            server.__exit__()
        logs = [w.logfile for w in self.all_workers]
        if not keep_logs:
            for path in logs:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        return logs

    # -- the flood -----------------------------------------------------------------------------

    def flood(self, plan: list[dict[str, Any]], stop: threading.Event) -> None:
        for s in plan:
            wait = self.t_start + s["t"] - time.monotonic()
            if wait > 0 and stop.wait(wait):
                return
            try:
                self.producer.send_task(POLICIES[s["policy"]][0], args=(s["n"], s["seconds"], s["id"]))
            except Exception as exc:  # the broker is never faulted; count it, do not stop
                self.errors.append(f"send failed: {exc!r}")
                continue
            self.sent.append({**s, "t_sent": time.monotonic()})

    # -- faults --------------------------------------------------------------------------------

    def inject(self, plan: list[tuple[float, str]], stop: threading.Event) -> None:
        for offset, kind in plan:
            wait = self.t_start + offset - time.monotonic()
            if wait > 0 and stop.wait(wait):
                return
            try:
                fault = getattr(self, "fault_" + kind)()
            except Exception as exc:
                self.errors.append(f"fault {kind} failed: {exc!r}")
                continue
            fault["kind"] = kind
            self.faults.append(fault)

    def _active_pids(self) -> set[int]:
        """Pids that are inside a run right now, from the record."""
        started: dict[tuple[int, str, int], int] = {}
        for path in os.listdir(self.dir):
            try:
                with open(os.path.join(self.dir, path), encoding="utf-8") as f:
                    for line in f:
                        if not line.endswith("\n"):
                            continue
                        ev = json.loads(line)
                        if ev["ev"] == "start":
                            started[(ev["pid"], ev["id"], ev["it"])] = ev["pid"]
                        elif ev["ev"] == "end":
                            started.pop((ev["pid"], ev["id"], ev["it"]), None)
            except OSError:
                continue
        return set(started.values())

    def _held_by(self, pids: set[int]) -> dict[str, dict[str, Any]]:
        """Lease keys whose holder is one of ``pids``: token, holder pid, fence, Celery task id, whether
        a rerun is owed, and when the lease runs out (monotonic; nothing renews a dead holder's)."""
        held = {}
        for name in self.watch.scan_iter(match=LEASE_PREFIX + "{*", count=200):
            if not name.endswith("}"):
                continue  # a companion key (fence, queue, hand-off)
            pipe = self.watch.pipeline(transaction=True)
            pipe.hmget(name, "t", "h", "f", "i", "r")
            pipe.pttl(name)
            (t, h, f, i, r), pttl = pipe.execute()
            seen = time.monotonic()
            pid = holder_pid(h) if h else None
            if t and pid in pids:
                held[name] = {"token": t, "key": name[len(LEASE_PREFIX) + 1:-1], "pid": pid,
                              "fence": int(f) if f and f.isdigit() else 0, "task": i or None, "rerun": bool(r),
                              "expires": seen + max(int(pttl), 0) / 1000.0}
        return held

    def _wait_free(self, held: dict[str, dict[str, Any]], since: float, limit: float) -> Optional[float]:
        """Seconds from ``since`` until none of ``held`` is still held by the same token."""
        if not held:
            return None
        for _ in range(int(limit / 0.02) + 1):
            try:
                still = [k for k, lease in held.items() if self.watch.hget(k, "t") == lease["token"]]
            except redis.RedisError:
                still = list(held)
            if not still:
                return time.monotonic() - since
            if time.monotonic() - since > limit:
                break
            time.sleep(0.02)
        return None

    def _probe(self, since: float, limit: float = 30.0) -> Optional[float]:
        """Seconds from ``since`` until a lease on a key of the probe's own can be taken and given back."""
        spec = single_run(key="chaos-probe", ttl=TTL, client=self.probe_client, on_busy="raise")
        for _ in range(int(limit / 0.02) + 1):
            try:
                with spec:
                    pass
                return time.monotonic() - since
            except (SingleTaskError, redis.RedisError):
                if time.monotonic() - since > limit:
                    return None
                time.sleep(0.02)
        return None

    def _kill(self, pids: list[int], worker: Optional[CeleryWorker] = None) -> tuple[float, dict[str, dict[str, Any]]]:
        held = self._held_by(set(pids))
        if worker is not None:
            worker.kill()
        else:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        t = time.monotonic()
        for pid in pids:
            self.kills.setdefault(pid, t)  # a run of a killed pid ended at its first kill
        return t, held

    def _look_again(self, pids: list[int], held: dict[str, dict[str, Any]]) -> None:
        """Complete the leases seen just before the kill with a look after it: a holder can take a
        key between the first look and the kill, and a lease it still renewed then runs out later
        than the first look says. Once the holder is dead, its leases change no more (but for a
        rerun asked of them), so one look after the kill (and the probe) sees each one that is left.
        ``after`` is False for a lease the second look no longer found (given back before the kill,
        or already run out); its ``expires`` is then only a lower bound."""
        try:
            after = self._held_by(set(pids))
        except redis.RedisError:
            return
        for lease in held.values():
            lease["after"] = False
        for name, lease in after.items():
            before = held.get(name)
            if before is not None and before["token"] == lease["token"]:
                lease["seen_before"] = True
            held[name] = {**lease, "after": True}

    @staticmethod
    def _dead_leases(held: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in lease.items() if k != "token"} for _, lease in sorted(held.items())]

    def _owing_pids(self, prefix: str) -> set[int]:
        """Pids holding a lease of a ``prefix`` key on which a rerun was requested (field 'r')."""
        pids = set()
        for name in self.watch.scan_iter(match=LEASE_PREFIX + "{" + prefix + ":*", count=200):
            if name.endswith("}"):
                r, h = self.watch.hmget(name, "r", "h")
                pid = holder_pid(h) if r and h else None
                if pid is not None:
                    pids.add(pid)
        return pids

    def fault_child_kill(self) -> dict[str, Any]:
        """SIGKILL one pool child. Every other kill aims at a holder that owes a rerun (of the
        plain and the durable rerun keys in turn), the case the rerun checks are about."""
        # A child killed before may still be listed until its worker reaps it: never aim at it again.
        children = {pid: w for w in self.workers for pid in w.child_pids() if pid not in self.kills}
        self.child_kills = getattr(self, "child_kills", 0) + 1
        target = "any"
        pool: list[int] = []
        if self.child_kills % 2:
            prefix = POLICIES["rerun_durable" if self.child_kills % 4 == 1 else "rerun"][1]
            for _ in range(40):  # look for one for up to 2 s
                pool = sorted(self._owing_pids(prefix) & set(children))
                if pool:
                    target = f"holder of {prefix}:* owing a rerun"
                    break
                time.sleep(0.05)
        if not pool:
            pool = sorted(self._active_pids() & set(children))
            target = "a child inside a run"
        if not pool:
            pool = sorted(children)
            target = "any child (none was inside a run)"
        if not pool:
            raise RuntimeError("no worker child to kill")
        pid = self.rng.choice(pool)
        t, held = self._kill([pid])
        probe = self._probe(t)
        self._look_again([pid], held)
        dead_free = self._wait_free(held, t, 3 * TTL)
        return {"t0": t, "t1": t, "pids": [pid], "target": target, "dead_keys": sorted(held),
                "dead_leases": self._dead_leases(held), "dead_free_s": dead_free, "probe_s": probe}

    def fault_worker_kill(self) -> dict[str, Any]:
        worker = self.rng.choice(self.workers)
        assert worker.proc is not None
        pids = [worker.proc.pid, *worker.child_pids()]
        t, held = self._kill(pids, worker)
        self.workers.remove(worker)
        probe = self._probe(t)
        self._look_again(pids, held)
        dead_free = self._wait_free(held, t, 3 * TTL)
        index = len(self.all_workers)
        replacement = self._start_worker(index)
        return {"t0": t, "t1": t, "pids": pids, "dead_keys": sorted(held), "dead_leases": self._dead_leases(held),
                "dead_free_s": dead_free, "probe_s": probe,
                "restart_s": time.monotonic() - t if replacement else None}

    def fault_pause(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self.lock.pause()
        time.sleep(PAUSE_S)
        self.lock.resume()
        t1 = time.monotonic()
        return {"t0": t0, "t1": t1, "probe_s": self._probe(t1)}

    def fault_restart(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self.lock.restart()
        t1 = time.monotonic()
        return {"t0": t0, "t1": t1, "probe_s": self._probe(t1)}

    def fault_client_kill(self) -> dict[str, Any]:
        t0 = time.monotonic()
        killed = self.watch.client_kill_filter(_type="normal", skipme=True)
        t1 = time.monotonic()
        return {"t0": t0, "t1": t1, "connections": killed, "probe_s": self._probe(t1)}

    # -- the end -------------------------------------------------------------------------------

    def drain(self, limit: float) -> bool:
        """Wait until the queue is empty, no message is unacked and no run is going on."""
        quiet = 0
        end = time.monotonic() + limit
        while time.monotonic() < end:
            try:
                pending = int(self.brokerc.llen("celery")) + int(self.brokerc.hlen("unacked"))
            except redis.RedisError:
                pending = 1
            alive = self._active_pids() - set(self.kills)
            quiet = quiet + 1 if not pending and not alive else 0
            if quiet >= 3:
                return True
            time.sleep(0.5)
        return False

    def watch_keys_free(self, limit: float) -> Optional[float]:
        t = time.monotonic()
        for _ in range(int(limit / 0.05) + 1):
            names = [n for n in self.watch.scan_iter(match=LEASE_PREFIX + "{*", count=200)
                     if n.endswith("}") and "chaos-probe" not in n]
            if not names:
                return time.monotonic() - t
            if time.monotonic() - t > limit:
                return None
            time.sleep(0.05)
        return None


def write_results(path: str, mode: str, text: str) -> None:
    """Keep one section per mode in RESULTS.md, replacing this mode's."""
    begin, end = f"<!-- {mode}:begin -->", f"<!-- {mode}:end -->"
    old = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
    if not old:
        old = ("# Chaos run results\n\nWritten by `python -m chaos.run`; each mode replaces its own section. "
               "What the checks mean: [README.md](README.md).\n")
    section = f"{begin}\n## `--{mode}`\n\n{text}{end}"
    if begin in old and end in old:
        head, _, rest = old.partition(begin)
        _, _, tail = rest.partition(end)
        new = head + section + tail
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.run", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="one cycle of faults, about 90 s (the default)")
    group.add_argument("--long", action="store_true", help="five cycles of faults, about 5 minutes")
    parser.add_argument("--seed", type=int, default=None, help="seed for the flood and the faults")
    parser.add_argument("--keep", action="store_true", help="keep the record and the worker logs even on success")
    parser.add_argument("--results", default=os.path.join(ROOT, "chaos", "RESULTS.md"),
                        help="where to write the Markdown verdict ('-' for nowhere)")
    args = parser.parse_args(argv)
    mode = MODES["long" if args.long else "quick"]
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    command = "python -m chaos.run " + ("--long" if args.long else "--quick") + f" --seed {seed}"
    began = time.monotonic()
    record_dir = tempfile.mkdtemp(prefix="chaos-record-")
    run = ChaosRun(mode, seed, record_dir)
    flood_plan = plan_flood(run.rng, mode.flood_s)
    fault_plan = plan_faults(run.rng, mode)
    print(f"chaos: {command}: {len(flood_plan)} tasks over {mode.flood_s:.0f}s, {len(fault_plan)} faults; "
          f"record in {record_dir}", flush=True)
    verdict: Optional[check.Verdict] = None
    logs: list[str] = []
    ok = False
    try:
        run.start()
        stop = threading.Event()
        run.t_start = time.monotonic() + 0.5
        threads = [threading.Thread(target=run.flood, args=(flood_plan, stop), daemon=True),
                   threading.Thread(target=run.inject, args=(fault_plan, stop), daemon=True)]
        for th in threads:
            th.start()
        limit = mode.flood_s + 120
        for th in threads:
            th.join(max(0.0, run.t_start + limit - time.monotonic()))
        stop.set()
        print(f"chaos: flood and faults done at {time.monotonic() - began:.0f}s; draining", flush=True)
        drained = run.drain(VISIBILITY_TIMEOUT + 30)
        if not drained:
            run.errors.append("the queue did not drain in time")
        run.final_free_s = run.watch_keys_free(3 * TTL)
        # What the driver saw, next to the workers' record: `python -m chaos.check DIR` judges it again.
        check.save_driver(record_dir, {"command": command, "ttl": TTL, "slack": SLACK, "origin": run.t_start,
                                       "kills": run.kills, "sent": run.sent, "faults": run.faults,
                                       "final_free_s": run.final_free_s})
        rec = check.load(record_dir, run.kills, run.t_start)
        faults = check.shift_faults(run.faults, run.t_start)
        verdict = check.judge(rec, run.sent, faults, run.final_free_s, TTL, SLACK)
        if run.errors:
            verdict.checks.append(check.Check("the harness itself ran cleanly", False, "; ".join(run.errors)[:500]))
        ok = verdict.ok
    finally:
        logs = run.stop(keep_logs=args.keep or not ok)
    took = time.monotonic() - began
    assert verdict is not None
    params = (f"seed {seed}, ttl {TTL:g}s, 2 prefork workers x 4, {len(POLICIES)} policies over 10 keys, "
              f"pause {PAUSE_S:g}s, visibility timeout {VISIBILITY_TIMEOUT:g}s")
    text = check.markdown(verdict, command, took, params)
    print(text, flush=True)
    if args.results != "-":
        write_results(args.results, mode.name, text)
    if args.keep:
        print(f"chaos: record kept in {record_dir}; worker logs: {' '.join(logs)}", flush=True)
    elif ok:
        shutil.rmtree(record_dir, ignore_errors=True)
    else:
        print(f"chaos: FAILED; record kept in {record_dir}; worker logs: {' '.join(logs)}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
