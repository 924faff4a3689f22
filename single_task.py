"""Run a Celery task -- or any function -- at most once at a time per key, under a Redis lease.

Usage::

    from single_task import single_run, current_lease

    @app.task(bind=True)
    @single_run(key="sync:{account_id}", ttl=30, on_busy="rerun")
    def sync_account(self, account_id, full=False):
        store.write(account_id, fence=current_lease().fence)

    with single_run(key="nightly-report", client="redis://localhost:6379/0") as lease:
        write_report(fence=lease.fence)

A run takes a lease in one round trip and gives it back in one more. While it runs, one watchdog
thread per process renews every lease the process holds; a holder that dies stops renewing and its
key frees itself within ``ttl``. Each lease carries a fencing token (``lease.fence``) that grows
with every acquisition of its key, so a store can refuse writes from a holder that lost its lease.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import random
import secrets
import socket
import string
import sys
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Final, Literal, Optional, TypeVar, Union, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    from typing import ParamSpec

    P = ParamSpec("P")

__all__ = [
    "AlreadyRunning",
    "ConfigurationError",
    "Lease",
    "RedisUnavailable",
    "SingleTaskError",
    "current_lease",
    "is_queued",
    "is_running",
    "send_once",
    "single_run",
]
__version__ = "0.1.0"

R = TypeVar("R")
OnBusy = Literal["skip", "raise", "wait", "retry", "rerun"]
KeyFunc = Callable[..., str]

DEFAULT_PREFIX: Final = "single_task:"
ENV_URL: Final = "SINGLE_TASK_REDIS_URL"
ENV_PREFIX: Final = "SINGLE_TASK_PREFIX"
MAX_KEY_BYTES: Final = 1024
_POLICIES: Final = ("skip", "raise", "wait", "retry", "rerun")

log_acquire = logging.getLogger("single_task.acquire")
log_renew = logging.getLogger("single_task.renew")
log_release = logging.getLogger("single_task.release")


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


class SingleTaskError(Exception):
    """Base of every error this module raises; ``.key`` names the lock key when there is one.

    ``args`` is ``(message, key)`` and ``__init__`` takes exactly that, so an instance rebuilds
    from pickle and from Celery's JSON exception format alike.
    """

    def __init__(self, message: str, key: Optional[str] = None) -> None:
        super().__init__(message, key)
        self.message = message
        self.key = key

    def __str__(self) -> str:
        return self.message


class AlreadyRunning(SingleTaskError):
    """The key is held by another run: raised under ``on_busy="raise"``, after a ``"wait"`` timed
    out, for ``"retry"`` outside a worker, and by a ``with`` block (which cannot be skipped)."""


class RedisUnavailable(SingleTaskError):
    """Redis could not be asked for the lease, so the run did not happen (fail closed)."""


class ConfigurationError(SingleTaskError, ValueError):
    """An option or a key cannot work; raised as early as possible, at decoration when it can."""


class Lease:
    """One held lease: what ``with single_run(...)`` yields and ``current_lease()`` returns.

    ``key`` is the resolved key (without prefix), ``fence`` an int that grows with every
    acquisition of the key, ``lost`` turns True once this holder can no longer be sure it holds
    the key (renewal refused or not confirmed before the deadline). ``holder`` says who holds it.
    """

    __slots__ = (
        "_client",
        "_context",
        "_deadline",
        "_lost",
        "_on_lost",
        "_parent",
        "_released",
        "_renew_at",
        "_token",
        "_ttl",
        "acquired_at",
        "fail_open",
        "fence",
        "holder",
        "key",
        "redis_key",
    )

    def __init__(
        self,
        key: str,
        redis_key: str,
        token: str,
        fence: int,
        ttl: float,
        client: Any,
        deadline: float,
        holder: dict[str, Any],
        on_lost: Optional[Callable[[Lease], None]],
        fail_open: bool = False,
    ) -> None:
        self.key = key
        self.redis_key = redis_key
        self.fence = fence
        self.holder = holder
        self.acquired_at = time.time()
        self.fail_open = fail_open
        self._token = token
        self._ttl = ttl
        self._client = client
        self._deadline = deadline
        self._renew_at = deadline - ttl + ttl / 3.0
        self._lost = fail_open
        self._released = False
        self._on_lost = on_lost
        self._parent: Optional[Lease] = None
        self._context: Optional[contextvars.Token[Optional[Lease]]] = None

    @property
    def lost(self) -> bool:
        """True once the lease may have passed to someone else (read the clock, not a cache)."""
        return self._lost or time.monotonic() >= self._deadline

    @property
    def time_left(self) -> float:
        """Seconds this holder can still count on, by its own conservative clock."""
        return 0.0 if self._lost else max(0.0, self._deadline - time.monotonic())

    @property
    def ttl(self) -> float:
        return self._ttl

    def __repr__(self) -> str:
        state = "lost" if self.lost else f"{self.time_left:.1f}s left"
        return f"<Lease {self.key!r} fence={self.fence} {state}>"


class single_run:  # noqa: N801 - used like a function: @single_run(...) and with single_run(...)
    """Hold a Redis lease on ``key`` for the duration of each run.

    As a decorator (on a plain function, or *under* ``@app.task``) every call takes the lease
    first; when the key is busy, ``on_busy`` decides what happens: ``"skip"`` returns None,
    ``"raise"`` raises AlreadyRunning, ``"wait"`` blocks (at most ``timeout`` seconds) until the
    holder hands the key over, ``"retry"`` re-sends the Celery task after ``retry_countdown``
    seconds without spending its retries, and ``"rerun"`` returns None and has the holder run the
    function once more after its current run. As a context manager the key must be a plain
    string, and a busy key raises AlreadyRunning unless ``on_busy="wait"``.

    ``client`` is a redis-py client, a ``redis://``/``rediss://``/``unix://`` URL, or None to use
    ``$SINGLE_TASK_REDIS_URL``, then the current Celery app's Redis broker, then its Redis result
    backend. ``fail_open=True`` runs the body without a lease (logging a WARNING) when Redis
    cannot be reached; by default the error propagates and the body does not run.
    ``queued_ttl`` bounds how long a ``send_once`` marker outlives a message that never starts
    (default: the broker's visibility timeout, 1 hour unless configured, plus any countdown).
    ``replicas=N`` makes each acquisition wait (Redis ``WAIT``, at most ``replica_timeout``
    seconds) until N replicas have it, so a failover right after cannot lose it.
    """

    def __init__(
        self,
        key: Union[str, KeyFunc, None] = None,
        *,
        ttl: float = 30.0,
        on_busy: OnBusy = "skip",
        timeout: Optional[float] = None,
        client: Any = None,
        prefix: Optional[str] = None,
        fail_open: bool = False,
        on_lost: Optional[Callable[[Lease], None]] = None,
        retry_countdown: float = 2.0,
        queued_ttl: Optional[float] = None,
        replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        self.ttl = _check_seconds("ttl", ttl, minimum=0.01)
        self._ttl_ms = int(self.ttl * 1000)
        self._alive_ms = _alive_ms(self.ttl)
        if on_busy not in _POLICIES:
            raise ConfigurationError(
                f"on_busy={on_busy!r} is not a policy; use one of {', '.join(map(repr, _POLICIES))}"
            )
        self.on_busy: OnBusy = on_busy
        if timeout is not None:
            if on_busy != "wait":
                raise ConfigurationError(
                    f"timeout={timeout!r} only applies to on_busy='wait' (on_busy={on_busy!r} never waits)"
                )
            timeout = _check_seconds("timeout", timeout, minimum=0.0)
        self.timeout = timeout
        self.retry_countdown = _check_seconds("retry_countdown", retry_countdown, minimum=0.0)
        self.queued_ttl = None if queued_ttl is None else _check_seconds("queued_ttl", queued_ttl, minimum=0.01)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ConfigurationError(f"replicas={replicas!r} must be a whole number of replicas >= 0")
        self.replicas = replicas
        self.replica_timeout = _check_seconds("replica_timeout", replica_timeout, minimum=0.001)
        self.prefix = _check_prefix(os.environ.get(ENV_PREFIX, DEFAULT_PREFIX) if prefix is None else prefix)
        self.client = _check_client(client)
        self.fail_open = bool(fail_open)
        if on_lost is not None and not callable(on_lost):
            raise ConfigurationError(f"on_lost must be callable, not {type(on_lost).__name__}")
        self.on_lost = on_lost
        if key is not None and not isinstance(key, str) and not callable(key):
            raise ConfigurationError(f"key must be a str template or a callable, not {type(key).__name__}")
        if isinstance(key, str) and not key:
            raise ConfigurationError("key must not be empty")
        if isinstance(key, str) and not _looks_like_template(key):
            _check_key(key)
        self.key = key
        self._resolved_client: Any = None

    # -- decorator ------------------------------------------------------------------------------

    def __call__(self, fn: Optional[Callable[P, R]] = None, *extra: Any, **extra_kw: Any) -> Callable[P, Optional[R]]:
        # ``extra`` catches the calls of a bare ``@single_run`` (the function became the key, and
        # this object stands where the function should): they get the fix, not a TypeError.
        if fn is None or extra or extra_kw or not (callable(fn) or isinstance(fn, (staticmethod, classmethod))):
            raise ConfigurationError(
                f"single_run(...) decorates a function, not {'nothing' if fn is None else type(fn).__name__}; "
                "did you write @single_run without parentheses? Write @single_run()"
            )
        _check_decoratable(fn)
        inner = getattr(fn, "__single_run__", None)
        if inner is not None and inner[0].key == self.key and inner[0].prefix == self.prefix:
            raise ConfigurationError(
                f"{_name_of(fn)} is decorated twice with @single_run(key={self.key!r}): every call would "
                "wait for itself; decorate it once"
            )
        renderer = _KeyRenderer(self.key, fn)
        spec = self

        @functools.wraps(fn)
        def single_run_wrapper(*args: P.args, **kwargs: P.kwargs) -> Optional[R]:
            return _run(spec, fn, renderer, args, kwargs)

        # Celery checks call arguments with inspect.getfullargspec, which ignores __wrapped__
        # but honours __signature__: without it .delay() would accept any arguments.
        single_run_wrapper.__signature__ = renderer.signature  # type: ignore[attr-defined]
        single_run_wrapper.__single_run__ = (spec, renderer)  # type: ignore[attr-defined]
        return single_run_wrapper

    @property
    def __name__(self) -> str:
        # Celery's @app.task reads the function's __name__: under a bare @single_run it finds
        # this object instead, and the user should learn the fix rather than an AttributeError.
        if inspect.isfunction(self.key):
            raise ConfigurationError(
                f"@single_run without parentheses made {self.key.__qualname__} its key; write @single_run() "
                "(or @single_run(key=...)) under @app.task"
            )
        raise AttributeError("__name__")

    # -- context manager ------------------------------------------------------------------------

    def __enter__(self) -> Lease:
        if self.key is None or callable(self.key) or _looks_like_template(self.key):
            raise ConfigurationError(
                f"`with single_run(key=...)` needs a plain string key, not {self.key!r}: "
                "there are no function arguments to fill it from"
            )
        if self.on_busy == "rerun":
            raise ConfigurationError(
                f"on_busy='rerun' needs a decorated function to run again; a with block for "
                f"{self.key!r} cannot be rerun (use 'wait' or 'raise')",
                self.key,
            )
        lease = _acquire(self, self.key, "wait" if self.on_busy == "wait" else "raise", None)
        assert lease is not None  # "raise" and "wait" never return None
        lease._parent = _current.get()
        lease._context = _current.set(lease)
        return lease

    def __exit__(self, *exc: object) -> None:
        # `with` blocks nest, so the innermost lease of this context is the one this block took;
        # nothing is kept on self, which many threads may share.
        lease = _current.get()
        if lease is None or lease._context is None:
            raise RuntimeError(f"{self!r}: __exit__ without a matching __enter__ in this context")
        if isinstance(self.key, str) and lease.redis_key != _lease_key(self.prefix, self.key):
            raise RuntimeError(
                f"{self!r}: the innermost lease of this context is {lease.key!r}; with blocks must end "
                "in the reverse order of their start"
            )
        _current.reset(lease._context)
        if _release(lease, "abort") == _RELEASED_OWED:
            log_release.warning(
                "A rerun of %r was requested while a with block held it; a with block cannot be "
                "rerun, so that request is dropped",
                lease.key,
            )

    def __repr__(self) -> str:
        return f"single_run(key={self.key!r}, ttl={self.ttl}, on_busy={self.on_busy!r})"


def current_lease() -> Optional[Lease]:
    """The lease of the innermost run or ``with`` block in this context, or None outside one."""
    return _current.get()


def is_running(task_or_function: Any, *args: Any, **kwargs: Any) -> bool:
    """True when a run of ``task_or_function`` for these arguments holds its lease right now.

    Accepts a Celery task or a function decorated with ``@single_run``; enqueues nothing.
    Arguments the key does not use may be left out; arguments the function cannot take raise
    TypeError.
    """
    spec, renderer, bound_task = _spec_of(task_or_function)
    if bound_task is not None:
        args = (bound_task, *args)
    key = renderer.render(args, kwargs, partial=True)
    _check_key(key)
    client = _client_of(spec)
    try:
        return bool(client.exists(_lease_key(spec.prefix, key)))
    except redis.RedisError as exc:
        raise RedisUnavailable(f"could not ask Redis whether {key!r} is running: {exc}", key) from exc


def send_once(task: Any, args: Any = None, kwargs: Optional[dict[str, Any]] = None, **options: Any) -> Any:
    """``task.apply_async(args, kwargs, **options)``, unless a message for the same key is already
    waiting in the queue: then return that message's ``AsyncResult`` and send nothing.

    The key is the one ``@single_run`` derives from the same arguments. The "queued" marker is
    taken before publishing and given up when the run starts, so at most one message per key
    waits while another runs; if publishing fails the marker is removed and the error propagates.
    """
    if not hasattr(task, "apply_async"):
        raise ConfigurationError(f"send_once needs the Celery task, not {task!r}")
    spec, renderer, bound_task = _spec_of(task)
    call_args = tuple(args or ())
    call_kwargs = dict(kwargs or {})
    key = renderer.render((bound_task, *call_args) if bound_task is not None else call_args, call_kwargs)
    _check_key(key)
    client = _client_of(spec)
    keys = _keys(_lease_key(spec.prefix, key))
    task_id = options.pop("task_id", None) or str(uuid.uuid4())
    ttl = _queued_ttl(spec, task, options)
    try:
        waiting = _script(client, keys, "q", task_id, int(ttl * 1000))
    except redis.RedisError as exc:
        raise RedisUnavailable(f"could not check the queue for {key!r}, so nothing was sent: {exc}", key) from exc
    if waiting is not None:
        waiting_id = waiting.decode() if isinstance(waiting, bytes) else str(waiting)
        log_acquire.debug("Queued already %r: returning task %s", key, waiting_id)
        return task.AsyncResult(waiting_id)
    try:
        return task.apply_async(call_args, call_kwargs, task_id=task_id, **options)
    except BaseException:
        # Nothing was queued, so no marker may say so.
        with contextlib.suppress(redis.RedisError):
            _script(client, keys, "u", task_id)
        raise


def is_queued(task: Any, *args: Any, **kwargs: Any) -> bool:
    """True when a ``send_once`` message for these arguments is waiting to start."""
    spec, renderer, bound_task = _spec_of(task)
    if bound_task is not None:
        args = (bound_task, *args)
    key = renderer.render(args, kwargs, partial=True)
    _check_key(key)
    try:
        return bool(_client_of(spec).exists(_lease_key(spec.prefix, key) + ":queued"))
    except redis.RedisError as exc:
        raise RedisUnavailable(f"could not ask Redis whether {key!r} is queued: {exc}", key) from exc


# ------------------------------------------------------------------------------------------------
# The lease core
# ------------------------------------------------------------------------------------------------

# Every operation on a key is this one script, so each step of the protocol is atomic on the node
# that owns the key's hash slot. KEYS: lease hash, fence counter, wait queue, waiter details, and
# the queued marker of send_once (the id of the task message waiting in the broker).
# ARGV[1] is the operation:
#   a  acquire: take the key if free; if busy, return its PTTL and (by ARGV[6]) ask the holder
#      for a rerun or join the wait queue. A holder with the caller's Celery task id is the
#      caller's own previous attempt, releasing after self.retry(): the caller always waits (and
#      asks for a rerun too under 'rerun': the holder may be the same message, delivered again).
#   n  renew: replace the TTL, only if the caller still owns the key.
#   r  release, only by the owner: run again if a rerun is owed and ARGV[4] is 'e'; otherwise
#      delete, then hand the key straight to the first live waiter ('c' cancels a wait first).
#   x  release for an operator, whoever holds it: return the holder's fields, hand the key on.
#   q  mark a message as queued unless one already is (returns the queued task id, or nil).
#   u  unmark a message that could not be published (only if the marker is still its own).
# A run gives up its own queued marker when it starts, or when it finds the key busy and will not
# wait (its request is then served by the holder), in the same round trip as its acquire.
# A fence is the server clock in microseconds, never below the last fence issued for the key, so
# it keeps growing across expiry of the counter key and across restarts.
# A script that fails half-way keeps what it wrote, so reads come before writes and every key
# gets its expiry right after it is created: no error (an ACL missing a command, say) can leave a
# key that never expires.
_SCRIPT: Final = r"""
local lease, fkey, queue, winfo, queued = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local op, token = ARGV[1], ARGV[2]

local function expire(key, ms)
  local ok = redis.pcall('PEXPIRE', key, ms)
  if type(ok) == 'table' and ok.err then
    redis.call('DEL', key)
    error(ok.err)
  end
end

local function unqueue(tid)
  if tid ~= '' and redis.call('GET', queued) == tid then redis.call('DEL', queued) end
end

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function take(who, ttl, tid, holder, now)
  local fence = now
  local last = tonumber(redis.call('GET', fkey) or '0')
  if fence <= last then fence = last + 1 end
  local f = string.format('%.0f', fence)
  redis.call('SET', fkey, f, 'PX', tonumber(ttl) + 60000)
  redis.call('HSET', lease, 't', who, 'f', f, 'i', tid, 'h', holder,
             's', string.format('%.0f', math.floor(now / 1000)))
  expire(lease, ttl)
  return f
end

local function hand_off()
  local now = nil
  while true do
    local w = redis.call('LPOP', queue)
    if not w then return end
    local info = redis.call('HGET', winfo, w)
    if info then
      redis.call('HDEL', winfo, w)
      now = now or now_us()
      local alive, ttl, tid, holder = string.match(info, '^(%d+)|(%d+)|([^|]*)|(.*)$')
      if alive and tonumber(alive) * 1000 >= now then
        local f = take(w, ttl, tid, holder, now)
        unqueue(tid)
        local hk = lease .. ':h:' .. w
        redis.call('RPUSH', hk, f)
        expire(hk, ttl)
        return
      end
    end
  end
end

if op == 'q' then
  local cur = redis.call('GET', queued)
  if cur then return cur end
  redis.call('SET', queued, token, 'PX', ARGV[3])
  return false
end

if op == 'u' then
  unqueue(token)
  return 1
end

if op == 'n' then
  if redis.call('HGET', lease, 't') == token then
    redis.call('PEXPIRE', lease, ARGV[3])
    return 1
  end
  return 0
end

if op == 'a' then
  local ttl, tid, holder, busy = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
  local cur = redis.call('HMGET', lease, 't', 'i', 'f')
  if not cur[1] then
    local f = take(token, ttl, tid, holder, now_us())
    unqueue(tid)
    if busy == 'w' then
      redis.call('LREM', queue, 0, token)
      redis.call('HDEL', winfo, token)
    end
    return {1, f}
  end
  if cur[1] == token then
    redis.call('DEL', lease .. ':h:' .. token)
    return {1, cur[3]}
  end
  local own = 0
  if tid ~= '' and cur[2] == tid then
    -- Our own task id: a retry, or the broker delivering a running message again. Wait for the
    -- hand-off, and under 'rerun' also ask for a rerun, in case the holder runs on instead.
    own = 1
    if busy == 'r' then redis.call('HSET', lease, 'r', '1') end
    busy = 'w'
  end
  local pttl = redis.call('PTTL', lease)
  if busy ~= 'w' then unqueue(tid) end
  if busy == 'r' then
    redis.call('HSET', lease, 'r', '1')
  elseif busy == 'w' then
    local keep = 2 * tonumber(ARGV[7])
    local until_ms = string.format('%.0f', math.floor(now_us() / 1000) + tonumber(ARGV[7]))
    local wttl, qttl = redis.call('PTTL', winfo), redis.call('PTTL', queue)
    local new = redis.call('HSET', winfo, token, until_ms .. '|' .. ttl .. '|' .. tid .. '|' .. holder)
    if wttl < keep then expire(winfo, keep) end
    if new == 1 then redis.call('RPUSH', queue, token) end
    if qttl < keep then expire(queue, keep) end
  end
  return {0, pttl, own}
end

if op == 'x' then
  local cur = redis.call('HMGET', lease, 't', 'f', 'i', 'h', 's')
  if not cur[1] then return false end
  redis.call('DEL', lease)
  hand_off()
  return cur
end

local mode = ARGV[4]
if mode == 'c' then
  unqueue(ARGV[5])
  redis.call('LREM', queue, 0, token)
  redis.call('HDEL', winfo, token)
  redis.call('DEL', lease .. ':h:' .. token)
end
local cur = redis.call('HMGET', lease, 't', 'r')
if cur[1] ~= token then return 0 end
if cur[2] and mode == 'e' then
  redis.call('HDEL', lease, 'r')
  redis.call('PEXPIRE', lease, ARGV[3])
  return 2
end
redis.call('DEL', lease)
hand_off()
if cur[2] then return 3 end
return 1
"""
_SCRIPT_SHA: Final = hashlib.sha1(_SCRIPT.encode()).hexdigest()

# Release outcomes, as the script returns them.
_NOT_OWNER: Final = 0
_RELEASED: Final = 1
_RERUN: Final = 2
_RELEASED_OWED: Final = 3
_UNCONFIRMED: Final = -1  # Redis did not answer the release: it expires by itself
# How many times in a row a rerun-policy run takes its key again after finding its lease lost.
_RETAKES: Final = 3
_RELEASE_MODE: Final = {"end": "e", "abort": "a", "cancel": "c"}
_BUSY_CODE: Final = {"rerun": "r", "wait": "w"}  # what a busy acquire asks for; "t": nothing

# The longest single BLPOP of a waiter: it re-polls at least this often, which keeps its place in
# the queue alive and stays under the socket timeout of the clients built here.
_WAIT_SLICE: Final = 5.0

_current: contextvars.ContextVar[Optional[Lease]] = contextvars.ContextVar("single_task_lease", default=None)
_HOST: Final = socket.gethostname()


class _Holder:
    """Who this process is, as stored in its leases ("pid@host"); renewed in a forked child."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.text = f"{self.pid}@{_HOST}"


_holder = _Holder()
_lost_lock = threading.Lock()


_Keys = tuple[str, str, str, str, str]


def _lease_key(prefix: str, key: str) -> str:
    # The braces make the user key the Redis Cluster hash tag, and every companion key only
    # appends a suffix, so all of a key's keys share one slot even when the user key contains
    # braces (Redis hashes from the first '{' to the next '}'). A key starting with '}' would
    # make that an empty tag, which Redis ignores: such keys are tagged by a digest instead,
    # and their names start with "}" so they can never equal a name of the first form.
    if key.startswith("}"):
        return f"{prefix}}}{{{hashlib.sha1(key.encode()).hexdigest()[:16]}}}{key}"
    return f"{prefix}{{{key}}}"


def _check_key(key: str) -> None:
    """Refuse a key Redis cannot store as UTF-8 text, or one longer than MAX_KEY_BYTES."""
    try:
        size = len(key.encode())
    except UnicodeEncodeError as exc:
        raise ConfigurationError(
            f"key {key!r} is not valid Unicode text ({exc.reason} at position {exc.start}); decode "
            "the data it came from properly (for file names: os.fsdecode then .encode(errors='replace'))",
            key,
        ) from None
    if size > MAX_KEY_BYTES:
        raise ConfigurationError(
            f"key {key[:60]!r}... is {size} bytes; keys are limited to {MAX_KEY_BYTES} bytes "
            "(build it from an id, not from the data)",
            key,
        )


def _keys(redis_key: str) -> _Keys:
    return redis_key, redis_key + ":fence", redis_key + ":q", redis_key + ":w", redis_key + ":queued"


def _script(client: Any, keys: _Keys, *args: Any) -> Any:
    """Run the script by SHA; after a Redis restart emptied the cache, send it once in full."""
    try:
        return client.evalsha(_SCRIPT_SHA, 5, *keys, *args)
    except redis.exceptions.NoScriptError:
        return client.eval(_SCRIPT, 5, *keys, *args)


def _acquire(spec: single_run, key: str, policy: str, task: Any) -> Optional[Lease]:
    """Take the lease for ``key`` or apply ``policy`` ("skip", "raise", "wait", "rerun").

    Returns the lease, or None when the call should return without running.
    """
    _check_key(key)
    parent = _current.get()
    while parent is not None:
        if parent.key == key and parent.redis_key == _lease_key(spec.prefix, key) and not parent.fail_open:
            raise AlreadyRunning(
                f"{key!r} is already held by this very run (a nested call with the same key); "
                "the inner call would wait for itself",
                key,
            )
        parent = parent._parent
    client = _client_of(spec)
    redis_key = _lease_key(spec.prefix, key)
    keys = _keys(redis_key)
    token = secrets.token_hex(16)
    task_id = ""
    if task is not None:
        task_id = getattr(task.request, "id", None) or ""
    holder = {"host": _HOST, "pid": _holder.pid, "task_id": task_id or None}
    holder_id = _holder.text
    busy = _BUSY_CODE.get(policy, "t")
    alive_ms = spec._alive_ms
    # The deadline is counted from before the request is sent: the server's TTL can only have
    # started later, so this holder never believes in the lease longer than Redis keeps it.
    sent = time.monotonic()
    try:
        if spec.replicas:
            reply = _replicated(spec, key, client, keys, "a", token, spec._ttl_ms, task_id, holder_id, busy, alive_ms)
        else:
            reply = _script(client, keys, "a", token, spec._ttl_ms, task_id, holder_id, busy, alive_ms)
    except redis.RedisError as exc:
        return _redis_failed(spec, key, exc)
    if reply[0] == 1:
        taken = Lease(key, redis_key, token, int(reply[1]), spec.ttl, client, sent + spec.ttl, holder, spec.on_lost)
        _watchdog.add(taken)
        log_acquire.debug("Acquired %r fence=%s", key, taken.fence)
        return taken
    pttl, own = int(reply[1]), int(reply[2])
    if own:
        # Our own earlier attempt holds the key and is about to release it (self.retry()
        # publishes before it unwinds): wait for the hand-off rather than skip our own retry.
        lease = _wait(spec, key, client, keys, token, task_id, holder, holder_id, spec.ttl, pttl, sent)
        if lease is not None:
            return lease
        if policy == "wait":
            sent = time.monotonic()
    if policy == "wait":
        lease = _wait(spec, key, client, keys, token, task_id, holder, holder_id, spec.timeout, pttl, sent)
        if lease is not None:
            return lease
        raise AlreadyRunning(f"{key!r} is still held after waiting {spec.timeout}s", key)
    if policy == "rerun":
        log_acquire.info("Busy %r: the holder will run again after its current run", key)
        return None
    if policy == "skip":
        log_acquire.info("Busy %r: skipped (%d ms left on the holder's lease)", key, pttl)
        return None
    raise AlreadyRunning(f"{key!r} is already running (the holder's lease has {pttl} ms left)", key)


def _alive_ms(ttl: float) -> int:
    # How long a waiter's place stays valid without news from it: two wait slices and a second.
    return int(2000 * min(ttl / 4.0, _WAIT_SLICE) + 1000)


def _wait(
    spec: single_run,
    key: str,
    client: Any,
    keys: _Keys,
    token: str,
    task_id: str,
    holder: dict[str, Any],
    holder_id: str,
    timeout: Optional[float],
    pttl_ms: int,
    sent: float,
) -> Optional[Lease]:
    """Block until the releasing holder hands us the key; None after ``timeout`` seconds.

    The caller already joined the queue (same round trip as the failed acquire). Each BLPOP is
    bounded by the holder's remaining TTL, so a holder that died is noticed when its lease runs
    out, and by a slice short enough to keep our place in the queue marked alive.
    """
    handoff = keys[0] + ":h:" + token
    slice_cap = min(spec.ttl / 4.0, _WAIT_SLICE, _socket_budget(client))
    end = math.inf if timeout is None else sent + timeout
    proof = sent  # the last moment we know the key had not been handed to us yet
    while True:
        now = time.monotonic()
        if now >= end:
            try:
                _script(client, keys, "r", token, spec._ttl_ms, "c", task_id)
            except redis.RedisError as exc:
                log_acquire.warning("Could not leave the wait queue of %r: %s", key, exc)
            return None
        block = max(0.01, min(slice_cap, pttl_ms / 1000.0 + 0.002, end - now))
        sent_block = time.monotonic()
        try:
            got = client.blpop([handoff], timeout=block)
            if got is not None:
                fence = int(got[1])
                break
            proof = sent_block
            sent_poll = time.monotonic()
            reply = _script(client, keys, "a", token, spec._ttl_ms, task_id, holder_id, "w", spec._alive_ms)
        except redis.RedisError as exc:
            _script_quietly(client, keys, token, spec._ttl_ms, task_id)
            raise RedisUnavailable(f"lost touch with Redis while waiting for {key!r}: {exc}", key) from exc
        if reply[0] == 1:
            fence = int(reply[1])
            break
        proof = sent_poll
        pttl_ms = int(reply[1])
    if spec.replicas:
        # The hand-off was written by the releaser's connection; WAIT only covers our own writes,
        # so renew (a write of ours) and wait for that.
        try:
            _replicated(spec, key, client, keys, "n", token, spec._ttl_ms)
        except redis.RedisError as exc:
            _script_quietly(client, keys, token, spec._ttl_ms, task_id)
            raise RedisUnavailable(f"could not confirm the lease for {key!r} on replicas: {exc}", key) from exc
    lease = Lease(key, keys[0], token, fence, spec.ttl, client, proof + spec.ttl, holder, spec.on_lost)
    _watchdog.add(lease)
    log_acquire.debug("Acquired %r by hand-off, fence=%s", key, fence)
    return lease


def _replicated(spec: single_run, key: str, client: Any, keys: _Keys, op: str, token: str, *args: Any) -> Any:
    """Run the script and ``WAIT`` for ``spec.replicas`` replicas in the same round trip.

    A lease taken but not acknowledged in time is given back, and the run fails closed.
    """
    # WAIT counts the replicas that have this connection's writes, so both go to the node that
    # owns the key (on a cluster, the client of that one node) in one pipeline.
    node = _node_client(client, keys[0])
    pipe = node.pipeline(transaction=False)
    pipe.evalsha(_SCRIPT_SHA, 5, *keys, op, token, *args)
    pipe.execute_command("WAIT", spec.replicas, int(spec.replica_timeout * 1000))
    reply, acked = pipe.execute(raise_on_error=False)
    if isinstance(reply, redis.exceptions.NoScriptError):
        reply = _script(node, keys, op, token, *args)
        acked = node.execute_command("WAIT", spec.replicas, int(spec.replica_timeout * 1000))
    for result in (reply, acked):
        if isinstance(result, Exception):
            raise result
    if int(acked) < spec.replicas and (op == "n" or reply[0] == 1):
        _script(client, keys, "r", token, spec._ttl_ms, "a")
        raise redis.exceptions.ConnectionError(
            f"only {acked} of {spec.replicas} replica(s) acknowledged the lease within {spec.replica_timeout}s"
        )
    return reply


def _node_client(client: Any, redis_key: str) -> Any:
    """The client to pipeline scripts for ``redis_key`` through: on a Redis Cluster the plain
    client of the node that owns its slot (redis-py's cluster pipeline refuses EVALSHA)."""
    get_node = getattr(client, "get_node_from_key", None)
    if get_node is None:
        return client
    return client.get_redis_connection(get_node(redis_key))


def _script_quietly(client: Any, keys: _Keys, token: str, ttl_ms: int, task_id: str) -> None:
    # Redis is what failed; if this does not get through either, our queue entry expires by itself.
    with contextlib.suppress(redis.RedisError):
        _script(client, keys, "r", token, ttl_ms, "c", task_id)


def _socket_budget(client: Any) -> float:
    # A BLPOP longer than the client's socket timeout would fail with TimeoutError.
    try:
        socket_timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
    except AttributeError:
        return _WAIT_SLICE
    return _WAIT_SLICE if not socket_timeout else max(0.05, float(socket_timeout) * 0.8)


def _release(lease: Lease, mode: str, warn: bool = True) -> int:
    """Give the lease back (owner-checked); returns one of the _RELEASED... outcomes."""
    if lease.fail_open:
        return _RELEASED
    lease._released = True  # from here on a refused renewal is ours, not a loss
    sent = time.monotonic()
    try:
        outcome = int(
            _script(
                lease._client, _keys(lease.redis_key), "r", lease._token, int(lease._ttl * 1000), _RELEASE_MODE[mode]
            )
        )
    except redis.RedisError as exc:
        _watchdog.discard(lease)
        if warn:
            log_release.warning(
                "Could not release %r (%s); it expires by itself within %.1fs", lease.key, exc, lease.time_left
            )
        return _UNCONFIRMED
    if outcome == _RERUN:
        lease._deadline = sent + lease._ttl
        lease._renew_at = sent + lease._ttl / 3.0
        lease._released = False
        _watchdog.add(lease)  # a retried release may have dropped it from the watchdog
        return _RERUN
    _watchdog.discard(lease)
    if outcome == _NOT_OWNER:
        _lose(lease, "at release the key was gone or held by another owner")
    elif time.monotonic() >= lease._deadline:
        _lose(lease, "the run outlived the lease's confirmed deadline")
    else:
        log_release.debug("Released %r", lease.key)
    return outcome


def _lose(lease: Lease, reason: str) -> None:
    """Mark the lease lost and report it once: a WARNING and the user's on_lost callback."""
    with _lost_lock:
        if lease._lost:
            return
        lease._lost = True
    log_renew.warning("Lease on %r (fence %s) was lost: %s", lease.key, lease.fence, reason)
    if lease._on_lost is not None:
        try:
            lease._on_lost(lease)
        except Exception:
            log_renew.exception("on_lost callback for %r raised", lease.key)


def _redis_failed(spec: single_run, key: str, exc: Exception) -> Optional[Lease]:
    # fail_open is for an outage. Redis refusing the credentials or a command is a configuration
    # that will not heal by itself: running unlocked would hide it, so that always fails closed.
    outage = isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)) and not isinstance(
        exc, (redis.exceptions.AuthenticationError, getattr(redis.exceptions, "AuthorizationError", ()))
    )
    if not spec.fail_open or not outage:
        raise RedisUnavailable(
            f"could not take the lease for {key!r}, so it did not run: {type(exc).__name__}: {exc}", key
        ) from exc
    log_acquire.warning("Redis failed (%s); running %r WITHOUT a lease (fail_open=True)", exc, key)
    holder = {"host": _HOST, "pid": _holder.pid, "task_id": None}
    return Lease(key, _lease_key(spec.prefix, key), "", 0, spec.ttl, None, math.inf, holder, None, fail_open=True)


