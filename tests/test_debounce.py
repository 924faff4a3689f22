"""send_once(debounce=...): one run per burst of calls, after the last one (at most max_wait after the
first), with the newest arguments; against a real redis-server and real Celery workers."""

from __future__ import annotations

import ast
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

import single_task
from single_task import ConfigurationError, is_queued, send_once, single_run
from support.redis_server import RedisServer
from support.worker import CeleryWorker
from tests import celery_app

QUEUE = "q-debounce"
DEBOUNCE = 0.5
# A due time is a whole millisecond of the Redis server's clock (the same machine's as this test's),
# and the run is let through only once the server says it is due: a run may start at most 1 ms
# before the exact due time. The bound allows 5 ms.
EARLY = 0.005
# How late a run may start after its due time: the worker's eta timer, handing the message to the
# pool, one round trip for the debounce check and one for the lease. Measured here: tens of ms.
LATE = 0.4


# server, app and rec: the module fixtures of tests/conftest.py.


@pytest.fixture(scope="module")
def worker(server: RedisServer, app: Celery) -> Iterator[CeleryWorker]:
    with CeleryWorker("tests.celery_app", server.url, pool="threads", concurrency=4, queues=QUEUE) as started:
        yield started


@dataclass
class Call:
    before: float  # time.time() just before send_once
    after: float  # and just after it returned
    value: Any
    result: AsyncResult


@dataclass
class Run:
    start: float
    value: Any
    task_id: str
    retries: int


def runs_of(rec: redis.Redis, n: int) -> list[Run]:
    return [Run(*ast.literal_eval(line)) for line in rec.lrange(f"rec:debounce:{n}", 0, -1)]


def call(n: int, value: Any, seconds: float = 0.0, queue: str = QUEUE, **options: Any) -> Call:
    before = time.time()
    result = send_once(celery_app.debounced, (n, value, seconds), queue=queue, **options)
    return Call(before, time.time(), value, result)


def retries_sent(rec: redis.Redis) -> int:
    return int(rec.get("rec:retries:tests.celery_app.debounced") or 0)


def check_bursts(calls: list[Call], runs: list[Run], debounce: float, max_wait: Optional[float]) -> list[float]:
    """Group the calls by the task id they got back (the bursts), and check each burst's one run.

    Returns how late each run started after its earliest possible due time (for the report).
    """
    bursts: dict[str, list[Call]] = {}
    for c in calls:
        bursts.setdefault(c.result.id, []).append(c)
    by_id = Counter(run.task_id for run in runs)
    assert set(by_id) == set(bursts), (by_id, list(bursts))
    assert max(by_id.values()) == 1, f"a burst ran more than once: {by_id}"
    late = []
    for task_id, group in bursts.items():
        run = next(r for r in runs if r.task_id == task_id)
        first, last = group[0], group[-1]
        assert run.value == last.value, f"burst {task_id} ran with {run.value!r}, not the newest {last.value!r}"
        assert run.retries == 0, "re-scheduling spent a retry"
        cap = math.inf if max_wait is None else max_wait
        earliest = min(last.before + debounce, first.before + cap)
        latest = min(last.after + debounce, first.after + cap)
        assert run.start >= earliest - EARLY, f"burst {task_id} started {earliest - run.start:.3f}s early"
        assert run.start <= latest + LATE, f"burst {task_id} started {run.start - latest:.3f}s late"
        assert all(c.before < run.start for c in group), "a call made after the run started joined its burst"
        late.append(run.start - earliest)
        for c in group:
            assert c.result.get(timeout=30) == last.value
    return late


