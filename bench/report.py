"""The Markdown report: machine and versions, the tables, and each target met or missed."""

from __future__ import annotations

import math
import os
import platform
import time
from importlib import metadata
from typing import Any, Optional

from bench import producer, replicas
from bench.contenders import CONTENDERS, Contender
from bench.costs import Profile, PythonCost
from bench.e2e import PoolResult
from bench.handoff import NOT_WAITING, WAITERS, HandoffResult
from bench.measure import Counts, Timed, format_counts
from bench.producer import ProducerResult
from bench.replicas import ReplicaResult
from bench.scale import CacheResult, HeldResult, KeysResult

TITLE = "# single_task benchmark"
FLOOR = "floor: SET NX PX + EVALSHA compare-and-delete"
BUSY_FLOOR = "floor: SET NX PX on a busy key"
PING = "PING (one round trip)"
ST_WITH = "single_task: `with single_run(...)` block"
ST_DECORATED = "single_task: decorated call"
ST_SKIP = "single_task: decorated call, key busy → skip"
ST_WAIT = WAITERS[0].name
PRL_WAIT = WAITERS[1].name
PEER_DISTS = ["redis", "celery", "kombu", "python-redis-lock", "pottery", "celery-once", "celery-singleton", "huey",
              "dramatiq"]
