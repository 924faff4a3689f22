"""The Markdown report: machine and versions, the targets of the performance issue met or missed,
and every phase's tables. A phase that failed, or a section that cannot be drawn, says so in its
place; the rest of the report is still written."""

from __future__ import annotations

import math
import os
import platform
import time
from importlib import metadata
from typing import Any, Callable, Optional

from bench import features, producer, replicas
from bench.contenders import CONTENDERS, Contender
from bench.costs import Profile
from bench.e2e import PoolResult
from bench.features import FeaturesResult
from bench.handoff import NOT_WAITING, WAITERS, HandoffResult
from bench.latency import PARSER_LABEL, PARSERS, ParserResult
from bench.measure import Counts, Timed, format_counts, percentile, round_ratios
from bench.producer import ProducerResult
from bench.replicas import ReplicaResult
from bench.scale import CacheResult, HeldResult, KeysResult

TITLE = "# single_task benchmark"
FLOOR = "floor: SET NX PX + EVALSHA compare-and-delete"
FLOOR_DIRECT = "floor, written straight to a pooled connection"
BUSY_FLOOR = "floor: SET NX PX on a busy key"
PING = "PING (one round trip)"
ST_WITH = "single_task: `with single_run(...)` block"
ST_WITH_ONCE = "single_task: `with spec` (single_run built once)"
ST_DECORATED = "single_task: decorated call"
ST_SKIP = "single_task: decorated call, key busy → skip"
RPY_LOCK = "redis-py `Lock` (`with r.lock(...)`)"
PRL = "python-redis-lock"
ST_WAIT = WAITERS[0].name
PRL_WAIT = WAITERS[1].name
PEER_DISTS = ["redis", "celery", "kombu", "hiredis", "python-redis-lock", "pottery", "celery-once", "celery-singleton",
              "huey", "dramatiq"]
HANDSHAKE = {"HELLO", "CLIENT", "SELECT", "AUTH"}
SERVER_TARGET_US = 30.0
SOLO_TARGET = 0.95

# (label, contender, base, limit, parsers the limit applies to); the limits of the issue
RATIO_TARGETS: list[tuple[str, str, str, float, tuple[str, ...]]] = [
    ("decorated call ≤ 1.10× the floor (pure-Python parser)", ST_DECORATED, FLOOR, 1.10, ("python",)),
    ("decorated call ≤ 1.05× the floor with hiredis", ST_DECORATED, FLOOR, 1.05, ("hiredis",)),
    ("stretch: decorated call ≤ 1.05× the floor without hiredis", ST_DECORATED, FLOOR, 1.05, ("python",)),
    ("`with` block, `single_run` built once ≤ 1.10× the floor (pure-Python parser)", ST_WITH_ONCE, FLOOR, 1.10,
     ("python",)),
    ("`with` block, `single_run` built once ≤ 1.05× the floor with hiredis", ST_WITH_ONCE, FLOOR, 1.05, ("hiredis",)),
    ("`with single_run(...)` built per use ≤ 1.15× the floor", ST_WITH, FLOOR, 1.15, ("python", "hiredis")),
    ("busy key, skip path ≤ 1.00× one `SET NX`", ST_SKIP, BUSY_FLOOR, 1.00, ("python", "hiredis")),
]


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


