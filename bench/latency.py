"""Cycle latency of every contender, interleaved, once with redis-py's pure-Python parser and once
with hiredis, in one ``python -m bench`` run.

redis-py chooses its parser at import, so each parser gets child processes of its own (see
bench/parser_child.py). The rounds of each parser are split into legs run in the order
python, hiredis, hiredis, python (…), so that machine drift over the phase hits both parsers alike;
inside a leg every contender is interleaved round by round with all the others (measure.py). The
first two legs of each parser start by counting commands, round trips and server time per cycle of
each contender, so the server figures come with several independent measurements.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Optional

import redis

from bench import contenders
from bench.measure import Counts, Timed, count_commands, run_interleaved

PARSERS = ("python", "hiredis")
PARSER_LABEL = {"python": "pure-Python parser (redis-py's default without hiredis)", "hiredis": "hiredis"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTED_LEGS = 2  # legs per parser that start with the counting window (the server figures' samples)


@dataclass
class ParserResult:
    parser: str
    timed: dict[str, Timed] = field(default_factory=dict)
    counts: dict[str, Counts] = field(default_factory=dict)  # the first leg's
    leg_counts: list[dict[str, Counts]] = field(default_factory=list)  # every leg's, in order
    unavailable: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # what the child's redis-py really used
    legs: int = 0
    seconds: float = 0.0
    skipped: Optional[str] = None  # why this parser was not measured at all
    errors: list[str] = field(default_factory=list)  # legs that failed

    @property
    def measured(self) -> bool:
        return self.skipped is None and any(t.samples for t in self.timed.values())


def hiredis_installed() -> Optional[str]:
    """hiredis's version if it is importable here, else None."""
    if importlib.util.find_spec("hiredis") is None:
        return None
    try:
        from importlib import metadata

        return metadata.version("hiredis")
    except Exception:
        return "unknown version"


def measure_latency(host: str, port: int, rounds: int, batch: int, count_cycles: int, legs: int,
                    log: Any) -> dict[str, ParserResult]:
    results = {p: ParserResult(p) for p in PARSERS}
    version = hiredis_installed()
    if version is None:
        results["hiredis"].skipped = "hiredis not installed: skipped (pip install hiredis to measure it)"
    active = [p for p in PARSERS if results[p].skipped is None]
    order: list[str] = []
    for leg in range(legs):
        order += active if leg % 2 == 0 else active[::-1]
    per_leg = [rounds // legs + (1 if i < rounds % legs else 0) for i in range(legs)]
    done: dict[str, int] = {p: 0 for p in PARSERS}
    for n, parser in enumerate(order):
        res = results[parser]
        leg = done[parser]
        done[parser] += 1
        count = count_cycles if leg < COUNTED_LEGS else 0
        log(f"  latency leg {n + 1}/{len(order)}: {parser}, {per_leg[leg]} rounds"
            + (f", counting {count} cycles of each contender first" if count else ""))
        started = time.monotonic()
        try:
            out = _run_child(host, port, parser, f"{parser}{leg}", per_leg[leg], batch, count)
        except Exception as exc:
            res.errors.append(f"leg {leg + 1}: {type(exc).__name__}: {exc}")
            continue
        finally:
            res.seconds += time.monotonic() - started
        res.legs += 1
        res.info = out["info"]
        res.unavailable.update(out["unavailable"])
        leg_counts = {name: Counts.from_json(data) for name, data in out["counts"].items()}
        res.leg_counts.append(leg_counts)
        if not res.counts:
            res.counts = leg_counts
        for name, data in out["timed"].items():
            t = Timed.from_json(data)
            if name in res.timed:
                res.timed[name].extend(t)
            else:
                res.timed[name] = t
    for parser in active:
        res = results[parser]
        want_hiredis = parser == "hiredis"
        if res.info and bool(res.info.get("hiredis_available")) != want_hiredis:
            res.errors.append(f"the child used {res.info.get('parser_class')}, not the {parser} parser")
    return results


def _run_child(host: str, port: int, parser: str, leg: str, rounds: int, batch: int, count: int) -> dict[str, Any]:
    fd, path = tempfile.mkstemp(prefix="single_task-bench-", suffix=".json")
    os.close(fd)
    try:
        env = dict(os.environ, BENCH_REDIS_PARSER=parser)
        cmd = [sys.executable, "-m", "bench.parser_child", "--host", host, "--port", str(port), "--leg", leg,
               "--rounds", str(rounds), "--batch", str(batch), "--count", str(count), "--out", path]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"child exited with {proc.returncode}: {proc.stderr.strip()[-1500:]}")
        with open(path) as f:
            result: dict[str, Any] = json.load(f)
        return result
    finally:
        os.unlink(path)


# -- in the child ------------------------------------------------------------------------------------


def _parser_info() -> dict[str, Any]:
    import redis.connection
    import redis.utils

    info: dict[str, Any] = {
        "hiredis_available": bool(getattr(redis.utils, "HIREDIS_AVAILABLE", False)),
        "parser_class": getattr(redis.connection, "DefaultParser", type(None)).__name__,
    }
    hiredis = sys.modules.get("hiredis")
    info["hiredis_version"] = getattr(hiredis, "__version__", None) if hiredis is not None else None
    return info


def child_main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.parser_child")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--leg", required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)  # as in the parent: expected outcomes must not print
    out: dict[str, Any] = {"info": _parser_info(), "counts": {}, "timed": {}, "unavailable": {}}
    probe = redis.Redis(host=args.host, port=args.port)
    if args.count:
        with ExitStack() as stack:
            env = contenders.Env(args.host, args.port, stack)
            cycles, unavailable = contenders.build_all(env, f"count-{args.leg}")
            out["unavailable"].update(unavailable)
            for name, cycle in cycles.items():
                try:
                    for _ in range(20):
                        cycle()
                    out["counts"][name] = count_commands(cycle, probe, args.count).to_json()
                except Exception as exc:
                    out["unavailable"][name] = f"failed while counting: {type(exc).__name__}: {exc}"
    with ExitStack() as stack:
        env = contenders.Env(args.host, args.port, stack)
        cycles, unavailable = contenders.build_all(env, f"time-{args.leg}")
        for name, why in unavailable.items():
            out["unavailable"].setdefault(name, why)
        timed = run_interleaved(cycles, args.rounds, args.batch)
        out["timed"] = {name: t.to_json() for name, t in timed.items()}
    with open(args.out, "w") as f:
        json.dump(out, f)
    return 0
