"""Read the record of a chaos run and judge it: the checks, the counts, the Markdown tables.

Pure functions over plain data, so the rules can be tested on made-up records (tests/test_chaos.py
feeds them overlaps and dropped reruns and expects them to be caught). chaos/README.md states the
rules in prose.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

RERUN_POLICIES = ("rerun", "rerun_durable")
WAITED_AFTER = 0.02
# single_task keeps a rerun request in the holder's lease. A holder that finds its lease lost at
# release (an expiry while Redis was paused, a Redis restart) takes the key again and runs, or
# passes a request on to whoever holds the key by then: no check excuses a request lost that way.


@dataclass
class Run:
    """One execution of a decorated body: a start event and, unless killed, an end event."""

    key: str
    fence: int
    pid: int
    call_id: str
    it: int
    start: float
    lease: bool
    end: Optional[float] = None
    lost_at_end: Optional[bool] = None
    killed_at: Optional[float] = None  # set when the run has no end and its process was killed
    lost_seen: Optional[float] = None  # when the holder learnt (on_lost) that the lease was lost
    # A lease the driver found held by a killed process that has no open run for it in the record
    # (killed between taking the key and recording the run's start: the start, a rerun's start, a
    # retake after a lost lease). Not a run of the body: only a holder a rerun request can go to.
    unrecorded: bool = False
    expires: Optional[float] = None  # when the driver saw a killed holder's lease run out, if it did
    # The Celery task id in a killed holder's lease as the driver read it ("" when the lease
    # recorded none: then its redelivered message cannot know that lease as its own attempt's).
    lease_task: Optional[str] = None

    @property
    def stop(self) -> float:
        """The latest moment the run can have been running (inf if it vanished unexplained)."""
        if self.end is not None:
            return self.end
        return self.killed_at if self.killed_at is not None else float("inf")

    @property
    def lost(self) -> bool:
        return bool(self.lost_at_end) or self.lost_seen is not None


@dataclass
class Attempt:
    """One execution of a task message (a redelivered message makes a second attempt)."""

    call_id: str
    pid: int
    policy: str
    key: str
    t0: float
    redelivered: bool
    task: Optional[str] = None  # the Celery task id (the same for a redelivered message)
    t1: Optional[float] = None
    outcome: Optional[str] = None
    runs: int = 0


@dataclass
class Record:
    runs: list[Run] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    lost_events: int = 0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Verdict:
    checks: list[Check]
    counts: list[tuple[str, Any]]
    recovery: list[tuple[str, int, str, str, str]]
    problems: list[str]
    fault_log: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def load(record_dir: str, kills: dict[int, float], origin: float = 0.0) -> Record:
    """Parse every ``<pid>.jsonl`` file; ``kills`` maps each pid the run SIGKILLed to when.

    Times are shifted by ``origin`` (the start of the flood), so findings read in seconds into it.
    """
    events: list[dict[str, Any]] = []
    for path in sorted(glob.glob(os.path.join(record_dir, "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.endswith("\n"):  # a line cut short by SIGKILL is not an event
                    ev = json.loads(line)
                    for name in ("t", "t0"):
                        if name in ev:
                            ev[name] -= origin
                    events.append(ev)
    return build(events, {pid: t - origin for pid, t in kills.items()})


def shift_faults(faults: list[dict[str, Any]], origin: float) -> list[dict[str, Any]]:
    """The driver's faults with their times (and their dead leases' expiry) in seconds into the flood."""
    out = []
    for f in faults:
        g = {**f, "t0": f["t0"] - origin, "t1": f["t1"] - origin, "at": f["t0"] - origin}
        if f.get("dead_leases"):
            g["dead_leases"] = [{**lease, "expires": lease["expires"] - origin if lease.get("expires") is not None
                                 else None} for lease in f["dead_leases"]]
        out.append(g)
    return out


DRIVER_FILE = "driver.json"  # not a <pid>.jsonl: load() does not read it as events


def save_driver(record_dir: str, driver: dict[str, Any]) -> None:
    with open(os.path.join(record_dir, DRIVER_FILE), "w", encoding="utf-8") as f:
        json.dump(driver, f)


def judge_again(record_dir: str) -> Verdict:
    """Judge a kept record (``--keep``, or any failed run) from the files alone."""
    with open(os.path.join(record_dir, DRIVER_FILE), encoding="utf-8") as f:
        d = json.load(f)
    kills = {int(pid): t for pid, t in d["kills"].items()}
    rec = load(record_dir, kills, d["origin"])
    return judge(rec, d["sent"], shift_faults(d["faults"], d["origin"]), d["final_free_s"], d["ttl"], d["slack"])


def build(events: list[dict[str, Any]], kills: dict[int, float]) -> Record:
    rec = Record()
    runs: dict[tuple[int, str, int], Run] = {}
    attempts: dict[tuple[int, str], list[Attempt]] = {}
    lost: dict[tuple[int, int], float] = {}
    for ev in events:
        kind = ev["ev"]
        if kind == "start":
            runs[(ev["pid"], ev["id"], ev["it"])] = Run(
                key=ev["key"], fence=int(ev["fence"]), pid=ev["pid"], call_id=ev["id"], it=ev["it"], start=ev["t"],
                lease=bool(ev["lease"]))
        elif kind == "end":
            run = runs[(ev["pid"], ev["id"], ev["it"])]
            run.end, run.lost_at_end = ev["t"], ev["lost"]
        elif kind == "call":
            a = Attempt(call_id=ev["id"], pid=ev["pid"], policy=ev["policy"], key=ev["key"], t0=ev["t"],
                        redelivered=bool(ev.get("redelivered")), task=ev.get("task"))
            attempts.setdefault((ev["pid"], ev["id"]), []).append(a)
            rec.attempts.append(a)
        elif kind == "ret":
            open_ = [a for a in attempts.get((ev["pid"], ev["id"]), []) if a.t1 is None]
            if open_:
                open_[-1].t1, open_[-1].outcome, open_[-1].runs = ev["t"], ev["outcome"], ev["runs"]
        elif kind == "lost":
            rec.lost_events += 1
            k = (ev["pid"], int(ev["fence"]))
            lost[k] = min(ev["t"], lost.get(k, ev["t"]))
    for run in runs.values():
        if run.end is None and run.pid in kills:
            run.killed_at = kills[run.pid]
        seen = lost.get((run.pid, run.fence))
        if seen is not None and (run.killed_at is None or seen <= run.killed_at):
            run.lost_seen = seen
        rec.runs.append(run)
    rec.runs.sort(key=lambda r: r.start)
    return rec


# -- the checks ----------------------------------------------------------------------------------


def check_overlap(runs: list[Run]) -> tuple[Check, dict[str, int], list[str]]:
    """No two runs of one key overlap, unless one of them lost its lease and has the lower fence."""
    by_key: dict[str, list[Run]] = {}
    for run in runs:
        by_key.setdefault(run.key, []).append(run)
    stats = {"overlaps": 0, "excused": 0, "unaware": 0}
    problems: list[str] = []
    for key, rs in by_key.items():
        rs.sort(key=lambda r: r.start)
        for i, a in enumerate(rs):
            for b in rs[i + 1:]:
                if b.start >= a.stop:
                    continue  # runs sorted by start: b and every later one may still overlap a
                stats["overlaps"] += 1
                both = f"{key}: run fence={a.fence} pid={a.pid} [{a.start:.3f}, {a.stop:.3f}] and fence={b.fence} " \
                       f"pid={b.pid} [{b.start:.3f}, {b.stop:.3f}]"
                if not (a.lost or b.lost):
                    problems.append(f"overlap, neither lease lost: {both}")
                    continue
                stale, fresh = (a, b) if a.lost and (not b.lost or a.fence < b.fence) else (b, a)
                if stale.fence >= fresh.fence:
                    problems.append(f"overlap where the lost lease has the higher fence: {both}")
                    continue
                stats["excused"] += 1
                if not stale.lost_at_end and stale.end is not None:
                    stats["unaware"] += 1  # the stale run only learnt at release: fencing is what saves it
    vanished = [r for r in runs if r.end is None and r.killed_at is None]
    for r in vanished:
        problems.append(f"{r.key}: run fence={r.fence} pid={r.pid} started at {r.start:.3f} and never ended, "
                        "but its process was not killed")
    ok = not problems
    detail = (f"{stats['overlaps']} overlapping pair(s), all with a lost lease whose fence is the lower one"
              if ok else f"{len(problems)} violation(s); first: {problems[0]}")
    if stats["unaware"]:
        detail += f" ({stats['unaware']} stale run(s) learnt it only when releasing)"
    return Check("no overlap", ok, detail), stats, problems


def check_leases(runs: list[Run]) -> Check:
    bad = [r for r in runs if not r.lease or r.fence <= 0]
    detail = f"{len(runs)} runs, each under a lease with a fence" if not bad else \
        f"{len(bad)} run(s) without a lease, e.g. {bad[0]}"
    return Check("no run without a lease (fail closed)", not bad, detail)


def check_single_delivery(rec: Record, policy: str = "rerun_durable") -> Check:
    """No acks_late message was delivered again while an earlier delivery of it still ran.

    The broker gives an unacknowledged message out again once its visibility timeout has run out,
    counted from its delivery, whether or not the task is still running. The first delivery then
    acknowledges the message when it returns, and if the second is killed afterwards there is
    nothing left to give back: the requests it owed are lost. That is the broker's configuration
    (the visibility timeout must exceed the longest time a task holds its message), not
    single_task, so it is a check of its own, and the finding that it causes says so."""
    holds = [a.t1 - a.t0 for a in rec.attempts if a.policy == policy and a.t1 is not None]
    twice = []
    by_call: dict[str, list[Attempt]] = {}
    for a in rec.attempts:
        if a.policy == policy:
            by_call.setdefault(a.call_id, []).append(a)
    for attempts in by_call.values():
        for b in attempts:
            if not b.redelivered:
                continue
            for a in attempts:
                if a is not b and a.t0 < b.t0 and a.t1 is not None and a.t1 > b.t0:
                    twice.append(f"call {b.call_id} (task {b.task}): delivered again at {b.t0:.3f} to pid {b.pid} "
                                 f"while its delivery to pid {a.pid} still ran ({a.t0:.3f} to {a.t1:.3f}, "
                                 f"{a.t1 - a.t0:.1f}s)")
    longest = f"the longest call of an acks_late task took {max(holds):.1f}s" if holds else "no acks_late call returned"
    detail = (f"{longest}; no message was delivered again while it ran" if not twice else
              f"{len(twice)} message(s) delivered again while they ran: " + "; ".join(twice))
    return Check("no acks_late message delivered twice while it ran (visibility timeout)", not twice, detail)


def check_stuck(faults: list[dict[str, Any]], final_free_s: Optional[float], ttl: float, slack: float) -> Check:
    limit = ttl + slack
    problems = []
    for f in faults:
        if f.get("dead_free_s") is not None and f["dead_free_s"] > limit:
            problems.append(f"{f['kind']} at {f['at']:.1f}s: keys of the killed holders freed after "
                            f"{f['dead_free_s']:.2f}s")
        if f.get("dead_free_s") is None and f.get("dead_keys"):
            problems.append(f"{f['kind']} at {f['at']:.1f}s: keys of the killed holders never freed")
    if final_free_s is None:
        problems.append("after the last run, some key was still held at the end of the watch")
    elif final_free_s > limit:
        problems.append(f"after the last run, all keys were free only after {final_free_s:.2f}s")
    held = [f["dead_free_s"] for f in faults if f.get("dead_free_s") is not None]
    detail = (f"a killed holder's key was free after at most {max(held, default=0.0):.2f}s "
              f"({len(held)} kill(s) that held keys); after the last run every key was free after "
              f"{final_free_s if final_free_s is not None else float('nan'):.2f}s; limit ttl+{slack:g}s = {limit:g}s")
    if problems:
        detail = "; ".join(problems)
    return Check(f"no stuck key (free within ttl+{slack:g}s)", not problems, detail)


def _kills(faults: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Each killed pid's first kill (a fault dict: its kind, when, the worker's restart time)."""
    out: dict[int, dict[str, Any]] = {}
    for f in sorted(faults, key=lambda f: f["t1"]):
        if f["kind"] in ("child_kill", "worker_kill"):
            for pid in f["pids"]:
                out.setdefault(pid, f)
    return out