def broker_messages(rec: redis.Redis) -> Counter[tuple[str, str]]:
    """Messages of the debounced task in the broker (waiting in the queue, or held by the worker
    for their eta), by (key argument, task id), in one atomic snapshot."""
    pipe = rec.pipeline(transaction=True)
    pipe.lrange(QUEUE, 0, -1)
    pipe.hvals("unacked")
    waiting, unacked = pipe.execute()
    counts: Counter[tuple[str, str]] = Counter()
    for message in [json.loads(raw) for raw in waiting] + [json.loads(raw)[0] for raw in unacked]:
        headers = message["headers"]
        if headers["task"] == "tests.celery_app.debounced":
            counts[headers["argsrepr"].strip("(").split(",")[0], headers["id"]] += 1
    return counts


def test_each_burst_runs_once_after_its_last_call_with_the_newest_arguments(
        app: Celery, worker: CeleryWorker, rec: redis.Redis) -> None:
    calls: dict[int, list[Call]] = {1: [], 2: []}
    peak: Counter[str] = Counter()
    ids_at_once: Counter[str] = Counter()
    done = threading.Event()
    retries_before = retries_sent(rec)

    def produce() -> None:
        # Three bursts per key, the two keys interleaved: five calls 0.1 s apart, then quiet until
        # well after the run (which is due DEBOUNCE after the last call).
        try:
            for burst in range(3):
                for i in range(5):
                    for n in (1, 2):
                        calls[n].append(call(n, [n, burst, i], debounce=DEBOUNCE))
                    time.sleep(0.1)
                time.sleep(DEBOUNCE + 0.6)
        finally:
            done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    samples = 0
    while not done.is_set():
        snapshot = broker_messages(rec)
        for n in ("1", "2"):
            mine = {task_id: count for (key, task_id), count in snapshot.items() if key == n}
            peak[n] = max(peak[n], sum(mine.values()))
            ids_at_once[n] = max(ids_at_once[n], len(mine))
        samples += 1
        time.sleep(0.005)
    producer.join()
    late = []
    for n in (1, 2):
        late += check_bursts(calls[n], runs_of(rec, n), DEBOUNCE, None)
        assert len({c.result.id for c in calls[n]}) == 3, "each quiet gap should end one burst"
    rescheduled = retries_sent(rec) - retries_before
    print(f"\n6 bursts of 5 calls: 6 runs, {rescheduled} early starts re-scheduled; started "
          f"{min(late) * 1000:.0f}-{max(late) * 1000:.0f} ms after the due time; broker peak per key {dict(peak)} "
          f"({samples} samples)")
    assert samples > 100
    assert max(ids_at_once.values()) == 1, f"two messages of one key's bursts in the broker at once: {ids_at_once}"
    # One message per burst. The one moment it can be seen twice is its re-scheduling: the new copy
    # (same id) is published from inside the run that re-schedules, and the broker drops the old
    # one when the worker acknowledges it, which Celery does as the run is accepted.
    assert max(peak.values()) <= 2, peak
    # The message published at a burst's first call is due DEBOUNCE later, before the burst's last
    # call moved it: every burst started early once and sent itself again.
    assert rescheduled >= 6


def test_max_wait_caps_a_burst_that_never_goes_quiet(app: Celery, worker: CeleryWorker, rec: redis.Redis) -> None:
    max_wait = 1.0
    calls = []
    end = time.time() + 2.4
    i = 0
    while time.time() < end:  # a call every 0.15 s: never DEBOUNCE of quiet
        calls.append(call(10, i, debounce=DEBOUNCE, max_wait=max_wait))
        i += 1
        time.sleep(0.15)
    late = check_bursts(calls, wait_for_runs(rec, 10, len({c.result.id for c in calls})), DEBOUNCE, max_wait)
    bursts = len({c.result.id for c in calls})
    print(f"\n{len(calls)} calls over 2.4 s, max_wait={max_wait}: {bursts} runs, each "
          f"{min(late) * 1000:.0f}-{max(late) * 1000:.0f} ms after its due time")
    assert bursts >= 2, "a burst that never went quiet was not cut by max_wait"


def wait_for_runs(rec: redis.Redis, n: int, count: int, timeout: float = 30.0) -> list[Run]:
    deadline = time.monotonic() + timeout
    while rec.llen(f"rec:debounce:{n}") < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return runs_of(rec, n)