class _Watchdog:
    """One thread per process renews every lease the process holds.

    It wakes when the first lease is due (a third of its TTL after its last confirmation) and
    renews, with it, every lease that would be due within the next sixth of its TTL: one
    pipeline per Redis node. Leases renewed together stay together, so a thousand leases cost a
    round trip or two per renewal period, not one per lease.
    """

    _IDLE: Final = 30.0

    def __init__(self) -> None:
        self._leases: dict[int, Lease] = {}
        self._twins: dict[int, tuple[Any, Any]] = {}
        self._cond = threading.Condition(threading.Lock())
        self._wake_at = math.inf
        self._thread: Optional[threading.Thread] = None
        self._pid = os.getpid()

    def add(self, lease: Lease) -> None:
        self._leases[id(lease)] = lease
        with self._cond:
            if self._thread is None:
                self._thread = _start_thread(self._loop, "single_task-watchdog")
            if lease._renew_at < self._wake_at:
                self._cond.notify()

    def discard(self, lease: Lease) -> None:
        self._leases.pop(id(lease), None)

    def _loop(self) -> None:
        while self._pid == os.getpid():
            try:
                self._tick()
            except Exception:  # never let one bad round end renewal for the whole process
                log_renew.exception("watchdog round failed")
                time.sleep(0.1)

    def _tick(self) -> None:
        with self._cond:
            now = time.monotonic()
            leases = list(self._leases.values())
            first = min((le._renew_at for le in leases), default=now + self._IDLE)
            if first > now:
                self._wake_at = first
                self._cond.wait(first - now)
                self._wake_at = math.inf
                return
        due = [le for le in leases if le._renew_at - le._ttl / 6.0 <= now]
        by_node: dict[int, tuple[Any, list[Lease]]] = {}
        for lease in due:
            node = self._own_client(_node_client(lease._client, lease.redis_key))
            by_node.setdefault(id(node), (node, []))[1].append(lease)
        for node, group in by_node.values():
            self._renew(node, group)
        now = time.monotonic()
        for lease in leases:
            if now >= lease._deadline and not lease._released:
                self.discard(lease)
                _lose(lease, f"renewal not confirmed within its {lease._ttl}s lease")

    def _own_client(self, client: Any) -> Any:
        """The client the watchdog sends through. Under gevent it is a twin with a pool of its
        own: the watchdog is a real OS thread, and a gevent socket opened by a greenlet of the
        main thread cannot be used from another thread ("Cannot switch to a different thread")."""
        if not _gevent_sockets():
            return client
        found = self._twins.get(id(client))
        if found is None:
            twin = client
            pool: Any = getattr(client, "connection_pool", None)
            if type(pool) in (redis.ConnectionPool, redis.BlockingConnectionPool):  # not Sentinel's
                with contextlib.suppress(Exception):
                    twin = type(client)(connection_pool=type(pool)(connection_class=pool.connection_class,
                                                                   **pool.connection_kwargs))
            found = self._twins[id(client)] = (client, twin)  # the client is kept so its id stays its own
        return found[1]

    def _renew(self, node: Any, group: list[Lease]) -> None:
        sent = time.monotonic()
        try:
            pipe = node.pipeline(transaction=False)
            for lease in group:
                pipe.evalsha(_SCRIPT_SHA, 5, *_keys(lease.redis_key), "n", lease._token, int(lease._ttl * 1000))
            replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            log_renew.warning("Could not renew %d lease(s): %s; retrying", len(group), exc)
            for lease in group:
                lease._renew_at = time.monotonic() + min(lease._ttl / 10.0, 0.5)
            return
        for lease, reply in zip(group, replies):
            if lease._released:
                continue
            if isinstance(reply, redis.RedisError):
                # NOSCRIPT after a restart, or MOVED after a cluster reshard: once more on its own,
                # through the lease's client, which loads the script or follows the move.
                try:
                    reply = _script(lease._client, _keys(lease.redis_key), "n", lease._token, int(lease._ttl * 1000))
                except redis.RedisError as exc:
                    reply = exc
            if isinstance(reply, Exception):
                log_renew.warning("Could not renew %r: %s", lease.key, reply)
                lease._renew_at = time.monotonic() + min(lease._ttl / 10.0, 0.5)
            elif int(reply) == 1:
                lease._deadline = sent + lease._ttl
                lease._renew_at = sent + lease._ttl / 3.0
                log_renew.debug("Renewed %r", lease.key)
            else:
                self.discard(lease)
                _lose(lease, "at renewal the key was gone or held by another owner")


