"""The lease promises, each against a real redis-server (no mocks)."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import single_task
from single_task import AlreadyRunning, ConfigurationError, RedisUnavailable, current_lease, is_running, single_run
from tests.conftest import ROOT


class CountingRedis(redis.Redis):
    """A real client that counts the commands it sends (to check the round-trip budget)."""

    sent: list[str]

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]))
        return super().execute_command(*args, **options)


@contextlib.contextmanager
def held_elsewhere(url: str, key: str, ttl: float = 30.0) -> Iterator[None]:
    """Hold ``key`` from another thread (a call in this thread would be a nested use)."""
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        with single_run(key=key, client=url, ttl=ttl):
            taken.set()
            done.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    taken.wait(5)
    try:
        yield
    finally:
        done.set()
        t.join()


def lease_keys(r: redis.Redis, key: str) -> dict[str, str]:
    return r.hgetall(f"single_task:{{{key}}}")  # type: ignore[return-value]


# -- 1. atomic acquire, owner-checked release, one round trip each --------------------------------


def test_a_run_costs_one_round_trip_to_acquire_and_one_to_release(redis_url: str) -> None:
    client = CountingRedis.from_url(redis_url)
    client.sent = []

    @single_run(key="rt", client=client)
    def job() -> int:
        return 7

    assert job() == 7  # the first call may load the script
    client.sent.clear()
    for _ in range(10):
        assert job() == 7
    assert client.sent == ["EVALSHA"] * 20


def test_the_owner_token_is_128_bits_from_secrets(redis_url: str, r: redis.Redis) -> None:
    with single_run(key="tok", client=redis_url):
        token = lease_keys(r, "tok")["t"]
    assert len(token) == 32 and int(token, 16) >= 0


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt, SystemExit])
def test_the_lease_is_released_however_the_run_ends(redis_url: str, r: redis.Redis, exc: type) -> None:
    @single_run(key="ends", client=redis_url)
    def job() -> None:
        assert r.exists("single_task:{ends}")
        raise exc()

    with pytest.raises(exc):
        job()
    assert not r.exists("single_task:{ends}")


def test_a_release_never_deletes_another_owners_lock(redis_url: str, r: redis.Redis, caplog: Any) -> None:
    lost: list[single_task.Lease] = []

    @single_run(key="stolen", client=redis_url, on_lost=lost.append)
    def job() -> single_task.Lease:
        # Another holder took over (as after an expiry): its token is now in the lease.
        r.hset("single_task:{stolen}", "t", "someone-else")
        lease = current_lease()
        assert lease is not None
        return lease

    with caplog.at_level(logging.WARNING, logger="single_task"):
        lease = job()
    assert lease_keys(r, "stolen")["t"] == "someone-else"
    assert lease.lost and lost == [lease]
    assert "stolen" in caplog.text and "lost" in caplog.text


# -- 2. crash safety with renewal -------------------------------------------------------------------


def test_a_run_longer_than_ttl_keeps_its_lease_by_renewal(redis_url: str, r: redis.Redis) -> None:
    seen: list[Any] = []

    @single_run(key="long", client=redis_url, ttl=0.6)
    def job() -> bool:
        for _ in range(4):
            time.sleep(0.5)
            seen.append(r.pttl("single_task:{long}"))
            from_elsewhere: list[Any] = []
            t = threading.Thread(target=lambda: from_elsewhere.append(other()))
            t.start()
            t.join()
            seen.append(from_elsewhere[0])
        lease = current_lease()
        assert lease is not None
        return lease.lost

    @single_run(key="long", client=redis_url)
    def other() -> str:
        return "ran"

    assert job() is False
    pttls, others = seen[0::2], seen[1::2]
    assert all(p > 0 for p in pttls), pttls
    assert others == [None] * 4


def test_renewal_is_one_watchdog_thread_for_all_leases(redis_url: str) -> None:
    before = {t.name for t in threading.enumerate()}
    stop = threading.Event()
    started = threading.Barrier(21)

    def hold(i: int) -> None:
        with single_run(key=f"many:{i}", client=redis_url, ttl=0.3):
            started.wait()
            stop.wait(1.0)

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    started.wait()
    names = [t.name for t in threading.enumerate() if t.name not in before]
    stop.set()
    for t in threads:
        t.join()
    assert sum(1 for n in names if "watchdog" in n) <= 1
    assert len(names) == 20 + sum(1 for n in names if "watchdog" in n)


class PipelineCountingRedis(redis.Redis):
    """A real client that notes when the watchdog thread opens a pipeline on it (a round trip)."""

    renewal_round_trips: list[float]

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "single_task-watchdog":
            self.renewal_round_trips.append(time.monotonic())
        return super().pipeline(*args, **kwargs)


def evalsha_calls(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def test_many_leases_are_renewed_together_once_per_period_in_one_round_trip(redis_url: str, r: redis.Redis) -> None:
    client = PipelineCountingRedis.from_url(redis_url)
    client.renewal_round_trips = []
    count, ttl, periods = 300, 1.2, 9  # a renewal period is ttl/3
    lost: list[str] = []
    with contextlib.ExitStack() as stack:
        for i in range(count):
            spec = single_run(key=f"batch:{i}", client=client, ttl=ttl, on_lost=lambda le: lost.append(le.key))
            stack.enter_context(spec)
        client.renewal_round_trips.clear()
        before = evalsha_calls(r)
        time.sleep(periods * ttl / 3)
        renewals = evalsha_calls(r) - before
        round_trips = len(client.renewal_round_trips)
    assert not lost
    # Every lease renewed about once a period (not twice, as when each is renewed at its early edge) ...
    assert count * (periods - 2) <= renewals <= count * periods * 1.3, renewals
    # ... and all of them in one pipelined round trip (two at most), not one round trip per lease.
    assert round_trips <= 2 * periods, round_trips


def test_renewal_survives_an_emptied_script_cache(redis_url: str, r: redis.Redis, caplog: Any) -> None:
    with caplog.at_level(logging.WARNING, logger="single_task"), single_run(
        key="flushed-while-held", client=redis_url, ttl=0.6
    ) as lease:
        r.script_flush()  # as a Redis restart does: the watchdog's pipelined EVALSHA gets NOSCRIPT
        time.sleep(1.5)
        assert not lease.lost and r.exists(lease.redis_key)
    assert "Could not renew" not in caplog.text and "lost" not in caplog.text


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


def test_a_lease_is_lost_when_renewal_cannot_be_confirmed(fresh_server: Any, caplog: Any) -> None:
    lost: list[single_task.Lease] = []
    client = redis.Redis.from_url(fresh_server.url, socket_timeout=0.3)
    with caplog.at_level(logging.WARNING, logger="single_task"):
        with single_run(key="paused", client=client, ttl=0.6, on_lost=lost.append) as lease:
            fresh_server.pause()
            try:
                time.sleep(1.2)
                assert lease.lost
            finally:
                fresh_server.resume()
            deadline = time.monotonic() + 2
            while not lost and time.monotonic() < deadline:
                time.sleep(0.05)
    assert lost == [lease]
    assert caplog.text.count("'paused'") >= 1


def test_a_forked_child_does_not_renew_or_hold_its_parents_leases(redis_url: str) -> None:
    with single_run(key="forked", client=redis_url):
        pid = os.fork()
        if pid == 0:  # child
            ok = current_lease() is None and not single_task._watchdog._leases
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


# -- 3. fencing ---------------------------------------------------------------------------------------


def test_fences_strictly_increase_across_acquisitions_and_a_restart(fresh_server: Any) -> None:
    fences = []
    for _ in range(20):
        with single_run(key="fence", client=fresh_server.url) as lease:
            fences.append(lease.fence)
    fresh_server.restart()  # an empty dataset: the fence must still go up
    single_task._clients.clear()
    with single_run(key="fence", client=fresh_server.url) as lease:
        fences.append(lease.fence)
    assert fences == sorted(set(fences)), fences


# -- 4. on_busy policies ------------------------------------------------------------------------------


def test_skip_returns_none_and_logs_the_key(redis_url: str, caplog: Any) -> None:
    @single_run(key="sk:{n}", client=redis_url)
    def job(n: int) -> str:
        return "ran"

    with held_elsewhere(redis_url, "sk:1"), caplog.at_level(logging.INFO, logger="single_task"):
        assert job(1) is None
        assert job(2) == "ran"
    assert "sk:1" in caplog.text and "skipped" in caplog.text


def test_raise_raises_already_running_with_the_key(redis_url: str) -> None:
    @single_run(key="rs", client=redis_url, on_busy="raise")
    def job() -> str:
        return "ran"

    with held_elsewhere(redis_url, "rs"), pytest.raises(AlreadyRunning) as info:
        job()
    assert info.value.key == "rs" and "rs" in str(info.value)


def test_a_busy_with_block_raises(redis_url: str) -> None:
    with held_elsewhere(redis_url, "cm"), pytest.raises(AlreadyRunning), single_run(key="cm", client=redis_url):
        pass


def test_wait_gets_the_key_from_the_release_in_order(redis_url: str) -> None:
    order: list[tuple[int, int]] = []

    @single_run(key="wq", client=redis_url, on_busy="wait", timeout=10)
    def job(i: int) -> None:
        lease = current_lease()
        assert lease is not None
        order.append((i, lease.fence))
        time.sleep(0.05)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join()
    assert len(order) == 6
    fences = [f for _, f in order]
    assert fences == sorted(fences)


def test_wait_times_out_with_already_running_and_never_waits_longer(redis_url: str, r: redis.Redis) -> None:
    @single_run(key="wt", client=redis_url, on_busy="wait", timeout=0.4)
    def job() -> str:
        return "ran"

    with held_elsewhere(redis_url, "wt"):
        start = time.monotonic()
        with pytest.raises(AlreadyRunning):
            job()
        elapsed = time.monotonic() - start
    assert 0.4 <= elapsed < 0.4 + 0.3
    assert not r.lrange("single_task:{wt}:q", 0, -1)  # a waiter that gave up left the queue
    assert job() == "ran"


def test_wait_wakes_when_a_crashed_holders_lease_runs_out(redis_url: str) -> None:
    proc = spawn_holder(redis_url, "wc", ttl=1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    @single_run(key="wc", client=redis_url, on_busy="wait", timeout=5)
    def job() -> float:
        return time.monotonic()

    start = time.monotonic()
    assert job() - start <= 1.0 + 0.2


def test_rerun_coalesces_calls_during_a_run_into_one_more_run(redis_url: str) -> None:
    runs: list[int] = []
    first_started = threading.Event()

    @single_run(key="rr", client=redis_url, on_busy="rerun")
    def job(i: int) -> str:
        runs.append(i)
        first_started.set()
        time.sleep(0.3)
        return "ran"

    t = threading.Thread(target=job, args=(0,))
    t.start()
    first_started.wait()
    assert [job(i) for i in range(1, 6)] == [None] * 5
    t.join()
    assert runs == [0, 0]


def test_every_rerun_call_is_followed_by_a_run_that_starts_after_it(redis_url: str) -> None:
    starts: list[float] = []
    calls: list[float] = []

    @single_run(key="race", client=redis_url, on_busy="rerun")
    def job() -> None:
        starts.append(time.monotonic())
        time.sleep(0.003)

    def caller() -> None:
        for _ in range(60):
            calls.append(time.monotonic())
            job()
            time.sleep(0.001 * (len(calls) % 4))

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    last_start = max(starts)
    assert all(any(s > c for s in starts) for c in calls), "a rerun request was lost"
    assert last_start >= max(calls)
    assert len(starts) < len(calls)  # and calls were really coalesced


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


# -- 5. nothing leaks ---------------------------------------------------------------------------------


def test_every_key_the_library_writes_has_an_expiry(redis_url: str, r: redis.Redis) -> None:
    test_wait_gets_the_key_from_the_release_in_order(redis_url)
    test_rerun_coalesces_calls_during_a_run_into_one_more_run(redis_url)
    with single_run(key="held", client=redis_url):
        keys = list(r.scan_iter("single_task:*"))
        assert keys
        assert all(r.pttl(k) > 0 for k in keys), {k: r.pttl(k) for k in keys}


# -- 6. Redis errors fail closed -------------------------------------------------------------------------


def test_dropped_connections_are_reconnected_without_an_error_or_a_pause(redis_url: str, r: redis.Redis) -> None:
    job = single_run(key="dropped", client=redis_url)(lambda: "ran")
    assert job() == "ran"  # the pool now holds an open connection
    for _ in range(3):
        r.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        start = time.monotonic()
        assert job() == "ran"
        assert time.monotonic() - start < 0.5  # one immediate retry, no backoff


def test_unreachable_redis_fails_closed_with_the_key_in_the_error() -> None:
    from support.redis_server import free_port

    ran = []

    @single_run(key="down:{n}", client=f"redis://127.0.0.1:{free_port()}/0")
    def job(n: int) -> None:
        ran.append(n)

    with pytest.raises(RedisUnavailable) as info:
        job(3)
    assert ran == [] and info.value.key == "down:3" and "down:3" in str(info.value)


def test_fail_open_runs_unlocked_and_warns(caplog: Any) -> None:
    from support.redis_server import free_port

    @single_run(key="open", client=f"redis://127.0.0.1:{free_port()}/0", fail_open=True)
    def job() -> bool:
        lease = current_lease()
        return lease is not None and lease.fail_open

    with caplog.at_level(logging.WARNING, logger="single_task"):
        assert job() is True
    assert "WITHOUT a lease" in caplog.text


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


# -- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [
    AlreadyRunning("busy", "k:1"),
    RedisUnavailable("down", "k:2"),
    ConfigurationError("bad", None),
])
def test_errors_survive_pickle_and_celery_json_rebuild(exc: single_task.SingleTaskError) -> None:
    from celery import Celery
    from celery.backends.base import Backend

    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc) and copy.key == exc.key and str(copy) == str(exc)
    backend = Backend(app=Celery(set_as_current=False), serializer="json")
    rebuilt = backend.exception_to_python(backend.prepare_exception(exc, "json"))
    assert type(rebuilt) is type(exc) and rebuilt.key == exc.key and str(rebuilt) == str(exc)
    assert isinstance(exc, single_task.SingleTaskError)


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


def test_no_redis_anywhere_lists_what_was_tried(monkeypatch: Any) -> None:
    from celery import Celery

    monkeypatch.delenv("SINGLE_TASK_REDIS_URL", raising=False)
    Celery("amqp-only", broker="amqp://guest@localhost//", set_as_current=False).set_current()

    @single_run(key="none")
    def job() -> None: ...

    with pytest.raises(ConfigurationError, match=r"SINGLE_TASK_REDIS_URL.*broker_url.*result_backend"):
        job()


# -- users can unit-test their own tasks with fakeredis ------------------------------------------------


def test_users_can_unit_test_decorated_functions_with_fakeredis() -> None:
    fakeredis = pytest.importorskip("fakeredis")
    fake = fakeredis.FakeRedis()

    @single_run(key="fake:{n}", client=fake, on_busy="raise")
    def job(n: int) -> int:
        with pytest.raises(AlreadyRunning):
            job(n)
        return n * 2

    assert job(21) == 42
    assert fake.keys("single_task:{fake:21}") == []
