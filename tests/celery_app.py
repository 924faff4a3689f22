"""The Celery app the test workers run. Broker, backend and leases all use $SINGLE_TASK_TEST_URL."""

from __future__ import annotations

import os
import threading
import time

import redis

from single_task import current_lease, single_run
from support.apps import make_app, worker_url

URL = worker_url()
app = make_app("single_task_tests", URL)
_record = redis.Redis.from_url(URL)


def use_server(url: str) -> None:
    """Point the producer side of ``app`` (and the run record) at ``url``.

    Celery caches the result backend and the producer pool it built for the previous broker; a
    module that starts its own server must drop them, or its results are read from a server that
    an earlier module already stopped.
    """
    global _record
    app.conf.update(broker_url=url, result_backend=url)
    app._local = threading.local()
    if hasattr(app, "_backend_cache"):  # Celery >= 5.5 caches thread-safe backends here
        app._backend_cache = None
    app._after_fork()  # drops the producer pool, as Celery itself does in a forked child
    app.set_current()
    _record = redis.Redis.from_url(url)
    for task in app.tasks.values():  # leases follow the broker: resolve their client again
        found = getattr(task.run, "__single_run__", None)
        if found is not None:
            found[0]._resolved_client = None


def _log_run(key: str, seconds: float) -> bool:
    """Record a run's start and end, and the largest number of concurrent runs seen per key.

    INCR/DECR in Redis counts overlap independently of clocks; the start/end list lets the test
    check by time too and count that every run was seen.
    """
    lease = current_lease()
    start = time.time()
    active = _record.incr(f"rec:active:{key}")
    _record.eval(
        "if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then "
        "redis.call('SET', KEYS[1], ARGV[1]) end", 1, f"rec:max:{key}", active)
    time.sleep(seconds)
    _record.decr(f"rec:active:{key}")
    fence = lease.fence if lease is not None else -1
    _record.rpush(f"rec:runs:{key}", f"{start!r} {time.time()!r} {os.getpid()} {fence}")
    return True


@app.task
@single_run(key="flood:{n}", ttl=10)
def flood(n: int, seconds: float = 0.02) -> bool:
    return _log_run(f"flood:{n}", seconds)


@app.task
def flood_unlocked(n: int, seconds: float = 0.02) -> bool:
    """The same work without the lock: proves the overlap detector can see an overlap."""
    return _log_run(f"flood:{n}", seconds)


@app.task(bind=True, max_retries=3)
@single_run(key="retrying:{n}", ttl=10)
def retrying(self: object, n: int, attempts: int) -> int:
    """Retries itself with countdown=0 until it has run ``attempts`` times."""
    runs = _record.incr(f"rec:retrying:{n}")
    if self.request.retries + 1 < attempts:  # type: ignore[attr-defined]
        # Publish the retry, then take a moment to unwind (as cleanup code in `finally` does):
        # the retry is picked up by another child while this attempt still holds the key.
        retry = self.retry(countdown=0, max_retries=attempts, throw=False)  # type: ignore[attr-defined]
        time.sleep(0.05)
        raise retry
    return runs


@app.task(bind=True)
@single_run(key="busy:{n}", ttl=10, on_busy="raise")
def raising(self: object, n: int, seconds: float) -> str:
    time.sleep(seconds)
    return "ran"


@app.task(bind=True, max_retries=1)
@single_run(key="contended:{n}", ttl=10, on_busy="retry", retry_countdown=0.2)
def contended(self: object, n: int, seconds: float) -> int:
    time.sleep(seconds)
    return int(self.request.retries)  # type: ignore[attr-defined]


@app.task(bind=True)
@single_run(key="holder:{n}", ttl=10)
def who_holds(self: object, n: int) -> dict[str, object]:
    lease = current_lease()
    assert lease is not None
    return {"holder": lease.holder, "fence": lease.fence, "task_id": self.request.id}  # type: ignore[attr-defined]


@app.task(time_limit=5, soft_time_limit=0.5)
@single_run(key="slow:{n}", ttl=10)
def soft_limited(n: int) -> str:
    time.sleep(3)
    return "finished"


@app.task
@single_run(key="rerun:{n}", ttl=10, on_busy="rerun")
def rerun_task(n: int, seconds: float) -> bool:
    return _log_run(f"rerun:{n}", seconds)


if os.environ.get("SINGLE_TASK_TEST_SERIALIZER") == "pickle":
    app.conf.update(result_serializer="pickle", task_serializer="pickle", accept_content=["pickle", "json"],
                    result_accept_content=["pickle", "json"])


