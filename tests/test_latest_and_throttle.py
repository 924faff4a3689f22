"""rerun_with="latest" (the newest call's arguments win) and min_interval (a throttle), in-process:
what test_single_task.py's contract for them leaves out."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from celery import Celery

from single_task import ConfigurationError, single_run
from test_single_task import in_thread

# -- rerun_with="latest" --------------------------------------------------------------------------


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
