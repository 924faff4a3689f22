"""The benchmark still runs end to end (small counts), so it cannot rot silently."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_benchmark_runs_and_prints_its_table() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "# single_task benchmark" in proc.stdout
    assert "| contender | median µs |" in proc.stdout
    assert "| target | measured | verdict | by how much |" in proc.stdout
    assert "## Producer side: `send_once` refusing a duplicate, vs a plain `delay()`" in proc.stdout
    assert "| call | median µs | p99 µs | median × `delay()` |" in proc.stdout
    assert "## `replicas=1`: uncontended cycle against a master with one replica" in proc.stdout
    assert "| contender | median µs | p99 µs | median × floor | p99 × floor | median × replicas=0 |" in proc.stdout
    for heading in ("## Producer side:", "## `replicas=1`:"):
        section = proc.stdout.split(heading, 1)[1].split("\n## ", 1)[0]
        assert "failed" not in section.lower() and "stopped" not in section.lower(), section
