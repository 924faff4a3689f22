"""The Celery app of the end-to-end benchmark: one no-op task undecorated, the same one decorated,
and the same one under the floor lock (SET NX PX + compare-and-delete, inline), for reference.

Broker and lease client come from $SINGLE_TASK_TEST_URL (set by ``support.worker.CeleryWorker``).
Results are not stored, and the worker's two INFO lines per task are turned off, so that the
lease is a larger part of what is measured, not a smaller one.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import redis
from celery import Celery, signals

from bench.contenders import COMPARE_AND_DELETE, TTL_MS
from single_task import single_run

URL = os.environ.get("SINGLE_TASK_TEST_URL", "redis://127.0.0.1:6379/0")
MARK_PREFIX = "bench:e2e:mark:"

app = Celery("single_task_bench", broker=URL)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=True,
)
_marks = redis.Redis.from_url(URL)
_floor_client = redis.Redis.from_url(URL)
_floor_sha = _floor_client.script_load(COMPARE_AND_DELETE)


@signals.after_setup_logger.connect
def _quiet_per_task_logs(**_: Any) -> None:
    # "Task ... received" and "Task ... succeeded" cost the same for both variants and would only
    # dilute the ratio; the worker reads these levels once, when it builds its task tracer.
    for name in ("celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)


@app.task(name="bench.plain")
def plain(n: int) -> None:
    return None


@app.task(name="bench.locked")
@single_run(key="bench:e2e:{n}", client=URL)
def locked(n: int) -> None:
    return None


@app.task(name="bench.floor")
def floor(n: int) -> None:
    """The cheapest correct lock around the same body: what any lock must at least add."""
    key, token = f"bench:e2e-floor:{n}", os.urandom(16)
    if not _floor_client.set(key, token, nx=True, px=TTL_MS):
        return None
    try:
        return None
    finally:
        _floor_client.evalsha(_floor_sha, 1, key, token)


@app.task(name="bench.mark")
def mark(name: str) -> None:
    """Note the monotonic clock (shared by all processes on the machine) under ``name``."""
    _marks.set(MARK_PREFIX + name, time.monotonic_ns())
