"""The library file stays lint- and type-clean, vendorable, and the README's demo keeps working."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run(*cmd: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_ruff_is_clean_on_the_library() -> None:
    result = run(sys.executable, "-m", "ruff", "check", "single_task.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean_on_the_library() -> None:
    result = run(sys.executable, "-m", "mypy", "single_task.py")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(sys.version_info < (3, 10), reason="sys.stdlib_module_names is new in 3.10")
def test_the_library_imports_only_stdlib_celery_and_redis() -> None:
    with open(f"{ROOT}/single_task.py") as f:
        tree = ast.parse(f.read())
    allowed = set(sys.stdlib_module_names) | {"celery", "redis", "gevent", "__future__"}
    imported = {
        (alias.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported - allowed == set()


def test_the_demo_runs_and_never_overlaps() -> None:
    result = run(sys.executable, "-m", "demo", timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    claims = [line for line in result.stdout.splitlines() if line.startswith(("PASS ", "FAIL "))]
    assert len(claims) >= 5 and all(line.startswith("PASS ") for line in claims), result.stdout
    assert any(line.startswith("PASS  max concurrent per key is 1") for line in claims)
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("skip ", "rerun "))]
    assert len(rows) == 2 and all(row[-1] == "1" for row in rows)
    assert all(int(row[2]) < int(row[1]) for row in rows)  # the flood really was contended