def dead_holders(rec: Record, faults: list[dict[str, Any]]) -> list[Run]:
    """The leases the driver found held by a killed process, at the kill, with no open run for
    them in the record: the holder was killed after taking the key and before writing its run's
    start (a first start, a rerun's start, a run after a lost lease was taken again). They hold
    the key, and rerun requests go to them, until the lease runs out. As a side effect, a killed
    run whose lease the driver saw learns when that lease ran out (``expires``)."""
    killed_runs = {(r.pid, r.fence): r for r in rec.runs if r.end is None and r.killed_at is not None}
    out: list[Run] = []
    for f in faults:
        for lease in f.get("dead_leases") or []:
            if lease.get("after") is False:
                continue  # gone by the look after the kill: given back before it (or run out at once)
            pid, fence, k = lease["pid"], int(lease["fence"]), f["t1"]
            expires = lease.get("expires")
            run = killed_runs.get((pid, fence))
            if run is not None:
                run.expires = expires
                run.lease_task = lease.get("task") or ""
                continue
            mine = [a for a in rec.attempts if a.pid == pid and a.t0 <= k and lease.get("task")
                    and a.task == lease["task"]]
            attempt = max(mine, key=lambda a: a.t0) if mine else None
            call_id = attempt.call_id if attempt is not None else ""
            before = [r for r in rec.runs if (r.pid, r.call_id) == (pid, call_id) and r.end is not None
                      and r.end <= k] if attempt is not None else []
            # It took the key no earlier than its call began and its last recorded run ended.
            since = max([attempt.t0 if attempt is not None else k, *(r.end for r in before if r.end is not None)])
            out.append(Run(key=lease["key"], fence=fence, pid=pid, call_id=call_id,
                           it=max((r.it + 1 for r in before), default=0), start=since, lease=True,
                           killed_at=k, unrecorded=True, expires=expires, lease_task=lease.get("task") or ""))
    return out


