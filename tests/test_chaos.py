"""The chaos run (chaos/README.md): its checker catches what it must, and the quick run passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from chaos import check

ROOT = Path(__file__).resolve().parent.parent
TTL, SLACK = 2.0, 0.5


def start(key: str, fence: int, pid: int, t: float, call: str = "", it: int = 0, lease: bool = True) -> dict[str, Any]:
    return {"ev": "start", "key": key, "fence": fence, "pid": pid, "t": t, "id": call or f"c{pid}-{fence}", "it": it,
            "lease": lease}


def end(key: str, fence: int, pid: int, t: float, lost: bool = False, call: str = "", it: int = 0) -> dict[str, Any]:
    return {"ev": "end", "key": key, "fence": fence, "pid": pid, "t": t, "id": call or f"c{pid}-{fence}", "it": it,
            "lost": lost}


def call(call_id: str, pid: int, policy: str, key: str, t0: float, t1: float, outcome: str) -> list[dict[str, Any]]:
    return [{"ev": "call", "id": call_id, "pid": pid, "policy": policy, "key": key, "t": t0},
            {"ev": "ret", "id": call_id, "pid": pid, "t": t1, "outcome": outcome, "runs": 0}]


def overlap_check(events: list[dict[str, Any]], kills: dict[int, float] | None = None) -> check.Check:
    return check.check_overlap(check.build(events, kills or {}).runs)[0]


def test_two_runs_of_one_key_that_overlap_fail_the_check() -> None:
    events = [start("k", 1, 10, 0.0), start("k", 2, 11, 0.5), end("k", 1, 10, 1.0), end("k", 2, 11, 1.5)]
    assert not overlap_check(events).ok


def test_runs_that_follow_each_other_pass() -> None:
    events = [start("k", 1, 10, 0.0), end("k", 1, 10, 1.0), start("k", 2, 11, 1.0), end("k", 2, 11, 2.0),
              start("j", 3, 12, 0.5), end("j", 3, 12, 1.5)]
    assert overlap_check(events).ok


def test_an_overlap_is_allowed_only_when_the_lost_lease_has_the_lower_fence() -> None:
    stale_lower = [start("k", 1, 10, 0.0), start("k", 2, 11, 0.5), end("k", 1, 10, 1.0, lost=True),
                   end("k", 2, 11, 1.5)]
    assert overlap_check(stale_lower).ok
    stale_higher = [start("k", 2, 10, 0.0), start("k", 1, 11, 0.5), end("k", 2, 10, 1.0, lost=True),
                    end("k", 1, 11, 1.5)]
    assert not overlap_check(stale_higher).ok


def test_a_loss_reported_by_on_lost_after_the_body_ended_still_excuses_the_overlap() -> None:
    events = [start("k", 1, 10, 0.0), start("k", 2, 11, 0.5), end("k", 1, 10, 1.0), end("k", 2, 11, 1.5),
              {"ev": "lost", "key": "k", "fence": 1, "pid": 10, "t": 1.01}]
    assert overlap_check(events).ok


def test_a_killed_run_counts_as_running_until_its_kill() -> None:
    before_kill = [start("k", 1, 10, 0.0), start("k", 2, 11, 0.5), end("k", 2, 11, 1.5)]
    assert not overlap_check(before_kill, {10: 0.8}).ok
    after_kill = [start("k", 1, 10, 0.0), start("k", 2, 11, 2.5), end("k", 2, 11, 3.5)]
    assert overlap_check(after_kill, {10: 0.8}).ok


def test_a_run_that_never_ended_and_was_not_killed_fails_the_check() -> None:
    assert not overlap_check([start("k", 1, 10, 0.0)]).ok


def test_a_run_without_a_lease_fails_the_check() -> None:
    assert not check.check_leases(check.build([start("k", 0, 10, 0.0, lease=False)], {}).runs).ok


def rerun_check(events: list[dict[str, Any]], policy: str, kills: dict[int, float] | None = None) -> check.Check:
    rec = check.build(events, kills or {})
    sent = [{"id": a.call_id, "policy": a.policy} for a in rec.attempts]
    return check.check_rerun(rec, TTL, SLACK, policy, sent, "rerun", policy == "rerun", {}, 40.0)[0]


def test_a_rerun_request_is_kept_by_the_holder_running_again() -> None:
    events = [start("r", 1, 10, 0.0, call="h"), *call("c", 11, "rerun", "r", 0.5, 0.51, "coalesced"),
              end("r", 1, 10, 1.0, call="h"), start("r", 1, 10, 1.0, call="h", it=1),
              end("r", 1, 10, 1.2, call="h", it=1), *call("h", 10, "rerun", "r", -0.01, 1.21, "ran")]
    assert rerun_check(events, "rerun").ok


def test_a_rerun_request_that_nobody_runs_fails_the_check() -> None:
    events = [start("r", 1, 10, 0.0, call="h"), *call("c", 11, "rerun", "r", 0.5, 0.51, "coalesced"),
              end("r", 1, 10, 1.0, call="h"), *call("h", 10, "rerun", "r", -0.01, 1.01, "ran")]
    assert not rerun_check(events, "rerun").ok


def test_a_rerun_request_kept_only_much_later_fails_the_check() -> None:
    events = [start("r", 1, 10, 0.0, call="h"), *call("c", 11, "rerun", "r", 0.5, 0.51, "coalesced"),
              end("r", 1, 10, 1.0, call="h"), *call("h", 10, "rerun", "r", -0.01, 1.01, "ran"),
              start("r", 2, 12, 9.0, call="late"), end("r", 2, 12, 9.5, call="late"),
              *call("late", 12, "rerun", "r", 9.0, 9.5, "ran")]
    assert not rerun_check(events, "rerun").ok


def test_a_rerun_owed_by_a_killed_holder_is_excused_only_under_default_acks() -> None:
    def events(policy: str) -> list[dict[str, Any]]:
        return [start("r", 1, 10, 0.0, call="h"), {"ev": "call", "id": "h", "pid": 10, "policy": policy, "key": "r",
                                                    "t": -0.01},
                *call("c", 11, policy, "r", 0.5, 0.51, "coalesced")]
    assert rerun_check(events("rerun"), "rerun", {10: 0.8}).ok
    assert not rerun_check(events("rerun_durable"), "rerun_durable", {10: 0.8}).ok


@pytest.mark.parametrize("policy", ["rerun", "rerun_durable"])
def test_a_rerun_owed_by_a_holder_that_lost_its_lease_must_be_kept_by_the_holder_taking_the_key_again(
    policy: str,
) -> None:
    # The holder's body ends at 1.0, its release waits out an outage and finds the lease gone at
    # 3.0 (on_lost), and its call returns at 3.3 after running once more (kept), or without it.
    def events(runs_again: bool) -> list[dict[str, Any]]:
        again = [start("r", 2, 10, 3.1, call="h", it=1), end("r", 2, 10, 3.3, call="h", it=1)] if runs_again else []
        return [start("r", 1, 10, 0.0, call="h"), *call("c", 11, policy, "r", 0.5, 0.51, "coalesced"),
                end("r", 1, 10, 1.0, call="h", lost=True), {"ev": "lost", "key": "r", "fence": 1, "pid": 10, "t": 3.0},
                *again, *call("h", 10, policy, "r", -0.01, 3.3, "ran")]

    assert rerun_check(events(True), policy).ok
    assert not rerun_check(events(False), policy).ok


def test_the_quick_chaos_run_passes(tmp_path: Path) -> None:
    """The real thing: two prefork workers, a redis-server, faults; about 60-90 s."""
    results = tmp_path / "RESULTS.md"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "chaos.run", "--quick", "--results", str(results)], cwd=ROOT,
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert "**Verdict: PASS**" in proc.stdout, out[-8000:]
    for name in ("no overlap", "no run without a lease", "no stuck key", "rerun keeps its promise (default acks)",
                 "rerun keeps its promise, killed holders too"):
        assert any(line.startswith(f"| {name}") and "| PASS |" in line for line in proc.stdout.splitlines()), name
    written = results.read_text()
    assert "python -m chaos.run --quick --seed" in written and "**Verdict: PASS**" in written