def _f(value: Optional[float], digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def _x(value: Optional[float]) -> str:
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


def _spread(values: list[float]) -> str:
    """The p10 to p90 range of per-round ratios."""
    if not values:
        return "n/a"
    return f"{percentile(values, 0.1):.2f}–{percentile(values, 0.9):.2f}"


def _failed(value: Any) -> Optional[str]:
    """The error of a phase that failed (main.PhaseError), else None."""
    if type(value).__name__ == "PhaseError":
        return str(value)
    return None


def _safe(title: str, fn: Callable[..., str], *args: Any) -> str:
    """A section, or its title and why it could not be drawn."""
    for arg in args:
        err = _failed(arg)
        if err:
            return f"{title}\n\nPhase failed: {err}"
    try:
        return fn(*args)
    except Exception as exc:
        return f"{title}\n\nCould not draw this section: {type(exc).__name__}: {exc}"


def _parsers(lat: Any) -> list[ParserResult]:
    if _failed(lat) or not isinstance(lat, dict):
        return []
    return [lat[p] for p in PARSERS if p in lat]


def _measured(lat: Any) -> list[ParserResult]:
    return [r for r in _parsers(lat) if r.measured]


def _server_legs(lat: Any, name: str) -> list[Counts]:
    """Every leg's counts of one contender, all parsers (the server's work does not depend on the parser)."""
    return [legs[name] for r in _parsers(lat) for legs in r.leg_counts if name in legs]


def _server_usec(lat: Any, name: str) -> float:
    """Median over all legs of the commandstats µs per cycle."""
    return percentile([k.server_usec for k in _server_legs(lat, name)], 0.5)


def _server_cpu_usec(lat: Any, name: str) -> float:
    return percentile([k.server_cpu_usec for k in _server_legs(lat, name)], 0.5)


def _counts_of(lat: Any) -> dict[str, Counts]:
    """Counts of the first parser that has them (server-side figures do not depend on the parser)."""
    for r in _parsers(lat):
        if r.counts:
            return r.counts
    return {}


# -- the report ------------------------------------------------------------------------------------


def render(data: dict[str, Any]) -> str:
    lat = data.get("latency")
    plan = data["plan"]
    parts = [TITLE, "", _safe("## Run", _header, data), "", _safe("## Targets (issue 11)", _targets, data), "",
             _safe("## Lock cycle latency", _latency, lat, plan), "",
             _safe("## Server time per cycle", _server_time, lat, plan), "",
             _safe("## Where the time goes", _where_time_goes, lat, data.get("profile")), "",
             _safe("## Hand-off", _handoff, data.get("handoff")), "",
             _safe("## `replicas=1`", _replicas, data.get("replicas"), plan), "",
             _safe("## Producer side", _producer, data.get("producer"), plan), "",
             _safe("## Producer features on the uncontended path", _features, data.get("features"), plan), "",
             _safe("## Celery end-to-end", _e2e, data.get("e2e"), plan), "",
             _safe("## Scale: leases held at once in one process", _held, data.get("held")), "",
             _safe("## Scale: distinct keys", _many_keys, data.get("many_keys")), "",
             _safe("## Script cache", _cache, data.get("cache")), ""]
    return "\n".join(parts)


def _header(data: dict[str, Any]) -> str:
    plan = data["plan"]
    cpus = os.cpu_count()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    load0, load1 = data["loadavg_start"], data["loadavg_end"]
    hiredis = data.get("hiredis")
    parsers = []
    for r in _parsers(data.get("latency")):
        if r.skipped:
            parsers.append(f"{r.parser}: {r.skipped}")
        else:
            info = r.info
            parsers.append(f"{r.parser}: {r.legs} leg(s), redis-py used `{info.get('parser_class', '?')}`"
                           + (f" (hiredis {info['hiredis_version']})" if info.get("hiredis_version") else "")
                           + (f"; errors: {'; '.join(r.errors)}" if r.errors else ""))
    try:
        import redis.connection

        parent_parser = redis.connection.DefaultParser.__name__
    except Exception:
        parent_parser = "unknown"
    phase_s = data.get("phase_seconds", {})
    rows = [
        ["command", f"`{data['command']}` (from the repository root)"],
        ["date", time.strftime("%Y-%m-%d %H:%M %Z")],
        ["machine", f"nproc {affinity} (os.cpu_count {cpus}), {_cpu_model()}, "
                    f"{platform.system()} {platform.release()}"],
        ["load average (1 / 5 / 15 min) at start", " / ".join(f"{v:.2f}" for v in load0)],
        ["load average (1 / 5 / 15 min) at end", " / ".join(f"{v:.2f}" for v in load1)],
        ["Python", f"{platform.python_implementation()} {platform.python_version()}"],
        ["redis-server", f"{data['redis_version']} (`{data['binary']}`)"],
        ["redis-py / celery / kombu", f"{_version('redis')} / {_version('celery')} / {_version('kombu')}"],
        ["hiredis", f"{hiredis} installed" if hiredis else "hiredis not installed: skipped"],
        ["latency phase, per parser", "; ".join(parsers) or "not run"],
        ["parser of every other phase", f"`{parent_parser}` (redis-py's default in this environment)"],
        ["peers", ", ".join(f"{d} {_version(d)}" for d in PEER_DISTS[4:])],
        ["single_task", _code_identity()],
        ["run length", f"{data['seconds']:.0f} s ("
                       + ", ".join(f"{k} {v:.0f} s" for k, v in phase_s.items()) + ")"],
        ["latency plan", f"{plan.rounds} rounds × {plan.batch} cycles per contender and parser, in {plan.legs} "
                         f"legs per parser; counters over {plan.count_cycles} cycles per contender"],
    ]
    return "## Run\n\n" + table(["", ""], rows) + (
        "\n\nThe machine is shared (other test and chaos runs may be going on); the load average above says how "
        "much. Only ratios between contenders measured in the same rounds are compared; absolute µs move with "
        "the load.")


def _code_identity() -> str:
    """Which single_task.py was measured: the file imported, its hash, and the git commit if there is one."""
    import hashlib
    import subprocess

    import single_task

    path = single_task.__file__ or ""
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
    except OSError:
        digest = "unreadable"
    where = os.path.dirname(os.path.abspath(path))
    git = "not a git checkout"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--", os.path.basename(path)], cwd=where,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            git = f"git {head.stdout.strip()}" + (", single_task.py modified in the work tree" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    version = getattr(single_task, "__version__", "?")
    return f"{version}, `{path}` (sha256 {digest}…; {git})"


# -- targets -------------------------------------------------------------------------------------------


def _targets(data: dict[str, Any]) -> str:
    lat = data.get("latency")
    rows: list[list[str]] = []
    measured = {r.parser: r for r in _measured(lat)}
    for label, name, base, limit, parsers in RATIO_TARGETS:
        for parser in parsers:
            rows.append(_ratio_row(label, measured.get(parser), _parsers(lat), parser, name, base, limit))
    for peer in (RPY_LOCK, PRL):
        for parser in PARSERS:
            rows.append(_peer_row(peer, measured.get(parser), _parsers(lat), parser))
    rows.append(_handoff_row(data.get("handoff")))
    rows.append(_server_row(lat))
    rows.append(_solo_row(data.get("e2e")))
    rows.append(_round_trip_row(lat))
    for fn, key in ((_cache_target, "cache"), (_producer_target, "producer"), (_features_target, "features"),
                    (_replicas_target, "replicas"), (_keys_target, "many_keys")):
        rows.append(_guard(fn, data.get(key), key))
    held = data.get("held")
    if _failed(held) or not isinstance(held, HeldResult):
        rows.append(["held leases", "not measured", "n/a", str(_failed(held) or "not run")])
    else:
        try:
            rows.extend(_held_targets(held))
        except Exception as exc:
            rows.append(["held leases", "not measured", "n/a", f"{type(exc).__name__}: {exc}"])
    pings = [f"{r.parser} {r.timed[PING].median_us:.1f} µs" for r in _measured(lat)
             if PING in r.timed and r.timed[PING].samples]
    load = (" A loaded machine adds the same wake-up delays to every contender and so pulls every ratio towards "
            "1: the median `PING` in each parser's rounds (" + ", ".join(pings) + ") says how loaded it was."
            if pings else "")
    return ("## Targets (issue 11)\n\n"
            "Medians from the interleaved rounds of this run; *per-round* is the p10–p90 spread of the ratio "
            "of the two contenders' medians round by round (the run-to-run noise a single ratio hides)." + load
            + "\n\n" + table(["target", "measured", "verdict", "by how much"], rows))


def _guard(fn: Callable[[Any], list[str]], value: Any, what: str) -> list[str]:
    err = _failed(value)
    if err or value is None:
        return [what, "not measured", "n/a", err or "not run"]
    try:
        return fn(value)
    except Exception as exc:
        return [what, "not measured", "n/a", f"{type(exc).__name__}: {exc}"]


def _not_measured(label: str, parser: str, results: list[ParserResult]) -> list[str]:
    why = next((r.skipped or "; ".join(r.errors) for r in results if r.parser == parser), "not run") or "not run"
    return [f"{label} [{parser}]", "not measured", "n/a", why]


def _ratio_row(label: str, res: Optional[ParserResult], results: list[ParserResult], parser: str, name: str,
               base: str, limit: float) -> list[str]:
    if res is None:
        return _not_measured(label, parser, results)
    t, b = res.timed.get(name), res.timed.get(base)
    if not t or not b or not t.samples or not b.samples:
        why = (t.error if t else None) or res.unavailable.get(name) or "not measured"
        return [f"{label} [{parser}]", "not measured", "n/a", why]
    r = t.median_us / b.median_us
    cpu = t.cpu_us / b.cpu_us if b.cpu_per_cycle and t.cpu_per_cycle else float("nan")
    return [f"{label} [{parser}]",
            f"{t.median_us:.1f} µs vs {b.median_us:.1f} µs: **{_x(r)}** (per-round {_spread(round_ratios(t, b))}; "
            f"client CPU {t.cpu_us:.1f} vs {b.cpu_us:.1f} µs: {_x(cpu)})",
            _verdict(r <= limit), _over(r, limit)]


def _peer_row(peer: str, res: Optional[ParserResult], results: list[ParserResult], parser: str) -> list[str]:
    label = f"decorated call and `with` (built once) faster than {peer.split(' (')[0]}"
    if res is None:
        return _not_measured(label, parser, results)
    p = res.timed.get(peer)
    if not p or not p.samples:
        return [f"{label} [{parser}]", "not measured", "n/a",
                res.unavailable.get(peer) or (p.error if p else None) or "not run"]
    parts, oks, spare = [], [], []
    for name, short in ((ST_DECORATED, "decorated"), (ST_WITH_ONCE, "with once")):
        t = res.timed.get(name)
        if not t or not t.samples:
            parts.append(f"{short}: not measured")
            oks.append(False)
            continue
        r = t.median_us / p.median_us
        parts.append(f"{short} {t.median_us:.1f} µs = {_x(r)} the peer's (per-round {_spread(round_ratios(t, p))})")
        oks.append(r < 1.0)
        spare.append(f"{short} {(1 - r) * 100:.0f} % faster" if r < 1.0 else f"{short} {(r - 1) * 100:.0f} % slower")
    return [f"{label} [{parser}]", f"peer {p.median_us:.1f} µs; " + "; ".join(parts), _verdict(all(oks)),
            ", ".join(spare) if spare else "—"]


def _handoff_row(hand: Any) -> list[str]:
    label = "`wait` hand-off median below python-redis-lock's (same run)"
    if _failed(hand) or not hand:
        return [label, "not measured", "n/a", _failed(hand) or "not run"]
    st, prl = hand[ST_WAIT], hand[PRL_WAIT]
    if not (st.samples_ns and prl.samples_ns):
        return [label, "not measured", "n/a", st.error or prl.error or ""]
    a, b = st.ms(0.5), prl.ms(0.5)
    return [label, f"{a:.3f} ms vs {b:.3f} ms", _verdict(a < b),
            f"{(1 - a / b) * 100:.0f} % faster" if a < b else f"{(a / b - 1) * 100:.0f} % slower"]


def _server_row(lat: Any) -> list[str]:
    label = f"server time per uncontended cycle ≤ {SERVER_TARGET_US:.0f} µs (`INFO commandstats`)"
    legs = _server_legs(lat, ST_DECORATED)
    if not legs:
        return [label, "not measured", "n/a", "no counts"]
    usec = _server_usec(lat, ST_DECORATED)
    inner = percentile([k.inner_usec for k in legs], 0.5)
    spread = f"{min(k.server_usec for k in legs):.1f}–{max(k.server_usec for k in legs):.1f}"
    others = []
    for name, short in ((ST_WITH_ONCE, "with once"), (ST_WITH, "with per use"), (ST_SKIP, "skip"),
                        (FLOOR, "floor"), (BUSY_FLOOR, "one SET NX"), (RPY_LOCK, "redis-py Lock"),
                        (PRL, "python-redis-lock")):
        if _server_legs(lat, name):
            others.append(f"{short} {_server_usec(lat, name):.1f}")
    ok = usec <= SERVER_TARGET_US
    return [label, f"decorated **{usec:.1f} µs** (median of {len(legs)} windows, {spread}; {inner:.1f} of it in "
                   "commands inside scripts); " + ", ".join(others) + " µs",
            _verdict(ok), f"{SERVER_TARGET_US - usec:.1f} µs to spare" if ok
            else f"over by {usec - SERVER_TARGET_US:.1f} µs "
                 f"({(usec / SERVER_TARGET_US - 1) * 100:.0f} % above the limit)"]


def _solo_row(results: Any) -> list[str]:
    label = f"Celery solo pool: decorated ≥ {SOLO_TARGET:.2f}× the floor lock inline (tasks/s)"
    if _failed(results) or results is None:
        return [label, "not measured", "n/a", _failed(results) or "skipped (--skip-e2e)"]
    solo = next((p for p in results if p.pool == "solo"), None)
    if solo is None or not solo.all_rates("locked") or not solo.all_rates("floor"):
        return [label, "not measured", "n/a", (solo.error if solo else None) or "not run"]
    ratios = solo.round_ratios("locked", "floor")
    med = percentile(ratios, 0.5)
    runs = ", ".join(f"{r:.2f}" for r in solo.run_ratios("locked", "floor"))
    inside = min(ratios) < SOLO_TARGET <= max(ratios) if ratios else False
    measured = (f"median of {len(ratios)} per-round ratios **{_x(med)}** (min {_x(min(ratios))}, max "
                f"{_x(max(ratios))}; per-run medians {runs}); ratio of median rates "
                f"{_x(solo.ratio('locked', 'floor'))}")
    how = f"{med - SOLO_TARGET:+.2f}× against the limit"
    if inside:
        how += "; the limit lies inside the per-round spread, so one round settles nothing"
    return [label, measured, _verdict(med >= SOLO_TARGET) + (" (within the noise)" if inside else ""), how]


def _round_trip_row(lat: Any) -> list[str]:
    label = "round trips: 2 per uncontended run (decorated, `with`), 1 for a busy call"
    counts = _counts_of(lat)
    want = {ST_DECORATED: 2.0, ST_WITH_ONCE: 2.0, ST_WITH: 2.0, ST_SKIP: 1.0}
    got = {n: counts[n].round_trips for n in want if n in counts}
    if len(got) < len(want):
        return [label, "not measured", "n/a", "no counts"]
    ok = all(abs(got[n] - want[n]) < 1e-9 for n in want)
    shown = (f"decorated {got[ST_DECORATED]:.2f}, with once {got[ST_WITH_ONCE]:.2f}, with per use "
             f"{got[ST_WITH]:.2f}, skip {got[ST_SKIP]:.2f}")
    return [label, shown, _verdict(ok), "—" if ok else "round trips differ from the target"]


# -- latency ---------------------------------------------------------------------------------------


def _latency(lat: Any, plan: Any) -> str:
    out = ["## Lock cycle latency (interleaved, one run, both parsers)", "",
           f"Every contender runs {plan.batch} cycles per round, contenders in turn (the first one rotates), for "
           f"{plan.rounds} rounds per parser, each contender on its own key and its own redis-py client, all "
           "against one redis-server on loopback. redis-py picks its parser when it is imported, so each parser's "
           f"rounds run in {plan.legs} child process(es) of their own (`bench/parser_child.py`; the pure-Python "
           "one with `import hiredis` made to fail), the legs alternating python, hiredis, hiredis, python… Ratios "
           "are to the floor's median (or p99) from the same rounds; *per-round* is the p10–p90 of the per-round "
           "ratio of medians. *Client CPU* is the benchmark process's CPU time (user + sys, all threads) per "
           "cycle, median over the rounds: what the client side costs, whatever library code, redis-py or "
           "kernel does it. *Round trips* and *client commands* are what the process wrote to its TCP sockets, "
           f"*server commands* the `INFO commandstats` delta, over {plan.count_cycles} separate cycles at the "
           "start of the parser's first leg: Redis counts the commands a Lua script calls under their own names, so "
           "for script-based locks the server count includes the script's inner commands. Logging below ERROR "
           "is disabled for every library alike (python-redis-lock logs a WARNING on every failed non-blocking "
           "acquire)."]
    for res in _parsers(lat):
        label = PARSER_LABEL[res.parser]
        out += ["", f"### {label}", ""]
        if res.skipped:
            out.append(res.skipped)
            continue
        if res.errors:
            out += ["Failed legs: " + "; ".join(res.errors), ""]
        if not res.measured:
            out.append("Not measured.")
            continue
        counts = res.counts or _counts_of(lat)
        out += ["Full cycles: acquire, empty body, release.", "",
                _cycle_table(res, counts, "cycle"), "",
                "Busy key: one attempt that must not run the body.", "",
                _cycle_table(res, counts, "busy")]
    return "\n".join(out)


def _cycle_table(res: ParserResult, counts: dict[str, Counts], kind: str) -> str:
    timed = res.timed
    base = timed.get(FLOOR if kind == "cycle" else BUSY_FLOOR)
    ping = timed.get(PING)
    unit = "floor" if kind == "cycle" else "SET NX"
    headers = ["contender", "median µs", "p99 µs", f"median × {unit}", "per-round (p10–p90)", f"p99 × {unit}",
               "PINGs", "client CPU µs", "round trips", "client commands", "server commands (incl. inside scripts)"]
    if kind == "cycle":
        headers += ["release", "renewal"]
    headers.append("note")
    rows = []
    wanted: list[Contender] = [c for c in CONTENDERS if c.kind == kind or (kind == "cycle" and c.kind == "unit")]
    for c in wanted:
        t = timed.get(c.name)
        k = counts.get(c.name)
        problem = res.unavailable.get(c.name) or (t.error if t else "not run")
        if t is None or not t.samples:
            row = [c.name] + ["—"] * 10
            if kind == "cycle":
                row += [c.release or "", c.renewal or ""]
            row.append(problem or "")
            rows.append(row)
            continue
        has_base = base is not None and bool(base.samples)
        ratio = t.median_us / base.median_us if has_base and base else float("nan")
        ratio99 = t.p99_us / base.p99_us if has_base and base else float("nan")
        pings = t.median_us / ping.median_us if ping and ping.samples else float("nan")
        row = [c.name, _f(t.median_us), _f(t.p99_us), _x(ratio),
               _spread(round_ratios(t, base)) if has_base and base else "n/a", _x(ratio99), _f(pings, 2),
               _f(t.cpu_us), _f(k.round_trips, 2) if k else "—", format_counts(k.client) if k else "—",
               format_counts(k.server) if k else "—"]
        if kind == "cycle":
            row += [c.release or "", c.renewal or ""]
        note = c.note
        if c.name in res.unavailable and t.samples:
            note = (note + "; " if note else "") + res.unavailable[c.name]
        if t.error:
            note = (note + "; " if note else "") + f"stopped: {t.error}"
        row.append(note)
        rows.append(row)
    return table(headers, rows)


def _server_time(lat: Any, plan: Any) -> str:
    head = ("## Server time per cycle (`INFO commandstats` and `INFO cpu`)\n\n"
            f"Over a counted window of {plan.count_cycles} cycles per contender at the start of the first two "
            "latency legs of each parser "
            "(nothing else runs against that server meanwhile): *commandstats µs* is the `usec` delta of the "
            "commands the client sent, per cycle (a script's `usec` already includes the commands it calls, "
            "shown apart as *inside scripts*; they are not added twice). *Server CPU* is the redis-server "
            "process's user + sys CPU delta per cycle, which also counts reading the request, writing the reply "
            "and the event loop: what a cycle costs the server in all. The server's work does not depend on the "
            "client's parser, so every leg is one more measurement of the same thing: the median over the legs "
            "is the figure, their range the noise.\n\n")
    n_legs = sum(len(r.leg_counts) for r in _parsers(lat))
    if not n_legs:
        return head + "Not measured."
    rows = []
    for c in CONTENDERS:
        legs = _server_legs(lat, c.name)
        if not legs:
            continue
        us = [k.server_usec for k in legs]
        cpu = [k.server_cpu_usec for k in legs]
        rows.append([c.name, f"**{percentile(us, 0.5):.1f}**", f"{min(us):.1f}–{max(us):.1f}",
                     _f(percentile([k.inner_usec for k in legs], 0.5)), f"{percentile(cpu, 0.5):.1f}",
                     f"{min(cpu):.1f}–{max(cpu):.1f}", str(len(legs)), format_counts(legs[0].server)])
    return head + table(["contender", "commandstats µs (median)", "range over the legs", "inside scripts µs",
                         "server CPU µs (median)", "range over the legs", "legs", "server commands per cycle"],
                        rows) + (
        f"\n\nTarget: ≤ {SERVER_TARGET_US:.0f} µs of commandstats time per uncontended single_task cycle "
        "(decorated, or `with`).")


def _where_time_goes(lat: Any, prof: Any) -> str:
    out = ["## Where the time goes", "",
           "Per contender and parser: the median cycle; the client process's CPU per cycle (median over the "
           "rounds; its own Python, redis-py's, and the kernel's send and receive); the server's commandstats "
           "time (median over all counted windows); *rest* = median − client CPU − server commandstats: the "
           "server's reading, replying and event loop, loopback and the wake-ups and scheduling between the two "
           "processes, which grow with the load. The server process's CPU (`INFO cpu`) is shown beside it for "
           "reference only: on this VM it is coarse (see its range over the legs in the server table), and on 2 "
           "cores it overlaps the client's. The client CPU and commandstats columns are the figures to optimise. "
           "The *gap* rows split single_task's extra time over the floor the same way: its client CPU gap is "
           "its own Python plus the extra packing and parsing in redis-py (an earlier stub-client measurement of "
           "the library's Python alone spoke the library's private script protocol, so it is gone; the floor "
           "written straight to a connection shows what redis-py's command layer costs every contender).", ""]
    names = [(FLOOR, "floor"), (FLOOR_DIRECT, "floor, direct to a connection"), (ST_DECORATED, "decorated"),
             (ST_WITH_ONCE, "with, built once"), (ST_WITH, "with, built per use"), (RPY_LOCK, "redis-py Lock"),
             (PRL, "python-redis-lock"), (BUSY_FLOOR, "one SET NX (busy)"), (ST_SKIP, "skip (busy)"),
             (PING, "PING")]
    rows = []
    counts_any = _counts_of(lat)
    for res in _measured(lat):
        counts = res.counts or counts_any
        for name, short in names:
            t, k = res.timed.get(name), counts.get(name)
            if not t or not t.samples:
                continue
            server_us, server_cpu = _server_usec(lat, name), _server_cpu_usec(lat, name)
            rest = t.median_us - t.cpu_us - server_us
            rows.append([f"{short} [{res.parser}]", _f(t.median_us), _f(t.cpu_us), _f(server_us), _f(rest),
                         _f(server_cpu)])
        floor, kf = res.timed.get(FLOOR), counts.get(FLOOR)
        for name, short in ((ST_DECORATED, "decorated"), (ST_WITH_ONCE, "with, built once"),
                            (ST_WITH, "with, built per use")):
            t, k = res.timed.get(name), counts.get(name)
            if not (t and t.samples and floor and floor.samples and k and kf):
                continue
            d_wall, d_cpu = t.median_us - floor.median_us, t.cpu_us - floor.cpu_us
            d_srv = _server_usec(lat, name) - _server_usec(lat, FLOOR)
            d_srv_cpu = _server_cpu_usec(lat, name) - _server_cpu_usec(lat, FLOOR)
            rows.append([f"**gap: {short} − floor** [{res.parser}]", _f(d_wall), _f(d_cpu), _f(d_srv),
                         _f(d_wall - d_cpu - d_srv), _f(d_srv_cpu)])
    if rows:
        out += [table(["contender [parser]", "median µs", "client CPU µs", "server commandstats µs", "rest µs",
                       "server process CPU µs (coarse)"], rows), ""]
    else:
        out += ["Latency not measured.", ""]
    if _failed(prof):
        out.append(f"Profile: phase failed: {_failed(prof)}")
    elif isinstance(prof, Profile):
        out += [f"cProfile of {prof.cycles:,} uncontended decorated calls against Redis in the main process "
                f"({prof.wall_us_per_cycle:.0f} µs per call under the profiler, which inflates every Python "
                "function call alike). cProfile counts wall time, so the socket methods among the builtins include "
                "the wait for the server's reply. Own time per call, by package:", "",
                table(["code", "own µs per call", "share"],
                      [[k, f"{v:.2f}", f"{v / sum(prof.by_package.values()) * 100:.0f} %"]
                       for k, v in prof.by_package.items()]), "",
                "Top functions by own time:", "",
                table(["function", "where", "calls per cycle", "own µs per cycle", "cumulative µs per cycle"],
                      [[f"`{r.function}`", r.where, f"{r.calls_per_cycle:g}", f"{r.own_us:.2f}",
                        f"{r.cumulative_us:.2f}"] for r in prof.rows])]
    return "\n".join(out)


# -- Celery ------------------------------------------------------------------------------------------


def _e2e(results: Optional[list[PoolResult]], plan: Any) -> str:
    pools = "; ".join(f"{p} (concurrency {c}): {runs} run(s) × {rounds} round(s) × {tasks:,} tasks per variant"
                      for p, c, runs, rounds, tasks in plan.e2e_pools)
    head = ("## Celery end-to-end: a real worker drains no-op tasks\n\n"
            f"{pools}. A run is one fresh worker draining one queue filled before it starts: "
            f"{plan.e2e_warmup} warm-up tasks of each variant, then per round one segment of each variant (their "
            "order rotating), a mark task between segments; a segment's tasks/s is its task count over the time "
            "between its marks (`time.monotonic_ns()` noted by the worker), so start-up and publishing are not "
            "counted and the three variants share the worker process, interleaved. Decorated: `@app.task` over "
            "`@single_run(key=\"bench:e2e:{n}\")` (the lease client from a URL, as most users have it; a "
            "distinct key per task in a segment, so uncontended). Floor lock: the same task taking `SET key token "
            "NX PX` and releasing with `EVALSHA` compare-and-delete inline. No result backend; the worker's "
            "per-task INFO log lines are off. Ratios are per round (same run, same round, adjacent segments); "
            "their min–median–max over all rounds is the noise, stated instead of one number.\n\n")
    if results is None:
        return head + "Skipped (`--skip-e2e`)."
    rows = []
    detail = []
    for p in results:
        if not p.all_rates("plain"):
            rows.append([f"{p.pool} (concurrency {p.concurrency})"] + ["—"] * 8 + [p.error or "not run"])
            continue

        def mmm(values: list[float]) -> str:
            if not values:
                return "—"
            return f"{min(values):.2f} / **{percentile(values, 0.5):.2f}** / {max(values):.2f}"

        def added_us(variant: str, p: PoolResult = p) -> float:
            return (1 / p.median(variant) - 1 / p.median("plain")) * 1e6 * p.concurrency

        rows.append([f"{p.pool} (concurrency {p.concurrency})", f"{p.runs} × {len(p.rates['plain'][0])}",
                     _f(p.median("plain"), 0), _f(p.median("floor"), 0), _f(p.median("locked"), 0),
                     mmm(p.round_ratios("locked", "floor")), mmm(p.round_ratios("locked", "plain")),
                     mmm(p.round_ratios("floor", "plain")), f"{_f(added_us('floor'), 0)} / {_f(added_us('locked'), 0)}",
                     p.error or ""])
        for run, (pl, fl, lo) in enumerate(zip(p.rates["plain"], p.rates["floor"], p.rates["locked"])):
            detail.append([f"{p.pool}, run {run + 1}", ", ".join(f"{v:,.0f}" for v in pl),
                           ", ".join(f"{v:,.0f}" for v in fl), ", ".join(f"{v:,.0f}" for v in lo),
                           ", ".join(f"{a / b:.2f}" for a, b in zip(lo, fl))])
    out = head + table(["pool", "runs × rounds", "undecorated tasks/s", "floor lock tasks/s", "decorated tasks/s",
                        "decorated ÷ floor per round (min / median / max)",
                        "decorated ÷ undecorated per round (min / median / max)",
                        "floor ÷ undecorated per round (min / median / max)",
                        "µs added per task: floor / single_task", "error"], rows)
    if detail:
        out += "\n\nEvery round (tasks/s of each segment, in round order):\n\n" + table(
            ["run", "undecorated", "floor lock", "decorated", "decorated ÷ floor"], detail)
    out += ("\n\ntasks/s are medians over all rounds; *µs added per task* is the difference of the per-task times "
            "(1 / median rate) multiplied by the concurrency: the time one pool process spends on it.")
    return out


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
            f"contenders in turn (the first one rotates), for {plan.side_rounds} rounds, each on its own key and its "
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
            f"first one rotates), for {plan.side_rounds} rounds. The refused calls find the marker of one message "
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


FEATURES_TARGET = "#12: producer features cost the uncontended path nothing measurable"
_CALL_SHORT = {"decorated": "decorated", "with": "with once"}
_CLIENT_SHORT = {"plain": "redis.Redis", "layer": "command layer"}


def _features_target(res: FeaturesResult) -> list[str]:
    label = FEATURES_TARGET
    if res.unavailable:
        return [label, "not measured", "n/a", f"unavailable: {res.unavailable}"]
    ok, comps = res.verdict()
    if not comps:
        return [label, "not measured", "n/a", res.error or "; ".join(res.failed.values()) or "not run"]
    shown = "; ".join(f"{_CALL_SHORT[c.call]}, {_CLIENT_SHORT[c.client]}: {c.version_us:.1f} vs {c.before_us:.1f} µs "
                      f"**{_x(c.ratio)}** (per-round {c.p10:.2f}–{c.p90:.2f})" for c in comps)
    missed = [c for c in comps if not c.met]
    if ok is None:
        how = "not every call and client was measured"
    elif missed:
        how = "; ".join(f"{_CALL_SHORT[c.call]}, {_CLIENT_SHORT[c.client]}: {(c.ratio - 1) * 100:.0f} % above before "
                        f"({c.version_us - c.before_us:+.1f} µs), per-round "
                        + (f"p10 {c.p10:.2f} > 1.0" if c.p10 > 1.0 else f"{c.p10:.2f}–{c.p90:.2f}, all below 1.0")
                        for c in missed)
    else:
        how = "every ratio ≤ 1.0 or 1.0 inside its per-round spread"
    return [label, "features (b4fed55) ÷ before (ac72e36^): " + shown
            + " (the redis.Redis ratios are net of b4fed55's direct path)", _verdict(ok), how]


def _features_cells(res: FeaturesResult, name: str, t: Timed, base: Optional[Timed],
                    previous: Optional[Timed]) -> list[str]:
    """One version's row after its labels: timing, ratios to before and to the version above, counts."""
    legs = res.counts.get(name, [])
    usec = [k.server_usec for k in legs]
    server = "—"
    if usec:
        server = f"{percentile(usec, 0.5):.1f}" + (f" ({min(usec):.1f}–{max(usec):.1f})" if len(usec) > 1 else "")
    cpu = "—"
    if base is not None:
        cpu_ratios = [a / b for a, b in zip(t.cpu_per_cycle, base.cpu_per_cycle) if b]
        cpu = f"{_x(t.cpu_us / base.cpu_us)} ({_spread(cpu_ratios)})"
    layer = res.layer_calls.get(name)
    note = "; ".join(x for x in (res.failed.get(name, ""), f"stopped: {t.error}" if t.error else "") if x)
    return [_f(t.median_us), _f(t.p99_us),
            _x(t.median_us / base.median_us) if base is not None else "—",
            _spread(round_ratios(t, base)) if base is not None else "—",
            _x(t.median_us / previous.median_us) if previous is not None else "—",
            _f(t.cpu_us), cpu, server, _f(legs[0].round_trips, 2) if legs else "—",
            _f(layer, 1) if layer is not None else "—", format_counts(legs[0].server) if legs else "—", note]


def _features(res: FeaturesResult, plan: Any) -> str:
    head = ("## Producer features on the uncontended path: before them, with them (unused), and HEAD\n\n"
            "Do `rerun_with=\"latest\"`, `send_once(debounce=...)`, `min_interval`, queued markers released on "
            "revoke and `single_task.signals` cost an uncontended call anything when it uses none of them? They "
            f"went into {features.FILE} in four consecutive commits of that file "
            f"({', '.join(features.FEATURE_COMMITS)}): *before* is the module just before them, *features* the "
            "module after the last one, and the module after each of the three commits between is a step of "
            "its own. *HEAD* is the working tree's module: later commits changed other things as well, so it is "
            "for reference, and the verdict is features against before. Every version runs in one child process "
            "(`bench/features.py`), each old one imported from a copy under a module name of its own (its own "
            "watchdog thread, locks and caches), all against one redis-server of its own.\n\n"
            "Per version: a decorated call of a zero-argument function and a `with` block on a `single_run` "
            "built once, each on a plain `redis.Redis` and on a `redis.Redis` subclass that overrides "
            "`execute_command` (calling it unchanged). b4fed55 also brought a direct path for plain `redis.Redis` "
            "clients that packs `EVALSHA` itself (its commit message says so; the *execute_command* column shows "
            "which versions take it): on a plain client features ÷ before is the features' cost *net of* that "
            "speed-up, while on the subclass every version goes through redis-py's command layer alike. Every "
            "contender has its own key and its own client; "
            f"{plan.features_batch} cycles per contender per round, contenders in turn (the first one rotates), "
            f"for {plan.features_rounds} rounds. *× before* is the ratio of the medians, *per-round* the p10–p90 "
            "of the ratio of the two versions' batch medians round by round; *client CPU* the child process's "
            "CPU time per cycle (median over the rounds). *Server µs* is the `INFO commandstats` usec delta per "
            f"cycle over {plan.count_cycles} counted cycles, median of {plan.features_windows} window(s) per "
            "contender (range in brackets), counted before the timed rounds with the round trips and commands; "
            f"*execute_command* counts the calls into redis-py's `Redis.execute_command` per cycle over "
            f"{features.PROFILED_CYCLES} cycles (the interpreter's profiling hook).\n\n")
    if res.unavailable:
        return head + f"Unavailable: {res.unavailable}. Nothing was measured in its place."
    if res.error and not res.timed:
        return head + f"Not measured: {res.error}"
    versions = table(["version", "file measured", "adds to the version above", "sha256"],
                     [[v.name, v.source, v.adds, f"{v.sha256}…"] for v in res.versions])
    rows = []
    for call, call_label in features.CALLS.items():
        for kind, kind_label in features.CLIENTS.items():
            base = res.timed.get(features.contender(call, kind, features.BEFORE))
            previous: Optional[Timed] = None
            for version in features.VERSIONS:
                name = features.contender(call, kind, version)
                t = res.timed.get(name)
                if t is None or not t.samples:
                    why = res.failed.get(name) or res.failed.get(version) or (t.error if t else None) or "not run"
                    rows.append([call_label, kind_label, version] + ["—"] * 11 + [why])
                    previous = None
                    continue
                against = base if version != features.BEFORE and base is not None and base.samples else None
                rows.append([call_label, kind_label, version, *_features_cells(res, name, t, against, previous)])
                previous = t
    out = head + versions + "\n\n" + table(
        ["call", "client", "version", "median µs", "p99 µs", "× before", "per-round × before (p10–p90)",
         "× the version above", "client CPU µs", "client CPU × before (per-round p10–p90)",
         "server µs (commandstats)", "round trips", "execute_command per cycle",
         "server commands (incl. inside scripts)", "note"], rows)
    ok, comps = res.verdict()
    out += (f"\n\n**Verdict: {FEATURES_TARGET.split(': ', 1)[1]}**: {_verdict(ok)}. The rule: {features.RULE}. "
            + " ".join(f"{_CALL_SHORT[c.call]} on {_CLIENT_SHORT[c.client]}: {_x(c.ratio)}, per-round "
                       f"{c.p10:.2f}–{c.p90:.2f} ({'met' if c.met else 'missed'})." for c in comps)
            + " A cost smaller than the per-round spread is not told apart from the noise by this rule; the "
              "client CPU and server µs columns show where a cost would come from.")
    info = res.info
    if info:
        threads = ", ".join(f"{n} × `{name}`" for name, n in sorted(info.get("threads", {}).items()))
        still = info.get("still_running") or []
        out += (f"\n\nAt the end of the rounds: leases still held (each copy's own `is_running`): "
                f"{', '.join(still) if still else 'none'}; keys of the phase left on the server: "
                f"{info.get('keys_left', '?')} ({info.get('keys_without_expiry', '?')} without an expiry); threads "
                f"in the child: {threads} (they end with it). redis-py {info.get('redis_py', '?')}, parser "
                f"`{info.get('parser_class', '?')}`.")
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


def _held(held: HeldResult) -> str:
    head = "## Scale: leases held at once in one process\n\n"
    if held.error:
        return head + f"Failed: {held.error}"
    rows = [
        ["leases held (one thread, nested `with` blocks)", f"{held.leases:,}"],
        ["ttl (renewal due every ttl/3)", f"{held.ttl:g} s"],
        ["time to acquire all", f"{held.acquire_s * 1000:,.0f} ms"],
        ["OS threads in the process before / while holding", f"{held.threads_before} / {held.threads_holding}"],
        ["threads that sent anything during window 2 (the holding thread sleeps)", str(held.renew_threads)],
        ["window 1 (nothing patched): renewals executed by the server",
         f"{held.renewals:,} in {held.window_s:g} s ({held.renewals / held.window_s:,.0f}/s; "
         f"{held.renewals / held.window_s / held.leases * held.ttl:.1f} per lease per ttl)"],
        ["window 1: watchdog thread CPU", f"{held.watchdog_cpu_s:.2f} s in {held.window_s:g} s "
                                          f"({held.watchdog_cpu_s / held.window_s * 100:.0f} % of one core)"],
        ["window 2 (round trips counted): renewals / round trips sent by the process (only its background threads run)",
         f"{held.counted_renewals:,} / {held.renew_round_trips:,} in {held.window_s:g} s "
         f"({held.renew_round_trips / held.window_s:,.1f} round trips/s)"],
        ["leases lost / alive at the end", f"{held.lost} / {held.alive_at_end:,} (alive by {held.alive_by})"],
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
