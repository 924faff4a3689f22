"""The contenders: one function per lock that builds a zero-argument cycle on a private key.

A *cycle* is what a task pays per run: acquire, an empty body, release. A *busy* cycle is one
attempt on a key another holder has, which must return without running. Each builder gets its
own redis-py client (own connection pool), so no contender shares a socket with another.

Peers are called through their public, documented entry points (the code path their users run),
never re-implemented here; a peer that is not installed is reported as such, not dropped.
"""

from __future__ import annotations

import contextvars
import os
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Optional

import redis

from bench.measure import Cycle
from single_task import single_run

TTL_S = 30  # every lock gets the same 30 s expiry (single_task's default)
TTL_MS = TTL_S * 1000

# The compare-and-delete release every correct SET NX lock needs (the floor's second round trip).
COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Unavailable(Exception):
    """The peer package is not installed (or does not import): reported, not hidden."""


@dataclass
class Env:
    """Where the contenders run: the server, and what to undo when a phase ends."""

    host: str
    port: int
    stack: ExitStack

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, **kwargs)


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "unit" (PING), "cycle" (acquire + release), "busy" (attempt on a held key)
    build: Callable[[Env, str], Cycle]  # (env, key) -> cycle
    release: str = ""
    renewal: str = ""
    package: Optional[str] = None  # distribution name, for peers
    note: str = ""


# -- helpers ---------------------------------------------------------------------------------------


def _token() -> bytes:
    return os.urandom(16)


def hold_with_single_task(env: Env, key: str) -> None:
    """Hold ``key`` through single_task from a thread of its own until the phase ends.

    A thread (not this one) so that the benchmark's own calls are not nested inside the holder's
    run, which single_task would rightly refuse as a self-deadlock.
    """
    entered, done = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def hold() -> None:
        try:
            with single_run(key=key, client=env.client()):
                entered.set()
                done.wait()
        except BaseException as exc:  # reported by the thread that waits for this one, at once
            failed.append(exc)
            entered.set()

    thread = threading.Thread(target=hold, name=f"bench-holder-{key}", daemon=True)
    thread.start()
    if not entered.wait(10):
        raise RuntimeError(f"holder of {key!r} did not start")
    if failed:
        raise RuntimeError(f"holder of {key!r} could not take it: {type(failed[0]).__name__}: {failed[0]}")

    def stop() -> None:
        done.set()
        thread.join(10)

    env.stack.callback(stop)


