"""The core promises hold on both ways a script reaches Redis: the direct path that a plain
``redis.Redis`` takes (EVALSHA packed by single_task and written to a pooled connection), and
redis-py's own command layer that every other client takes. Real redis-servers, no mocks."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import single_task
from single_task import AlreadyRunning, Lease, RedisUnavailable, current_lease, single_run
from support.proxy import DroppingProxy
from support.redis_server import RedisServer
from tests.test_core import held_elsewhere
from tests.test_lifecycle import run_script


class NormalPathRedis(redis.Redis):
    """A real client that sends every command through redis-py's command layer: a subclass that
    overrides ``execute_command`` is never taken past it."""

    def execute_command(self, *args: Any, **options: Any) -> Any:
        return super().execute_command(*args, **options)


MakeClient = Callable[..., redis.Redis]


def takes_direct_path(client: Any) -> bool:
    return single_task._route(client)[1] is not None


def keeps_connections(client: Any) -> bool:
    return single_task._route(client)[4] is not None


@pytest.fixture(params=["kept", "direct", "normal"])
def make_client(request: pytest.FixtureRequest) -> MakeClient:
    """Builds a client from a URL that takes the path this test runs on (and checks it does): the
    direct path keeping its connections (redis-py's default pool), the direct path with a
    connection from the pool per command (a pool configured smaller), or redis-py's own."""
    cls = NormalPathRedis if request.param == "normal" else redis.Redis

    def make(url: str, **kwargs: Any) -> redis.Redis:
        if request.param == "direct":
            kwargs.setdefault("max_connections", 50)
        client = cls.from_url(url, **kwargs)
        assert takes_direct_path(client) == (request.param != "normal")
        assert keeps_connections(client) == (request.param == "kept")
        return client

    return make


def evalsha_calls(r: redis.Redis) -> tuple[int, int]:
    stats = r.info("commandstats")
    return tuple(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))  # type: ignore[return-value]


def retrying(**kwargs: Any) -> dict[str, Any]:
    """One immediate retry after a dropped connection, on every supported redis-py (before 5.1 a
    retry also needs the error in retry_on_error)."""
    return {"retry": Retry(NoBackoff(), 1), "retry_on_error": [redis.exceptions.ConnectionError], **kwargs}


# -- the promises, on both paths -------------------------------------------------------------------


def test_a_run_costs_one_round_trip_to_acquire_and_one_to_release(make_client: MakeClient, redis_url: str,
                                                                   r: redis.Redis) -> None:
    client = make_client(redis_url)

    @single_run(key="paths-rt", client=client)
    def job() -> int:
        return 7

    assert job() == 7  # loads the scripts
    before = evalsha_calls(r)
    for _ in range(10):
        assert job() == 7
    after = evalsha_calls(r)
    assert (after[0] - before[0], after[1] - before[1]) == (20, 0)


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt, SystemExit])
def test_the_lease_is_released_however_the_run_ends(make_client: MakeClient, redis_url: str, r: redis.Redis,
                                                    exc: type) -> None:
    @single_run(key="paths-ends", client=make_client(redis_url))
    def job() -> None:
        assert r.exists("single_task:{paths-ends}")
        raise exc()

    with pytest.raises(exc):
        job()
    assert not r.exists("single_task:{paths-ends}")


def test_a_busy_key_is_skipped_or_raises(make_client: MakeClient, redis_url: str) -> None:
    client = make_client(redis_url)
    ran: list[int] = []
    skip = single_run(key="paths-busy", client=client)(lambda: ran.append(1))
    with held_elsewhere(redis_url, "paths-busy"):
        assert skip() is None
        with pytest.raises(AlreadyRunning, match="paths-busy"), single_run(key="paths-busy", client=client):
            ran.append(2)
    assert ran == []


def test_a_run_longer_than_ttl_keeps_its_lease_by_renewal(make_client: MakeClient, redis_url: str,
                                                          r: redis.Redis) -> None:
    with single_run(key="paths-long", client=make_client(redis_url), ttl=0.6) as lease:
        pttls = []
        for _ in range(3):
            time.sleep(0.5)
            pttls.append(r.pttl("single_task:{paths-long}"))
        assert not lease.lost
    assert all(p > 0 for p in pttls), pttls
    assert not r.exists("single_task:{paths-long}")