def _alive_until(run: Run, ttl: float) -> float:
    """The latest moment a run's lease can have been held: its end, or for a killed run, its kill
    plus ttl (its last renewal was before the kill), or when the driver saw it run out."""
    if run.end is not None:
        return run.end
    if run.killed_at is None:
        return float("inf")
    return min(run.killed_at + ttl, run.expires if run.expires is not None else float("inf"))


def came_back(rec: Record, run: Run) -> Optional[Attempt]:
    """The redelivered attempt of a killed run's own message that will take the key again: the
    first one after the kill that was not itself killed before it got anywhere."""
    if not run.call_id or run.killed_at is None:
        return None
    again = sorted((a for a in rec.attempts if a.call_id == run.call_id and a.redelivered and a.t0 > run.killed_at),
                   key=lambda a: a.t0)
    started = {(r.pid, r.call_id) for r in rec.runs if not r.unrecorded}
    for a in again:
        if a.t1 is not None or (a.pid, a.call_id) in started:
            return a
    return again[-1] if again else None


def rerun_requests(rec: Record, ttl: float, slack: float, policy: str,
                   faults: Sequence[dict[str, Any]] = ()) -> tuple[dict[str, int], list[str]]:
    """Every coalesced call must be followed, in time, by a run of its key that started after it.

    The request is owed by the holder of the lease the call found: of the runs that can have held
    the key while the call was made (started before it returned, not ended before it began; a
    killed run until its lease ran out) and the leases the driver found held by a killed process
    with no run recorded for them, the one with the highest fence (the latest lease taken). "In
    time" follows from ttl and the record, never from how fast the machine was:

    - a live holder: its end + ``slack`` (it runs again right after it releases);
    - a holder that lost its lease: see below;
    - a killed holder: nothing in the library serves the request until the killed holder's own
      message comes back (redelivered: at once for a killed pool process, after the broker's
      visibility timeout for a worker killed whole); that attempt waits out the dead lease (at
      most ttl from its start), takes the key and runs: its start + ttl + ``slack``. Without a
      redelivery (default acks), any run by the dead lease's end + ``slack`` keeps it;
    - no holder at all: the lease the call found was held by a live process between taking the
      key and recording its run (every killed holder's lease is known from the driver): its run
      starts at once; by the call's return + ttl + ``slack`` at the latest.

    Any run of the key that starts after the call began and by then keeps the request.
    """
    kills = _kills(list(faults))
    runs_of: dict[str, list[Run]] = {}
    for run in rec.runs:
        runs_of.setdefault(run.key, []).append(run)
    holders_of: dict[str, list[Run]] = {k: list(v) for k, v in runs_of.items()}
    for run in dead_holders(rec, list(faults)):
        holders_of.setdefault(run.key, []).append(run)
    stats = {"requests": 0, "kept": 0, "kept_by_rerun": 0, "kept_by_redelivery": 0, "tight": 0,
             "killed_holder": 0, "killed_holder_kept": 0, "unrecorded_holder": 0, "lost_holder": 0, "dropped": 0}
    redelivered = {(a.pid, a.call_id) for a in rec.attempts if a.redelivered}
    returned = {(a.pid, a.call_id): a.t1 for a in rec.attempts if a.t1 is not None}
    problems: list[str] = []
    for a in rec.attempts:
        if a.policy != policy or a.outcome != "coalesced" or a.t1 is None:
            continue
        stats["requests"] += 1
        runs = runs_of.get(a.key, [])
        holders = [r for r in holders_of.get(a.key, []) if r.start <= a.t1 and _alive_until(r, ttl) >= a.t0]
        owner = max(holders, key=lambda r: (r.fence, r.start)) if holders else None
        killed = owner is not None and owner.end is None
        back: Optional[Attempt] = None
        if owner is None:
            due = a.t1 + ttl + slack
            how = (f"by {due:.3f}: its return + ttl + {slack:g}s (no run of {a.key} was open while it was made, "
                   "and the driver's looks at every kill found no killed process holding its lease: the holder "
                   "was alive, between taking the key and writing its start)")
        elif killed:
            assert owner.killed_at is not None
            stats["unrecorded_holder"] += owner.unrecorded
            back = came_back(rec, owner)
            expiry = _alive_until(owner, ttl)
            if back is not None:
                due = back.t0 + ttl + slack
                what = f"returned {back.outcome} at {back.t1:.3f}" if back.t1 is not None else "was killed too"
                how = (f"by {due:.3f}: its message came back at {back.t0:.3f} (pid {back.pid}, "
                       f"{back.t0 - owner.killed_at:.2f}s after the kill; that attempt {what}), + ttl + {slack:g}s")
                if back.outcome == "coalesced" and owner.lease_task == "":
                    how += (" — the dead lease recorded no Celery task id, so the redelivered attempt could not "
                            "know it as its own and coalesced into it")
            else:
                due = expiry + slack
                how = f"by {due:.3f}: its message never came back; its lease ran out by {expiry:.3f}, + {slack:g}s"
                acked = [b for b in rec.attempts if b.call_id == owner.call_id and b.pid != owner.pid
                         and b.t1 is not None and b.t1 <= owner.killed_at]
                if owner.call_id and acked:
                    first = min(acked, key=lambda b: b.t1 or 0.0)
                    how += (f" — the message had been acknowledged at {first.t1:.3f} by its other delivery (pid "
                            f"{first.pid}, from {first.t0:.3f}), so the broker had nothing to give back")
        elif owner.lost:
            # The holder learns at release that its lease is gone (a release may wait out a Redis
            # pause or restart); its call then takes the key and runs again (its next iteration),
            # or passes a request on to the run holding the key, which runs again when it ends.
            own_next = [r for r in runs if (r.pid, r.call_id, r.it) == (owner.pid, owner.call_id, owner.it + 1)]
            back_at = max(owner.stop, returned.get((owner.pid, owner.call_id), owner.stop),
                          *(r.start for r in own_next))
            busy = [r for r in runs if r is not owner and r.start <= back_at <= r.stop]
            due = max([back_at, *(r.stop for r in busy)]) + slack
            how = f"by {due:.3f}: the holder's release found the lease lost and took the key again, + {slack:g}s"
        else:
            due = owner.stop + slack
            how = f"by {due:.3f}: the holder's end + {slack:g}s"
        later = [r for r in runs if r.start > a.t0]
        first = min(later, key=lambda r: r.start) if later else None
        if first is not None and first.start <= due:
            stats["kept"] += 1
            stats["kept_by_rerun"] += first.it > 0
            stats["kept_by_redelivery"] += (first.pid, first.call_id) in redelivered
            stats["tight"] += first.start < a.t1
            stats["killed_holder_kept"] += killed
            continue
        if killed:
            stats["killed_holder"] += 1
            why = "its holder was killed"
        elif owner is not None and owner.lost:
            stats["lost_holder"] += 1
            why = "its holder lost the lease"
        else:
            stats["dropped"] += 1
            why = "its holder was neither killed nor lost its lease" if owner is not None else "no holder"
        nxt = f"the next run started {first.start - due:.2f}s after that" if first else "no run followed"
        problems.append(f"{a.key}: rerun requested at {a.t0:.3f} by pid {a.pid} (call {a.call_id}) was not kept "
                        f"{how} ({why}; holder: {_describe(owner, kills)}; {nxt})")
    return stats, problems