def test_a_message_that_starts_early_sends_itself_again_keeping_its_id_and_retries_and_no_worker_slot(
        app: Celery, server: RedisServer, rec: redis.Redis) -> None:
    queue = "q-debounce-solo"
    with CeleryWorker("tests.celery_app", server.url, pool="solo", queues=queue):
        retries_before = retries_sent(rec)
        first = call(20, "a", queue=queue, debounce=DEBOUNCE)
        time.sleep(0.3)
        second = call(20, "b", queue=queue, debounce=DEBOUNCE)  # due 0.8 s after the first call now
        assert second.result.id == first.result.id
        states = []
        deadline = time.monotonic() + 30
        other_sent = False
        while not first.result.ready() and time.monotonic() < deadline:
            states.append(first.result.state)
            if not other_sent and time.time() >= first.before + DEBOUNCE + 0.1:
                # The message started early and went back to the broker: the only worker slot (a
                # solo pool) is free for another task before the debounced run is due.
                celery_app.produce.apply_async((77, 0.0), queue=queue)
                other_sent = True
            time.sleep(0.01)
        assert first.result.get(timeout=30) == second.result.get(timeout=30) == "b"
    (run,) = runs_of(rec, 20)
    produced = [float(x) for x in rec.lrange("rec:produce:77", 0, -1)]
    assert produced and produced[0] < run.start, "the other task waited for the debounced run's slot"
    assert run.task_id == first.result.id and run.retries == 0
    assert run.start >= second.before + DEBOUNCE - EARLY
    # Once; twice if the worker's eta timer fired a moment before the server's due millisecond.
    assert 1 <= retries_sent(rec) - retries_before <= 3
    assert "RETRY" in states and first.result.state == "SUCCESS", states
    print(f"\nre-scheduled once (states seen: {sorted(set(states))}); the other task started "
          f"{run.start - produced[0]:.3f}s before the debounced run; run {run.start - second.before:.3f}s after "
          "the last call")


def test_a_call_after_the_run_started_opens_a_new_burst_and_on_busy_decides_the_overlap(
        app: Celery, worker: CeleryWorker, rec: redis.Redis) -> None:
    first = call(30, "x", 1.0, debounce=DEBOUNCE)  # a run of 1 s, under on_busy="wait"
    (started,) = wait_for_runs(rec, 30, 1)
    assert not is_queued(celery_app.debounced, 30)  # the burst closed when its run started
    more = [call(30, "y", 0.0, debounce=DEBOUNCE) for _ in range(3)]
    assert len({c.result.id for c in more}) == 1 and more[0].result.id != first.result.id
    assert is_queued(celery_app.debounced, 30)
    assert first.result.get(timeout=30) == "x"
    assert more[0].result.get(timeout=30) == "y"
    runs = runs_of(rec, 30)
    assert [r.value for r in runs] == ["x", "y"]
    # Due DEBOUNCE after the last call, but the first run held the key for 1 s: "wait" waited.
    assert runs[1].start >= more[-1].before + DEBOUNCE - EARLY
    assert runs[1].start >= started.start + 1.0


def test_a_revoked_burst_ends_with_its_message_and_the_next_call_opens_a_new_one(
        app: Celery, worker: CeleryWorker, rec: redis.Redis) -> None:
    first = call(35, "gone", debounce=3.0)
    time.sleep(0.3)  # the worker holds it for its due time
    first.result.revoke()
    revoked = time.monotonic()
    while is_queued(celery_app.debounced, 35) and time.monotonic() - revoked < 5:
        time.sleep(0.02)
    took = time.monotonic() - revoked
    assert not rec.exists("single_task:{debounce:35}:debounce") and took < 2.0, took
    again = call(35, "kept", debounce=DEBOUNCE)
    assert again.result.id != first.result.id  # not joined to the dead message
    assert again.result.get(timeout=30) == "kept"
    assert [r.value for r in runs_of(rec, 35)] == ["kept"]