def test_a_waiter_is_handed_the_key_by_the_release(make_client: MakeClient, redis_url: str) -> None:
    client = make_client(redis_url)
    fences: list[int] = []
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with single_run(key="paths-wait", client=client) as lease:
            fences.append(lease.fence)
            taken.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(10)
    started = time.monotonic()
    threading.Timer(0.2, release.set).start()
    with single_run(key="paths-wait", client=client, on_busy="wait", timeout=10) as lease:
        waited = time.monotonic() - started
        fences.append(lease.fence)
    holder.join()
    assert 0.18 < waited < 5  # woken by the release, not before it
    assert fences[1] > fences[0]


def test_a_script_cache_emptied_by_a_restart_costs_one_extra_round_trip_once(make_client: MakeClient,
                                                                             redis_url: str,
                                                                             r: redis.Redis) -> None:
    job = single_run(key="paths-flush", client=make_client(redis_url))(lambda: "ran")
    assert job() == "ran"
    r.script_flush()
    before = evalsha_calls(r)
    assert job() == "ran"  # NOSCRIPT for the acquire, then EVAL; the release goes as EVAL at once
    middle = evalsha_calls(r)
    assert job() == "ran"
    after = evalsha_calls(r)
    assert (middle[0] - before[0], middle[1] - before[1]) == (1, 2)  # three round trips: one extra
    assert (after[0] - middle[0], after[1] - middle[1]) == (2, 0)


def test_an_acquire_and_a_release_whose_replies_were_dropped_are_retried(make_client: MakeClient, redis_url: str,
                                                                         r: redis.Redis) -> None:
    proxy = DroppingProxy("127.0.0.1", int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    lost: list[Lease] = []
    try:
        client = make_client(proxy.url, **retrying())

        @single_run(key="paths-drop", client=client, on_lost=lost.append)
        def job() -> int:
            lease = current_lease()
            assert lease is not None
            return lease.fence

        job()  # loads the scripts
        proxy.drop_reply_to(b"EVALSHA", nth=1)  # the acquire ran, its answer never came
        first = job()
        proxy.drop_reply_to(b"EVALSHA", nth=2)  # the release ran, its answer never came
        second = job()
        assert proxy.dropped == 2
        assert second > first and lost == []
        assert not r.exists("single_task:{paths-drop}")
    finally:
        proxy.close()


def test_a_timeout_fails_closed_and_the_connection_is_not_reused(make_client: MakeClient, redis_url: str,
                                                                  r: redis.Redis) -> None:
    # No retry: the timed-out command is not sent again, and its late reply must never be read
    # as the answer to a later command on the same connection.
    client = make_client(redis_url, socket_timeout=0.3, retry=Retry(NoBackoff(), 0))
    job = single_run(key="paths-timeout", client=client, ttl=0.5)(lambda: current_lease())
    assert job() is not None
    r.client_pause(700)
    with pytest.raises(RedisUnavailable, match=r"paths-timeout.*Timeout"):
        job()
    time.sleep(1.3)  # the pause ended and the acquire that timed out ran, then expired
    lease = job()
    assert lease is not None and not lease.lost
    assert not r.exists("single_task:{paths-timeout}")


def test_decoded_replies_work(make_client: MakeClient, redis_url: str) -> None:
    client = make_client(redis_url, decode_responses=True)
    with single_run(key="paths-decoded", client=client) as lease:
        assert lease.fence > 0
    with held_elsewhere(redis_url, "paths-decoded"):
        assert single_run(key="paths-decoded", client=client)(lambda: "ran")() is None


# -- which clients take the direct path ------------------------------------------------------------


@pytest.fixture
def unix_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.args += ["--unixsocket", os.path.join(server.dir, "redis.sock"), "--unixsocketperm", "700"]
    with server:
        yield server


def test_plain_clients_of_every_transport_and_pool_take_the_direct_path(redis_url: str,
                                                                         unix_server: RedisServer) -> None:
    sock = os.path.join(unix_server.dir, "redis.sock")
    host, port = redis_url.rsplit("/", 1)[0].rsplit(":", 1)
    clients = {
        "from_url": redis.Redis.from_url(redis_url),
        "blocking pool": redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(redis_url, timeout=5)),
        "unix socket": redis.Redis(unix_socket_path=sock),
        "decode_responses": redis.Redis.from_url(redis_url, decode_responses=True),
        "unix:// URL": redis.Redis.from_url(f"unix://{sock}"),
    }
    for name, client in clients.items():
        assert takes_direct_path(client), name
        with single_run(key=f"paths-transport-{name}", client=client) as lease:
            assert lease.fence > 0, name
    tls = redis.Redis.from_url(f"rediss://{host.split('//')[1]}:{port}/0")  # judged only: nothing is sent
    assert takes_direct_path(tls)