def _describe(run: Optional[Run], kills: Optional[dict[int, dict[str, Any]]] = None) -> str:
    if run is None:
        return "none (no open run, no killed process's lease)"
    kill = (kills or {}).get(run.pid)
    if run.unrecorded:
        what = (f"lease fence={run.fence} of pid {run.pid} (call {run.call_id or '?'}, after its run it={run.it - 1})"
                if run.it else f"lease fence={run.fence} of pid {run.pid} (call {run.call_id or '?'})")
        text = f"{what}, taken after {run.start:.3f}, no run recorded for it"
    else:
        end = f"{run.end:.3f}" if run.end is not None else f"killed at {run.killed_at:.3f}"
        text = (f"fence={run.fence} pid={run.pid} call {run.call_id} it={run.it} [{run.start:.3f}, {end}] "
                f"lost={run.lost}")
    if run.end is None and run.killed_at is not None:
        if kill is not None and kill["kind"] == "worker_kill":
            ready = kill.get("restart_s")
            text += (f"; killed with its whole worker at {run.killed_at:.3f}, a new worker ready "
                     + (f"{ready:.1f}s later" if ready is not None else "never"))
        else:
            text += f"; killed at {run.killed_at:.3f}"
        if run.expires is not None:
            text += f", its lease ran out at {run.expires:.3f}"
    return text


