"""The benchmark still runs end to end (small counts), so it cannot rot silently."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_benchmark_runs_and_prints_its_tables() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "# single_task benchmark" in out
    assert "| target | measured | verdict | by how much |" in out
    assert "| contender | median µs | p99 µs | median × floor | per-round (p10–p90) |" in out
    assert "### pure-Python parser" in out
    # hiredis is optional: measured when installed, and said to be skipped when not
    assert "### hiredis" in out
    try:
        import hiredis  # noqa: F401
    except ImportError:
        assert "hiredis not installed: skipped" in out
    else:
        assert "redis-py used `_HiredisParser`" in out
    assert "redis-py used `_RESP2Parser`" in out or "redis-py used `_RESP3Parser`" in out
    assert "## Server time per cycle" in out
    assert "server time per uncontended cycle ≤ 30 µs" in out
    assert "Celery solo pool: decorated ≥ 0.95× the floor lock inline" in out
    assert "decorated ÷ floor per round (min / median / max)" in out
    assert "## Producer side: `send_once` refusing a duplicate, vs a plain `delay()`" in out
    assert "| call | median µs | p99 µs | median × `delay()` |" in out
    assert "## `replicas=1`: uncontended cycle against a master with one replica" in out
    assert "| contender | median µs | p99 µs | median × floor | p99 × floor | median × replicas=0 |" in out
    assert "## Producer features on the uncontended path: before them, with them (unused), and HEAD" in out
    assert "#12: producer features cost the uncontended path nothing measurable" in out
    features = out.split("## Producer features on the uncontended path:", 1)[1].split("\n## ", 1)[0]
    if "Unavailable:" not in features:  # a checkout without the feature commits says so instead
        assert "| call | client | version | median µs | p99 µs | × before |" in features, features
        assert "**Verdict: producer features cost the uncontended path nothing measurable**" in features
        assert "leases still held (each copy's own `is_running`): none" in features, features
    # No phase may fail on the current library (a failing phase is reported, not raised).
    assert "Phase failed" not in out and "Could not draw this section" not in out, out
    for heading in ("## Producer side:", "## `replicas=1`:", "## Producer features on the uncontended path:",
                    "## Celery end-to-end:"):
        section = out.split(heading, 1)[1].split("\n## ", 1)[0]
        assert "failed" not in section.lower() and "stopped" not in section.lower(), section
    # single_task's own contenders ran every round (peers may be missing where only '.[test]' is installed).
    section = out.split("## Lock cycle latency", 1)[1].split("\n## ", 1)[0]
    assert "Failed legs" not in section, section
    for line in section.splitlines():
        if line.startswith("| single_task") or line.startswith("| floor"):
            assert "stopped:" not in line and "failed" not in line and "| — |" not in line, line
