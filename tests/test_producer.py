"""send_once: never enqueue a duplicate, against a real worker and a real broker queue."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
import redis
from celery import Celery

from single_task import is_queued, send_once, single_run
from support.redis_server import RedisServer
from support.worker import CeleryWorker
from tests import celery_app


def queued_per_key(rec: redis.Redis, queue: str) -> Counter[str]:
    """Messages in a Redis broker queue that have not started yet (waiting in the list, or taken
    by the worker but not started), counted by (task, first argument), in one atomic snapshot."""
    pipe = rec.pipeline(transaction=True)
    pipe.lrange(queue, 0, -1)
    pipe.hvals("unacked")
    pipe.smembers("rec:started")
    waiting, unacked, started = pipe.execute()
    counts: Counter[str] = Counter()
    for message in [json.loads(raw) for raw in waiting] + [json.loads(raw)[0] for raw in unacked]:
        headers = message["headers"]
        if headers["id"] not in started:
            counts[f"{headers['task']}{headers['argsrepr'].split(',')[0]}"] += 1
    return counts


def test_a_flood_of_send_once_keeps_one_message_per_key_and_loses_no_update(
        app: Celery, server: RedisServer, rec: redis.Redis) -> None:
    queue = "q-produce"
    last_call: dict[int, float] = {}
    results = []
    peak: Counter[str] = Counter()
    sampled = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for key, n in queued_per_key(rec, queue).items():
                peak[key] = max(peak[key], n)
            sampled[0] += 1
            time.sleep(0.002)

    # One process at 20 runs/s against a producer at ~1000 calls/s: without send_once the queue
    # would grow by hundreds of messages.
    with CeleryWorker("tests.celery_app", server.url, pool="solo", queues=queue):
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            for i in range(1000):
                n = i % 3
                last_call[n] = time.time()
                results.append(send_once(celery_app.produce, (n, 0.05), queue=queue))
                time.sleep(0.001)
            for result in results:
                result.get(timeout=120)
        finally:
            done.set()
            watcher.join()
    assert all(r is not None and r.id for r in results)
    assert sampled[0] > 50 and peak, "the queue watcher never saw the queue"
    assert max(peak.values()) == 1, peak
    sent = {r.id for r in results}
    assert len(sent) < 200  # the flood was collapsed, not sent
    for n in range(3):
        starts = [float(x) for x in rec.lrange(f"rec:produce:{n}", 0, -1)]
        assert max(starts) > last_call[n], f"key {n}: no run started after the last call"


def test_a_call_during_a_run_queues_exactly_one_more(app: Celery, server: RedisServer, rec: redis.Redis) -> None:
    queue = "q-one-more"
    with CeleryWorker("tests.celery_app", server.url, pool="solo", queues=queue):
        first = send_once(celery_app.produce, (50, 1.0), queue=queue)
        deadline = time.monotonic() + 30
        while not rec.exists("rec:produce:50") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not is_queued(celery_app.produce, 50, 1.0)  # the marker went when the run started
        more = [send_once(celery_app.produce, (50, 0.0), queue=queue) for _ in range(5)]
        assert len({r.id for r in more}) == 1 and more[0].id != first.id
        assert is_queued(celery_app.produce, 50, 0.0)
        first.get(timeout=60)
        more[0].get(timeout=60)
    assert rec.llen("rec:produce:50") == 2
    assert not is_queued(celery_app.produce, 50, 0.0)


def test_a_worker_killed_after_taking_the_message_frees_the_key_within_the_marker_expiry(
        app: Celery, server: RedisServer) -> None:
    queue = "q-killed"
    with single_run(key="produce-short:1", client=server.url):  # the run will block waiting
        worker = CeleryWorker("tests.celery_app", server.url, pool="solo", queues=queue).start()
        try:
            send_once(celery_app.produce_short, (1,), queue=queue)
            time.sleep(1.0)  # the worker took it and waits for the key, marker still set
            assert is_queued(celery_app.produce_short, 1)
            worker.kill()
            killed = time.monotonic()
        finally:
            worker.stop()
        while is_queued(celery_app.produce_short, 1) and time.monotonic() - killed < 5:
            time.sleep(0.02)
        assert time.monotonic() - killed <= 1.5 + 0.2


def test_a_countdown_extends_the_marker(app: Celery, server: RedisServer, rec: redis.Redis) -> None:
    send_once(celery_app.produce_short, (2,), queue="q-nobody", countdown=3)
    pttl = rec.pttl("single_task:{produce-short:2}:queued")
    assert 3000 < pttl <= 4500


def test_send_once_checks_arguments_before_marking(app: Celery, server: RedisServer) -> None:
    with pytest.raises(TypeError):
        send_once(celery_app.produce, (), {})
    assert not server.client().keys("single_task:{produce:*}:queued")
