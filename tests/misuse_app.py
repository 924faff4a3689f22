"""The Celery app of the misuse tests. Broker, backend and leases all use $SINGLE_TASK_TEST_URL."""

from __future__ import annotations

from single_task import single_run
from support.apps import make_app, worker_url

URL = worker_url()
app = make_app("single_task_misuse", URL)


@app.task(bind=True, max_retries=0)
@single_run(key="no-retries:{n}", ttl=10, on_busy="retry", retry_countdown=0.2, client=URL)
def no_retries_left(self: object, n: int) -> int:
    """A task that may never retry itself, yet uses on_busy="retry"."""
    return int(self.request.retries)  # type: ignore[attr-defined]
