"""The Celery app of the misuse tests. Broker, backend and leases all use $SINGLE_TASK_TEST_URL."""

from __future__ import annotations

import os

from celery import Celery

from single_task import single_run

URL = os.environ.get("SINGLE_TASK_TEST_URL", "redis://127.0.0.1:6379/0")
app = Celery("single_task_misuse", broker=URL, backend=URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)


@app.task(bind=True, max_retries=0)
@single_run(key="no-retries:{n}", ttl=10, on_busy="retry", retry_countdown=0.2, client=URL)
def no_retries_left(self: object, n: int) -> int:
    """A task that may never retry itself, yet uses on_busy="retry"."""
    return int(self.request.retries)  # type: ignore[attr-defined]