def test_other_clients_take_redis_pys_own_path(redis_url: str) -> None:
    import functools

    from redis.sentinel import Sentinel

    class Wrapped(redis.Redis):
        pass

    original = redis.Redis.execute_command
    Wrapped.execute_command = functools.wraps(original)(lambda self, *a, **k: original(self, *a, **k))  # type: ignore[method-assign]
    custom = redis.Redis.from_url(redis_url)
    custom.set_response_callback("EVALSHA", lambda reply, **options: reply)
    instance = redis.Redis.from_url(redis_url)
    host, port = redis_url.rsplit("/", 1)[0].split("//")[1].rsplit(":", 1)
    instance.execute_command = functools.partial(redis.Redis.execute_command, instance)  # type: ignore[method-assign]
    clients = {
        "overrides execute_command": NormalPathRedis.from_url(redis_url),
        "execute_command wrapped in place": Wrapped.from_url(redis_url),
        "execute_command set on the instance": instance,
        "single connection": redis.Redis(host=host, port=port, single_connection_client=True),
        "EVALSHA response callback": custom,
        "latin-1 encoding": redis.Redis.from_url(redis_url, encoding="latin-1"),
        "Sentinel's pool": Sentinel([("127.0.0.1", 1)]).master_for("mymaster"),
        "not a client": object(),
    }
    fakeredis = sys.modules.get("fakeredis")
    try:
        import fakeredis
    except ImportError:
        pass
    if fakeredis is not None:
        clients["fakeredis"] = fakeredis.FakeRedis()
    for name, client in clients.items():
        assert not takes_direct_path(client), name
    for name in ("overrides execute_command", "execute_command wrapped in place", "single connection",
                 "EVALSHA response callback"):
        with single_run(key=f"paths-normal-{name}", client=clients[name]) as lease:
            assert lease.fence > 0, name


def calls_during(fn: Callable[[], Any]) -> list[str]:
    """The redis-py functions called in this thread while ``fn`` runs (by the interpreter's own
    profiling hook: nothing is replaced)."""
    redis_dir = os.path.dirname(os.path.abspath(redis.__file__))
    seen: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(redis_dir):
            seen.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def test_a_plain_client_sends_its_scripts_without_redis_pys_command_layer(redis_url: str) -> None:
    plain = single_run(key="paths-proof", client=redis.Redis.from_url(redis_url))(lambda: "ran")
    normal = single_run(key="paths-proof", client=NormalPathRedis.from_url(redis_url))(lambda: "ran")
    plain(), normal()  # connected, scripts loaded
    direct_calls, normal_calls = calls_during(plain), calls_during(normal)
    assert direct_calls.count("send_packed_command") == 2 and direct_calls.count("read_response") >= 2
    assert "execute_command" not in direct_calls and "evalsha" not in direct_calls
    assert normal_calls.count("execute_command") == 2 and normal_calls.count("evalsha") == 2


def test_a_pool_of_redis_pys_default_kind_lends_its_connections_to_the_scripts_for_good(
        fresh_server: RedisServer) -> None:
    redis_url = fresh_server.url
    for client in (redis_url, redis.Redis.from_url(redis_url), redis.Redis(port=fresh_server.port)):
        job = single_run(key="paths-kept", client=client)(lambda: "ran")
        assert job() == "ran"
        calls = calls_during(job)
        assert "get_connection" not in calls and "release" not in calls  # not from the pool per command
        assert calls.count("send_packed_command") == 2
    assert keeps_connections(single_task._clients[redis_url])
    r = fresh_server.client()
    for c in r.client_list():
        if c["cmd"] == "evalsha":
            r.client_kill_filter(_id=c["id"])
    url_job = single_run(key="paths-kept", client=redis_url)(lambda: "ran")
    for _ in range(20):
        assert url_job() == "ran"
    # One connection served every script of the client (the server has no other that sent one).
    assert [c["cmd"] for c in r.client_list()].count("evalsha") == 1
    # A pool configured smaller, or a blocking one, lends a connection for each command.
    for pool in (redis.ConnectionPool.from_url(redis_url, max_connections=10),
                 redis.BlockingConnectionPool.from_url(redis_url, max_connections=200)):
        client = redis.Redis(connection_pool=pool)
        assert takes_direct_path(client) and not keeps_connections(client)
        passed = single_run(key="paths-kept", client=client)(lambda: "ran")
        passed()
        assert calls_during(passed).count("get_connection") == 2