def _gevent_sockets() -> bool:
    """True when gevent has patched ``socket`` in this process."""
    if "gevent" not in sys.modules:
        return False
    try:
        from gevent import monkey
    except ImportError:
        return False
    return bool(monkey.is_module_patched("socket"))


def _start_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """Start a daemon OS thread, a real one even when gevent has patched ``threading``."""
    if "gevent" in sys.modules:
        try:
            from gevent import monkey

            if monkey.is_module_patched("threading"):
                start_new = monkey.get_original("_thread", "start_new_thread")
                start_new(target, ())
                # Not joinable, but not None either: the watchdog must see it as started, or it
                # starts a new OS thread for every lease.
                return threading.main_thread()
        except ImportError:
            pass
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


_watchdog = _Watchdog()


def _after_fork_in_child() -> None:
    # Leases belong to the process that took them: a forked child neither renews nor releases
    # them, and starts its own watchdog when it takes its first lease.
    global _watchdog, _holder
    _watchdog = _Watchdog()
    _holder = _Holder()
    _current.set(None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- clients -------------------------------------------------------------------------------------

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()
_URL_SCHEMES: Final = ("redis://", "rediss://", "unix://")


def _check_client(client: Any) -> Any:
    if client is None:
        return None
    if isinstance(client, str):
        return _check_url(client, "client URL")
    if inspect.isclass(client):
        raise ConfigurationError(
            f"client must be a client instance, not the class {client.__name__}: "
            f"pass {client.__name__}(...) or {client.__name__}.from_url(...)"
        )
    evalsha = getattr(client, "evalsha", None)
    if not callable(evalsha):
        raise ConfigurationError(f"client must be a redis-py client or a Redis URL, not {type(client).__name__}")
    if inspect.iscoroutinefunction(evalsha) or type(client).__module__.startswith("redis.asyncio"):
        raise ConfigurationError(
            f"client {type(client).__module__}.{type(client).__name__} is an asyncio client; single_run holds "
            "its lease around a blocking call and needs a blocking one (redis.Redis, redis.RedisCluster)"
        )
    return client


def _check_url(url: str, what: str) -> str:
    """Refuse a URL that is not Redis's or that redis-py cannot parse, naming where it came from."""
    if not url.startswith(_URL_SCHEMES):
        raise ConfigurationError(f"{what} {_redact(url)!r} is not a Redis URL; use redis://, rediss:// or unix://")
    try:
        redis.ConnectionPool.from_url(url)  # parses only; connects nothing
    except ValueError as exc:
        raise ConfigurationError(f"{what} {_redact(url)!r} cannot be parsed: {exc}") from None
    return url


def _client_of(spec: single_run) -> Any:
    client = spec._resolved_client
    if client is None:
        client = spec.client
        if client is None:
            client = _default_url()
        if isinstance(client, str):
            client = _client_for_url(client)
        spec._resolved_client = client
    return client


def _client_for_url(url: str) -> Any:
    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            # redis-py pools notice a fork by pid and reconnect in the child, so one pool per URL
            # per process is safe. Timeouts keep a dead or paused server from hanging a run. One
            # immediate retry reconnects a dropped connection (not a timeout: a silent server
            # would cost two); redis-py's default, up to ten retries with backoff, would hold a
            # release or renewal past the lease it serves.
            retry = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
            client = redis.Redis.from_url(url, socket_connect_timeout=5.0, socket_timeout=10.0, retry=retry)
            _clients[url] = client
        return client


def _default_url() -> str:
    tried = [f"${ENV_URL} (unset)"]
    url = os.environ.get(ENV_URL)
    if url:
        return _check_url(url, f"${ENV_URL}")
    try:
        from celery import current_app

        conf = current_app.conf
        for name in ("broker_url", "result_backend"):
            value = conf.get(name)
            first = _first_url(value)
            if first and first.startswith(_URL_SCHEMES):
                return first
            if first and first.startswith("redis+socket://"):
                return "unix://" + first[len("redis+socket://") :]
            tried.append(f"Celery {name} ({_redact(first) if first else 'unset'}: not Redis)")
    except ImportError:
        tried.append("Celery (not installed)")
    raise ConfigurationError("no Redis to hold leases: pass client=..., or set one of: " + "; ".join(tried))


def _first_url(value: Any) -> Optional[str]:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, str) and value:
        return value.split(";")[0].strip()
    return None


