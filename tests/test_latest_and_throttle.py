"""rerun_with="latest" (the newest call's arguments win) and min_interval (a throttle), in-process."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
from celery import Celery

from single_task import AlreadyRunning, ConfigurationError, current_lease, single_run


def in_thread(fn: Any, *args: Any) -> Any:
    out: list[Any] = []

    def call() -> None:
        try:
            out.append(fn(*args))
        except BaseException as exc:  # handed back to the test
            out.append(exc)

    t = threading.Thread(target=call)
    t.start()
    t.join()
    return out[0]


# -- rerun_with="latest" --------------------------------------------------------------------------


def test_the_rerun_runs_with_the_newest_calls_arguments(redis_url: str) -> None:
    seen: list[tuple[int, int]] = []

    @single_run(key="doc:{doc_id}", client=redis_url, on_busy="rerun", rerun_with="latest")
    def index(doc_id: int, version: int) -> None:
        seen.append((doc_id, version))
        if len(seen) == 1:
            assert in_thread(index, doc_id, 2) is None  # busy: a rerun with version 2
            assert in_thread(index, doc_id, 3) is None  # and now version 3 wins

    index(1, 1)
    assert seen == [(1, 1), (1, 3)]


def test_by_default_the_rerun_keeps_the_holders_arguments(redis_url: str) -> None:
    seen: list[int] = []

    @single_run(key="doc:{doc_id}", client=redis_url, on_busy="rerun")
    def index(doc_id: int, version: int) -> None:
        seen.append(version)
        if len(seen) == 1:
            in_thread(index, doc_id, 2)

    index(1, 1)
    assert seen == [1, 1]


def test_a_bound_task_keeps_its_own_self_and_only_the_arguments_travel(redis_url: str) -> None:
    app = Celery("latest", broker=redis_url, backend=redis_url, set_as_current=False)
    seen: list[tuple[Any, int]] = []

    @app.task(bind=True)
    @single_run(key="bound:{n}", client=redis_url, on_busy="rerun", rerun_with="latest")
    def job(self: Any, n: int, version: int) -> None:
        seen.append((self, version))
        if len(seen) == 1:
            in_thread(job, n, 9)

    job(1, 1)
    assert [v for _, v in seen] == [1, 9] and all(getattr(s, "name", None) == job.name for s, _ in seen)


def test_arguments_that_are_not_json_are_refused_before_redis_changes(redis_url: str, r: redis.Redis) -> None:
    @single_run(key="nj:{n}", client=redis_url, on_busy="rerun", rerun_with="latest")
    def job(n: int, payload: Any) -> None:
        busy = in_thread(job, n, object())
        assert isinstance(busy, TypeError) and "JSON" in str(busy) and "'nj:1'" in str(busy)
        too_big = in_thread(job, n, "x" * 70_000)
        assert isinstance(too_big, ValueError) and "65536" in str(too_big)
        assert r.hget("single_task:{nj:1}", "r") is None  # no rerun was asked for

    job(1, "ok")


def test_rerun_with_latest_needs_the_rerun_policy() -> None:
    with pytest.raises(ConfigurationError, match="needs on_busy='rerun'"):
        single_run(key="k", rerun_with="latest")
    with pytest.raises(ConfigurationError, match="'holder' or 'latest'"):
        single_run(key="k", on_busy="rerun", rerun_with="newest")  # type: ignore[arg-type]


# -- min_interval ------------------------------------------------------------------------------------


def test_two_runs_start_at_least_min_interval_apart_and_a_call_inside_it_is_skipped(redis_url: str) -> None:
    fences: list[int] = []

    @single_run(key="thr", client=redis_url, min_interval=0.5)
    def job() -> str:
        lease = current_lease()
        assert lease is not None
        fences.append(lease.fence)  # the server's clock in microseconds
        return "ran"

    assert job() == "ran"
    assert job() is None  # inside the interval: skipped
    time.sleep(0.55)
    assert job() == "ran"
    assert fences[1] - fences[0] >= 500_000


def test_raise_says_how_long_is_left(redis_url: str) -> None:
    job = single_run(key="thr-raise", client=redis_url, min_interval=2.0, on_busy="raise")(lambda: "ran")
    assert job() == "ran"
    with pytest.raises(AlreadyRunning, match=r"min_interval.*s left"):
        job()


def test_wait_blocks_until_the_interval_ends_then_runs(redis_url: str) -> None:
    fences: list[int] = []

    @single_run(key="thr-wait", client=redis_url, min_interval=0.6, on_busy="wait", timeout=5)
    def job() -> float:
        lease = current_lease()
        assert lease is not None
        fences.append(lease.fence)
        return time.monotonic()

    first = job()
    second = job()
    assert second - first >= 0.55 and fences[1] - fences[0] >= 600_000


def test_a_wait_whose_timeout_ends_inside_the_interval_raises(redis_url: str) -> None:
    job = single_run(key="thr-wait-t", client=redis_url, min_interval=2.0, on_busy="wait", timeout=0.2)(lambda: 1)
    assert job() == 1
    started = time.monotonic()
    with pytest.raises(AlreadyRunning, match="min_interval"):
        job()
    assert time.monotonic() - started < 0.5


def test_an_owed_rerun_starts_when_the_interval_ends(redis_url: str) -> None:
    fences: list[int] = []

    @single_run(key="thr-rerun", client=redis_url, min_interval=0.8, on_busy="rerun")
    def job() -> None:
        lease = current_lease()
        assert lease is not None
        fences.append(lease.fence)
        if len(fences) == 1:
            in_thread(job)  # busy: asks for a rerun, which may not start before the interval ends

    job()
    assert len(fences) == 2 and fences[1] - fences[0] >= 800_000


def test_a_throttled_rerun_outside_a_worker_is_refused_with_what_to_use(redis_url: str) -> None:
    job = single_run(key="thr-rerun-out", client=redis_url, min_interval=5.0, on_busy="rerun")(lambda: 1)
    assert job() == 1
    with pytest.raises(ConfigurationError, match=r"needs a Celery worker.*'wait' or 'skip'"):
        job()


def test_show_says_how_long_a_key_cools_down_and_the_last_fence_after_a_release(redis_url: str, capsys: Any) -> None:
    import json

    from single_task import main

    with single_run(key="thr-show", client=redis_url, min_interval=30.0) as lease:
        fence = lease.fence
    assert main(["--url", redis_url, "show", "thr-show"]) == 1  # not held
    out = capsys.readouterr().out
    assert "cooling down" in out and f"last fence: {fence}" in out
    assert main(["--url", redis_url, "show", "thr-show", "--json"]) == 1
    shown = json.loads(capsys.readouterr().out)
    assert shown["last_fence"] == fence and 29 < shown["cooling_down_s"] <= 30