def test_a_kept_connection_that_the_server_closed_is_connected_anew(fresh_server: RedisServer) -> None:
    r = fresh_server.client(decode_responses=True)
    client = redis.Redis.from_url(fresh_server.url, retry=Retry(NoBackoff(), 0))  # no retry to hide behind
    assert keeps_connections(client)
    job = single_run(key="paths-killed", client=client)(lambda: current_lease())
    assert job() is not None
    (kept,) = [c for c in r.client_list() if c["cmd"] == "evalsha"]
    r.client_kill_filter(_id=kept["id"])
    time.sleep(0.05)
    for _ in range(3):
        lease = job()
        assert lease is not None and not lease.lost
    client.close()  # the pool disconnects what it lent out, kept connections too
    assert job() is not None
    assert not r.exists("single_task:{paths-killed}")


def test_threads_on_a_client_made_from_a_url_each_read_their_own_replies(redis_url: str, r: redis.Redis) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        @single_run(key=f"paths-threads-{n}", client=redis_url)
        def job() -> None:
            lease = current_lease()
            assert lease is not None
            assert r.hget(f"single_task:{{paths-threads-{n}}}", "f") == str(lease.fence)

        try:
            for _ in range(100):
                job()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    kept = single_task._route(single_task._clients[redis_url])[4]
    assert kept is not None and 1 <= len(kept.idle) <= 8


def test_a_forked_child_never_sends_on_its_parents_kept_connection(redis_url: str) -> None:
    out = run_script("""
        import os, sys, time, redis, single_task
        from single_task import current_lease, single_run
        url = os.environ["URL"]
        r = redis.Redis.from_url(url, decode_responses=True)

        def cycles(name, seconds):
            @single_run(key=name, client=url, ttl=5)
            def job():
                lease = current_lease()
                assert r.hget("single_task:{%s}" % name, "f") == str(lease.fence), "another key's reply"
                return lease

            until = time.monotonic() + seconds
            while time.monotonic() < until:
                lease = job()
                assert lease is not None and not lease.lost
                assert not r.exists("single_task:{%s}" % name)  # released

        def ports():
            kept = single_task._route(single_task._clients[url])[4]
            return sorted(c._sock.getsockname()[1] for c in kept.idle if c._sock is not None)

        cycles("parent", 0.1)  # the parent now keeps a connection, idle at the fork
        parents = ports()
        pid = os.fork()
        if pid == 0:
            try:
                cycles("child", 0.1)
                assert not set(ports()) & set(parents), "the child sent on its parent's socket"
                cycles("child", 1.0)
            except BaseException as exc:
                print("child:", repr(exc), file=sys.stderr)
                os._exit(1)
            os._exit(0)
        time.sleep(0.3)
        cycles("parent", 1.0)  # at the same time, on the connection it kept
        _, status = os.waitpid(pid, 0)
        print(len(parents), os.waitstatus_to_exitcode(status))
    """, redis_url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1 0", out.stderr


@pytest.mark.parametrize("args", [
    ("a" * 32, 30000, "", "123@höst", "w", 11000),
    ("tok", 0, -5, "x" * 7000, b"raw\r\nbytes"),
    (),
])
def test_the_direct_path_sends_the_bytes_redis_py_would(redis_url: str, args: tuple[Any, ...]) -> None:
    client = redis.Redis.from_url(redis_url)
    conn = client.connection_pool.get_connection(*single_task._route(client)[2])
    try:
        for script in (single_task._ACQUIRE, single_task._RELEASE, single_task._RENEW):
            for redis_key in ("single_task:{k}", "single_task:{ключ}", "single_task:}{0123456789abcdef}}x"):
                for _ in range(2):  # the second time from the cached prefix (and tail)
                    ours = single_task._pack(script, redis_key, args)
                    theirs = b"".join(conn.pack_command("EVALSHA", single_task._SHA[script], 1, redis_key, *args))
                    assert ours == theirs
    finally:
        client.connection_pool.release(conn)


def test_an_argument_the_direct_path_does_not_pack_is_left_to_redis_py() -> None:
    assert single_task._pack(single_task._RENEW, "single_task:{k}", ("tok", 1.5)) is None
    assert single_task._pack(single_task._RENEW, "single_task:{k}", ("tok", True)) is None