def _import(module: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise Unavailable(f"not installed ({exc.name or module}); pip install -e '.[bench]'") from exc


# -- the floor ---------------------------------------------------------------------------------------


def build_ping(env: Env, key: str) -> Cycle:
    client = env.client()

    def cycle() -> None:
        client.ping()

    return cycle


def build_floor(env: Env, key: str) -> Cycle:
    client = env.client()
    sha = client.script_load(COMPARE_AND_DELETE)

    def cycle() -> None:
        token = _token()
        if not client.set(key, token, nx=True, px=TTL_MS):
            raise RuntimeError(f"floor: {key!r} unexpectedly busy")
        if client.evalsha(sha, 1, key, token) != 1:
            raise RuntimeError(f"floor: {key!r} was not ours at release")

    return cycle


def build_floor_direct(env: Env, key: str) -> Cycle:
    """The floor's two commands packed and written straight to one pooled connection.

    No pool checkout, retry wrapper or response callback per command: what the same two round
    trips cost below redis-py's command layer (for reference; no target uses it).
    """
    client = env.client()
    sha = client.script_load(COMPARE_AND_DELETE)
    pool = client.connection_pool
    conn = pool.get_connection()
    env.stack.callback(pool.release, conn)
    pack: Any = conn.pack_command
    send: Any = conn.send_packed_command
    read: Any = conn.read_response
    ttl = str(TTL_MS)

    def cycle() -> None:
        token = _token()
        send(pack("SET", key, token, "NX", "PX", ttl), False)
        if read() is None:
            raise RuntimeError(f"floor (direct): {key!r} unexpectedly busy")
        send(pack("EVALSHA", sha, 1, key, token), False)
        if read() != 1:
            raise RuntimeError(f"floor (direct): {key!r} was not ours at release")

    return cycle


def build_floor_busy(env: Env, key: str) -> Cycle:
    client = env.client()
    client.set(key, b"someone-else", px=3_600_000)
    env.stack.callback(client.delete, key)

    def cycle() -> None:
        if client.set(key, _token(), nx=True, px=TTL_MS):
            raise RuntimeError(f"floor busy: {key!r} was free")

    return cycle


# -- single_task ---------------------------------------------------------------------------------


def build_st_with(env: Env, key: str) -> Cycle:
    client = env.client()

    def cycle() -> None:
        with single_run(key=key, client=client):
            pass

    return cycle


def build_st_with_prebuilt(env: Env, key: str) -> Cycle:
    spec = single_run(key=key, client=env.client())

    def cycle() -> None:
        with spec:
            pass

    return cycle


def build_st_decorated(env: Env, key: str, client: Optional[redis.Redis] = None) -> Cycle:
    @single_run(key=key, client=env.client() if client is None else client)
    def job() -> int:
        return 1

    def cycle() -> None:
        if job() != 1:
            raise RuntimeError("single_task: decorated call did not run")

    return cycle


def build_st_decorated_per_command(env: Env, key: str) -> Cycle:
    # A pool configured below redis-py's default size lends a connection for each command.
    return build_st_decorated(env, key, env.client(max_connections=50))


def build_st_template(env: Env, key: str) -> Cycle:
    @single_run(key=key + ":{account_id}", client=env.client())
    def job(account_id: int, full: bool = False) -> int:
        return account_id

    def cycle() -> None:
        if job(42) != 42:
            raise RuntimeError("single_task: decorated call did not run")

    return cycle


def _build_st_busy(env: Env, key: str, on_busy: Any) -> Cycle:
    hold_with_single_task(env, key)

    @single_run(key=key, client=env.client(), on_busy=on_busy)
    def job() -> int:
        return 1

    def cycle() -> None:
        if job() is not None:
            raise RuntimeError(f"single_task: {on_busy} ran on a busy key")

    return cycle


def build_st_skip(env: Env, key: str) -> Cycle:
    return _build_st_busy(env, key, "skip")


def build_st_rerun_request(env: Env, key: str) -> Cycle:
    return _build_st_busy(env, key, "rerun")


def build_st_rerun_coalesced(env: Env, key: str) -> Cycle:
    """One run, during which a second caller asks for a rerun; the holder runs once more.

    The second caller runs in an empty context (as another thread or task would), so it is a
    separate caller that finds the key busy, not a nested call of the same run.
    """
    runs: list[int] = []

    @single_run(key=key, client=env.client(), on_busy="rerun")
    def job() -> None:
        runs.append(1)
        if len(runs) == 1:
            contextvars.Context().run(job)

    def cycle() -> None:
        runs.clear()
        job()
        if len(runs) != 2:
            raise RuntimeError(f"single_task rerun: body ran {len(runs)} times, expected 2")

    return cycle


# -- peers ---------------------------------------------------------------------------------------


def build_redis_py_lock(env: Env, key: str) -> Cycle:
    client = env.client()

    def cycle() -> None:
        with client.lock(key, timeout=TTL_S):
            pass

    return cycle


def build_redis_py_lock_busy(env: Env, key: str) -> Cycle:
    client = env.client()
    holder = client.lock(key, timeout=3600)
    holder.acquire()
    env.stack.callback(holder.release)

    def cycle() -> None:
        if client.lock(key, timeout=TTL_S).acquire(blocking=False):
            raise RuntimeError("redis-py Lock: acquired a busy key")

    return cycle


def _redis_lock(auto_renewal: bool) -> Callable[[Env, str], Cycle]:
    def build(env: Env, key: str) -> Cycle:
        redis_lock = _import("redis_lock")
        client = env.client()

        def cycle() -> None:
            with redis_lock.Lock(client, key, expire=TTL_S, auto_renewal=auto_renewal):
                pass

        return cycle

    return build


def build_redis_lock_busy(env: Env, key: str) -> Cycle:
    redis_lock = _import("redis_lock")
    client = env.client()
    holder = redis_lock.Lock(client, key, expire=3600)
    holder.acquire()
    env.stack.callback(holder.release)

    def cycle() -> None:
        if redis_lock.Lock(client, key, expire=TTL_S).acquire(blocking=False):
            raise RuntimeError("python-redis-lock: acquired a busy key")

    return cycle


def build_pottery(env: Env, key: str) -> Cycle:
    pottery = _import("pottery")
    client = env.client()

    def cycle() -> None:
        with pottery.Redlock(key=key, masters={client}, auto_release_time=TTL_S):
            pass

    return cycle


def build_celery_once(env: Env, key: str) -> Cycle:
    backend_mod = _import("celery_once.backends.redis")
    backend = backend_mod.Redis({"url": env.url, "default_timeout": TTL_S})

    def cycle() -> None:
        backend.raise_or_lock(key, timeout=TTL_S)  # raises AlreadyQueued when busy
        backend.clear_lock(key)

    return cycle


def build_celery_singleton(env: Env, key: str) -> Cycle:
    backend_mod = _import("celery_singleton.backends.redis")
    uuid = _import("kombu.utils.uuid").uuid
    backend = backend_mod.RedisBackend(env.url)

    def cycle() -> None:
        if not backend.lock(key, uuid(), expiry=TTL_S):
            raise RuntimeError("celery-singleton: key busy")
        backend.unlock(key)

    return cycle


def _huey(expiring: bool) -> Callable[[Env, str], Cycle]:
    def build(env: Env, key: str) -> Cycle:
        huey = _import("huey")
        cls = huey.RedisExpireHuey if expiring else huey.RedisHuey
        app = cls(f"bench-{key}", host=env.host, port=env.port)
        ttl = TTL_S if expiring else None

        def cycle() -> None:
            with app.lock_task(key, ttl=ttl):
                pass

        return cycle

    return build


def build_dramatiq(env: Env, key: str) -> Cycle:
    rate_limits = _import("dramatiq.rate_limits")
    backends = _import("dramatiq.rate_limits.backends")
    mutex = rate_limits.ConcurrentRateLimiter(backends.RedisBackend(client=env.client()), key, limit=1)

    def cycle() -> None:
        with mutex.acquire(raise_on_failure=False) as acquired:
            if not acquired:
                raise RuntimeError("dramatiq: mutex busy")

    return cycle


OWNER_CHECKED = "owner-checked script"
ST_RENEWAL = "auto: one watchdog thread per process, pipelined"

CONTENDERS: list[Contender] = [
    Contender("PING (one round trip)", "unit", build_ping),
    Contender("floor: SET NX PX + EVALSHA compare-and-delete", "cycle", build_floor,
              release=OWNER_CHECKED, renewal="none"),
    Contender("floor, written straight to a pooled connection", "cycle", build_floor_direct,
              release=OWNER_CHECKED, renewal="none",
              note="the same two commands below redis-py's command layer (pack, send, read)"),
    Contender("floor: SET NX PX on a busy key", "busy", build_floor_busy),
    Contender("single_task: `with single_run(...)` block", "cycle", build_st_with,
              release=OWNER_CHECKED, renewal=ST_RENEWAL, note="single_run(...) built per use"),
    Contender("single_task: `with spec` (single_run built once)", "cycle", build_st_with_prebuilt,
              release=OWNER_CHECKED, renewal=ST_RENEWAL),
    Contender("single_task: decorated call", "cycle", build_st_decorated,
              release=OWNER_CHECKED, renewal=ST_RENEWAL, note="constant key"),
    Contender("single_task: decorated call, pool of 50 (a connection per command)", "cycle",
              build_st_decorated_per_command, release=OWNER_CHECKED, renewal=ST_RENEWAL,
              note="a pool configured smaller than redis-py's default lends a connection per command"),
    Contender("single_task: decorated call, key `…:{account_id}`", "cycle", build_st_template,
              release=OWNER_CHECKED, renewal=ST_RENEWAL, note="key rendered from the arguments"),
    Contender("single_task: decorated call, key busy → skip", "busy", build_st_skip,
              note="returns None"),
    Contender("single_task: decorated call, key busy → rerun request", "busy", build_st_rerun_request,
              note="marks the holder to run once more"),
    Contender("single_task: rerun coalesced (2 runs + 1 request)", "cycle", build_st_rerun_coalesced,
              release=OWNER_CHECKED, renewal=ST_RENEWAL,
              note="whole episode: run, a busy caller asks for a rerun, the run repeats, release"),
    Contender("redis-py `Lock` (`with r.lock(...)`)", "cycle", build_redis_py_lock,
              release=OWNER_CHECKED, renewal="manual extend()", package="redis"),
    Contender("redis-py `Lock`, busy key, acquire(blocking=False)", "busy", build_redis_py_lock_busy,
              package="redis"),
    Contender("python-redis-lock", "cycle", _redis_lock(False),
              release=OWNER_CHECKED, renewal="manual extend()", package="python-redis-lock"),
    Contender("python-redis-lock, auto_renewal=True", "cycle", _redis_lock(True),
              release=OWNER_CHECKED, renewal="auto: one thread per held lock", package="python-redis-lock"),
    Contender("python-redis-lock, busy key, acquire(blocking=False)", "busy", build_redis_lock_busy,
              package="python-redis-lock"),
    Contender("pottery `Redlock` (one master)", "cycle", build_pottery,
              release=OWNER_CHECKED, renewal="manual extend() (3 at most)", package="pottery"),
    Contender("celery-once Redis backend", "cycle", build_celery_once,
              release="blind DEL", renewal="none", package="celery-once",
              note="raise_or_lock() + clear_lock()"),
    Contender("celery-singleton Redis backend", "cycle", build_celery_singleton,
              release="blind DEL", renewal="none", package="celery-singleton", note="lock() + unlock()"),
    Contender("huey `lock_task` (RedisHuey)", "cycle", _huey(False),
              release="blind HDEL", renewal="none", package="huey",
              note="default storage: the lock has no expiry"),
    Contender("huey `lock_task` (RedisExpireHuey, ttl=30)", "cycle", _huey(True),
              release="blind DEL", renewal="none", package="huey"),
    Contender("dramatiq `ConcurrentRateLimiter(limit=1)`", "cycle", build_dramatiq,
              release="counter decrement, not owner-checked", renewal="none", package="dramatiq"),
]


def key_for(index: int, phase: str) -> str:
    return f"bench:{phase}:{index}"


def build_all(env: Env, phase: str) -> tuple[dict[str, Cycle], dict[str, str]]:
    """Build every contender for one phase: {name: cycle} and {name: why it is unavailable}."""
    cycles: dict[str, Cycle] = {}
    problems: dict[str, str] = {}
    for i, contender in enumerate(CONTENDERS):
        try:
            cycles[contender.name] = contender.build(env, key_for(i, phase))
        except Unavailable as exc:
            problems[contender.name] = str(exc)
        except Exception as exc:
            problems[contender.name] = f"failed to set up: {type(exc).__name__}: {exc}"
    return cycles, problems