@app.task(bind=True)
@single_run(key="rerun-fail:{n}", ttl=10, on_busy="rerun")
def rerun_fails(self: object, n: int, seconds: float, fail: bool) -> str:
    _record.rpush(f"rec:rerun-fail:{n}", "fail" if fail else "ok")
    time.sleep(seconds)
    if fail:
        raise RuntimeError("this run fails")
    return "ok"


def _count_retry(sender: object = None, **_: object) -> None:
    _record.incr(f"rec:retries:{getattr(sender, 'name', sender)}")


from celery.signals import task_retry  # noqa: E402

task_retry.connect(_count_retry, weak=False)


@app.task
@single_run(key="produce:{n}", ttl=10, on_busy="wait")
def produce(n: int, seconds: float) -> float:
    """A slow task for send_once: records when each run started."""
    start = time.time()
    _record.rpush(f"rec:produce:{n}", repr(start))
    time.sleep(seconds)
    return start


@app.task
@single_run(key="produce-short:{n}", ttl=10, on_busy="wait", queued_ttl=1.5)
def produce_short(n: int) -> str:
    return "ran"


def _mark_started(task_id: str = "", **_: object) -> None:
    # Fires before the task body (and so before the lease and the queued marker are touched).
    _record.sadd("rec:started", task_id)


from celery.signals import task_prerun  # noqa: E402

task_prerun.connect(_mark_started, weak=False)


@single_run(key="helper:{a}", ttl=10, on_busy="rerun")
def helper(a: int, b: str) -> str:
    """A plain decorated function that a task calls: not the task itself."""
    if _record.incr(f"rec:helper:{a}") == 1:
        asker = threading.Thread(target=helper, args=(a, b))  # busy: asks this run for a rerun
        asker.start()
        asker.join()
        raise ValueError("the helper failed")
    return b


@app.task
def calls_helper(n: int) -> str:
    return helper(n, "x")


@app.task
@single_run(key="doomed:{n}", ttl=10)
def doomed(n: int) -> str:
    """For messages that are revoked, expire or are rejected: records every run that happens."""
    _record.rpush(f"rec:doomed:{n}", "ran")
    return "ran"


@app.task
@single_run(key="doomed-const", ttl=10)
def doomed_const() -> str:
    """A key without arguments: found even for a message whose body the worker refused to read."""
    _record.rpush("rec:doomed-const", "ran")
    return "ran"


@app.task(bind=True)
@single_run(key="debounce:{n}", ttl=10, on_busy="wait", queued_ttl=30)
def debounced(self: object, n: int, value: object, seconds: float = 0.0) -> object:
    """For send_once(debounce=...): records each run's start, arguments, task id and retries."""
    request = self.request  # type: ignore[attr-defined]
    _record.rpush(f"rec:debounce:{n}", repr((time.time(), value, request.id, request.retries)))
    time.sleep(seconds)
    return value


@app.task(bind=True)
@single_run(key="latest-fail:{n}", ttl=10, on_busy="rerun", rerun_with="latest")
def latest_fails(self: object, n: int, version: int, seconds: float, fail: bool) -> int:
    """Records the version each run got; a failing run's owed rerun must carry the newest one."""
    _record.rpush(f"rec:latest-fail:{n}", version)
    time.sleep(seconds)
    if fail:
        raise RuntimeError("this run fails")
    return version


def _log_fence(key: str) -> int:
    """Record the server-clock fence of this run's start: starts must be min_interval apart."""
    lease = current_lease()
    assert lease is not None
    _record.rpush(f"rec:{key}", lease.fence)
    return lease.fence


@app.task(bind=True)
@single_run(key="throttled:{n}", ttl=10, on_busy="rerun", min_interval=1.0)
def throttled(self: object, n: int) -> int:
    return _log_fence(f"throttled:{n}")


@app.task(bind=True, max_retries=0)
@single_run(key="throttled-retry:{n}", ttl=10, on_busy="retry", min_interval=1.0)
def throttled_retry(self: object, n: int) -> int:
    return _log_fence(f"throttled-retry:{n}")


@single_run(key="helper-holder:{n}", ttl=10)
def holder_of(n: int) -> object:
    lease = current_lease()
    assert lease is not None
    return lease.holder["task_id"]


@app.task
def calls_holder_of(n: int) -> object:
    return holder_of(n)