def check_rerun(rec: Record, ttl: float, slack: float, policy: str, sent: list[dict[str, Any]], label: str,
                excuse_killed: bool, faults: Sequence[dict[str, Any]] = ()) -> tuple[Check, dict[str, int], list[str]]:
    stats, problems = rerun_requests(rec, ttl, slack, policy, faults)
    if excuse_killed:
        problems = [p for p in problems if "its holder was killed" not in p]
    unkept = stats["requests"] - stats["kept"]
    unexcused = unkept - (stats["killed_holder"] if excuse_killed else 0)
    finished = {a.call_id for a in rec.attempts if a.policy == policy and a.outcome is not None}
    mine = [s for s in sent if s["policy"] == policy]
    never = [s["id"] for s in mine if s["id"] not in finished]
    if not excuse_killed and never:
        problems.append(f"{len(never)} {policy} task(s) never finished a call, e.g. {never[:3]}")
    ok = stats["requests"] > 0 and unexcused == 0 and (excuse_killed or not never)
    detail = (f"{stats['requests']} requests, {stats['kept']} kept in time: {stats['kept_by_rerun']} by the "
              f"holder running again, {stats['kept_by_redelivery']} by a redelivered message, the rest by a later call"
              f" ({stats['tight']} started while the request was returning)")
    detail += (f"; owed by a killed holder: {stats['killed_holder_kept'] + stats['killed_holder']}, of which "
               f"{stats['killed_holder_kept']} kept")
    if stats["unrecorded_holder"]:
        detail += (f" ({stats['unrecorded_holder']} owed by a holder killed after it took the key and before it "
                   "recorded its run)")
    if excuse_killed:
        detail += f" and {stats['killed_holder']} not (allowed here)"
    else:
        detail += f"; {len(mine) - len(never)}/{len(mine)} tasks finished a call"
    if stats["lost_holder"] or excuse_killed:
        detail += f"; not kept because the holder lost its lease: {stats['lost_holder']}"
    if stats["dropped"] or (not excuse_killed and stats["killed_holder"]):
        detail += f"; dropped: {stats['dropped'] + (0 if excuse_killed else stats['killed_holder'])}"
    if not stats["requests"]:
        detail += "; no request at all, so nothing was checked"
    return Check(label, ok, detail), stats, problems


