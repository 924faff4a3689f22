"""The demo's Celery app: two tasks that take longer than the producer waits between sends."""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from single_task import current_lease, single_run

URL = os.environ.get("SINGLE_TASK_TEST_URL", "redis://127.0.0.1:6379/0")
app = Celery("demo", broker=URL, backend=URL)
app.conf.update(worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
stats = redis.Redis.from_url(URL)


def _work(kind: str, key: str, seconds: float) -> bool:
    lease = current_lease()
    assert lease is not None
    active = stats.incr(f"demo:active:{key}")
    stats.eval("if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then "
               "redis.call('SET', KEYS[1], ARGV[1]) end", 1, f"demo:max:{kind}", active)
    # A rerun keeps its lease, so it has the fence of the run before it.
    if not stats.sadd(f"demo:fences:{kind}", lease.fence):
        stats.incr(f"demo:reruns:{kind}")
    stats.incr(f"demo:runs:{kind}")
    time.sleep(seconds)
    stats.decr(f"demo:active:{key}")
    return True


@app.task
@single_run(key="report:{account_id}", ttl=10, on_busy="skip")
def build_report(account_id: int) -> bool:
    """Skip: a call that finds the account busy returns at once; the running one is enough."""
    return _work("skip", f"report:{account_id}", 0.05)


@app.task
@single_run(key="sync:{account_id}", ttl=10, on_busy="rerun")
def sync_account(account_id: int) -> bool:
    """Rerun: a call that finds the account busy makes the holder run once more afterwards,
    so the last change is always synced."""
    return _work("rerun", f"sync:{account_id}", 0.05)