def _redact(url: str) -> str:
    head, sep, tail = url.partition("@")
    if not sep:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://***@{tail}"


# -- keys ----------------------------------------------------------------------------------------

_formatter = string.Formatter()


def _template_fields(template: str) -> list[str]:
    return [field for _, field, _, _ in _formatter.parse(template) if field is not None]


def _looks_like_template(key: str) -> bool:
    try:
        return bool(_template_fields(key))
    except ValueError:
        return False  # not a valid template, so a literal key


class _KeyRenderer:
    """Turns a call's arguments into its key, checked against the signature at decoration time.

    A call's arguments are checked against the signature before any lock is asked for, and
    template fields are looked up positionally or by name, both without ``Signature.bind``
    (slow on every call); the full bind only runs to produce Python's own TypeError.
    """

    def __init__(self, key: Union[str, KeyFunc, None], fn: Callable[..., Any]) -> None:
        qualname = getattr(fn, "__qualname__", None)
        self.name = f"{getattr(fn, '__module__', None) or '?'}.{qualname}" if qualname else repr(fn)
        self.signature = inspect.signature(fn)
        self.func: Optional[KeyFunc] = None
        self.constant: Optional[str] = None
        self.template = ""
        self.lookups: list[tuple[str, int, Any]] = []
        self._plan_arguments()
        if key is None:
            if not qualname:
                raise ConfigurationError(
                    f"{fn!r} has no __qualname__ to name its default key after; pass key=... explicitly"
                )
            self.constant = self.name
        elif callable(key):
            self._check_key_callable(key)
            self.func = key
        else:
            self._plan(key)

    def _plan_arguments(self) -> None:
        kinds = inspect.Parameter
        params = list(self.signature.parameters.values())
        positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
        varargs = any(p.kind == kinds.VAR_POSITIONAL for p in params)
        varkw = any(p.kind == kinds.VAR_KEYWORD for p in params)
        self.max_positional = None if varargs else len(positional)
        self.by_name = None if varkw else {p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD,
                                                                                kinds.KEYWORD_ONLY)}
        self.positional_names = tuple(p.name for p in positional if p.kind == kinds.POSITIONAL_OR_KEYWORD)
        # Required positional parameters come first, so a call with at least that many positional
        # arguments has them all: the common case costs one comparison.
        self.required = [p.name for p in positional if p.default is p.empty]
        self.required_kw = [p.name for p in params if p.kind == kinds.KEYWORD_ONLY and p.default is p.empty]

    def check_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any], partial: bool = False) -> None:
        """Raise Python's own TypeError for arguments the function cannot take (``partial``: a
        call that may leave out required arguments, as is_running and is_queued allow)."""
        n = len(args)
        fits = self.max_positional is None or n <= self.max_positional
        if fits and kwargs:
            fits = (self.by_name is None or all(name in self.by_name for name in kwargs)) and not any(
                name in kwargs for name in self.positional_names[:n]
            )
        if fits and not partial:
            if n < len(self.required):
                fits = all(name in kwargs for name in self.required[n:])
            if fits and self.required_kw:
                fits = all(name in kwargs for name in self.required_kw)
        if not fits:
            (self.signature.bind_partial if partial else self.signature.bind)(*args, **kwargs)

    def _check_key_callable(self, func: KeyFunc) -> None:
        try:
            key_signature = inspect.signature(func)
        except (TypeError, ValueError):
            return  # a builtin without a signature: found out at the first call
        kinds = inspect.Parameter
        params = list(self.signature.parameters.values())
        positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
        keyword_only = {p.name: None for p in params if p.kind == kinds.KEYWORD_ONLY}
        required = [p for p in positional if p.default is p.empty]
        calls = [
            ([None] * len(positional), keyword_only),  # every argument, passed positionally
            ([None] * len(required), {p.name: None for p in params if p.kind == kinds.KEYWORD_ONLY and
                                      p.default is p.empty}),  # the required ones only
            ([None] * sum(p.kind == kinds.POSITIONAL_ONLY for p in positional),  # by name where possible
             {**{p.name: None for p in positional if p.kind == kinds.POSITIONAL_OR_KEYWORD}, **keyword_only}),
        ]
        for call_args, call_kwargs in calls:
            try:
                key_signature.bind(*call_args, **call_kwargs)
            except TypeError as exc:
                raise ConfigurationError(
                    f"the key callable {_name_of(func)}{key_signature} of {self.name} cannot take the arguments "
                    f"of {self.name}{self.signature} ({exc}); give it the same parameters, or *args and **kwargs"
                ) from None

    def _plan(self, template: str) -> None:
        params = self.signature.parameters
        try:
            parsed = list(_formatter.parse(template))
        except ValueError as exc:
            raise ConfigurationError(f"key template {template!r} of {self.name} is malformed: {exc}") from exc
        fields = [field for _, field, _, _ in parsed if field is not None]
        if not fields:
            self.constant = template
            _check_key(template)
            return
        for _, field, _, conversion in parsed:
            if conversion not in (None, "r", "s", "a"):
                raise ConfigurationError(
                    f"key template {template!r} of {self.name} has an unknown conversion !{conversion} in "
                    f"{{{field}!{conversion}}}; use !r, !s or !a, or none"
                )
        roots: list[str] = []
        for field in fields:
            root = field.split(".", 1)[0].split("[", 1)[0]
            if not root or root.isdigit():
                raise ConfigurationError(
                    f"key template {template!r} of {self.name} has a positional field {{{field}}}; "
                    f"name the parameter instead, e.g. {{{next(iter(params), 'arg')}}}"
                )
            if root not in params:
                raise ConfigurationError(
                    f"key field {{{field}}} of {self.name} names no parameter; "
                    f"its parameters are: {', '.join(params) or '(none)'}"
                )
            kind = params[root].kind
            if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                raise ConfigurationError(
                    f"key field {{{field}}} of {self.name} names *{root}; use a key callable for variadic arguments"
                )
            if root not in roots:
                roots.append(root)
        self.template = template
        positional = [p.name for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for root in roots:
            p = params[root]
            index = positional.index(root) if root in positional else -1
            self.lookups.append((root, index, p.default))

    def render(self, args: tuple[Any, ...], kwargs: dict[str, Any], partial: bool = False) -> str:
        self.check_arguments(args, kwargs, partial)
        if self.constant is not None:
            return self.constant
        if self.func is not None:
            try:
                key = self.func(*args, **kwargs)
            except Exception as exc:
                raise ConfigurationError(f"the key callable of {self.name} raised {type(exc).__name__}: {exc}") from exc
            if not isinstance(key, str) or not key:
                raise ConfigurationError(f"the key callable of {self.name} must return a non-empty str, not {key!r}")
            return key
        values: dict[str, Any] = {}
        for name, index, default in self.lookups:
            if 0 <= index < len(args):
                values[name] = args[index]
            elif name in kwargs:
                values[name] = kwargs[name]
            elif default is not inspect.Parameter.empty:
                values[name] = default
            else:  # only a partial call gets here
                raise TypeError(f"{self.name}() missing argument {name!r}, which its key needs")
        try:
            key = self.template.format_map(values)
        except (AttributeError, LookupError, ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"could not build key {self.template!r} of {self.name}: {type(exc).__name__}: {exc}"
            ) from exc
        if not key:
            raise ConfigurationError(f"key {self.template!r} of {self.name} rendered empty")
        return key


# -- validation ----------------------------------------------------------------------------------


def _check_seconds(name: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be a number of seconds, not {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < minimum or (minimum > 0 and seconds <= 0):
        raise ConfigurationError(f"{name}={value!r} is out of range: it must be a finite number >= {minimum}s")
    return seconds


def _check_prefix(prefix: Any) -> str:
    if not isinstance(prefix, str):
        raise ConfigurationError(f"prefix must be a str, not {type(prefix).__name__}")
    if "{" in prefix or "}" in prefix:
        raise ConfigurationError(f"prefix {prefix!r} must not contain braces: they decide Redis Cluster slots")
    return prefix


def _name_of(fn: Any) -> str:
    qualname = getattr(fn, "__qualname__", None)
    return qualname if isinstance(qualname, str) else repr(fn)


def _check_decoratable(fn: Any) -> None:
    if isinstance(fn, (staticmethod, classmethod)):
        kind = type(fn).__name__
        raise ConfigurationError(
            f"@single_run is applied to a {kind} object; put @{kind} above @single_run:\n"
            f"    @{kind}\n    @single_run(...)\n    def ..."
        )
    if hasattr(fn, "apply_async") and hasattr(fn, "run"):
        raise ConfigurationError(
            f"@single_run is above @app.task on {getattr(fn, 'name', fn)!r}; put it below, so "
            "that it wraps the function the worker runs:\n    @app.task\n    @single_run(...)\n    def ..."
        )
    if inspect.isclass(fn):
        raise ConfigurationError(f"@single_run decorates functions, not the class {fn.__qualname__}")
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise ConfigurationError(
            f"{_name_of(fn)} is a coroutine function; single_run holds a lease for a blocking "
            "call and does not support async functions"
        )
    if inspect.isgeneratorfunction(fn):
        raise ConfigurationError(
            f"{_name_of(fn)} is a generator function: its body runs after the call returns, "
            "outside the lease; decorate a function that does the work"
        )


# ------------------------------------------------------------------------------------------------
# Celery glue
# ------------------------------------------------------------------------------------------------


_task_getter: list[Callable[[], Any]] = []  # celery's get_current_task, imported at the first call


def _current_task() -> Any:
    """The Celery task executing in this thread, or None (and None when Celery is absent)."""
    if not _task_getter:
        # Imported once, lazily: a plain decorated function never pays for importing Celery, and
        # every call after the first skips the import machinery (microseconds on the hot path).
        try:
            from celery._state import get_current_task
        except ImportError:
            _task_getter.append(lambda: None)
        else:
            _task_getter.append(get_current_task)
    task = _task_getter[0]()
    if task is None or task.request.called_directly:
        return None
    return task


def _run(
    spec: single_run, fn: Callable[..., R], renderer: _KeyRenderer, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Optional[R]:
    """One decorated call: acquire, run (again, while reruns are owed), release."""
    key = renderer.render(args, kwargs)
    task = _current_task()
    policy = spec.on_busy
    lease: Optional[Lease] = None
    if policy == "retry":
        if task is None or task.request.is_eager:
            policy = "raise"  # no broker to re-send through: the caller sees AlreadyRunning
        else:
            try:
                lease = _acquire(spec, key, "raise", task)
            except AlreadyRunning as exc:
                raise _busy_retry(spec, task, exc) from None
    if policy != "retry":
        lease = _acquire(spec, key, policy, task)
    if lease is None:
        return None
    lease._parent = _current.get()
    context_token = _current.set(lease)
    retakes = 0
    try:
        while True:
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                if _release(lease, "abort") == _RELEASED_OWED:
                    _pass_on_rerun(spec, fn, lease, task, args, kwargs, exc)
                raise
            outcome = _release(lease, "end")
            if outcome == _UNCONFIRMED and policy == "rerun":
                outcome = _release_patiently(lease)
            if outcome == _RERUN:
                retakes = 0
                log_acquire.info("Running %r again: a rerun was requested during the last run", key)
                continue
            if policy != "rerun" or outcome not in (_NOT_OWNER, _UNCONFIRMED) or retakes >= _RETAKES:
                return result
            # Rerun requests are kept in the lease, so a lost lease may have taken some with it.
            # Take the key again and run, or (busy) pass a request on to whoever holds it now.
            retakes += 1
            _current.reset(context_token)  # the lost lease is no longer ours: not a nested use
            context_token = _current.set(lease._parent)
            again = _retake(spec, key, task)
            if again is None:
                return result
            log_acquire.info("Running %r again: its lease was lost, and rerun requests with it", key)
            again._parent = lease._parent
            lease = again
            _current.reset(context_token)
            context_token = _current.set(lease)
    finally:
        _current.reset(context_token)


def _release_patiently(lease: Lease) -> int:
    """Retry a release that Redis did not answer while the lease may still be alive there: only
    its holder can see a rerun it owes. (A release that did get through retries as NOT_OWNER.)"""
    outcome = _UNCONFIRMED
    while outcome == _UNCONFIRMED and time.monotonic() < lease._deadline:
        time.sleep(0.05)
        outcome = _release(lease, "end", warn=False)
    return outcome


def _retake(spec: single_run, key: str, task: Any) -> Optional[Lease]:
    """After a lost lease, take the key again, or ask its new holder for a rerun (None). Redis may
    be restarting: keep trying for one ttl before giving up with a WARNING."""
    give_up = time.monotonic() + spec.ttl
    while True:
        try:
            return _acquire(spec, key, "rerun", task)
        except RedisUnavailable as exc:
            if time.monotonic() >= give_up:
                log_release.warning(
                    "Lease on %r was lost, and reruns requested during the run may be lost with it: %s",
                    key, exc.message,
                )
                return None
        time.sleep(0.1)


def _busy_retry(spec: single_run, task: Any, exc: AlreadyRunning) -> Any:
    """Re-send the current Celery task after ``retry_countdown`` seconds, as Task.retry does,
    but without counting the attempt against the task's own ``max_retries``."""
    from celery.exceptions import Retry

    countdown = spec.retry_countdown * random.uniform(0.5, 1.5)  # spread a herd of retries
    request = task.request
    sig = task.signature_from_request(request, None, None, countdown=countdown, retries=request.retries)
    sig.apply_async()
    return Retry(exc=exc, when=countdown, sig=sig)


def _pass_on_rerun(
    spec: single_run,
    fn: Callable[..., Any],
    lease: Lease,
    task: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    exc: BaseException,
) -> None:
    """A run that owed a rerun raised: the request must still be served by a later run."""
    from celery.exceptions import Retry

    if isinstance(exc, Retry) and getattr(exc, "sig", None) is not None:
        return  # the retry already queued is a later run
    if task is not None and not task.request.is_eager:
        call_args = args[1:] if args and args[0] is task else args
        task.apply_async(call_args, kwargs)
        log_release.warning(
            "Run of %r raised %s; the rerun it owed was sent as a new task", lease.key, type(exc).__name__
        )
        return
    log_release.warning(
        "Run of %r raised %s; the rerun it owed is dropped (outside a worker there is nobody to run it)",
        lease.key,
        type(exc).__name__,
    )


def _queued_ttl(spec: single_run, task: Any, options: dict[str, Any]) -> float:
    """How long a queued marker may outlive a message that never starts.

    A message not started within the broker's visibility timeout is redelivered (Redis and SQS
    brokers), so the marker lasts that long; a countdown or eta adds its delay.
    """
    ttl = spec.queued_ttl
    if ttl is None:
        transport = task.app.conf.broker_transport_options or {}
        ttl = float(transport.get("visibility_timeout", 3600))
    delay = options.get("countdown") or 0.0
    eta = options.get("eta")
    if eta is not None:
        now = datetime.datetime.now(eta.tzinfo) if eta.tzinfo else datetime.datetime.now()
        delay = max(delay, (eta - now).total_seconds())
    return float(ttl) + max(0.0, float(delay))


def _spec_of(obj: Any) -> tuple[single_run, _KeyRenderer, Any]:
    """The single_run behind a decorated function or Celery task, and the task if it is bound."""
    run = getattr(obj, "run", None) if hasattr(obj, "apply_async") else obj
    found = getattr(run, "__single_run__", None)
    if found is None:
        raise ConfigurationError(f"{obj!r} is not decorated with @single_run")
    spec, renderer = found
    bound = obj if inspect.ismethod(run) else None
    return spec, renderer, bound


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

_CLI_HELP: Final = """\
Look at and manage the leases that @single_run holds in Redis.

A lease is held while a run of a key is in progress; it carries who holds it (host, pid, Celery
task id), since when, how long it has left unless renewed, and its fence. A "queued" marker says
that send_once() has a message for the key waiting in the broker.

Redis is found as the library finds it: --url, else $SINGLE_TASK_REDIS_URL, else the Redis
broker_url or result_backend of the Celery app given with -A (as for `celery -A`).
"""

_CLI_EPILOG: Final = """\
exit codes:
  0  success: listed; KEY is held (show); released (release); KEY is free (wait)
  1  the negative answer: KEY is not held (show, release); still held at --timeout (wait)
  2  usage or configuration error, Redis unreachable, or release without --force

examples:
  python -m single_task --url redis://localhost:6379/0 list
  python -m single_task -A proj.celery list 'sync:*' --json
  python -m single_task show sync:42
  python -m single_task release sync:42 --force
  python -m single_task wait nightly-report --timeout 600 && ./publish.sh
"""

_EXIT_OK: Final = 0
_EXIT_NO: Final = 1
_EXIT_ERROR: Final = 2


class _CliError(Exception):
    """A one-line error for the operator; main() prints it and exits with status 2."""


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m single_task``: list, show, release or wait for leases. Returns the exit code."""
    parser = _cli_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return _EXIT_ERROR
    try:
        prefix = _check_prefix(args.prefix if args.prefix is not None else os.environ.get(ENV_PREFIX, DEFAULT_PREFIX))
        client = _cli_client(args)
        command: Callable[[Any, str, Any], int] = args.run
        return command(client, prefix, args)
    except KeyboardInterrupt:
        return 130
    except _CliError as exc:
        message = str(exc)
    except SingleTaskError as exc:
        message = exc.message
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        message = f"cannot reach Redis at {getattr(args, 'where', '?')}: {exc}"
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        message = f"Redis at {getattr(args, 'where', '?')} answered with an error: {type(exc).__name__}: {exc}"
    print(f"single_task: {' '.join(message.split())}", file=sys.stderr)
    return _EXIT_ERROR


def _cli_parser() -> Any:
    import argparse

    def options(parser: Any, default: Any) -> None:
        # On the main parser and on every command, so that options may come before or after it;
        # the commands' defaults are SUPPRESS so they never overwrite what came first.
        parser.add_argument("--url", default=default, metavar="URL",
                            help="the Redis to use: redis://[:password@]host:port/db, rediss:// or unix://")
        parser.add_argument("-A", "--app", default=default, metavar="APP",
                            help="a Celery app, as for `celery -A`, whose Redis broker or backend to use")
        parser.add_argument("--cluster", action="store_true", default=default if default is not None else False,
                            help="the URL names a node of a Redis Cluster: use redis-py's RedisCluster")
        parser.add_argument("--prefix", default=default, metavar="PREFIX",
                            help=f"the key prefix of single_run(prefix=...) (default: ${ENV_PREFIX} or "
                                 f"{DEFAULT_PREFIX!r})")

    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m single_task", description=_CLI_HELP, epilog=_CLI_EPILOG,
                                     formatter_class=formatter)
    options(parser, None)
    parser.set_defaults(command=None)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, run: Callable[[Any, str, Any], int], summary: str, details: str) -> Any:
        sub = commands.add_parser(name, help=summary, description=f"{summary}\n\n{details}",
                                  epilog=_CLI_EPILOG, formatter_class=formatter)
        options(sub, argparse.SUPPRESS)
        sub.set_defaults(command=name, run=run)
        return sub

    sub = command("list", _cli_list, "List every held lease and queued marker.",
                  "Walks the keyspace with SCAN (never KEYS), so it is safe on a busy Redis. PATTERN is\n"
                  "matched against the keys as you passed them to single_run, with * ? [abc] [^abc].")
    sub.add_argument("pattern", nargs="?", default="*", metavar="PATTERN", help="only keys matching this (default *)")
    sub.add_argument("--json", action="store_true", help="print one JSON array, for scripts")
    sub.add_argument("--count", type=int, default=1000, metavar="N", help="SCAN COUNT per round trip (default 1000)")

    sub = command("show", _cli_show, "Show who holds KEY, and its queued marker and waiters.",
                  "Exits 0 if KEY is held, 1 if it is not.")
    sub.add_argument("key", metavar="KEY", help="the key as passed to single_run (what `list` prints)")
    sub.add_argument("--json", action="store_true", help="print one JSON object, for scripts")

    sub = command("release", _cli_release, "Delete the lease of KEY (needs --force); print what was removed.",
                  "The holder is not stopped: its next renewal finds the lease gone and reports it lost\n"
                  "(lease.lost, on_lost). A rerun it owed is dropped; the first waiting run is handed the\n"
                  "key at once. Without --force it only shows the holder and exits 2.")
    sub.add_argument("key", metavar="KEY", help="the key as passed to single_run (what `list` prints)")
    sub.add_argument("--force", action="store_true", help="really delete the lease")

    sub = command("wait", _cli_wait, "Block until nobody holds KEY (exit 0), for shell scripts.",
                  "Polls the lease every --interval seconds. A key handed straight from one run to a\n"
                  "waiting one never counts as free. Exits 1 if KEY is still held after --timeout.")
    sub.add_argument("key", metavar="KEY", help="the key as passed to single_run (what `list` prints)")
    sub.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="give up after this long")
    sub.add_argument("--interval", type=float, default=0.2, metavar="SECONDS", help="poll period (default 0.2)")
    return parser


def _cli_client(args: Any) -> Any:
    if args.app:
        try:
            from celery.app.utils import find_app
        except ImportError as exc:
            raise _CliError("-A needs Celery installed") from exc
        try:
            find_app(args.app).set_current()
        except Exception as exc:
            raise _CliError(f"could not load the Celery app {args.app!r}: {type(exc).__name__}: {exc}") from exc
    if args.url:
        url = args.url
    else:
        try:
            url = _default_url()
        except ConfigurationError as exc:
            tried = exc.message.rpartition("set one of: ")[2]
            raise _CliError(f"no Redis to look at: pass --url or -A APP, or set ${ENV_URL} (tried: {tried})") from exc
    args.where = _redact(url)
    if not url.startswith(_URL_SCHEMES):
        raise _CliError(f"{args.where!r} is not a Redis URL; use redis://, rediss:// or unix://")
    if args.cluster:
        if url.startswith("unix://"):
            raise _CliError("--cluster needs a redis:// or rediss:// URL of one cluster node")
        try:
            client = cast(Any, redis.RedisCluster).from_url(url, socket_connect_timeout=5.0, socket_timeout=10.0)
        except redis.exceptions.RedisClusterException as exc:  # it connects to discover the nodes
            raise _CliError(f"cannot reach the Redis Cluster at {args.where}: {exc}") from exc
    else:
        client = _client_for_url(url)
        client.ping()  # one clear error now, rather than one in the middle of the output
    return client


def _cli_list(client: Any, prefix: str, args: Any) -> int:
    import re

    if args.count < 1:
        raise _CliError("--count must be at least 1")
    wanted = re.compile(_glob_to_regex(args.pattern), re.DOTALL)
    started = time.monotonic()
    found: list[tuple[str, str, bytes]] = []
    for name in client.scan_iter(match=_glob_escape(prefix) + "*", count=args.count):
        parsed = _parse_redis_key(prefix, name)
        if parsed is not None and wanted.match(parsed[1]):
            found.append((*parsed, name))
    rows = _describe(client, prefix, [(kind, key) for kind, key, _ in found])
    rows.sort(key=lambda row: (row["key"], row["kind"]))
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
        return _EXIT_OK
    took = time.monotonic() - started
    if not rows:
        print(f"no leases or queued markers under prefix {prefix!r} match {args.pattern!r} ({took:.2f}s)")
        return _EXIT_OK
    table = [("KEY", "KIND", "HOLDER", "TASK ID", "HELD SINCE (UTC)", "LEFT", "FENCE", "NOTE")]
    for row in rows:
        if row["kind"] == "lease":
            where = f"{row['host']}:{row['pid']}" if row["host"] else "?"
            table.append((_printable(row["key"]), "lease", where, row["task_id"] or "-",
                          _utc(row["held_since_ms"]), _seconds(row["time_left_s"]), str(row["fence"]), _note(row)))
        else:
            table.append((_printable(row["key"]), "queued", "-", row["task_id"] or _printable(row["value"]), "-",
                          _seconds(row["time_left_s"]), "-", ""))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    leases = sum(1 for row in rows if row["kind"] == "lease")
    print(f"{leases} lease(s), {len(rows) - leases} queued marker(s) under {prefix!r} ({took:.2f}s)")
    return _EXIT_OK


def _cli_show(client: Any, prefix: str, args: Any) -> int:
    row = _describe(client, prefix, [("lease", args.key)])
    queued = _describe(client, prefix, [("queued", args.key)])
    lease = row[0] if row else None
    last_fence = client.get(_lease_key(prefix, args.key) + ":fence")
    if args.json:
        print(json.dumps({"key": args.key, "lease": lease, "queued": queued[0] if queued else None,
                          "last_fence": int(last_fence) if last_fence else None}, ensure_ascii=False))
    else:
        print(f"key:        {_printable(args.key)}")
        print(f"redis key:  {_printable(_lease_key(prefix, args.key))}")
        if lease is None:
            print("lease:      free")
        else:
            print(f"lease:      held by {lease['host']} pid {lease['pid']}"
                  + (f", Celery task {lease['task_id']}" if lease["task_id"] else ""))
            print(f"held since: {_utc(lease['held_since_ms'])} UTC ({_seconds(lease['held_for_s'])} ago)")
            print(f"time left:  {_seconds(lease['time_left_s'])} unless renewed")
            print(f"fence:      {lease['fence']}")
            print(f"rerun owed: {'yes' if lease['rerun_owed'] else 'no'}")
            print(f"waiting:    {lease['waiters']} run(s) queued for a hand-off")
        if queued:
            print(f"queued:     {_printable(queued[0]['value'])} ({_seconds(queued[0]['time_left_s'])} left)")
        else:
            print("queued:     none")
        print(f"last fence: {int(last_fence) if last_fence else '-'}")
    return _EXIT_OK if lease is not None else _EXIT_NO


def _cli_release(client: Any, prefix: str, args: Any) -> int:
    rows = _describe(client, prefix, [("lease", args.key)])
    if not rows:
        print(f"{_printable(args.key)} is not held: nothing to release")
        return _EXIT_NO
    if not args.force:
        print(f"{_printable(args.key)} is held by {_holder_text(rows[0])}")
        print("single_task: not released: the holder may still be running; pass --force to delete the lease",
              file=sys.stderr)
        return _EXIT_ERROR
    # One script reads the holder, deletes the lease and hands the key to the first waiter, so
    # what is printed is exactly what was removed.
    reply = _script(client, _keys(_lease_key(prefix, args.key)), "x", "")
    removed = {} if not reply else {k: _text(v) for k, v in zip("tfihs", reply) if v is not None}
    if not removed:
        print(f"{_printable(args.key)} was freed meanwhile: nothing to release")
        return _EXIT_NO
    row = _lease_row(args.key, removed, -2, 0, None)
    print(f"released {_printable(args.key)}: removed the lease held by {_holder_text(row)}")
    return _EXIT_OK


def _cli_wait(client: Any, prefix: str, args: Any) -> int:
    if args.interval <= 0 or (args.timeout is not None and args.timeout < 0):
        raise _CliError("--interval must be > 0 and --timeout >= 0")
    redis_key = _lease_key(prefix, args.key)
    started = time.monotonic()
    while client.exists(redis_key):
        waited = time.monotonic() - started
        if args.timeout is not None and waited >= args.timeout:
            print(f"single_task: {_printable(args.key)} is still held after {args.timeout:g}s", file=sys.stderr)
            return _EXIT_NO
        pause = args.interval if args.timeout is None else min(args.interval, args.timeout - waited)
        time.sleep(max(0.0, pause))
    print(f"{_printable(args.key)} is free (waited {time.monotonic() - started:.1f}s)")
    return _EXIT_OK


def _parse_redis_key(prefix: str, raw: Any) -> Optional[tuple[str, str]]:
    """(kind, key) of a lease or queued-marker name, or None for any other key.

    A name counts only if the library would build exactly it from the recovered key, which
    tells a lease ``P{K}`` from the companion keys ``P{K}:fence``, ``:q``, ``:w``, ``:h:*``.
    """
    try:
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        return None  # the library writes UTF-8 names only
    for kind, suffix in (("queued", ":queued"), ("lease", "")):
        if not name.endswith(suffix):
            continue
        rest = name[len(prefix) : len(name) - len(suffix)]
        candidates = [rest[1:-1]]
        if rest.startswith("}{"):  # a key tagged by a digest rather than by itself
            candidates.append(rest[rest.find("}", 2) + 1 :])
        for key in candidates:
            if key and _lease_key(prefix, key) + suffix == name:
                return kind, key
    return None


def _describe(client: Any, prefix: str, items: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The details of leases and queued markers, fetched in pipelines of a few hundred keys."""
    now_ms = _server_ms(client)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(items), 300):
        batch = items[start : start + 300]
        pipe = client.pipeline(transaction=False)
        for kind, key in batch:
            redis_key = _lease_key(prefix, key)
            if kind == "lease":
                pipe.hgetall(redis_key)
                pipe.pttl(redis_key)
                pipe.llen(redis_key + ":q")
            else:
                pipe.get(redis_key + ":queued")
                pipe.pttl(redis_key + ":queued")
                pipe.exists(redis_key)
        replies = pipe.execute(raise_on_error=False)
        for n, (kind, key) in enumerate(batch):
            first, pttl, extra = replies[3 * n : 3 * n + 3]
            if isinstance(first, Exception) or not first:
                continue  # gone since the scan, or not what the library writes (WRONGTYPE)
            if kind == "lease":
                rows.append(_lease_row(key, _fields(first), pttl, extra, now_ms))
            else:
                rows.append(_queued_row(key, first, pttl))
    return rows


def _fields(reply: Any) -> dict[str, str]:
    """A hash as str -> str, from HGETALL (a dict) or from a script (a flat list)."""
    if isinstance(reply, dict):
        return {_text(k): _text(v) for k, v in reply.items()}
    return {_text(k): _text(v) for k, v in zip(reply[0::2], reply[1::2])} if reply else {}


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _lease_row(key: str, fields: dict[str, str], pttl: Any, waiters: Any, now_ms: Optional[int]) -> dict[str, Any]:
    pid, _, host = fields.get("h", "").partition("@")
    since = int(fields["s"]) if fields.get("s", "").isdigit() else None
    pttl = int(pttl) if isinstance(pttl, int) else -2
    return {
        "key": key,
        "kind": "lease",
        "host": host or None,
        "pid": int(pid) if pid.isdigit() else None,
        "task_id": fields.get("i") or None,
        "held_since": None if since is None else _iso(since),
        "held_since_ms": since,
        "held_for_s": None if since is None or now_ms is None else max(0.0, (now_ms - since) / 1000.0),
        "time_left_s": pttl / 1000.0 if pttl >= 0 else None,
        "fence": int(fields["f"]) if fields.get("f", "").isdigit() else None,
        "rerun_owed": "r" in fields,
        "waiters": int(waiters) if isinstance(waiters, int) else 0,
    }


def _queued_row(key: str, value: Any, pttl: Any) -> dict[str, Any]:
    text = _text(value)
    pttl = int(pttl) if isinstance(pttl, int) else -2
    return {"key": key, "kind": "queued", "task_id": text, "value": text,
            "time_left_s": pttl / 1000.0 if pttl >= 0 else None}


def _server_ms(client: Any) -> Optional[int]:
    try:
        reply = client.time()
    except (redis.RedisError, redis.exceptions.RedisClusterException):
        return None
    if isinstance(reply, dict):  # RedisCluster may answer per node
        reply = next(iter(reply.values()), None)
    if not reply:
        return None
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000


def _holder_text(row: dict[str, Any]) -> str:
    text = f"{row['host'] or '?'} pid {row['pid'] or '?'}"
    if row["task_id"]:
        text += f" (Celery task {row['task_id']})"
    if row["held_since_ms"] is not None:
        text += f" since {_utc(row['held_since_ms'])} UTC"
    return text + f", fence {row['fence']}"


def _note(row: dict[str, Any]) -> str:
    notes = []
    if row["rerun_owed"]:
        notes.append("rerun owed")
    if row["waiters"]:
        notes.append(f"{row['waiters']} waiting")
    return ", ".join(notes)


def _iso(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000.0, datetime.timezone.utc).isoformat(timespec="milliseconds")


def _utc(ms: Optional[int]) -> str:
    if ms is None:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000.0, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    minutes, seconds = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours < 48 else f"{hours // 24}d{hours % 24:02d}h"


def _printable(text: str) -> str:
    return text if text.isprintable() else repr(text)


def _glob_escape(text: str) -> str:
    """``text`` as a literal inside a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _glob_to_regex(pattern: str) -> str:
    """A Redis-style glob (``* ? [abc] [^a-z] \\x``) as a regular expression for the whole key."""
    import re

    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if c == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] == "^" else i + 1)
            if end > i:
                body = pattern[i + 1 : end]
                negate = body.startswith("^")
                body = "".join(ch if ch == "-" else re.escape(ch) for ch in (body[1:] if negate else body))
                out.append(f"[{'^' if negate else ''}{body}]")
                i = end + 1
                continue
        out.append(".*" if c == "*" else "." if c == "?" else re.escape(c))
        i += 1
    return "".join(out) + r"\Z"


if __name__ == "__main__":
    sys.exit(main())
