"""replicas=N: an acquisition waits until N replicas have it (Redis WAIT), or fails closed."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from single_task import ConfigurationError, RedisUnavailable, current_lease, single_run
from support.redis_server import RedisServer


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[RedisServer, RedisServer]]:
    # Without a zero delay, a Redis 7 master waits 5 s for more replicas before the first sync.
    with RedisServer("--repl-diskless-sync-delay", "0") as master:
        with RedisServer("--replicaof", "127.0.0.1", str(master.port)) as replica:
            deadline = time.monotonic() + 10
            while replica.client().info("replication").get("master_link_status") != "up":
                assert time.monotonic() < deadline, "the replica never synced"
                time.sleep(0.05)
            yield master, replica


def test_an_acquisition_is_on_the_replica_before_the_run_starts(pair: tuple[RedisServer, RedisServer]) -> None:
    master, replica = pair
    on_replica = replica.client(decode_responses=True)

    @single_run(key="rep:{n}", client=master.url, replicas=1)
    def job(n: int) -> str:
        lease = current_lease()
        assert lease is not None
        return on_replica.hget(f"single_task:{{rep:{n}}}", "f") == str(lease.fence)

    assert all(job(n) for n in range(20))


def test_a_wait_hand_off_is_confirmed_on_the_replica_too(pair: tuple[RedisServer, RedisServer]) -> None:
    import threading

    master, replica = pair
    on_replica = replica.client(decode_responses=True)
    seen: list[bool] = []

    @single_run(key="rep-wait", client=master.url, replicas=1, on_busy="wait", timeout=10)
    def job() -> None:
        lease = current_lease()
        assert lease is not None
        seen.append(on_replica.hget("single_task:{rep-wait}", "t") is not None)
        time.sleep(0.05)

    threads = [threading.Thread(target=job) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [True] * 4


def test_without_enough_replicas_the_run_fails_closed_and_leaves_no_lease() -> None:
    ran = []
    with RedisServer() as lonely:

        @single_run(key="alone", client=lonely.url, replicas=1, replica_timeout=0.2)
        def job() -> None:
            ran.append(1)

        start = time.monotonic()
        with pytest.raises(RedisUnavailable, match="replica"):
            job()
        assert time.monotonic() - start < 2
        assert ran == [] and not lonely.client().exists("single_task:{alone}")


def test_replicas_must_be_a_whole_number() -> None:
    with pytest.raises(ConfigurationError, match="replicas"):
        single_run(key="x", replicas=-1)
    with pytest.raises(ConfigurationError, match="replicas"):
        single_run(key="x", replicas=1.5)  # type: ignore[arg-type]


def test_redis_client_is_untouched_by_replicas_option(pair: tuple[RedisServer, RedisServer]) -> None:
    master, _ = pair
    client = redis.Redis.from_url(master.url)
    with single_run(key="plain", client=client, replicas=1) as lease:
        assert lease.fence > 0


def test_a_replica_that_does_not_answer_makes_the_run_fail_closed(pair: tuple[RedisServer, RedisServer]) -> None:
    master, replica = pair
    ran = []

    @single_run(key="rep-paused", client=master.url, replicas=1, replica_timeout=0.3)
    def job() -> None:
        ran.append(1)

    replica.pause()
    try:
        with pytest.raises(RedisUnavailable, match="only 0 of 1 replica"):
            job()
    finally:
        replica.resume()
    assert ran == [] and not master.client().exists("single_task:{rep-paused}")
