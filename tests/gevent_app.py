"""The Celery app the gevent-pool tests run (``celery -A tests.gevent_app worker -P gevent``).

Broker, backend, leases and the run record all use $SINGLE_TASK_TEST_URL. Under ``-P gevent``
Celery monkey-patches the process before this module is imported, so ``time.sleep`` and the
redis sockets here cooperate with the other greenlets of the pool.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from single_task import current_lease, single_run
from support.apps import make_app, worker_url

URL = worker_url()
app = make_app("single_task_gevent_tests", URL)
_record = redis.Redis.from_url(URL)


def _patched() -> bool:
    try:
        from gevent import monkey
    except ImportError:
        return False
    return bool(monkey.is_module_patched("socket") and monkey.is_module_patched("threading"))


def _log_run(key: str, seconds: float) -> dict[str, Any]:
    """Record the run (start, end, overlap count per key) and how its lease stood at the end."""
    lease = current_lease()
    assert lease is not None
    start = time.time()
    active = _record.incr(f"rec:active:{key}")
    _record.eval(
        "if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then "
        "redis.call('SET', KEYS[1], ARGV[1]) end", 1, f"rec:max:{key}", active)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))  # cooperative: gevent.sleep
    lost = lease.lost
    _record.decr(f"rec:active:{key}")
    end = time.time()
    _record.rpush(f"rec:runs:{key}", f"{start!r} {end!r} {lease.fence}")
    return {"lost": lost, "fence": lease.fence, "seconds": end - start, "patched": _patched(),
            "pid": os.getpid()}


@app.task
@single_run(key="glong:{n}", ttl=1)
def long_run(n: int, seconds: float) -> dict[str, Any]:
    """A run that lasts several times its 1 s TTL: it only keeps the key if renewal keeps up."""
    return _log_run(f"glong:{n}", seconds)


@app.task
@single_run(key="gflood:{n}", ttl=1)
def flood(n: int, seconds: float) -> dict[str, Any]:
    return _log_run(f"gflood:{n}", seconds)


@app.task
def hog(seconds: float) -> int:
    """Keep the CPU and the gevent hub busy without ever yielding to another greenlet."""
    deadline = time.monotonic() + seconds
    spins = 0
    while time.monotonic() < deadline:
        spins += 1
    _record.incr("rec:hogs")
    return spins
