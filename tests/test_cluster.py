"""single_run on a real Redis Cluster (3 masters, 1 replica each) through redis-py's RedisCluster."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.crc import key_slot

import single_task
from single_task import AlreadyRunning, current_lease, is_running, single_run
from support.topologies import Cluster

# Keys whose text contains braces: the whole user key must stay the hash tag of every key the
# library derives from it, or a script would touch two slots (CROSSSLOT).
BRACED = ["{", "{}", "{a}", "a}b", "x}", "a{b}c", "{{}}", "user:{42}:sync"]
# A key that starts with "}" would make "{}" the first brace pair of its Redis keys: an empty hash tag,
# so Redis hashes each whole name and the companion keys scatter over slots.
LEADING_CLOSE = ["}", "}x", "}{", "}abc{d}"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(masters=3, replicas=1) as c:
        yield c


@pytest.fixture
def rc(cluster: Cluster) -> Iterator[redis.RedisCluster]:
    for node in cluster.masters:
        node.client().flushall()
    client = cluster.client()
    yield client
    client.close()


def all_keys(cluster: Cluster) -> dict[int, list[str]]:
    """Every key on each master, by the master's port (asked of each node directly)."""
    return {m.port: sorted(k.decode() for k in m.client().scan_iter(count=1000)) for m in cluster.masters}


def derived_keys(key: str) -> list[str]:
    lease = single_task._lease_key(single_task.DEFAULT_PREFIX, key)
    return [lease, *(lease + suffix for suffix in (":fence", ":q", ":w", ":queued", ":h:0123456789abcdef"))]


@pytest.mark.parametrize("key", ["plain", "sync:{account}", *BRACED])
def test_every_key_the_library_derives_from_a_user_key_is_in_one_slot(key: str) -> None:
    assert len({key_slot(k.encode()) for k in derived_keys(key)}) == 1, derived_keys(key)


@pytest.mark.parametrize("key", LEADING_CLOSE)
def test_a_key_starting_with_a_closing_brace_keeps_its_keys_in_one_slot(key: str) -> None:
    assert len({key_slot(k.encode()) for k in derived_keys(key)}) == 1, derived_keys(key)


def test_a_run_takes_and_gives_back_its_lease_on_the_cluster(cluster: Cluster, rc: redis.RedisCluster) -> None:
    seen: list[Any] = []

    @single_run(key="job:{n}", client=rc)
    def job(n: int) -> int:
        lease = current_lease()
        assert lease is not None
        seen.append((rc.exists(lease.redis_key), is_running(job, n)))
        return lease.fence

    fences = [job(1), job(1), job(2)]
    assert seen == [(1, True)] * 3
    assert fences[0] < fences[1]
    assert not is_running(job, 1)
    assert all(not k.startswith("single_task:{job:") or k.endswith(":fence") for ks in all_keys(cluster).values()
               for k in ks)


def test_leases_spread_over_all_masters(cluster: Cluster, rc: redis.RedisCluster) -> None:
    with contextlib.ExitStack() as stack:
        leases = [stack.enter_context(single_run(key=f"spread:{i}", client=rc, ttl=10)) for i in range(30)]
        by_master = {port: [k for k in ks if not k.endswith(":fence")] for port, ks in all_keys(cluster).items()}
    assert sum(len(ks) for ks in by_master.values()) == len(leases) == 30
    assert all(len(ks) >= 3 for ks in by_master.values()), {p: len(ks) for p, ks in by_master.items()}
    for port, ks in by_master.items():  # each lease lives on the master that owns its slot
        assert all(cluster.master_of_slot(key_slot(k.encode())).port == port for k in ks)
    assert not any(k for ks in all_keys(cluster).values() for k in ks if not k.endswith(":fence"))


