"""The demo's Celery app: two tasks that take longer than the producer waits between sends.

Every task records, in the demo's own Redis, when it arrived at the worker (before the lease is
asked for) and, for every run of its body, the run's start and end and the task's id. A rerun runs
the body again inside the same task, so a task id that appears twice among the runs is a rerun.
``python -m demo`` checks its claims against these records.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery, current_task
from celery.signals import task_prerun

from single_task import single_run

URL = os.environ.get("SINGLE_TASK_TEST_URL", "redis://127.0.0.1:6379/0")
app = Celery("demo", broker=URL, backend=URL)
app.conf.update(worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
stats = redis.Redis.from_url(URL)

RUN_SECONDS = 0.05


def arrivals_key(kind: str, account_id: int) -> str:
    return f"demo:arrived:{kind}:{account_id}"


def runs_key(kind: str, account_id: int) -> str:
    return f"demo:runs:{kind}:{account_id}"


def _run(kind: str, account_id: int) -> bool:
    started = time.time()
    time.sleep(RUN_SECONDS)
    stats.rpush(runs_key(kind, account_id), f"{started!r} {time.time()!r} {current_task.request.id}")
    return True


@app.task
@single_run(key="report:{account_id}", ttl=10, on_busy="skip")
def build_report(account_id: int) -> bool:
    """Skip: a call that finds the account busy returns at once; the running one is enough."""
    return _run("skip", account_id)


@app.task
@single_run(key="sync:{account_id}", ttl=10, on_busy="rerun")
def sync_account(account_id: int) -> bool:
    """Rerun: a call that finds the account busy makes the holder run once more afterwards,
    so the last change is always synced."""
    return _run("rerun", account_id)


KINDS = {build_report.name: "skip", sync_account.name: "rerun"}


@task_prerun.connect
def _arrived(sender: Any = None, args: Any = None, **_: Any) -> None:
    """The task reached a worker process; the lease has not been asked for yet."""
    kind = KINDS.get(getattr(sender, "name", None) or "")
    if kind is not None and args:
        stats.rpush(arrivals_key(kind, args[0]), repr(time.time()))