HANDSHAKE = {"HELLO", "CLIENT", "SELECT", "AUTH"}


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _f(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def _x(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}×"


def _verdict(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**MISSED**")


def _over(measured: float, limit: float) -> str:
    """How far a 'measured <= limit' target is off, in the target's unit and in percent."""
    if math.isnan(measured):
        return "not measured"
    if measured <= limit:
        return f"{limit - measured:.2f}× to spare"
    return f"over by {measured - limit:.2f}× ({(measured / limit - 1) * 100:.0f} % above the limit)"


# -- sections --------------------------------------------------------------------------------------


def render(data: dict[str, Any]) -> str:
    timed: dict[str, Timed] = data["timed"]
    counts: dict[str, Counts] = data["counts"]
    parts = [TITLE, "", _header(data), "", _targets(data), "", "## Lock cycle latency (interleaved, one run)", "",
             _method(data), "", "### Full cycles: acquire, empty body, release", "",
             _cycle_table(timed, counts, data["unavailable"], "cycle"), "",
             "### Busy key: one attempt that must not run the body", "",
             _cycle_table(timed, counts, data["unavailable"], "busy"), "",
             _handoff(data["handoff"]), "", _replicas(data["replicas"], data["plan"]), "",
             _producer(data["producer"], data["plan"]), "", _e2e(data["e2e"], data["plan"]), "",
             _held(data["held"]), "",
             _many_keys(data["many_keys"]), "", _cache(data["cache"]), "",
             _where_time_goes(data), ""]
    return "\n".join(parts)


def _header(data: dict[str, Any]) -> str:
    plan = data["plan"]
    cpus = os.cpu_count()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    load0, load1 = data["loadavg_start"], data["loadavg_end"]
    rows = [
        ["command", f"`{data['command']}` (from the repository root)"],
        ["date", time.strftime("%Y-%m-%d %H:%M %Z")],
        ["machine", f"nproc {affinity} (os.cpu_count {cpus}), {_cpu_model()}, "
                    f"{platform.system()} {platform.release()}"],
        ["load average (1 min) at start / end", f"{load0[0]:.2f} / {load1[0]:.2f}"],
        ["Python", f"{platform.python_implementation()} {platform.python_version()}"],
        ["redis-server", f"{data['redis_version']} (`{data['binary']}`)"],
        ["redis-py / celery / kombu", f"{_version('redis')} / {_version('celery')} / {_version('kombu')}"],
        ["peers", ", ".join(f"{d} {_version(d)}" for d in PEER_DISTS[3:])],
        ["single_task", _version("single_task") if _version("single_task") != "not installed" else "working tree"],
        ["run length", f"{data['seconds']:.0f} s; latency: {plan.rounds} rounds × {plan.batch} cycles per contender"],
    ]
    return table(["", ""], rows)


def _method(data: dict[str, Any]) -> str:
    plan = data["plan"]
    return (
        f"Every contender runs {plan.batch} cycles per round, contenders in turn (the first one rotates), for "
        f"{plan.rounds} rounds, each on its own key and its own redis-py client, all against one redis-server "
        "on loopback. Ratios are to the floor's median (or p99) from the same rounds; *PINGs* is the median "
        "over the median of one `PING`. *Round trips* and *client commands* are what redis-py wrote to its "
        f"sockets, *server commands* the `INFO commandstats` delta, both over {plan.count_cycles} separate "
        "cycles: Redis counts the commands a Lua script calls under their own names, so for script-based "
        "locks the server count includes the script's inner commands. *Server µs* is commandstats' `usec` "
        "per cycle (scripts include their inner commands). Logging below ERROR is disabled for every "
        "library alike (python-redis-lock logs a WARNING on every failed non-blocking acquire)."
    )


def _ratio_base(kind: str) -> str:
    return FLOOR if kind == "cycle" else BUSY_FLOOR


def _cycle_table(timed: dict[str, Timed], counts: dict[str, Counts], unavailable: dict[str, str], kind: str) -> str:
    base_name = _ratio_base(kind)
    base = timed.get(base_name)
    ping = timed.get(PING)
    headers = ["contender", "median µs", "p99 µs", "median × " + ("floor" if kind == "cycle" else "SET NX"),
               "p99 × " + ("floor" if kind == "cycle" else "SET NX"), "PINGs", "round trips",
               "client commands", "server commands (incl. inside scripts)", "server µs"]
    if kind == "cycle":
        headers += ["release", "renewal"]
    headers.append("note")
    rows = []
    wanted: list[Contender] = [c for c in CONTENDERS if c.kind == kind or (kind == "cycle" and c.kind == "unit")]
    for c in wanted:
        t = timed.get(c.name)
        k = counts.get(c.name)
        problem = unavailable.get(c.name) or (t.error if t else "not run")
        if t is None or not t.samples:
            row = [c.name, "—", "—", "—", "—", "—", "—", "—", "—", "—"]
            if kind == "cycle":
                row += [c.release or "", c.renewal or ""]
            row.append(problem or "")
            rows.append(row)
            continue
        med, p99 = t.median_us, t.p99_us
        ratio = med / base.median_us if base and base.samples else float("nan")
        ratio99 = p99 / base.p99_us if base and base.samples else float("nan")
        pings = med / ping.median_us if ping and ping.samples else float("nan")
        row = [c.name, _f(med), _f(p99), _x(ratio), _x(ratio99), _f(pings, 2),
               _f(k.round_trips, 2) if k else "—", format_counts(k.client) if k else "—",
               format_counts(k.server) if k else "—", _f(k.server_usec) if k else "—"]
        if kind == "cycle":
            row += [c.release or "", c.renewal or ""]
        note = c.note
        if t.error:
            note = (note + "; " if note else "") + f"stopped: {t.error}"
        row.append(note)
        rows.append(row)
    return table(headers, rows)


def _median_ratio(timed: dict[str, Timed], name: str, base: str) -> float:
    t, b = timed.get(name), timed.get(base)
    if not t or not b or not t.samples or not b.samples:
        return float("nan")
    return t.median_us / b.median_us


def _targets(data: dict[str, Any]) -> str:
    timed: dict[str, Timed] = data["timed"]
    rows: list[list[str]] = []

    for label, name in (("uncontended `with` block, renewal on: ≤ 1.05× floor (median)", ST_WITH),
                        ("uncontended decorated call, renewal on: ≤ 1.05× floor (median)", ST_DECORATED)):
        r = _median_ratio(timed, name, FLOOR)
        rows.append([label, _x(r), _verdict(None if math.isnan(r) else r <= 1.05), _over(r, 1.05)])

    r = _median_ratio(timed, ST_SKIP, BUSY_FLOOR)
    rows.append(["busy key, skip path: ≤ 1.05× one `SET NX` round trip (median)", _x(r),
                 _verdict(None if math.isnan(r) else r <= 1.05), _over(r, 1.05)])

    hand: dict[str, HandoffResult] = data["handoff"]
    st, prl = hand[ST_WAIT], hand[PRL_WAIT]
    if st.samples_ns and prl.samples_ns:
        a, b = st.ms(0.5), prl.ms(0.5)
        rows.append(["`wait` hand-off median below python-redis-lock's (same run)",
                     f"{a:.3f} ms vs {b:.3f} ms", _verdict(a < b),
                     f"{(1 - a / b) * 100:.0f} % faster" if a < b else f"{(a / b - 1) * 100:.0f} % slower"])
    else:
        rows.append(["`wait` hand-off median below python-redis-lock's (same run)", "not measured", "n/a",
                     st.error or prl.error or ""])

    results: Optional[list[PoolResult]] = data["e2e"]
    solo = next((p for p in results or [] if p.pool == "solo"), None)
    if solo and not solo.error and solo.rates["plain"] and solo.rates["locked"]:
        ratio, floor = solo.ratio(), solo.ratio("floor")
        rows.append(["Celery solo pool: decorated ≥ 0.85× undecorated tasks/s",
                     f"{_x(ratio)} (the floor lock inline: {_x(floor)})", _verdict(ratio >= 0.85),
                     f"{ratio - 0.85:+.2f}× against the 0.85× limit"])
    else:
        rows.append(["Celery solo pool: decorated ≥ 0.85× undecorated tasks/s", "not measured", "n/a",
                     solo.error if solo and solo.error else "skipped"])

    rows.append(_producer_target(data["producer"]))
    rows.append(_replicas_target(data["replicas"]))
    rows.append(_cache_target(data["cache"]))
    rows.extend(_held_targets(data["held"]))
    rows.append(_keys_target(data["many_keys"]))
    return "## Targets\n\n" + table(["target", "measured", "verdict", "by how much"], rows)


def _producer_target(res: ProducerResult) -> list[str]:
    label = "`send_once` with a message for the key already queued: one round trip, nothing published"
    k, sent = res.counts.get(producer.REFUSED), res.published.get(producer.REFUSED)
    if k is None or sent is None:
        return [label, "not measured", "n/a", res.error or "not run"]
    ok = abs(k.round_trips - 1.0) < 1e-9 and sent == 0
    return [label, f"{_f(k.round_trips, 2)} round trip(s) ({format_counts(k.client)}), "
                   f"{_f(sent, 2)} messages published per call", _verdict(ok),
            f"{k.round_trips - 1:+.2f} round trips, {sent:+.2f} messages"]


def _replicas_target(res: ReplicaResult) -> list[str]:
    label = "`replicas=1`: `WAIT` rides in the acquire's round trip (uncontended cycle: 2 round trips, as replicas=0)"
    k1, k0 = res.counts.get(replicas.ST1), res.counts.get(replicas.ST0)
    if k1 is None or k0 is None:
        return [label, "not measured", "n/a", res.error or res.unavailable.get(replicas.ST1, "not run")]
    ok = abs(k1.round_trips - 2.0) < 1e-9 and abs(k0.round_trips - 2.0) < 1e-9
    return [label, f"replicas=1: {_f(k1.round_trips, 2)} ({format_counts(k1.client)}); "
                   f"replicas=0: {_f(k0.round_trips, 2)} ({format_counts(k0.client)})", _verdict(ok),
            f"{k1.round_trips - k0.round_trips:+.2f} round trips over replicas=0"]


def _cache_rts(step: Any) -> int:
    """Round trips of a step without redis-py's connection handshake (which any client pays)."""
    handshake = sum(n for cmd, n in step.client_commands.items() if cmd in HANDSHAKE)
    return int(step.round_trips - handshake)


def _cache_target(cache: CacheResult) -> list[str]:
    label = "script cache warm after the first call; restart costs ≤ 1 extra round trip, once, no error"
    if cache.error or len(cache.steps) < 6:
        return [label, "not measured", "n/a", cache.error or "incomplete"]
    rts = [_cache_rts(s) for s in cache.steps]
    errors = [s.error for s in cache.steps if s.error]
    ok = (rts[1] == 2 and rts[2] - 2 <= 1 and rts[3] == 2 and rts[4] - 2 <= 1 and rts[5] == 2 and not errors)
    measured = (f"round trips: cold {rts[0]}, warm {rts[1]}; after restart {rts[2]} then {rts[3]}; "
                f"after SCRIPT FLUSH {rts[4]} then {rts[5]}; errors surfaced: {len(errors)}")
    return [label, measured, _verdict(ok), f"+{max(rts[2], rts[4]) - 2} round trip(s) once"
            + (f"; {errors}" if errors else "")]


def _held_targets(held: HeldResult) -> list[list[str]]:
    label1 = f"{held.leases} held leases renew from one thread"
    label2 = f"{held.leases} held leases: renewal traffic batched (≤ 2 round trips per renewal period)"
    if held.error:
        return [[label1, "not measured", "n/a", held.error], [label2, "not measured", "n/a", held.error]]
    extra_threads = held.threads_holding - held.threads_before
    ok1 = held.renew_threads <= 1 and extra_threads <= 1
    period = held.ttl / 3.0
    rts_per_period = held.renew_round_trips / held.window_s * period
    per_rt = held.counted_renewals / held.renew_round_trips if held.renew_round_trips else float("nan")
    ok2 = rts_per_period <= 2.0
    return [
        [label1, f"threads in process {held.threads_before} → {held.threads_holding}; threads that sent during "
                 f"the window: {held.renew_threads}", _verdict(ok1), f"+{extra_threads} thread(s)"],
        [label2, f"{held.renew_round_trips / held.window_s:,.1f} round trips/s carrying "
                 f"{held.counted_renewals / held.window_s:,.0f} renewals/s ({_f(per_rt)} leases per round trip; "
                 f"ttl {held.ttl:g} s, period ttl/3)", _verdict(ok2),
         f"{rts_per_period:,.1f} round trips per renewal period"
         + ("" if ok2 else f" ({rts_per_period / 2:,.0f}× the limit)")],
    ]


def _keys_target(keys: KeysResult) -> list[str]:
    label = f"{keys.keys:,} distinct keys: nothing remains once the expiries pass"
    if keys.error:
        return [label, "not measured", "n/a", keys.error]
    if keys.dbsize_after_expiry is None:
        return [label, f"{keys.dbsize_after_release:,} keys left at release, {keys.without_expiry} without expiry; "
                       f"longest expiry {keys.max_pttl_ms / 1000:.0f} s (not waited in this run)",
                _verdict(keys.without_expiry == 0) + " (expiry set; not waited)", "—"]
    ok = keys.dbsize_after_expiry == 0 and keys.without_expiry == 0
    return [label, f"{keys.dbsize_after_release:,} keys at release (all with expiry) → {keys.dbsize_after_expiry} "
                   f"after {keys.waited_s:.0f} s", _verdict(ok), f"{keys.dbsize_after_expiry} keys left"]


def _handoff(hand: dict[str, HandoffResult]) -> str:
    rows = []
    st = hand[ST_WAIT]
    for w in WAITERS:
        r = hand[w.name]
        if not r.samples_ns:
            rows.append([w.name, w.mechanism, "—", "—", "—", "—", "0", r.error or "not run"])
            continue
        vs = r.ms(0.5) / st.ms(0.5) if st.samples_ns else float("nan")
        rows.append([w.name, w.mechanism, f"{r.ms(0.5):.3f}", f"{r.ms(0.9):.3f}", f"{r.ms(0.99):.3f}",
                     _x(vs), str(len(r.samples_ns)), r.error or ""])
    for name, why in NOT_WAITING.items():
        rows.append([name, why, "—", "—", "—", "—", "—", ""])
    return ("## Hand-off: holder's release → blocked waiter in another process starts its body\n\n"
            "One sample of each library per round; the holder releases 20–70 ms (random) after the waiter "
            "starts waiting, and only once a BLPOP-based waiter is seen blocked by the server. Default wait "
            "settings throughout. Clock: `time.monotonic_ns()` in both processes (CLOCK_MONOTONIC).\n\n"
            + table(["waiter", "mechanism", "median ms", "p90 ms", "p99 ms", "median × single_task", "samples",
                     "note"], rows))


def _replicas(res: ReplicaResult, plan: Any) -> str:
    head = ("## `replicas=1`: uncontended cycle against a master with one replica\n\n"
            "A master and one replica (`--replicaof`) on loopback, servers of their own (the master runs with "
            "`--repl-diskless-sync-delay 0`, so the initial sync does not wait 5 s for more replicas; the "
            f"replica synced in {res.sync_s:.2f} s). Every contender runs {plan.replica_batch} cycles per round, "
            f"contenders in turn (the first one rotates), for {plan.rounds} rounds, each on its own key and its "
            "own redis-py client of the master. With `replicas=1` the acquire script and `WAIT 1 1000` go in one "
            "pipeline; the release is not waited for. With `replicas=0` (and for the floor) the master still "
            "replicates every write, asynchronously. Round trips and commands are counted as in the lock cycle "
            f"tables over {plan.count_cycles} separate cycles.\n\n")
    if res.error and not res.timed:
        return head + f"Failed: {res.error}"
    floor, st0 = res.timed.get(replicas.FLOOR), res.timed.get(replicas.ST0)
    rows = []
    for name in replicas.NAMES:
        t, k = res.timed.get(name), res.counts.get(name)
        if t is None or not t.samples:
            why = res.unavailable.get(name) or (f"failed: {t.error}" if t and t.error else None)
            rows.append([name] + ["—"] * 10 + [why or "not run"])
            continue
        vs_floor = _ratios(t, floor)
        vs_st0 = _ratios(t, st0) if name in (replicas.ST0, replicas.ST1) else ("—", "—")
        note = "REPLCONF: the replica's ACK to the master's GETACK" if k and k.server.get("REPLCONF", 0) >= 0.5 else ""
        if t.error:
            note = (note + "; " if note else "") + f"stopped: {t.error}"
        rows.append([name, _f(t.median_us), _f(t.p99_us), *vs_floor, *vs_st0,
                     _f(k.round_trips, 2) if k else "—", format_counts(k.client) if k else "—",
                     format_counts(k.server) if k else "—", _f(k.server_usec) if k else "—", note])
    out = head + table(["contender", "median µs", "p99 µs", "median × floor", "p99 × floor", "median × replicas=0",
                        "p99 × replicas=0", "round trips", "client commands", "server commands (incl. inside scripts)",
                        "server µs", "note"], rows)
    added = [(a, b) for a, b in ((replicas.ST1, replicas.ST0), (replicas.FLOOR_WAIT, replicas.FLOOR))
             if _has(res.timed, a) and _has(res.timed, b)]
    if added:
        out += "\n\nMedian µs added by waiting for the replica: " + "; ".join(
            f"{_short(a)} − {_short(b)}: {res.timed[a].median_us - res.timed[b].median_us:+,.1f} µs"
            for a, b in added) + "."
    out += ("\n\n*Server µs* leaves out the time a `WAIT` is blocked for the replica's acknowledgement: "
            "commandstats counts only the command's own execution." if any(k.server.get("WAIT")
                                                                           for k in res.counts.values()) else "")
    if res.lag_end is not None:
        out += (f" The replica was {res.lag_end:,} bytes of replication stream behind the master 0.1 s after the "
                "last round.")
    if res.error:
        out += f"\n\nStopped: {res.error}"
    return out


def _producer(res: ProducerResult, plan: Any) -> str:
    head = ("## Producer side: `send_once` refusing a duplicate, vs a plain `delay()`\n\n"
            "One Celery app (Redis broker on a redis-server of its own, JSON, no result backend, no worker) and one "
            "task decorated `@single_run(key=\"bench:send:{n}\")`; all three contenders call it, so only the "
            f"producer path differs. {plan.producer_batch} calls per contender per round, contenders in turn (the "
            f"first one rotates), for {plan.rounds} rounds. The refused calls find the marker of one message "
            "that waits in a queue of its own throughout; the publishing `send_once` uses a fresh `n` every call. "
            "After every round (untimed) the broker queue and the publishing calls' markers are deleted. Round "
            f"trips and commands are counted as in the lock cycle tables over {plan.count_cycles} separate calls; "
            "*messages published* is the queue's length after those calls, per call.\n\n")
    if res.error and not res.timed:
        return head + f"Failed: {res.error}"
    base = res.timed.get(producer.DELAY)
    rows = []
    for name in producer.NAMES:
        t, k = res.timed.get(name), res.counts.get(name)
        if t is None or not t.samples:
            why = (t.error if t else None) or res.error
            rows.append([name] + ["—"] * 9 + [f"failed: {why}" if why else "not run"])
            continue
        sent = res.published.get(name)
        rows.append([name, _f(t.median_us), _f(t.p99_us), *_ratios(t, base),
                     _f(k.round_trips, 2) if k else "—", format_counts(k.client) if k else "—",
                     format_counts(k.server) if k else "—", _f(k.server_usec) if k else "—",
                     _f(sent, 2) if sent is not None else "—", f"stopped: {t.error}" if t.error else ""])
    out = head + table(["call", "median µs", "p99 µs", "median × `delay()`", "p99 × `delay()`", "round trips",
                        "client commands", "server commands (incl. inside scripts)", "server µs",
                        "messages published per call", "note"], rows)
    before, after = res.used_memory
    if before:
        out += ("\n\nBroker server used_memory before the timed rounds / after the last round's cleanup: "
                f"{before:,} B / {after:,} B; keys left: " + ", ".join(f"`{k}`" for k in res.keys_at_end) + ".")
    if res.error:
        out += f"\n\nStopped: {res.error}"
    return out


def _has(timed: dict[str, Timed], name: str) -> bool:
    t = timed.get(name)
    return bool(t and t.samples)


def _ratios(t: Timed, base: Optional[Timed]) -> tuple[str, str]:
    if base is None or not base.samples:
        return "n/a", "n/a"
    return _x(t.median_us / base.median_us), _x(t.p99_us / base.p99_us)


def _short(name: str) -> str:
    return {replicas.ST1: "replicas=1", replicas.ST0: "replicas=0", replicas.FLOOR_WAIT: "floor + WAIT",
            replicas.FLOOR: "floor"}.get(name, name)


def _e2e(results: Optional[list[PoolResult]], plan: Any) -> str:
    head = ("## Celery end-to-end: a real worker drains no-op tasks\n\n"
            f"Each run: a fresh queue holding a start mark, {plan.e2e_tasks:,} tasks and a done mark is filled, "
            "then a fresh worker drains it; tasks/s counts from the start mark to the done mark (worker start-up "
            f"excluded). {plan.e2e_rounds} round(s), the variants rotating which goes first. Decorated: "
            "`@app.task` over `@single_run(key=\"bench:e2e:{n}\")` (a distinct key per task, so uncontended). "
            "Floor lock: the same task taking `SET key token NX PX` and releasing with `EVALSHA` "
            "compare-and-delete inline, the cheapest correct lock. No result backend; the worker's per-task "
            "INFO log lines are off.\n\n")
    if results is None:
        return head + "Skipped (`--skip-e2e`)."
    rows = []
    for p in results:
        def each(variant: str, p: PoolResult = p) -> str:
            return ", ".join(f"{v:,.0f}" for v in p.rates[variant]) or "—"

        def added_us(variant: str, p: PoolResult = p) -> float:
            return (1 / p.median(variant) - 1 / p.median("plain")) * 1e6 * p.concurrency

        rows.append([f"{p.pool} (concurrency {p.concurrency})", _f(p.median("plain"), 0), _f(p.median("floor"), 0),
                     _f(p.median("locked"), 0), _x(p.ratio("floor")), _x(p.ratio()), _f(added_us("floor"), 0),
                     _f(added_us("locked"), 0), f"{each('plain')} / {each('floor')} / {each('locked')}",
                     p.error or ""])
    return head + table(["pool", "undecorated tasks/s", "floor lock tasks/s", "decorated tasks/s",
                         "floor ÷ undecorated", "decorated ÷ undecorated", "µs added per task by the floor",
                         "µs added per task by single_task", "each run (undecorated / floor / decorated)", "error"],
                        rows) + ("\n\ntasks/s are medians over the rounds; *µs added per task* is the difference "
                                 "of the per-task times (1 / rate) multiplied by the concurrency: the time one "
                                 "pool process spends on it.")


def _held(held: HeldResult) -> str:
    head = "## Scale: leases held at once in one process\n\n"
    if held.error:
        return head + f"Failed: {held.error}"
    rows = [
        ["leases held (one thread, nested `with` blocks)", f"{held.leases:,}"],
        ["ttl (renewal due every ttl/3)", f"{held.ttl:g} s"],
        ["time to acquire all", f"{held.acquire_s * 1000:,.0f} ms"],
        ["OS threads in the process before / while holding", f"{held.threads_before} / {held.threads_holding}"],
        ["threads that sent anything during window 2", str(held.renew_threads)],
        ["window 1 (nothing patched): renewals executed by the server",
         f"{held.renewals:,} in {held.window_s:g} s ({held.renewals / held.window_s:,.0f}/s; "
         f"{held.renewals / held.window_s / held.leases * held.ttl:.1f} per lease per ttl)"],
        ["window 1: watchdog thread CPU", f"{held.watchdog_cpu_s:.2f} s in {held.window_s:g} s "
                                          f"({held.watchdog_cpu_s / held.window_s * 100:.0f} % of one core)"],
        ["window 2 (round trips counted): renewals / round trips from the watchdog thread",
         f"{held.counted_renewals:,} / {held.renew_round_trips:,} in {held.window_s:g} s "
         f"({held.renew_round_trips / held.window_s:,.1f} round trips/s)"],
        ["leases lost / alive at the end", f"{held.lost} / {held.alive_at_end:,}"],
    ]
    return head + table(["", ""], rows) + (
        "\n\nOne lease per `with` block, all nested in one thread's ExitStack; every lease is on the same "
        "redis-py client, so one pipeline per renewal period could carry them all.")


def _many_keys(keys: KeysResult) -> str:
    head = (f"## Scale: {keys.keys:,} distinct keys acquired and released (decorated function, key "
            f"`bench:many:{{i}}`, ttl {keys.ttl:g} s, a server of its own)\n\n")
    if keys.error:
        return head + f"Failed: {keys.error}"
    after = ("not waited (quick run)" if keys.dbsize_after_expiry is None
             else f"{keys.dbsize_after_expiry} keys, used_memory {keys.used_after_expiry:,} B "
                  f"(after waiting {keys.waited_s:.0f} s)")
    rows = [
        ["time for all calls", f"{keys.seconds:.2f} s ({keys.seconds / keys.keys * 1e6:,.0f} µs per call)"],
        ["used_memory before", f"{keys.used_before:,} B"],
        ["used_memory right after the last release", f"{keys.used_after_release:,} B "
                                                     f"(+{keys.used_after_release - keys.used_before:,} B, "
                                                     f"{(keys.used_after_release - keys.used_before) / keys.keys:.0f}"
                                                     " B per key)"],
        ["keys left right after the last release", f"{keys.dbsize_after_release:,} "
                                                   f"({keys.without_expiry} without an expiry)"],
        ["longest remaining expiry", f"{keys.max_pttl_ms / 1000:.1f} s"],
        ["once the expiries have passed", after],
    ]
    return head + table(["", ""], rows)


def _cache(cache: CacheResult) -> str:
    head = ("## Script cache: a decorated call's round trips (single_task's own client from a URL)\n\n")
    if cache.error and not cache.steps:
        return head + f"Failed: {cache.error}"
    rows = []
    for s in cache.steps:
        handshake = {k: v for k, v in s.client_commands.items() if k in HANDSHAKE}
        lease = {k: float(v) for k, v in s.client_commands.items() if k not in HANDSHAKE}
        rows.append([s.what, str(_cache_rts(s)), format_counts(lease),
                     format_counts({k: float(v) for k, v in handshake.items()}) if handshake else "—",
                     s.error or "none"])
    note = ("\n\nThe *connection handshake* is redis-py reconnecting after the restart (every client pays it); "
            "it is not counted in the lease's round trips. A failed `EVALSHA` (NOSCRIPT) followed by `EVAL` is "
            "the one extra round trip.")
    return head + table(["call", "lease round trips", "lease commands sent", "connection handshake sent",
                         "error surfaced"], rows) + note + (f"\n\nStopped: {cache.error}" if cache.error else "")


def _where_time_goes(data: dict[str, Any]) -> str:
    timed: dict[str, Timed] = data["timed"]
    counts: dict[str, Counts] = data["counts"]
    cost: PythonCost = data["python_cost"]
    prof: Profile = data["profile"]
    out = ["## Where single_task's cycle time goes", ""]
    dec, floor, ping = timed.get(ST_DECORATED), timed.get(FLOOR), timed.get(PING)
    if dec and floor and ping and dec.samples and floor.samples and ping.samples:
        kd, kf = counts.get(ST_DECORATED), counts.get(FLOOR)
        total = dec.median_us
        rows = [
            ["decorated call, median (from the interleaved rounds)", _f(total), "100 %"],
            ["  single_task's own Python (stub client answering instantly, no I/O)", _f(cost.decorated_us),
             f"{cost.decorated_us / total * 100:.0f} %"],
            ["  Redis server time (commandstats usec, both scripts)", _f(kd.server_usec) if kd else "n/a",
             f"{kd.server_usec / total * 100:.0f} %" if kd else ""],
            ["  the rest: 2 × (redis-py call + loopback + kernel)",
             _f(total - cost.decorated_us - (kd.server_usec if kd else 0)),
             f"{(total - cost.decorated_us - (kd.server_usec if kd else 0)) / total * 100:.0f} %"],
            ["floor, median", _f(floor.median_us), f"{floor.median_us / total * 100:.0f} % of the decorated call"],
            ["  floor's Redis server time", _f(kf.server_usec) if kf else "n/a", ""],
            ["one PING, median", _f(ping.median_us), ""],
            ["gap to the floor (decorated − floor)", _f(total - floor.median_us),
             f"{(total - floor.median_us) / total * 100:.0f} %"],
        ]
        out += [table(["", "µs", "share"], rows), ""]
    out += [f"single_task's own Python per cycle with the stub client: decorated {cost.decorated_us:.1f} µs, "
            f"`with single_run(...)` {cost.with_us:.1f} µs, skip path {cost.skip_us:.1f} µs.", "",
            f"cProfile of {prof.cycles:,} uncontended decorated calls against Redis "
            f"({prof.wall_us_per_cycle:.0f} µs per call under the profiler); top functions by own time:", "",
            table(["function", "where", "calls per cycle", "own µs per cycle", "cumulative µs per cycle"],
                  [[f"`{r.function}`", r.where, f"{r.calls_per_cycle:g}", f"{r.own_us:.2f}", f"{r.cumulative_us:.2f}"]
                   for r in prof.rows])]
    return "\n".join(out)
