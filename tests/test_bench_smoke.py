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
