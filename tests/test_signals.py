"""Every decision is visible: one signal per decision, and a receiver cannot break anything."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

import single_task
from single_task import AlreadyRunning, current_lease, send_once, single_run
from tests.test_core import held_elsewhere

NAMES = ("acquired", "released", "lost", "busy", "deduplicated")


@pytest.fixture
def seen() -> Iterator[list[tuple[str, str, dict[str, Any]]]]:
    """Every signal sent while the test runs: (signal, sender, keyword arguments)."""
    got: list[tuple[str, str, dict[str, Any]]] = []
    receivers = {}
    for name in NAMES:
        def receiver(sender: str, name: str = name, **named: Any) -> None:
            named.pop("signal", None)
            got.append((name, sender, named))
        receivers[name] = receiver
        getattr(single_task.signals, name).connect(receiver, weak=False)
    yield got
    for name, receiver in receivers.items():
        getattr(single_task.signals, name).disconnect(receiver)


def kinds(seen: list[tuple[str, str, dict[str, Any]]], key: str) -> list[str]:
    return [f"{name}:{named['action']}" if name == "busy" else name for name, sender, named in seen if sender == key]


def test_a_run_sends_acquired_then_released(redis_url: str, seen: list[Any]) -> None:
    @single_run(key="sig:{n}", client=redis_url)
    def job(n: int) -> int:
        return n

    assert job(1) == 1
    assert kinds(seen, "sig:1") == ["acquired", "released"]
    acquired, released = seen
    assert acquired[2]["lease"] is released[2]["lease"] and released[2]["confirmed"] is True
    assert acquired[2]["task"] is None


@pytest.mark.parametrize(("policy", "action"), [("skip", "skipped"), ("rerun", "rerun_requested"),
                                                 ("raise", "raised")])
def test_a_busy_call_sends_one_busy_signal_with_what_it_did(redis_url: str, seen: list[Any], policy: str,
                                                            action: str) -> None:
    job = single_run(key="busy-sig", client=redis_url, on_busy=policy)(lambda: "ran")  # type: ignore[arg-type]
    with held_elsewhere(redis_url, "busy-sig"):
        seen.clear()
        try:
            job()
        except AlreadyRunning:
            assert policy == "raise"
        assert kinds(seen, "busy-sig") == [f"busy:{action}"]
        assert seen[0][2]["policy"] == policy and 0 < seen[0][2]["time_left"] <= 30


def test_a_waiter_sends_waiting_then_acquired(redis_url: str, seen: list[Any]) -> None:
    job = single_run(key="wait-sig", client=redis_url, on_busy="wait", timeout=10)(lambda: "ran")
    with held_elsewhere(redis_url, "wait-sig", ttl=30) as _:
        seen.clear()
        done: list[str] = []
        waiter = threading.Thread(target=lambda: done.append(job()))
        waiter.start()
        time.sleep(0.3)
    waiter.join(10)
    assert done == ["ran"]
    got = kinds(seen, "wait-sig")
    # The holder's release and the waiter's acquire happen in two threads: either may signal first.
    assert got[0] == "busy:waiting" and got[-1] == "released"
    assert sorted(got[1:3]) == ["acquired", "released"]


def test_a_rerun_is_an_acquisition_of_its_own(redis_url: str, seen: list[Any]) -> None:
    calls: list[int] = []

    @single_run(key="rerun-sig", client=redis_url, on_busy="rerun")
    def job() -> None:
        calls.append(1)
        if len(calls) == 1:
            other = threading.Thread(target=job)
            other.start()
            other.join()

    job()
    assert kinds(seen, "rerun-sig") == ["acquired", "busy:rerun_requested", "acquired", "released"]
    assert seen[0][2]["lease"].fence < seen[2][2]["lease"].fence or seen[0][2]["lease"] is seen[2][2]["lease"]


def test_a_lost_lease_sends_lost_once(redis_url: str, r: redis.Redis, seen: list[Any]) -> None:
    with single_run(key="lost-sig", client=redis_url, ttl=0.5) as lease:
        r.delete("single_task:{lost-sig}")
        deadline = time.monotonic() + 5
        while "lost" not in kinds(seen, "lost-sig") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lease.lost
    assert kinds(seen, "lost-sig") == ["acquired", "lost"]
    assert "gone" in seen[1][2]["reason"]


def test_a_duplicate_send_once_sends_deduplicated_with_the_waiting_id(redis_url: str, seen: list[Any]) -> None:
    app = Celery("sig", broker=redis_url, backend=redis_url, set_as_current=False)

    @app.task
    @single_run(key="dedup:{n}", client=redis_url)
    def task(n: int) -> None: ...

    first = send_once(task, (1,))
    second = send_once(task, (1,))
    assert second.id == first.id
    assert kinds(seen, "dedup:1") == ["deduplicated"]
    assert seen[0][2]["task_id"] == first.id and seen[0][2]["task"] is task


@pytest.mark.parametrize("raising", [RuntimeError, SystemExit, KeyboardInterrupt])
def test_a_receiver_that_raises_breaks_nothing(redis_url: str, r: redis.Redis, raising: type) -> None:
    def bad(sender: str, **named: Any) -> None:
        raise raising("receiver")

    for name in NAMES:
        getattr(single_task.signals, name).connect(bad, weak=False)
    try:
        @single_run(key="bad-sig", client=redis_url)
        def job() -> int:
            lease = current_lease()
            assert lease is not None
            return lease.fence

        assert job() > 0
        assert not r.exists("single_task:{bad-sig}")
        with single_run(key="bad-sig-2", client=redis_url, ttl=0.5) as lease:
            time.sleep(1.2)  # renewed meanwhile, signals or not
            assert not lease.lost
    finally:
        for name in NAMES:
            getattr(single_task.signals, name).disconnect(bad)
