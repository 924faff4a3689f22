"""A send_once marker dies with its message: revoked, expired or rejected, against a real worker."""

from __future__ import annotations

import datetime
import time
import uuid
from typing import Any, Callable

import pytest
import redis

from single_task import is_queued, send_once
from tests import celery_app

# How long after the worker learns that a message will never run its marker may still be there:
# the sweep of held eta messages runs every 0.5 s; the rest is the broadcast and one round trip.
BOUND = 1.5


@pytest.fixture
def app(redis_url: str) -> Any:
    celery_app.use_server(redis_url)
    return celery_app.app


def marker(r: redis.Redis, key: str) -> Any:
    return r.get(f"single_task:{{{key}}}:queued")


def until(condition: Callable[[], bool], timeout: float = 10.0) -> float:
    """Seconds until ``condition()`` held (polled every 10 ms); fails after ``timeout``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "timed out"
        time.sleep(0.01)
    return time.monotonic() - started


def received(worker: Any, task_id: str) -> Callable[[], bool]:
    return lambda: f"[{task_id}] received" in worker.log()


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_revoking_a_message_the_worker_holds_for_its_countdown_releases_its_marker_at_once(
        app: Any, r: redis.Redis, worker_factory: Any, pool: str) -> None:
    worker = worker_factory(pool=pool, concurrency=1, queues="q-held")
    first = send_once(celery_app.doomed, (1,), queue="q-held", countdown=60)
    until(received(worker, first.id))
    assert is_queued(celery_app.doomed, 1)
    first.revoke()
    took = until(lambda: not is_queued(celery_app.doomed, 1))
    print(f"\n{pool}: marker of a revoked countdown message gone {took:.2f}s after revoke()")
    assert took <= BOUND
    again = send_once(celery_app.doomed, (1,), queue="q-held")
    assert again.id != first.id and again.get(timeout=30) == "ran"
    assert r.lrange("rec:doomed:1", 0, -1) == ["ran"]  # the revoked one never ran


def test_a_message_revoked_before_it_reaches_the_worker_releases_its_marker_when_it_arrives(
        app: Any, r: redis.Redis, worker_factory: Any) -> None:
    worker = worker_factory(pool="solo", queues="q-revoked")
    task_id = str(uuid.uuid4())
    assert app.control.revoke(task_id, reply=True, timeout=5)  # the worker has it in its revoked set
    sent = time.monotonic()
    first = send_once(celery_app.doomed, (4,), queue="q-revoked", task_id=task_id)
    assert first.id == task_id
    until(lambda: not is_queued(celery_app.doomed, 4))
    took = time.monotonic() - sent
    print(f"\nmarker of a message revoked before it came gone {took:.2f}s after send_once")
    assert took <= BOUND and f"Discarding revoked task: tests.celery_app.doomed[{task_id}]" in worker.log()
    again = send_once(celery_app.doomed, (4,), queue="q-revoked")
    assert again.id != task_id and again.get(timeout=30) == "ran"
    assert r.lrange("rec:doomed:4", 0, -1) == ["ran"]


def test_a_message_that_expires_while_the_worker_holds_it_releases_its_marker(
        app: Any, r: redis.Redis, worker_factory: Any) -> None:
    worker_factory(pool="solo", queues="q-expiring")
    sent = time.monotonic()
    first = send_once(celery_app.doomed, (2,), queue="q-expiring", countdown=30, expires=1)
    until(lambda: not is_queued(celery_app.doomed, 2))
    took = time.monotonic() - sent
    print(f"\nmarker of a message with expires=1 (countdown=30) gone {took:.2f}s after send_once")
    assert 1.0 <= took <= 1.0 + BOUND
    again = send_once(celery_app.doomed, (2,), queue="q-expiring")
    assert again.id != first.id and again.get(timeout=30) == "ran"
    assert r.lrange("rec:doomed:2", 0, -1) == ["ran"]


def test_a_message_expired_when_the_worker_gets_it_releases_its_marker(
        app: Any, r: redis.Redis, worker_factory: Any) -> None:
    worker_factory(pool="solo", queues="q-expired")
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=5)
    sent = time.monotonic()
    first = send_once(celery_app.doomed, (3,), queue="q-expired", expires=past)
    until(lambda: not is_queued(celery_app.doomed, 3))
    took = time.monotonic() - sent
    print(f"\nmarker of a message sent already expired gone {took:.2f}s after send_once")
    assert took <= BOUND
    again = send_once(celery_app.doomed, (3,), queue="q-expired")
    assert again.id != first.id and again.get(timeout=30) == "ran"
    assert r.lrange("rec:doomed:3", 0, -1) == ["ran"]


def test_a_message_the_worker_rejects_releases_its_marker(app: Any, r: redis.Redis, worker_factory: Any) -> None:
    worker = worker_factory(pool="solo", queues="q-rejected")
    sent = time.monotonic()
    # The worker accepts JSON only: a pickled message is rejected unread (task_rejected).
    first = send_once(celery_app.doomed_const, queue="q-rejected", serializer="pickle")
    until(lambda: not is_queued(celery_app.doomed_const))
    took = time.monotonic() - sent
    print(f"\nmarker of a rejected message gone {took:.2f}s after send_once")
    assert took <= BOUND and "ContentDisallowed" in worker.log()
    again = send_once(celery_app.doomed_const, queue="q-rejected")
    assert again.id != first.id and again.get(timeout=30) == "ran"
    assert r.lrange("rec:doomed-const", 0, -1) == ["ran"]


def test_a_revoked_message_never_removes_a_marker_that_names_another_message(
        app: Any, r: redis.Redis, worker_factory: Any) -> None:
    worker = worker_factory(pool="solo", queues="q-other")
    first = send_once(celery_app.doomed, (6,), queue="q-other", countdown=60)
    until(received(worker, first.id))
    newer = f"another-task-id|{int(time.time() * 1000)}"
    r.set("single_task:{doomed:6}:queued", newer, px=60000)  # as if a newer message had marked the key
    first.revoke()
    until(lambda: first.id in str(app.control.inspect(timeout=2).revoked() or {}), timeout=10)
    time.sleep(3 * 0.5)  # three sweeps
    assert marker(r, "doomed:6") == newer