def test_markers_expire_like_the_queued_marker_and_a_joining_call_is_reported(
        app: Celery, server: RedisServer, rec: redis.Redis) -> None:
    seen: list[tuple[str, str]] = []

    def deduplicated(sender: str, task_id: str, **_: Any) -> None:
        seen.append((sender, task_id))

    single_task.signals.deduplicated.connect(deduplicated)
    try:
        first = call(40, "a", queue="q-nobody", debounce=DEBOUNCE)  # nobody consumes it: lost
        assert is_queued(celery_app.debounced, 40)
        burst, marker = "single_task:{debounce:40}:debounce", "single_task:{debounce:40}:queued"
        # queued_ttl=30 of the task, plus the time to the due time.
        assert 30_000 < rec.pttl(burst) <= 30_000 + DEBOUNCE * 1000
        assert 30_000 < rec.pttl(marker) <= 30_000 + DEBOUNCE * 1000
        time.sleep(0.2)
        second = call(40, "b", queue="q-nobody", debounce=DEBOUNCE)
        assert second.result.id == first.result.id
        assert 30_000 + 200 < rec.pttl(burst) <= 30_000 + DEBOUNCE * 1000
        assert 30_000 + 200 < rec.pttl(marker) <= 30_000 + DEBOUNCE * 1000
        assert rec.llen("q-nobody") == 1  # one message for the burst
    finally:
        single_task.signals.deduplicated.disconnect(deduplicated)
    assert seen == [("debounce:40", first.result.id)]


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"debounce": 0}, ConfigurationError, r"debounce=0 is out of range"),
    ({"debounce": -1}, ConfigurationError, r"debounce=-1 is out of range"),
    ({"debounce": math.nan}, ConfigurationError, r"debounce=nan is out of range"),
    ({"debounce": math.inf}, ConfigurationError, r"debounce=inf is out of range"),
    ({"debounce": "1"}, ConfigurationError, r"debounce must be a number of seconds"),
    ({"debounce": 1, "max_wait": 0.5}, ConfigurationError, r"'debounce:50'.*max_wait >= debounce"),
    ({"debounce": 1, "max_wait": math.inf}, ConfigurationError, r"max_wait=inf is out of range"),
    ({"max_wait": 1}, ConfigurationError, r"only applies with debounce="),
    ({"debounce": 1, "countdown": 3}, ConfigurationError, r"'debounce:50'.*drop countdown=3"),
])
def test_bad_options_are_refused_naming_the_fix_before_redis_changes(
        app: Celery, server: RedisServer, options: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        send_once(celery_app.debounced, (50, "v"), queue="q-bad", **options)
    assert server.client().keys("single_task:{debounce:50}*") == []
    assert server.client().llen("q-bad") == 0


@pytest.mark.parametrize(("value", "error", "match"), [
    (object(), TypeError, r"'debounce:51'.*as JSON.*pass ids, strings"),
    (math.nan, TypeError, r"'debounce:51'.*as JSON"),
    ("x" * 70_000, ValueError, r"'debounce:51'.*bytes as JSON \(at most 65536\); pass an id"),
])
def test_arguments_that_are_not_small_json_are_refused_before_redis_changes(
        app: Celery, server: RedisServer, value: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        send_once(celery_app.debounced, (51, value), queue="q-bad", debounce=1)
    assert server.client().keys("single_task:{debounce:51}*") == []
    assert server.client().llen("q-bad") == 0


def test_in_eager_mode_a_debounced_call_runs_at_once(server: RedisServer) -> None:
    eager = Celery("eager-debounce", set_as_current=False)
    eager.conf.update(task_always_eager=True)

    @eager.task
    @single_run(key="eager-debounce:{n}", client=server.url)
    def job(n: int) -> int:
        return n + 1

    assert send_once(job, (1,), debounce=5).get() == 2
    assert not is_queued(job, 1)
