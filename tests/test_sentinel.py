"""single_run on a Sentinel-managed master: one master, one replica, three sentinels on loopback."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from single_task import AlreadyRunning, Lease, RedisUnavailable, current_lease, single_run
from support.topologies import SentinelGroup


@pytest.fixture(scope="module")
def group() -> Iterator[SentinelGroup]:
    with SentinelGroup(replicas=1, sentinels=3, down_after_ms=1000, failover_timeout_ms=5000) as g:
        yield g


def master_client(group: SentinelGroup) -> Any:
    return group.sentinel().master_for(group.master_name, socket_timeout=1.0, socket_connect_timeout=1.0)


def test_a_sentinel_managed_master_is_accepted_as_the_client(group: SentinelGroup) -> None:
    client = master_client(group)

    @single_run(key="sentinel:{n}", client=client)
    def job(n: int) -> int:
        lease = current_lease()
        assert lease is not None
        assert client.hget(lease.redis_key, "f") == str(lease.fence).encode()
        return lease.fence

    assert job(1) < job(1)
    with single_run(key="sentinel-with", client=client), pytest.raises(AlreadyRunning):
        with single_run(key="sentinel-with", client=client):
            pass


def first_lease_after(client: Any, deadline: float, failures: list[str]) -> tuple[float, Lease]:
    """Try a fresh key every 100 ms until an acquisition succeeds; returns when and the lease."""
    attempt = 0
    while True:
        attempt += 1
        try:
            with single_run(key=f"after-failover:{attempt}", client=client) as lease:
                return time.monotonic(), lease
        except RedisUnavailable as exc:
            failures.append(str(exc).rsplit("did not run: ", 1)[-1][:80])
        assert time.monotonic() < deadline, f"no lease could be taken after the failover: {failures[-3:]}"
        time.sleep(0.1)


@pytest.mark.slow
def test_after_the_master_is_killed_new_leases_work_without_restarting_anything(group: SentinelGroup) -> None:
    client = master_client(group)
    _old_host, old_port = group.master_address()
    lost: list[str] = []
    with contextlib.ExitStack() as stack:
        before = stack.enter_context(single_run(key="before", client=client))
        # Two leases held across the failover, one confirmed on the replica (replicas=1), one not.
        replicated = stack.enter_context(single_run(key="held:replicated", client=client, ttl=15, replicas=1,
                                                    on_lost=lambda lease: lost.append(lease.key)))
        plain = stack.enter_context(single_run(key="held:plain", client=client, ttl=15,
                                               on_lost=lambda lease: lost.append(lease.key)))
        time.sleep(0.2)  # asynchronous replication of the plain lease (it normally takes well under 1 ms)

        killed_at = time.monotonic()
        group.kill_master()
        failures: list[str] = []
        first_ok, first = first_lease_after(client, killed_at + 45, failures)
        new_host, new_port = group.master_address()
        print(f"\nfailover: first new lease {first_ok - killed_at:.2f}s after SIGKILL of the master; "
              f"{len(failures)} refused attempts before it, e.g. {failures[:1]}; master {old_port} -> {new_port}")
        assert new_port != old_port

        # New leases keep working through the same client object, with fences still growing.
        fences = []
        for i in range(20):
            with single_run(key=f"after:{i % 4}", client=client) as lease:
                fences.append(lease.fence)
        assert first.fence > before.fence and min(fences) > before.fence

        # The leases held across the failover: the replicated one must still exclude others.
        with pytest.raises(AlreadyRunning):
            with single_run(key="held:replicated", client=client):
                pass
        try:
            with single_run(key="held:plain", client=client):
                plain_state = "free after the failover (its write had not reached the replica)"
        except AlreadyRunning:
            plain_state = "still held after the failover"
        # Let the watchdog renew at least once against the new master.
        time.sleep(0.5)
        print(f"held through failover: replicated lost={replicated.lost}, plain lost={plain.lost} "
              f"({plain_state}); on_lost calls: {lost}")
        assert not replicated.lost
    assert "held:replicated" not in lost
    with single_run(key="held:replicated", client=client) as again:  # given back properly at exit
        assert again.fence > replicated.fence
    redis.Redis(host=new_host, port=new_port).ping()
