"""single_run under a real Celery worker with the gevent pool (``-P gevent``).

The watchdog that renews leases runs in a real OS thread even when gevent has patched
``threading``: a greenlet could not renew while another greenlet keeps the hub busy. These tests
give the leases a 1 s TTL, make runs last several TTLs while other greenlets spin the CPU without
yielding, and check from outside the worker that the key was never free during a run.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

pytest.importorskip("gevent")

from single_task import AlreadyRunning, single_run
from tests import gevent_app

pytestmark = pytest.mark.slow  # real worker processes, several seconds each


@pytest.fixture
def app(redis_url: str) -> Any:
    """The gevent test app, pointed at this test's server from the producer side."""
    gevent_app.app.conf.update(broker_url=redis_url, result_backend=redis_url)
    gevent_app._record = redis.Redis.from_url(redis_url)
    return gevent_app.app


def runs_of(r: redis.Redis, key: str) -> list[tuple[float, float, int]]:
    rows = [line.split() for line in r.lrange(f"rec:runs:{key}", 0, -1)]
    return sorted((float(start), float(end), int(fence)) for start, end, fence in rows)


def assert_clean_log(worker: Any) -> None:
    """No failed renewal round, no lost lease, no task error: the worker log has no ERROR at all."""
    log = worker.log()
    problems = [line for line in log.splitlines() if "ERROR/" in line or ("WARNING/" in line and "lost" in line)]
    assert problems == [], "\n".join(problems[:5]) + "\n...\n" + log[-4000:]


def collect(results: list[Any], timeout: float) -> list[Any]:
    """Every result's value, read from the backend once all are ready. Celery 5.3's result
    consumer can miss pub/sub notifications, and get() then waits a second per result."""
    deadline = time.monotonic() + timeout
    pending = list(results)
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} of {len(results)} tasks not done in {timeout}s"
        time.sleep(0.05)
        pending = [res for res in pending if not res.ready()]
    return [res.get(timeout=10, propagate=False) for res in results]


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def test_a_run_of_several_ttls_keeps_its_lease_while_other_greenlets_hog_the_cpu(
        app: Any, worker_factory: Any, redis_url: str, r: redis.Redis) -> None:
    worker = worker_factory("tests.gevent_app", pool="gevent", concurrency=20)
    result = gevent_app.long_run.delay(1, 3.5)  # ttl=1
    wait_until(lambda: r.get("rec:active:glong:1") == "1", 30, "the long run to start")
    # Two greenlets that never yield, 1.5 s each (more than the TTL): meanwhile no other greenlet
    # of the worker runs, so only a renewer outside the gevent hub can keep the lease.
    hogs = [gevent_app.hog.delay(1.5) for _ in range(2)]
    probes = refused = 0
    while not result.ready():
        probes += 1
        try:
            with single_run(key="glong:1", client=redis_url):
                # Taken: legitimate only once the run has recorded its end (it does so before
                # releasing); before that, the key was free while the run was still going.
                assert r.llen("rec:runs:glong:1") == 1, "the lease expired during the run"
        except AlreadyRunning:
            refused += 1
        time.sleep(0.05)
    info = result.get(timeout=10)
    assert [h.get(timeout=30) > 0 for h in hogs] == [True, True]
    assert info["patched"] is True, "the worker was not monkey-patched by gevent"
    assert info["lost"] is False, f"the run's own lease reported lost: {info}"
    assert info["seconds"] >= 3.5 and refused >= 30, (info, probes, refused)
    assert int(r.get("rec:hogs") or 0) == 2
    assert_clean_log(worker)
    [(_, _, fence)] = runs_of(r, "glong:1")
    assert fence == info["fence"]


def test_a_flood_over_a_few_keys_never_overlaps_per_key(app: Any, worker_factory: Any, r: redis.Redis) -> None:
    worker = worker_factory("tests.gevent_app", pool="gevent", concurrency=50)
    results = []
    for i in range(240):
        seconds = 1.6 if i % 60 == 0 else 0.005 * (i % 7)  # some runs outlast the 1 s TTL
        results.append(gevent_app.flood.delay(i % 3, seconds))
        if i in (40, 100, 160):
            # Shorter than the TTL: a greenlet whose acquisition reply waits behind a longer hog
            # starts with its lease already past its confirmed deadline, and is rightly told so.
            results.append(gevent_app.hog.delay(0.4))
    values = collect(results, timeout=120)
    assert_clean_log(worker)
    runs = [v for v in values if isinstance(v, dict)]
    assert all(v is None or isinstance(v, (dict, int)) for v in values), values
    assert runs and all(v["patched"] for v in runs)
    assert [v for v in runs if v["lost"]] == [], "a lease was lost during a run"
    recorded = 0
    for n in range(3):
        key = f"gflood:{n}"
        assert int(r.get(f"rec:max:{key}") or 0) == 1, f"{key}: two runs overlapped"
        spans = runs_of(r, key)
        recorded += len(spans)
        for (_, end, fence), (start, _, next_fence) in zip(spans, spans[1:]):
            assert start >= end, f"{key}: a run started at {start} before the previous ended at {end}"
            assert next_fence > fence
    assert recorded == len(runs), "the detector missed runs"
    skipped = values.count(None)
    assert len(runs) >= 6 and skipped > 0, (len(runs), skipped)  # both runs and skips happened
    assert any(v["seconds"] > 1.5 for v in runs)  # a run outlasted its TTL and kept the key