@pytest.mark.parametrize("text", BRACED)
def test_keys_with_braces_acquire_wait_and_hand_over_on_the_cluster(rc: redis.RedisCluster, text: str) -> None:
    """The key comes from user text (a template field), as a task's argument would give it."""
    release = threading.Event()
    fences: list[tuple[str, int]] = []

    def body(role: str) -> str:
        lease = current_lease()
        assert lease is not None and lease.key == f"t:{text}"
        fences.append((role, lease.fence))
        if role == "holder":
            release.wait(10)
        return role

    holder = single_run(key="t:{text}", client=rc, ttl=5)(lambda text, role: body(role))
    busy = single_run(key="t:{text}", client=rc, on_busy="raise")(lambda text, role: body(role))
    waiter = single_run(key="t:{text}", client=rc, ttl=5, on_busy="wait", timeout=10)(
        lambda text, role: body(role))
    thread = threading.Thread(target=holder, args=(text, "holder"))
    thread.start()
    deadline = time.monotonic() + 5
    while not fences and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(AlreadyRunning):
        busy(text, "busy")
    threading.Timer(0.3, release.set).start()
    assert waiter(text, "waiter") == "waiter"
    thread.join(10)
    assert [role for role, _ in fences] == ["holder", "waiter"]
    assert fences[0][1] < fences[1][1]
    assert not rc.exists(single_task._lease_key("single_task:", f"t:{text}"))


@pytest.mark.parametrize("key", LEADING_CLOSE)
def test_keys_starting_with_a_closing_brace_work_on_the_cluster(rc: redis.RedisCluster, key: str) -> None:
    with single_run(key=key.replace("{", "{{").replace("}", "}}"), client=rc, ttl=5) as lease:
        assert rc.exists(lease.redis_key)


def test_a_waiter_is_handed_the_key_when_the_holder_returns(rc: redis.RedisCluster) -> None:
    order: list[tuple[str, int]] = []

    @single_run(key="handoff", client=rc, ttl=5, on_busy="wait", timeout=10)
    def job(name: str, seconds: float) -> None:
        lease = current_lease()
        assert lease is not None
        order.append((name, lease.fence))
        time.sleep(seconds)

    holder = threading.Thread(target=job, args=("holder", 0.5))
    holder.start()
    time.sleep(0.1)
    started = time.monotonic()
    job("waiter", 0)
    waited = time.monotonic() - started
    holder.join(5)
    assert [name for name, _ in order] == ["holder", "waiter"]
    assert order[0][1] < order[1][1]
    assert 0.2 < waited < 3.0  # handed over on release, not after the holder's TTL


def test_a_rerun_requested_on_the_cluster_runs_once_more(rc: redis.RedisCluster) -> None:
    runs: list[int] = []
    started = threading.Event()

    @single_run(key="rerun", client=rc, ttl=5, on_busy="rerun")
    def job() -> str:
        runs.append(1)
        started.set()
        time.sleep(0.3)
        return "ran"

    holder = threading.Thread(target=job)
    holder.start()
    started.wait(5)
    assert job() is None and job() is None  # both asks fold into one rerun
    holder.join(5)
    assert len(runs) == 2
    assert not rc.exists("single_task:{rerun}")


def test_fences_grow_with_every_acquisition_on_the_cluster(rc: redis.RedisCluster) -> None:
    fences = []
    for key in ("fence", "fence", "a}}b", "fence", "a}}b"):
        with single_run(key=key, client=rc) as lease:
            fences.append((key, lease.fence))
    for key in ("fence", "a}}b"):
        mine = [f for k, f in fences if k == key]
        assert mine == sorted(mine) and len(set(mine)) == len(mine)


def test_a_script_cache_flushed_on_every_node_is_loaded_again(cluster: Cluster, rc: redis.RedisCluster) -> None:
    for node in cluster.masters:
        node.client().script_flush()
    with single_run(key="flushed", client=rc) as lease:
        assert lease.fence > 0


def test_renewal_keeps_a_run_longer_than_its_ttl_alive_on_the_cluster(rc: redis.RedisCluster) -> None:
    lost: list[str] = []
    with single_run(key="long", client=rc, ttl=0.6, on_lost=lambda lease: lost.append(lease.key)) as lease:
        time.sleep(2.0)
        assert rc.hget(lease.redis_key, "t") is not None, "the lease expired: nothing renewed it"
        assert not lease.lost
    assert not lost


def test_replicas_option_works_on_the_cluster(rc: redis.RedisCluster) -> None:
    with single_run(key="replicated", client=rc, replicas=1) as lease:
        assert lease.fence > 0