# -- the verdict ---------------------------------------------------------------------------------


def judge(rec: Record, sent: list[dict[str, Any]], faults: list[dict[str, Any]], final_free_s: Optional[float],
          ttl: float, slack: float) -> Verdict:
    problems: list[str] = []
    overlap, ostats, p = check_overlap(rec.runs)
    problems += p
    plain, _, p = check_rerun(rec, ttl, slack, "rerun", sent, "rerun keeps its promise (default acks)", True,
                              faults)
    problems += p
    durable, _, p = check_rerun(rec, ttl, slack, "rerun_durable", sent,
                                "rerun keeps its promise, killed holders too (acks_late + reject_on_worker_lost)",
                                False, faults)
    problems += p
    checks = [overlap, check_leases(rec.runs), check_stuck(faults, final_free_s, ttl, slack), plain, durable,
              check_single_delivery(rec)]

    outcomes: dict[str, int] = {}
    for a in rec.attempts:
        outcomes[a.outcome or "killed"] = outcomes.get(a.outcome or "killed", 0) + 1
    first_start = {}
    for run in rec.runs:
        first_start.setdefault((run.pid, run.call_id), run.start)
    waits = sum(1 for a in rec.attempts if a.policy == "wait" and a.outcome == "ran"
                and first_start.get((a.pid, a.call_id), a.t0) - a.t0 > WAITED_AFTER)
    recorded = {a.call_id for a in rec.attempts}
    lost_leases = len({(r.pid, r.fence) for r in rec.runs if r.lost})
    kinds: dict[str, int] = {}
    for f in faults:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    counts: list[tuple[str, Any]] = [
        ("tasks sent", f"{len(sent)} (" + ", ".join(
            f"{p}: {sum(1 for s in sent if s['policy'] == p)}" for p in ("skip", "wait", "rerun", "rerun_durable"))
         + ")"),
        ("task executions (redelivered)", f"{len(rec.attempts)} ({sum(a.redelivered for a in rec.attempts)})"),
        ("tasks that never started (message lost with a killed worker)",
         len(sent) - len(recorded & {s["id"] for s in sent})),
        ("runs (of which reruns by the holder)", f"{len(rec.runs)} ({sum(1 for r in rec.runs if r.it > 0)})"),
        ("runs killed mid-run", sum(1 for r in rec.runs if r.killed_at is not None)),
        ("skips", outcomes.get("skipped", 0)),
        ("rerun requests (coalesced calls)", outcomes.get("coalesced", 0)),
        ("waits that ran after waiting / wait timeouts", f"{waits} / {outcomes.get('wait_timeout', 0)}"),
        ("calls refused because Redis was unreachable (fail closed)", outcomes.get("unavailable", 0)),
        ("calls that raised anything else", sum(v for k, v in outcomes.items() if k.startswith("error:"))),
        ("task executions killed before returning", outcomes.get("killed", 0)),
        ("lost leases (holders that learnt it / on_lost calls)", f"{lost_leases} / {rec.lost_events}"),
        ("overlapping pairs, all excused by a lost lease and a lower fence", ostats["overlaps"]),
        ("acks_late messages of killed holders back after the kill (s), pool process / whole worker (median / max)",
         " / ".join(_spread(_redelivery_after(rec, faults, kind)) for kind in ("child_kill", "worker_kill"))),
        ("whole workers back after a kill (s)", ", ".join(f"{f['restart_s']:.1f}" for f in faults
                                                          if f.get("restart_s") is not None) or "-"),
        ("faults injected", f"{len(faults)} (" + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())) + ")"),
    ]

    recovery = []
    starts = sorted(r.start for r in rec.runs)
    for kind in sorted(kinds):
        fs = [f for f in faults if f["kind"] == kind]
        probe = [f["probe_s"] for f in fs if f.get("probe_s") is not None]
        dead = [f["dead_free_s"] for f in fs if f.get("dead_free_s") is not None]
        first_run = []
        for f in fs:
            after = [s for s in starts if s >= f["t1"]]
            if after:
                first_run.append(after[0] - f["t1"])
        recovery.append((kind, len(fs), _spread(probe), _spread(first_run), _spread(dead)))
    log = []
    for f in faults:
        what = {"child_kill": lambda: f"SIGKILL pid {f['pids'][0]} ({f.get('target', '')})",
                "worker_kill": lambda: f"SIGKILL worker group ({len(f['pids'])} processes); new worker ready after "
                                       f"{f['restart_s']:.1f}s" if f.get("restart_s") else "new worker did not start",
                "pause": lambda: f"SIGSTOP lock redis for {f['t1'] - f['t0']:.1f}s",
                "restart": lambda: f"lock redis stopped and started empty in {f['t1'] - f['t0']:.2f}s",
                "client_kill": lambda: f"CLIENT KILL TYPE normal: {f.get('connections')} connection(s)"}[f["kind"]]()
        keys = [k.split("{", 1)[1].rstrip("}") for k in f.get("dead_keys") or []]
        held = f" holding {', '.join(keys)}" if keys else ""
        log.append(f"| {f['at']:.1f} | {f['kind']} | {what}{held} |")
    return Verdict(checks, counts, recovery, problems, log)


