"""The Celery apps of the test workers: one configuration, made in one place.

``support.worker.CeleryWorker`` passes the server a worker should use in ``$SINGLE_TASK_TEST_URL``;
an app module reads it with ``worker_url()`` and makes its app with ``make_app``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery


def worker_url() -> str:
    """The Redis of the worker this module is imported in (broker, results, leases, records)."""
    return os.environ.get("SINGLE_TASK_TEST_URL", "redis://127.0.0.1:6379/0")


def make_app(name: str, url: str, **conf: Any) -> Celery:
    """A Celery app with ``url`` as broker and result backend: JSON only, one message prefetched per
    process (so a busy process does not sit on messages another could run), and the broker
    connection retried at startup. ``conf`` adds to these settings or overrides them."""
    app = Celery(name, broker=url, backend=url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
    )
    app.conf.update(conf)
    return app
