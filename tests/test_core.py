"""The lease promises that need more than test_single_task.py has (subprocesses, forks, restarts, the
scripts themselves) and the keys, is_running and client resolution; against a real redis-server."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
import redis

import single_task
from single_task import AlreadyRunning, current_lease, is_running, single_run
from test_single_task import held_elsewhere  # noqa: F401  (tests/test_paths.py imports it from here)
from tests.conftest import ROOT

# -- crash safety: a SIGKILLed holder, a forked child --------------------------------------------------


HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from single_task import single_run
    with single_run(key={key!r}, client={url!r}, ttl={ttl}) as lease:
        print(lease.fence, flush=True)
        time.sleep(60)
""")


def spawn_holder(url: str, key: str, ttl: float) -> subprocess.Popen[str]:
    code = HOLDER.format(root=ROOT, key=key, url=url, ttl=ttl)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip().isdigit()
    return proc


def test_a_sigkilled_holder_frees_the_key_within_ttl(redis_url: str, r: redis.Redis) -> None:
    proc = spawn_holder(redis_url, "crash", ttl=1.0)
    time.sleep(1.2)  # past one ttl: the holder's watchdog must have renewed it
    assert r.exists("single_task:{crash}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = time.monotonic()
    while r.exists("single_task:{crash}") and time.monotonic() - killed < 3:
        time.sleep(0.01)
    assert time.monotonic() - killed <= 1.0 + 0.1
    with single_run(key="crash", client=redis_url) as lease:
        assert lease.fence > 0


def test_a_forked_child_does_not_renew_or_hold_its_parents_leases(redis_url: str) -> None:
    with single_run(key="forked", client=redis_url):
        pid = os.fork()
        if pid == 0:  # child
            ok = current_lease() is None and not single_task._watchdog._leases
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


# -- on_busy: crashed holders, rerun requests and lost leases ------------------------------------------


def test_wait_wakes_when_a_crashed_holders_lease_runs_out(redis_url: str) -> None:
    proc = spawn_holder(redis_url, "wc", ttl=1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    @single_run(key="wc", client=redis_url, on_busy="wait", timeout=5)
    def job() -> float:
        return time.monotonic()

    start = time.monotonic()
    assert job() - start <= 1.0 + 0.2


def test_a_rerun_request_lost_with_the_holders_lease_is_still_served(redis_url: str, r: redis.Redis) -> None:
    # The rerun flag lives in the lease. A holder whose lease was lost (here: deleted, as a Redis
    # restart would) cannot know whether a request went with it, so it takes the key again.
    fences: list[int] = []
    lost: list[int] = []
    first_started = threading.Event()

    @single_run(key="rr-lost", client=redis_url, on_busy="rerun", on_lost=lambda le: lost.append(le.fence))
    def job(i: int) -> str:
        lease = current_lease()
        assert lease is not None
        fences.append(lease.fence)
        first_started.set()
        time.sleep(0.3 if len(fences) == 1 else 0.0)
        return "ran"

    t = threading.Thread(target=job, args=(0,))
    t.start()
    first_started.wait()
    assert job(1) is None  # a rerun request, recorded in the holder's lease ...
    r.delete("single_task:{rr-lost}")  # ... which is then lost
    t.join()
    assert len(fences) == 2 and fences[1] > fences[0]
    assert lost == [fences[0]]
    assert not r.exists("single_task:{rr-lost}")


def test_a_second_delivery_of_the_holders_own_task_under_rerun_is_not_lost(redis_url: str, r: redis.Redis) -> None:
    # A broker that redelivers a message still running (its visibility timeout ran out) gives the
    # new run the holder's own task id. It waits for a hand-off as a retry would, and under
    # "rerun" it also asks for a rerun, so that the holder running on keeps the request.
    client = redis.Redis.from_url(redis_url)
    key = single_task._lease_key("single_task:", "own")
    holder, again = "a" * 32, "b" * 32
    acquire, release = single_task._ACQUIRE, single_task._RELEASE
    assert single_task._call(client, acquire, key, holder, 30_000, "task-1", "1@h", "r", 5000)[0] == 1
    reply = single_task._call(client, acquire, key, again, 30_000, "task-1", "2@h", "r", 5000)
    assert reply[0] == 0 and reply[2] == 1  # busy, and it is our own task: wait for the hand-off
    assert r.hget("single_task:{own}", "r") == "1"
    assert single_task._call(client, release, key, holder, "c" * 32, 30_000, "e", 0, 2000)[0] == single_task._RERUN


def test_a_rerun_holder_whose_release_finds_redis_restarting_still_runs_again(fresh_server: Any) -> None:
    # Redis goes down at the end of the run and comes back empty: the release is retried until
    # it is answered (the lease is gone with the data, and any rerun request with it), and the
    # holder takes the key again and runs once more.
    runs: list[int] = []

    @single_run(key="rr-restart", client=fresh_server.url, on_busy="rerun", ttl=2.0)
    def job() -> str:
        runs.append(1)
        if len(runs) == 1:
            fresh_server.stop()
            threading.Timer(0.5, fresh_server.start).start()
        return "ran"

    assert job() == "ran"
    assert len(runs) == 2
    assert not fresh_server.client().exists("single_task:{rr-restart}")


def test_a_holder_that_keeps_losing_its_lease_takes_the_key_again_a_bounded_number_of_times(
    redis_url: str, r: redis.Redis
) -> None:
    runs: list[int] = []

    @single_run(key="rr-always-lost", client=redis_url, on_busy="rerun")
    def job() -> str:
        runs.append(1)
        r.delete("single_task:{rr-always-lost}")
        return "ran"

    assert job() == "ran"
    assert len(runs) == 1 + single_task._RETAKES


def test_rerun_owed_by_a_run_that_raises_outside_celery_is_logged(redis_url: str, caplog: Any) -> None:
    started = threading.Event()

    @single_run(key="rx", client=redis_url, on_busy="rerun")
    def job(fail: bool) -> None:
        started.set()
        time.sleep(0.2)
        if fail:
            raise RuntimeError("boom")

    errors: list[BaseException] = []

    def run_failing() -> None:
        try:
            job(True)
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=run_failing)
    with caplog.at_level(logging.WARNING, logger="single_task"):
        t.start()
        started.wait()
        assert job(False) is None
        t.join()
    assert len(errors) == 1 and "rerun it owed is dropped" in caplog.text


# -- dropped connections -------------------------------------------------------------------------------


def test_dropped_connections_are_reconnected_without_an_error_or_a_pause(redis_url: str, r: redis.Redis) -> None:
    job = single_run(key="dropped", client=redis_url)(lambda: "ran")
    assert job() == "ran"  # the pool now holds an open connection
    for _ in range(3):
        r.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        start = time.monotonic()
        assert job() == "ran"
        assert time.monotonic() - start < 0.5  # one immediate retry, no backoff


# -- keys ------------------------------------------------------------------------------------------------


def test_positional_and_keyword_calls_give_the_same_key(redis_url: str) -> None:
    keys = []

    @single_run(key="acct:{account_id}:{full}:{user.name}:{ids[1]}:{n:03d}", client=redis_url)
    def job(account_id: int, user: Any, ids: list[int], n: int = 5, full: bool = False) -> None:
        lease = current_lease()
        assert lease is not None
        keys.append(lease.key)

    class User:
        name = "ann"

    job(1, User(), [7, 8])
    job(account_id=1, ids=[7, 8], user=User(), n=5)
    assert keys == ["acct:1:False:ann:8:005"] * 2


def test_a_field_naming_no_parameter_fails_at_decoration() -> None:
    with pytest.raises(ValueError, match=r"\{acount_id\}.*job"):

        @single_run(key="sync:{acount_id}")
        def job(account_id: int) -> None: ...


def test_key_callable_and_default_key(redis_url: str) -> None:
    @single_run(key=lambda a, b=2: f"sum:{a + b}", client=redis_url)
    def job(a: int, b: int = 2) -> str:
        lease = current_lease()
        assert lease is not None
        return lease.key

    @single_run(client=redis_url)
    def plain() -> str:
        lease = current_lease()
        assert lease is not None
        return lease.key

    assert job(1) == "sum:3"
    assert plain() == f"{__name__}.test_key_callable_and_default_key.<locals>.plain"


def test_keys_with_braces_and_unicode_work(redis_url: str, r: redis.Redis) -> None:
    @single_run(key="{{a}}}}{{:{x}", client=redis_url)
    def job(x: str) -> bool:
        return True

    assert job("ü–{}") is True
    with single_run(key="{{a}}}}{{:ü", client=redis_url):
        assert r.exists("single_task:{{a}}{:ü}")


def test_is_running_answers_for_the_arguments(redis_url: str) -> None:
    @single_run(key="ir:{n}", client=redis_url)
    def job(n: int) -> tuple[bool, bool]:
        return is_running(job, n), is_running(job, n=n + 1)

    assert job(1) == (True, False)
    assert is_running(job, 1) is False


def test_nested_use_of_the_same_key_in_one_run_raises(redis_url: str) -> None:
    @single_run(key="nest", client=redis_url)
    def job(depth: int) -> str:
        return job(depth + 1) if depth == 0 else "inner ran"

    with pytest.raises(AlreadyRunning, match="nested"):
        job(0)
    with single_run(key="outer", client=redis_url), single_run(key="inner", client=redis_url) as lease:
        assert lease.key == "inner"


def test_current_lease_is_none_outside_a_run() -> None:
    assert current_lease() is None


# -- client resolution -----------------------------------------------------------------------------------


def test_client_comes_from_the_environment_lazily(redis_url: str, monkeypatch: Any) -> None:
    @single_run(key="env")  # decorating needs no Redis
    def job() -> str:
        return "ran"

    monkeypatch.setenv("SINGLE_TASK_REDIS_URL", redis_url)
    assert job() == "ran"


def test_client_comes_from_the_celery_broker_url(redis_url: str, monkeypatch: Any) -> None:
    from celery import Celery

    monkeypatch.delenv("SINGLE_TASK_REDIS_URL", raising=False)
    app = Celery("zero", broker=redis_url, set_as_current=False)
    app.set_current()

    @single_run(key="zc")
    def job() -> bool:
        return True

    assert job() is True


def test_no_redis_anywhere_lists_what_was_tried() -> None:
    # In a process of its own: here, the one Redis app that some other test made would be found.
    code = textwrap.dedent("""
        from celery import Celery
        from single_task import ConfigurationError, single_run
        Celery("amqp-only", broker="amqp://guest@localhost//", set_as_current=False).set_current()
        try:
            single_run(key="none")(lambda: None)()
        except ConfigurationError as exc:
            print(exc)
    """)
    env = {k: v for k, v in os.environ.items() if k != "SINGLE_TASK_REDIS_URL"}
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=ROOT), capture_output=True,
                         text=True, timeout=60)
    assert re.search(r"SINGLE_TASK_REDIS_URL.*broker_url.*result_backend", out.stdout), out.stdout + out.stderr
