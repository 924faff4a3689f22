"""Fixtures: a private redis-server for the session, a clean database per test, Celery workers."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from support.redis_server import RedisServer  # noqa: E402
from support.worker import CeleryWorker  # noqa: E402


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session server's URL, emptied before each test (we started it, so we may flush it)."""
    redis_server.client().flushall()
    yield redis_server.url


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """A server of the module's own, for a module whose workers serve more than one test."""
    with RedisServer() as started:
        yield started


@pytest.fixture(scope="module")
def app(server: RedisServer) -> Celery:
    """The test workers' app (tests/celery_app.py), pointed at the module's server from the producer side."""
    from tests import celery_app

    celery_app.use_server(server.url)
    return celery_app.app


@pytest.fixture
def rec(server: RedisServer) -> redis.Redis:
    """The module's server, where the test workers' tasks record their runs."""
    return redis.Redis.from_url(server.url, decode_responses=True)


@pytest.fixture
def fresh_server() -> Iterator[RedisServer]:
    """A server of the test's own, for tests that stop, pause or restart it."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def worker_factory(redis_url: str) -> Iterator[object]:
    started: list[CeleryWorker] = []

    def make(app: str = "tests.celery_app", **kwargs: object) -> CeleryWorker:
        worker = CeleryWorker(app, str(kwargs.pop("url", redis_url)), **kwargs)  # type: ignore[arg-type]
        started.append(worker)
        return worker.start()

    yield make
    for worker in started:
        worker.stop()