def _redelivery_after(rec: Record, faults: list[dict[str, Any]], kind: str) -> list[float]:
    """For each task execution killed by a fault of ``kind``: how long until its message started again."""
    kills = {pid: f["t1"] for pid, f in _kills(faults).items() if f["kind"] == kind}
    out = []
    for a in rec.attempts:
        if a.t1 is None and a.pid in kills:
            again = [b.t0 for b in rec.attempts if b.call_id == a.call_id and b.redelivered and b.t0 > kills[a.pid]]
            if again:
                out.append(min(again) - kills[a.pid])
    return out


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} / {max(values):.2f}"


def markdown(v: Verdict, command: str, took_s: float, params: str) -> str:
    out = [f"Command: `{command}` ({params}; took {took_s:.0f} s)", "",
           f"**Verdict: {'PASS' if v.ok else 'FAIL'}**", "",
           "| check | verdict | detail |", "| --- | --- | --- |"]
    out += [f"| {c.name} | {'PASS' if c.ok else 'FAIL'} | {c.detail} |" for c in v.checks]
    out += ["", "| count | value |", "| --- | --- |"]
    out += [f"| {name} | {value} |" for name, value in v.counts]
    out += ["", "Recovery, in seconds (median / max), counted from the end of each fault (the kill, the resume, "
            "the restarted server answering, the CLIENT KILL):", "",
            "| fault | injected | a new lease can be taken | first run of any key | killed holders' keys free |",
            "| --- | --- | --- | --- | --- |"]
    out += [f"| {k} | {n} | {a} | {b} | {c} |" for k, n, a, b, c in v.recovery]
    if v.fault_log:
        out += ["", "Faults, at seconds into the flood:", "", "| at | fault | what |", "| --- | --- | --- |"]
        out += v.fault_log
    if v.problems:
        out += ["", "Findings (first 20):", ""] + [f"- {p}" for p in v.problems[:20]]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m chaos.check RECORD_DIR   (a record kept by python -m chaos.run)")
    verdict = judge_again(sys.argv[1])
    print(markdown(verdict, f"python -m chaos.check {sys.argv[1]}", 0.0, "judged again from the kept record"))
    sys.exit(0 if verdict.ok else 1)
