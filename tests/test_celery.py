"""single_run under real Celery workers (prefork, threads, solo) on a real redis-server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from single_task import AlreadyRunning, ConfigurationError, is_running, single_run
from support.redis_server import RedisServer
from support.worker import CeleryWorker
from tests import celery_app


@pytest.fixture(scope="module")
def prefork(server: RedisServer, app: Celery) -> Iterator[CeleryWorker]:
    with CeleryWorker("tests.celery_app", server.url, pool="prefork", concurrency=4) as worker:
        yield worker


def check_flood(rec: redis.Redis, results: list[Any], keys: list[str]) -> int:
    """No two runs of one key overlapped, and the detector saw every run that happened."""
    ran = sum(1 for x in results if x is True)
    assert all(x in (True, None) for x in results), results
    recorded = 0
    for key in keys:
        assert int(rec.get(f"rec:max:{key}") or 0) == 1, f"{key}: two runs overlapped"
        runs = sorted(tuple(map(float, line.split()[:2])) for line in rec.lrange(f"rec:runs:{key}", 0, -1))
        recorded += len(runs)
        for (_, end), (start, _) in zip(runs, runs[1:]):
            assert start >= end, f"{key}: a run started at {start} before the previous ended at {end}"
    assert recorded == ran, "the detector missed runs"
    return ran


def test_a_flood_on_a_prefork_worker_never_overlaps_per_key(app: Celery, prefork: CeleryWorker,
                                                             rec: redis.Redis) -> None:
    results = [celery_app.flood.delay(i % 3, 0.005 * (i % 5)) for i in range(300)]
    values = [r.get(timeout=120) for r in results]
    ran = check_flood(rec, values, [f"flood:{n}" for n in range(3)])
    assert ran >= 3 and values.count(None) > 0  # both runs and skips happened: the check was exercised


def test_the_overlap_detector_sees_overlaps_without_the_lock(app: Celery, prefork: CeleryWorker,
                                                             rec: redis.Redis) -> None:
    results = [celery_app.flood_unlocked.delay(99, 0.2) for _ in range(8)]
    for r in results:
        r.get(timeout=60)
    assert int(rec.get("rec:max:flood:99") or 0) > 1


def test_delay_with_wrong_arguments_raises_typeerror_like_an_undecorated_task(app: Celery) -> None:
    with pytest.raises(TypeError):
        celery_app.flood.delay()
    with pytest.raises(TypeError):
        celery_app.flood.delay(1, 2, 3)
    with pytest.raises(TypeError):
        celery_app.retrying.delay(1, attempts=2, bogus=3)
    assert celery_app.flood.name == "tests.celery_app.flood"
    assert celery_app.retrying.__doc__ and "Retries itself" in celery_app.retrying.__doc__


def test_a_tasks_own_countdown_zero_retry_gets_the_key(app: Celery, prefork: CeleryWorker) -> None:
    results = [celery_app.retrying.delay(n, 4) for n in range(25)]
    assert [r.get(timeout=120) for r in results] == [4] * 25


def test_already_running_comes_back_through_the_json_result_backend(app: Celery, prefork: CeleryWorker,
                                                                    server: RedisServer) -> None:
    with single_run(key="busy:1", client=server.url):
        result = celery_app.raising.delay(1, 0)
        with pytest.raises(AlreadyRunning) as info:
            result.get(timeout=60)
    assert info.value.key == "busy:1"
    # An expected outcome, logged as one INFO line by Celery, not an ERROR with a traceback.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the worker's log is written a moment after the result
        log = prefork.log()
        lines = [ln for ln in log.splitlines() if result.id in ln and "AlreadyRunning" in ln]
        if lines:
            break
        time.sleep(0.1)
    assert lines, log[-2000:]
    line = lines[0]
    assert "INFO" in line and "raised expected" in line, line
    assert f"Task tests.celery_app.raising[{result.id}] raised unexpected" not in log


def test_retry_on_contention_does_not_spend_the_tasks_retries(app: Celery, prefork: CeleryWorker,
                                                              server: RedisServer, rec: redis.Redis) -> None:
    with single_run(key="contended:1", client=server.url):
        result = celery_app.contended.delay(1, 0)
        time.sleep(1.5)
        assert not result.ready()
    assert result.get(timeout=60) == 0  # request.retries is untouched
    assert int(rec.get("rec:retries:tests.celery_app.contended") or 0) >= 2  # > max_retries=1


def test_the_lease_records_the_celery_task_as_holder(app: Celery, prefork: CeleryWorker) -> None:
    result = celery_app.who_holds.delay(5)
    info = result.get(timeout=60)
    assert info["holder"]["task_id"] == result.id == info["task_id"]
    assert info["holder"]["pid"] > 0 and info["holder"]["host"]


def test_a_soft_time_limit_releases_the_lease(app: Celery, prefork: CeleryWorker, rec: redis.Redis) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    with pytest.raises(SoftTimeLimitExceeded):
        celery_app.soft_limited.delay(1).get(timeout=60)
    assert not rec.exists("single_task:{slow:1}")


def test_rerun_under_celery_coalesces_into_one_more_run(app: Celery, prefork: CeleryWorker,
                                                         rec: redis.Redis) -> None:
    first = celery_app.rerun_task.delay(1, 0.8)
    deadline = time.monotonic() + 30
    while not is_running(celery_app.rerun_task, 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    others = [celery_app.rerun_task.delay(1, 0.0) for _ in range(10)]
    assert [r.get(timeout=60) for r in others] == [None] * 10
    assert first.get(timeout=60) is True
    assert rec.llen("rec:runs:rerun:1") == 2
    assert int(rec.get("rec:max:rerun:1") or 0) == 1


def test_a_rerun_owed_by_a_failing_run_is_sent_again_through_the_broker(app: Celery, prefork: CeleryWorker,
                                                                         rec: redis.Redis) -> None:
    failing = celery_app.rerun_fails.delay(1, 0.8, True)
    deadline = time.monotonic() + 30
    while not is_running(celery_app.rerun_fails, 1, 0, False) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert celery_app.rerun_fails.delay(1, 0.0, False).get(timeout=60) is None
    with pytest.raises(RuntimeError):
        failing.get(timeout=60)
    deadline = time.monotonic() + 30
    while rec.llen("rec:rerun-fail:1") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rec.lrange("rec:rerun-fail:1", 0, -1) == ["fail", "fail"]  # re-sent with the holder's arguments


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_threads_and_solo_pools_never_overlap(app: Celery, server: RedisServer, rec: redis.Redis, pool: str) -> None:
    rec.delete(*[f"rec:{kind}:flood:{n}" for kind in ("max", "runs", "active") for n in (10, 11)] or ["none"])
    queue = f"q-{pool}"
    with CeleryWorker("tests.celery_app", server.url, pool=pool, concurrency=4, queues=queue):
        results = [celery_app.flood.apply_async((10 + i % 2, 0.003), queue=queue) for i in range(120)]
        values = [r.get(timeout=120) for r in results]
    assert check_flood(rec, values, ["flood:10", "flood:11"]) >= 2


def test_already_running_comes_back_through_a_pickle_result_backend(app: Celery, server: RedisServer) -> None:
    producer = Celery("pickle-producer", broker=server.url, backend=server.url, set_as_current=False)
    producer.conf.update(task_serializer="pickle", result_serializer="pickle", accept_content=["pickle", "json"],
                         result_accept_content=["pickle", "json"])
    with CeleryWorker("tests.celery_app", server.url, pool="solo", queues="q-pickle",
                      env={"SINGLE_TASK_TEST_SERIALIZER": "pickle", "C_FORCE_ROOT": "1"}), \
            single_run(key="busy:2", client=server.url):
        result = producer.send_task("tests.celery_app.raising", (2, 0), queue="q-pickle")
        with pytest.raises(AlreadyRunning) as info:
            result.get(timeout=60)
    assert info.value.key == "busy:2"


def test_is_running_takes_the_task_object(app: Celery, prefork: CeleryWorker, server: RedisServer) -> None:
    assert is_running(celery_app.flood, 42) is False
    with single_run(key="flood:42", client=server.url):
        assert is_running(celery_app.flood, 42) is True
        assert is_running(celery_app.flood, n=42, seconds=1) is True
    with single_run(key="contended:7", client=server.url):
        assert is_running(celery_app.contended, 7, 0.0) is True  # a bound task


def test_single_run_above_app_task_is_refused_with_the_fix(app: Celery) -> None:
    with pytest.raises(ConfigurationError, match="below"):

        @single_run(key="x")
        @app.task
        def job() -> None: ...


def test_a_rerun_owed_by_a_failing_run_goes_to_the_queue_the_run_came_from(app: Celery, server: RedisServer,
                                                                           rec: redis.Redis) -> None:
    with CeleryWorker("tests.celery_app", server.url, pool="prefork", concurrency=2, queues="routed"):
        failing = celery_app.rerun_fails.apply_async((7, 0.8, True), queue="routed")
        deadline = time.monotonic() + 30
        while not is_running(celery_app.rerun_fails, 7) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert celery_app.rerun_fails.apply_async((7, 0.0, False), queue="routed").get(timeout=60) is None
        with pytest.raises(RuntimeError):
            failing.get(timeout=60)
        deadline = time.monotonic() + 20
        while rec.llen("rec:rerun-fail:7") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rec.lrange("rec:rerun-fail:7", 0, -1) == ["fail", "fail"], "the rerun went to a queue nobody serves"
        assert rec.llen("celery") == 0


def test_a_decorated_helper_called_by_a_task_is_not_mistaken_for_the_task(app: Celery, server: RedisServer) -> None:
    with CeleryWorker("tests.celery_app", server.url, pool="solo", queues="helper"):
        result = celery_app.calls_helper.apply_async((3,), queue="helper")
        with pytest.raises(ValueError, match="the helper failed"):
            result.get(timeout=60)


def test_a_failing_run_owing_a_latest_rerun_sends_the_newest_arguments(app: Celery, prefork: CeleryWorker,
                                                                      rec: redis.Redis) -> None:
    failing = celery_app.latest_fails.delay(1, 1, 0.8, True)
    deadline = time.monotonic() + 30
    while not is_running(celery_app.latest_fails, 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert celery_app.latest_fails.delay(1, 2, 0.0, False).get(timeout=60) is None
    assert celery_app.latest_fails.delay(1, 3, 0.0, False).get(timeout=60) is None
    with pytest.raises(RuntimeError):
        failing.get(timeout=60)
    deadline = time.monotonic() + 30
    while rec.llen("rec:latest-fail:1") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert rec.lrange("rec:latest-fail:1", 0, -1) == ["1", "3"]


def test_a_throttle_under_rerun_ends_every_burst_with_one_trailing_run(app: Celery, prefork: CeleryWorker,
                                                                       rec: redis.Redis) -> None:
    results = [celery_app.throttled.delay(1) for _ in range(6)]
    values = [r.get(timeout=60) for r in results]
    ran = [v for v in values if v is not None]
    deadline = time.monotonic() + 10
    while rec.llen("rec:throttled:1") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # nothing more may come
    fences = [int(f) for f in rec.lrange("rec:throttled:1", 0, -1)]
    assert len(ran) >= 1 and len(fences) == 2, fences  # the first, and one trailing run for the others
    assert fences[1] - fences[0] >= 1_000_000  # starts at least min_interval apart, by Redis's clock


def test_a_throttle_under_retry_resends_for_when_the_interval_ends(app: Celery, prefork: CeleryWorker,
                                                                   rec: redis.Redis) -> None:
    first = celery_app.throttled_retry.delay(1)
    first.get(timeout=30)
    second = celery_app.throttled_retry.delay(1)
    assert second.get(timeout=30) is not None  # re-sent (not counted against max_retries=0), then ran
    fences = [int(f) for f in rec.lrange("rec:throttled-retry:1", 0, -1)]
    assert len(fences) == 2 and fences[1] - fences[0] >= 1_000_000


def test_a_decorated_helper_records_the_id_of_the_task_that_calls_it(app: Celery, prefork: CeleryWorker) -> None:
    # So that a redelivery of the task's message recognises the helper's lease as its own attempt.
    result = celery_app.calls_holder_of.delay(5)
    assert result.get(timeout=60) == result.id
