"""Start a real Celery worker subprocess and stop exactly it (its process group), by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence


class CeleryWorker:
    """``celery -A APP worker`` in its own process group, with $SINGLE_TASK_TEST_URL set to ``url``.

    The app module reads that variable for its broker, result backend and lease client.
    """

    def __init__(self, app: str, url: str, *, pool: str = "prefork", concurrency: int = 4,
                 queues: Optional[str] = None, extra: Sequence[str] = (), env: Optional[dict[str, str]] = None,
                 name: Optional[str] = None) -> None:
        self.app, self.url, self.pool, self.concurrency = app, url, pool, concurrency
        self.queues, self.extra, self.env = queues, list(extra), env or {}
        self.name = name or f"w{os.getpid()}-{time.monotonic_ns()}@%h"
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.logfile = tempfile.NamedTemporaryFile(prefix="single_task-worker-", suffix=".log", delete=False).name

    def start(self, timeout: float = 60.0) -> CeleryWorker:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, SINGLE_TASK_TEST_URL=self.url, PYTHONPATH=os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH", "")) if p), **self.env)
        cmd = [sys.executable, "-m", "celery", "-A", self.app, "worker", "--pool", self.pool,
               "--concurrency", str(self.concurrency), "--loglevel", "INFO", "-n", self.name,
               "--without-gossip", "--without-mingle", "--without-heartbeat", *self.extra]
        if self.queues:
            cmd += ["-Q", self.queues]
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=root, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if " ready." in self.log():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"celery worker not ready after {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        with open(self.logfile, "rb") as f:
            return f.read().decode(errors="replace")

    def child_pids(self) -> list[int]:
        """The pool's worker processes (prefork children of the main process)."""
        if self.proc is None:
            return []
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return [int(x) for x in out.stdout.split()]

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # warm shutdown of our own group only
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers of our group, if any
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children) at once."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None

    def __enter__(self) -> CeleryWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
