"""The lease survives what the process holding it does: forks, client retries, a stalled server,
copied contexts. Each test is a way the lease once broke (interrupts and callbacks that raise are in
test_single_task.py)."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.retry import Retry

from single_task import (
    ConfigurationError,
    Lease,
    RedisUnavailable,
    current_lease,
    send_once,
    single_run,
)
from support.proxy import DroppingProxy
from support.redis_server import RedisServer
from test_single_task import free_within, held_elsewhere
from tests.conftest import ROOT


def run_script(code: str, url: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=ROOT, URL=url)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


# -- 3. a forked child never touches its parent's lease --------------------------------------------


def test_a_child_forked_inside_a_run_never_releases_the_parents_lease(redis_url: str) -> None:
    out = run_script("""
        import json, os, sys, redis
        from single_task import current_lease, single_run
        url = os.environ["URL"]
        r = redis.Redis.from_url(url, decode_responses=True)

        @single_run(key="fork", client=url, ttl=5)
        def job():
            pid = os.fork()
            if pid == 0:
                sys.exit(7)  # unwinds through the run, in the child
            _, status = os.waitpid(pid, 0)
            lease = current_lease()
            return {"child_status": os.waitstatus_to_exitcode(status), "lost": lease.lost,
                    "token_kept": r.hget("single_task:{fork}", "t") is not None,
                    "busy": single_run(key="fork", client=url, on_busy="raise") is not None and _busy()}

        def _busy():
            import threading
            seen = []
            def other():
                try:
                    with single_run(key="fork", client=url, on_busy="raise"):
                        seen.append(False)
                except Exception as exc:
                    seen.append(type(exc).__name__ == "AlreadyRunning")
            t = threading.Thread(target=other); t.start(); t.join()
            return seen[0]

        print(json.dumps(job()))
    """, redis_url)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"child_status": 7, "lost": False, "token_kept": True, "busy": True}


def test_a_child_leaving_a_with_block_exits_with_its_own_status(redis_url: str, r: redis.Redis) -> None:
    out = run_script("""
        import os, sys, redis
        from single_task import single_run
        url = os.environ["URL"]
        r = redis.Redis.from_url(url)
        with single_run(key="forkwith", client=url, ttl=5):
            pid = os.fork()
            if pid == 0:
                sys.exit(5)
            _, status = os.waitpid(pid, 0)
            print(os.waitstatus_to_exitcode(status), r.exists("single_task:{forkwith}"))
    """, redis_url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["5", "1"], out.stdout + out.stderr
    assert "RuntimeError" not in out.stderr


# -- 4. one stalled Redis does not stall the leases on another --------------------------------------


def test_a_paused_server_neither_stalls_renewal_on_a_healthy_one_nor_delays_the_loss_report() -> None:
    ttl = 1.0
    with RedisServer() as healthy, RedisServer() as stalled:
        # No socket timeout at all: a renewal sent to the paused server blocks until it resumes.
        slow_client = redis.Redis(host="127.0.0.1", port=stalled.port, socket_timeout=None)
        lost: list[tuple[Lease, float]] = []
        good = single_run(key="healthy", client=healthy.url, ttl=ttl, on_lost=lambda le: lost.append((le, 0)))
        bad = single_run(key="stalled", client=slow_client, ttl=ttl,
                         on_lost=lambda le: lost.append((le, time.monotonic())))
        with good as good_lease, bad as bad_lease:
            stalled.pause()
            try:
                paused_at = time.monotonic()
                time.sleep(3 * ttl)
                assert not good_lease.lost, "the lease on the healthy server lapsed"
                assert healthy.client().hget("single_task:{healthy}", "t") is not None
                assert [le for le, _ in lost] == [bad_lease], "the stalled lease was not reported lost"
                assert lost[0][1] - paused_at < ttl + 0.6, "the loss was reported late"
            finally:
                stalled.resume()


# -- 6, 7. send_once under client retries and timeouts ---------------------------------------------


@pytest.fixture
def broker(redis_url: str) -> Iterator[Celery]:
    app = Celery("lifecycle", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(broker_connection_retry_on_startup=True)
    yield app


def test_send_once_publishes_when_its_queued_check_was_retried_after_it_ran(redis_url: str, r: redis.Redis,
                                                                           broker: Celery) -> None:
    proxy = DroppingProxy("127.0.0.1", int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    try:
        @broker.task
        @single_run(key="so:{n}", client=proxy.url)
        def task(n: int) -> None: ...

        send_once(task, (0,))  # loads the scripts, so the next check is one EVALSHA
        proxy.drop_reply_to(b"EVALSHA")
        result = send_once(task, (1,))
        assert proxy.dropped == 1
        assert r.llen("celery") == 2, "send_once returned a result for a message it never published"
        assert r.get("single_task:{so:1}:queued").split("|")[0] == result.id
    finally:
        proxy.close()


def test_a_timed_out_queued_check_leaves_no_marker_that_blocks_the_retry(broker: Celery) -> None:
    with RedisServer() as server:
        broker.conf.update(broker_url=server.url)
        client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=0.3, retry=Retry(NoBackoff(), 0))

        @broker.task
        @single_run(key="st:{n}", client=client)
        def task(n: int) -> None: ...

        plain = server.client()
        send_once(task, (0,))  # loads the scripts: the check that times out is the one that runs
        server.pause()
        try:
            with pytest.raises(RedisUnavailable):
                send_once(task, (1,))
        finally:
            server.resume()
        time.sleep(0.2)  # the check the client gave up on runs now
        result = send_once(task, (1,))
        assert plain.llen("celery") == 2, "the retry got a phantom: nothing was published"
        assert plain.get("single_task:{st:1}:queued").decode().split("|")[0] == result.id


# -- 8. a killed waiter does not keep the key for a whole ttl ---------------------------------------


def test_a_waiter_killed_while_blocked_is_not_handed_the_key_for_a_whole_ttl(redis_url: str,
                                                                           r: redis.Redis) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT, URL=redis_url)
    code = textwrap.dedent("""
        import os
        from single_task import single_run
        single_run(key="kw", client=os.environ["URL"], ttl=20, on_busy="wait")(lambda: None)()
    """)
    with held_elsewhere(redis_url, "kw", ttl=20):
        waiter = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT)
        deadline = time.monotonic() + 20
        while r.llen("single_task:{kw}:q") == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert r.llen("single_task:{kw}:q") == 1
        waiter.kill()
        waiter.wait()
    assert free_within(redis_url, "kw", 4.0) < 3.0


# -- 9. a with block in a generator iterated from copied contexts ----------------------------------


def test_a_with_block_releases_what_it_took_whatever_context_exits_it(redis_url: str, r: redis.Redis) -> None:
    def rows() -> Iterator[int]:
        with single_run(key="gen", client=redis_url, ttl=5):
            yield 1
            yield 2

    gen = rows()
    # What asyncio.to_thread, anyio and Starlette do with a sync generator: each step runs in a
    # fresh copy of the caller's context.
    assert contextvars.copy_context().run(next, gen) == 1
    assert r.exists("single_task:{gen}")
    assert contextvars.copy_context().run(next, gen) == 2
    with pytest.raises(StopIteration):
        contextvars.copy_context().run(next, gen)
    assert not r.exists("single_task:{gen}")
    assert current_lease() is None


# -- 10. a release retried by the client after it went through --------------------------------------


@pytest.mark.parametrize("meanwhile", ["nothing", "another holder takes the key"])
def test_a_release_retried_after_it_went_through_is_not_reported_lost(redis_url: str, r: redis.Redis, caplog: Any,
                                                                     meanwhile: str) -> None:
    proxy = DroppingProxy("127.0.0.1", int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    lost: list[Lease] = []
    other = single_run(key="rr", client=redis_url, ttl=5)
    taken: list[Lease] = []
    try:
        @single_run(key="rr", client=proxy.url, on_lost=lost.append)
        def job() -> Lease:
            lease = current_lease()
            assert lease is not None
            return lease

        job()  # loads the scripts
        # The release of the next run goes through and its answer is lost; the client's retry of
        # it comes after another holder took the key, in the second case.
        then = None if meanwhile == "nothing" else lambda: taken.append(other.__enter__())
        proxy.drop_reply_to(b"EVALSHA", nth=2, then=then)
        with caplog.at_level(logging.WARNING, logger="single_task"):
            lease = job()
        assert proxy.dropped == 1 and len(taken) == (meanwhile != "nothing")
        assert lost == [] and not lease.lost
        assert "lost" not in caplog.text
        if taken:
            assert r.hget("single_task:{rr}", "t") is not None and not taken[0].lost
    finally:
        if taken:
            other.__exit__(None, None, None)
        proxy.close()
    assert not r.exists("single_task:{rr}")


def test_a_rerun_granted_by_a_release_whose_answer_was_lost_still_runs(redis_url: str, r: redis.Redis) -> None:
    proxy = DroppingProxy("127.0.0.1", int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    runs: list[int] = []
    try:
        @single_run(key="rrr", client=proxy.url, on_busy="rerun")
        def job() -> None:
            lease = current_lease()
            assert lease is not None
            runs.append(lease.fence)
            if len(runs) == 1:
                r.hset("single_task:{rrr}", "r", "1")  # a rerun was requested during this run
                proxy.drop_reply_to(b"EVALSHA")  # and the answer to the release is lost

        job()
        assert len(runs) == 2, "the rerun the first release granted was dropped"
        assert not r.exists("single_task:{rrr}")
    finally:
        proxy.close()


# -- 14. one rule for literal braces ------------------------------------------------------------------


def test_literal_braces_are_written_doubled_in_every_kind_of_key(redis_url: str, r: redis.Redis) -> None:
    @single_run(key="cfg{{prod}}:{n}", client=redis_url)
    def job(n: int) -> str:
        return "ran"

    @single_run(key="cfg{{prod}}:1", client=redis_url)
    def constant() -> str:
        return "ran"

    with single_run(key="cfg{{prod}}:1", client=redis_url):
        assert r.exists("single_task:{cfg{prod}:1}")
        done: list[Any] = []
        for fn in (lambda: job(1), constant):
            t = threading.Thread(target=lambda fn=fn: done.append(fn()))
            t.start()
            t.join()
        assert done == [None, None], "a with block on the same key must exclude both runs"
    assert job(1) == "ran"


def test_a_single_brace_in_a_with_key_is_refused_with_the_rule(redis_url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"\{\{"):
        with single_run(key="cfg{prod}:1", client=redis_url):
            pass


# -- also: a naive eta is UTC, as Celery reads it -------------------------------------------------------


def test_a_naive_eta_counts_as_utc_for_the_queued_marker(r: redis.Redis, broker: Celery, redis_url: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime

    monkeypatch.setenv("TZ", "America/New_York")  # local time five hours behind UTC
    time.tzset()

    @broker.task
    @single_run(key="eta:{n}", client=redis_url, queued_ttl=10)
    def task(n: int) -> None: ...

    eta = datetime.datetime.utcnow() + datetime.timedelta(seconds=100)  # naive, in UTC as Celery takes it
    send_once(task, (1,), eta=eta)
    left = r.pttl("single_task:{eta:1}:queued") / 1000.0
    monkeypatch.undo()
    time.tzset()
    assert 100 < left <= 111, left


def test_renewal_against_a_server_that_refuses_connections_backs_off(fresh_server: RedisServer,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    ttl = 1.0
    with caplog.at_level(logging.WARNING, logger="single_task.renew"):
        with single_run(key="refused", client=fresh_server.url, ttl=ttl) as lease:
            fresh_server.stop()  # connections are refused from now on
            time.sleep(1.5)
            assert lease.lost
    tries = [r for r in caplog.records if "Could not renew" in r.getMessage()]
    # One try every min(ttl/10, 0.5) s until the deadline (about 7 within ttl), not a loop.
    assert 1 <= len(tries) <= 15, len(tries)


def test_a_fork_while_another_thread_is_inside_the_library_does_not_deadlock_the_child(redis_url: str) -> None:
    out = run_script("""
        import os, sys, threading, time
        import redis
        import single_task
        from single_task import single_run
        url = os.environ["URL"]
        inside = threading.Event()
        def busy():  # a thread in the middle of the library's bookkeeping when the fork comes
            with single_task._clients_lock, single_task._state_lock, single_task._routes_lock, \
                    single_task._signals_lock:
                inside.set()
                time.sleep(3)
        threading.Thread(target=busy, daemon=True).start()
        inside.wait()
        pid = os.fork()
        if pid == 0:
            single_task.signals.acquired  # made at first use, under its lock
            with single_run(key="fork-locks", client=redis.Redis.from_url(url)):
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """, redis_url, timeout=20)
    assert out.returncode == 0 and out.stdout.split() == ["0"], out.stdout + out.stderr
