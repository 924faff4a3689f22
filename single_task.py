"""Run a Celery task -- or any function -- at most once at a time per key, under a Redis lease.

Usage::

    from single_task import current_lease, send_once, single_run

    @app.task
    @single_run(key="sync:{account_id}:{full}", ttl=30, on_busy="rerun")
    def sync_account(account_id, full=False):
        store.write(account_id, fence=current_lease().fence)

    send_once(sync_account, (42,))  # the producer: at most one message per key waits

    with single_run(key="nightly-report", client="redis://localhost:6379/0") as lease:
        write_report(fence=lease.fence)

A run takes a lease in one round trip and gives it back in one more. While it runs, one watchdog
per process renews every lease the process holds (a renewer thread per Redis node); a holder that
dies stops renewing and its key frees itself within ``ttl``. Each lease carries a fencing token
(``lease.fence``) that grows with every acquisition of its key, so a store can refuse writes from
a holder that lost its lease.
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
import types
import uuid
import weakref
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
    "signals",  # noqa: F822 - made at first use, by the module's __getattr__
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
        "_cooling",
        "_deadline",
        "_every_ms",
        "_next_token",
        "_on_lost",
        "_parent",
        "_pid",
        "_renew_at",
        "_renewing",
        "_rerun_args",
        "_state",
        "_task",
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
        # One of "held", "releasing", "released", "lost": see the lease lifecycle below.
        self._state = _LOST if fail_open else _HELD
        self._renewing = False  # handed to a renewer thread, answer pending
        self._next_token = ""  # the token a rerun takes over under, once a release asked for one
        self._pid = os.getpid()  # leases belong to the process that took them
        self._task: Any = None  # the Celery task of the run, for signals
        self._every_ms = 0  # min_interval of its single_run, in ms
        self._rerun_args: Optional[str] = None  # JSON arguments of the newest rerun request
        self._cooling = 0.0  # seconds until an owed rerun may start
        self._on_lost = on_lost
        self._parent: Optional[Lease] = None
        self._context: Optional[contextvars.Token[Optional[Lease]]] = None

    @property
    def lost(self) -> bool:
        """True once the lease may have passed to someone else (read the clock, not a cache)."""
        state = self._state
        return state == _LOST or (state != _RELEASED_STATE and time.monotonic() >= self._deadline)

    @property
    def time_left(self) -> float:
        """Seconds this holder can still count on, by its own conservative clock."""
        if self._state != _HELD and self._state != _RELEASING:
            return 0.0
        return max(0.0, self._deadline - time.monotonic())

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
    ``$SINGLE_TASK_REDIS_URL``, then the Redis broker (else result backend) of the task's app, the
    thread's or default app, or the process's one Redis app. ``fail_open=True`` runs the body
    without a lease (logging a WARNING) when Redis cannot be reached; by default the error
    propagates and the body does not run.
    ``queued_ttl`` bounds how long a ``send_once`` marker outlives a message that never starts
    (default: the broker's visibility timeout, 1 hour unless configured, plus any countdown).
    ``replicas=N`` makes each acquisition wait (Redis ``WAIT``, at most ``replica_timeout``
    seconds) until N replicas have it, so a failover right after cannot lose it.
    ``rerun_with="latest"`` (with ``"rerun"``) reruns with the newest busy call's arguments
    instead of the holder's. ``min_interval`` makes two runs of a key start at least that many
    seconds apart (the server's clock); a call inside it is busy and follows ``on_busy``.
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
        rerun_with: Literal["holder", "latest"] = "holder",
        min_interval: Optional[float] = None,
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
        if rerun_with not in ("holder", "latest"):
            raise ConfigurationError(f"rerun_with={rerun_with!r} must be 'holder' or 'latest'")
        if rerun_with == "latest" and on_busy != "rerun":
            raise ConfigurationError(
                f"rerun_with='latest' chooses the arguments of a rerun and needs on_busy='rerun' (not {on_busy!r})"
            )
        self.rerun_with = rerun_with
        self.min_interval = None if min_interval is None else _check_seconds("min_interval", min_interval, 0.001)
        self._every_ms = 0 if self.min_interval is None else max(1, int(self.min_interval * 1000))
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
        # The key of a with block, braces undoubled (a malformed template is refused here). This
        # __init__ is long only because it checks each option in turn.
        self._literal: Optional[str] = _literal_key(key) if isinstance(key, str) else None
        self.key = key
        self._resolved_client: Any = None
        # The leases this object's with blocks hold, so that __exit__ finds its own whatever
        # context it runs in (a generator stepped from copied contexts).
        self._entered: list[Lease] = []
        self._entered_lock = threading.Lock()

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
        if not _markers_watched and "celery" in sys.modules:
            _watch_queued_markers()  # see "queued markers die with their message"
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
            return _run(spec, fn, single_run_wrapper, renderer, args, kwargs)

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
        key = self._literal
        if key is None:
            raise ConfigurationError(
                f"`with single_run(key=...)` needs a plain string key, not {self.key!r}: there are no "
                "function arguments to fill it from (write {{ and }} for literal braces)"
            )
        if self.on_busy == "rerun":
            raise ConfigurationError(
                f"on_busy='rerun' needs a decorated function to run again; a with block for "
                f"{key!r} cannot be rerun (use 'wait' or 'raise')",
                key,
            )
        lease = _acquire(self, key, "wait" if self.on_busy == "wait" else "raise", None, _client_of(self, None))
        assert lease is not None  # "raise" and "wait" never return None
        lease._parent = _current.get()
        lease._context = _current.set(lease)
        with self._entered_lock:
            self._entered.append(lease)
        return lease

    def __exit__(self, *exc: object) -> None:
        lease = self._exiting()
        if lease is None:
            raise RuntimeError(f"{self!r}: __exit__ without a matching __enter__")
        if _current.get() is lease:
            try:
                _current.reset(lease._context)  # type: ignore[arg-type]
            except ValueError:  # entered in another context (a copy): restore by hand
                _current.set(lease._parent)
        if _release(lease, "abort") == _RELEASED_OWED:
            log_release.warning(
                "A rerun of %r was requested while a with block held it; a with block cannot be "
                "rerun, so that request is dropped",
                lease.key,
            )

    def _exiting(self) -> Optional[Lease]:
        """The lease this block's __enter__ took: the innermost of this context if it is one of
        ours (with blocks nest, and many threads may share this object), else the last one ours
        that this process still holds."""
        current = _current.get()
        with self._entered_lock:
            for lease in reversed(self._entered):
                if lease is current:
                    break
            else:
                mine = [le for le in self._entered if _in_this_process(le)]
                lease = (mine or self._entered or [None])[-1]  # type: ignore[list-item]
                if lease is None:
                    return None
            self._entered.remove(lease)
        return lease

    def __repr__(self) -> str:
        return f"single_run(key={self.key!r}, ttl={self.ttl}, on_busy={self.on_busy!r})"


def current_lease() -> Optional[Lease]:
    """The lease of the innermost run or ``with`` block in this context, or None outside one
    (and in a forked child, which does not hold its parent's leases)."""
    lease = _current.get()
    return lease if lease is None or lease._pid == _holder.pid else None


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
    client = _client_of(spec, task_or_function if hasattr(task_or_function, "apply_async") else None)
    try:
        return bool(client.exists(_lease_key(spec.prefix, key)))
    except redis.RedisError as exc:
        raise RedisUnavailable(f"could not ask Redis whether {key!r} is running: {exc}", key) from exc


def send_once(task: Any, args: Any = None, kwargs: Optional[dict[str, Any]] = None, *,
              debounce: Optional[float] = None, max_wait: Optional[float] = None, **options: Any) -> Any:
    """``task.apply_async(args, kwargs, **options)``, unless a message for the same key is already
    waiting in the queue: then return that message's ``AsyncResult`` and send nothing.

    The key is the one ``@single_run`` derives from the same arguments. The "queued" marker is
    taken before publishing (provisionally, for a few seconds), confirmed once the message is
    published, and given up when the run starts, so at most one message per key waits while
    another runs; if publishing fails the marker is removed and the error propagates.

    With ``debounce=seconds``, the calls of a burst make one run, ``debounce`` seconds after the
    last of them (but at most ``max_wait`` seconds after the first), with the newest call's
    arguments (kept in Redis as JSON); every call of the burst returns the same ``AsyncResult``.
    """
    if not hasattr(task, "apply_async"):
        raise ConfigurationError(f"send_once needs the Celery task, not {task!r}")
    spec, renderer, bound_task = _spec_of(task)
    call_args = tuple(args or ())
    call_kwargs = dict(kwargs or {})
    key = renderer.render((bound_task, *call_args) if bound_task is not None else call_args, call_kwargs)
    _check_key(key)
    client = _client_of(spec, task)
    if debounce is not None or max_wait is not None:
        return _send_debounced(task, spec, key, client, call_args, call_kwargs, debounce, max_wait, options)
    marker = _lease_key(spec.prefix, key) + ":queued"
    # After a check that failed (a timeout: it may still have run), the next call from this
    # process uses the same task id, so that a marker the failed check left counts as its own.
    task_id = options.pop("task_id", None) or _unsent.pop(marker, None) or str(uuid.uuid4())
    ttl = _queued_ttl(spec, task, options)
    try:
        waiting = _call(client, _MARK, marker, task_id, _PROVISIONAL_MS)
    except BaseException as exc:
        _remember_unsent(marker, task_id)
        if isinstance(exc, redis.RedisError):
            raise RedisUnavailable(f"could not check the queue for {key!r}, so nothing was sent: {exc}",
                                   key) from exc
        raise
    if waiting is not None:
        waiting_id = waiting.decode() if isinstance(waiting, bytes) else str(waiting)
        log_acquire.debug("Queued already %r: returning task %s", key, waiting_id)
        _send("deduplicated", key, task=task, task_id=waiting_id)
        return task.AsyncResult(waiting_id)
    try:
        result = task.apply_async(call_args, call_kwargs, task_id=task_id, **options)
    except BaseException:
        # Nothing was queued, so no marker may say so.
        with contextlib.suppress(Exception):
            _call(client, _CONFIRM, marker, task_id, 0, "0")
        raise
    try:
        _call(client, _CONFIRM, marker, task_id, int(ttl * 1000), "1")
    except redis.RedisError as exc:
        # Published all the same; the provisional marker expires in seconds, and a duplicate
        # sent meanwhile would only find the key busy.
        log_acquire.warning("Could not confirm the queued marker of %r (%s); it expires in %.0fs", key, exc,
                            _PROVISIONAL_MS / 1000.0)
    return result


_unsent: dict[str, str] = {}


def _remember_unsent(marker: str, task_id: str) -> None:
    if len(_unsent) >= 1000:  # bounded: the oldest is forgotten (its marker expires anyway)
        _unsent.pop(next(iter(_unsent)))
    _unsent[marker] = task_id


def is_queued(task: Any, *args: Any, **kwargs: Any) -> bool:
    """True when a ``send_once`` message for these arguments is waiting to start."""
    spec, renderer, bound_task = _spec_of(task)
    if bound_task is not None:
        args = (bound_task, *args)
    key = renderer.render(args, kwargs, partial=True)
    _check_key(key)
    try:
        return bool(_client_of(spec, task).exists(_lease_key(spec.prefix, key) + ":queued"))
    except redis.RedisError as exc:
        raise RedisUnavailable(f"could not ask Redis whether {key!r} is queued: {exc}", key) from exc


class _Signals:
    """``single_task.signals``: Celery signals, one sent for every decision the library makes.

    Each is sent with ``sender`` = the key (without prefix) and these keyword arguments:

    - ``acquired(lease, task)``: a run or ``with`` block took the lease (a rerun too).
    - ``released(lease, task, confirmed)``: it gave the lease back (``confirmed=False``: Redis did
      not answer, and the key expires by itself).
    - ``lost(lease, task, reason)``: the lease was lost (see ``on_lost``).
    - ``busy(policy, action, task, time_left)``: the key was held; ``action`` is what the call did:
      "skipped", "rerun_requested", "waiting", "retry_sent", "raised" or "throttled".
    - ``deduplicated(task, task_id)``: ``send_once`` returned the waiting message ``task_id``.

    ``task`` is the Celery task when there is one, else None. A receiver that raises is logged and
    changes nothing: it never breaks a run, a release or the watchdog.
    """

    def __init__(self) -> None:
        from celery.utils.dispatch import Signal

        self.acquired = Signal(name="single_task.acquired", providing_args={"lease", "task"})
        self.released = Signal(name="single_task.released", providing_args={"lease", "task", "confirmed"})
        self.lost = Signal(name="single_task.lost", providing_args={"lease", "task", "reason"})
        self.busy = Signal(name="single_task.busy", providing_args={"policy", "action", "task", "time_left"})
        self.deduplicated = Signal(name="single_task.deduplicated", providing_args={"task", "task_id"})


_signals: Optional[_Signals] = None
_signals_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    # ``single_task.signals`` is made at first use: importing Celery's dispatch costs ~80 ms, which
    # a process that never listens should not pay.
    global _signals
    if name == "signals":
        with _signals_lock:
            if _signals is None:
                _signals = _Signals()
        return _signals
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _send(name: str, sender: str, **named: Any) -> None:
    """Send signal ``name`` if anyone listens; a receiver that raises (anything) is only logged."""
    if _signals is None:
        return
    signal = getattr(_signals, name)
    if not signal.receivers:
        return
    try:
        signal.send(sender=sender, **named)
    except BaseException:
        logging.getLogger("single_task.signals").exception("a receiver of single_task.signals.%s raised", name)


# ------------------------------------------------------------------------------------------------
# The lease lifecycle
# ------------------------------------------------------------------------------------------------
#
# A lease is "held" from the moment Redis confirms it, "releasing" while its release is on the way,
# then "released" or "lost" (which stays): _acquire and _wait make it, _release ends it, _lose
# reports it lost once. Every change of state happens under _state_lock; the watchdog renews only
# held leases; and whatever ends a run, a wait or a release -- any exception, an interrupt -- leaves
# the lease out of "held". The scripts these functions send come after them.

# Release outcomes, as _RELEASE returns them, and the process's own.
_NOT_OWNER: Final = 0
_RELEASED: Final = 1
_RERUN: Final = 2
_RELEASED_OWED: Final = 3
_COOLING: Final = 4  # a rerun is owed once min_interval has passed (the lease is still held)
_UNCONFIRMED: Final = -1  # Redis did not answer the release: the key expires by itself
_NOT_MINE: Final = -2  # a lease of the parent process, in a forked child: never touched
# How many times in a row a rerun-policy run takes its key again after finding its lease lost.
_RETAKES: Final = 3
_BUSY_CODE: Final = {"rerun": "r", "wait": "w"}  # what a busy acquire asks for; "t": nothing
# "end": a run returned (run again if a rerun is owed); "abort": it raised; "trail": it returned and
# the rerun it owed was sent as a task.
_RELEASE_MODE: Final = {"end": "e", "abort": "a", "trail": "t"}

# The longest single BLPOP of a waiter: it re-polls at least this often, which keeps its place in
# the queue alive and stays under the socket timeout of the clients built here.
_WAIT_SLICE: Final = 5.0
# A key handed to a waiter is held this long (at most its ttl) until the waiter confirms it, so
# a waiter killed while blocked holds it no longer than that.
_HANDOFF_MS: Final = 2000
# A send_once marker is provisional for this long, until the message is published: a check that
# failed or timed out leaves nothing that blocks the key for longer.
_PROVISIONAL_MS: Final = 5000

# The states of a lease (Lease._state).
_HELD: Final = "held"
_RELEASING: Final = "releasing"
_RELEASED_STATE: Final = "released"
_LOST: Final = "lost"

_current: contextvars.ContextVar[Optional[Lease]] = contextvars.ContextVar("single_task_lease", default=None)
_HOST: Final = socket.gethostname()


class _Holder:
    """Who this process is, as stored in its leases ("pid@host"); renewed in a forked child."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.text = f"{self.pid}@{_HOST}"


_holder = _Holder()
_state_lock: Any = None  # an OS lock (see _os_lock), made once the watchdog's helpers are defined


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

def _in_this_process(lease: Optional[Lease]) -> bool:
    return lease is not None and lease._pid == _holder.pid


class _Throttled(AlreadyRunning):
    """Inside the library only: the key is free but its minimum interval has not passed, for a
    policy ("rerun", "retry") that the caller serves by sending a task for when it has."""

    def __init__(self, message: str, key: str, left: float) -> None:
        super().__init__(message, key)
        self.left = left


def _acquire(spec: single_run, key: str, policy: str, task: Any, client: Any, arguments: str = "",
             task_id: Optional[str] = None) -> Optional[Lease]:
    """Take the lease for ``key`` or apply ``policy`` ("skip", "raise", "wait", "retry", "rerun").

    Returns the lease, or None when the call should return without running. ``arguments`` (JSON)
    go with a rerun request when the newest call's arguments are to win.
    """
    _check_key(key)
    redis_key = _lease_key(spec.prefix, key)
    parent = _current.get()
    while parent is not None:
        if parent.redis_key == redis_key and not parent.fail_open and _in_this_process(parent):
            raise AlreadyRunning(
                f"{key!r} is already held by this very run (a nested call with the same key); "
                "the inner call would wait for itself",
                key,
            )
        parent = parent._parent
    token = secrets.token_hex(16)
    if task_id is None:
        task_id = (getattr(task.request, "id", None) or "") if task is not None else ""
    holder = {"host": _HOST, "pid": _holder.pid, "task_id": task_id or None}
    busy = _BUSY_CODE.get(policy, "t")
    args = (token, spec._ttl_ms, task_id, _holder.text, busy, spec._alive_ms, arguments, spec._every_ms)
    give_up = math.inf if spec.timeout is None else time.monotonic() + spec.timeout
    while True:
        # The deadline is counted from before the request is sent: the server's TTL can only have
        # started later, so this holder never believes in the lease longer than Redis keeps it.
        sent = time.monotonic()
        try:
            if spec.replicas:
                reply = _replicated(spec, client, _ACQUIRE, redis_key, token, *args)
            else:
                reply = _call(client, _ACQUIRE, redis_key, *args)
        except redis.RedisError as exc:
            return _redis_failed(spec, key, client, exc)
        except BaseException:
            # Interrupted (a time limit, Ctrl-C) after the request may have reached Redis: if it
            # took the key, give it back rather than leave it blocked for a ttl.
            _give_back_quietly(client, redis_key, token, spec._ttl_ms)
            raise
        if reply[0] == 1 or len(reply) < 4 or int(reply[3]) != 1:
            break
        # Free, but its last run started less than min_interval ago (the server's clock says).
        left = int(reply[1]) / 1000.0
        if policy != "wait" or sent + left > give_up:
            _throttled(key, policy, task, left)  # raises, unless it is skipped
            return None
        _busy(key, policy, "throttled", task, int(reply[1]))
        time.sleep(left)
    if reply[0] == 1:
        return _held(spec, key, redis_key, token, int(reply[1]), client, sent, holder, task)
    return _when_busy(spec, key, policy, task, client, redis_key, token, task_id, holder, reply, sent)


def _when_busy(spec: single_run, key: str, policy: str, task: Any, client: Any, redis_key: str, token: str,
               task_id: str, holder: dict[str, Any], reply: Any, sent: float) -> Optional[Lease]:
    """Apply ``policy`` to a busy key (the acquire's ``reply``, sent at ``sent``)."""
    pttl, own = int(reply[1]), int(reply[2])
    if own:
        # Our own earlier attempt holds the key and is about to release it (self.retry()
        # publishes before it unwinds): wait for the hand-off rather than skip our own retry.
        _busy(key, policy, "waiting", task, pttl)
        lease = _wait(spec, key, client, redis_key, token, task_id, task, holder, spec.ttl, pttl, sent)
        if lease is not None:
            return lease
        if policy == "wait":
            sent = time.monotonic()
    if policy == "wait":
        if not own:
            _busy(key, policy, "waiting", task, pttl)
        lease = _wait(spec, key, client, redis_key, token, task_id, task, holder, spec.timeout, pttl, sent)
        if lease is not None:
            return lease
        raise AlreadyRunning(f"{key!r} is still held after waiting {spec.timeout}s", key)
    if policy == "rerun":
        log_acquire.info("Busy %r: the holder will run again after its current run", key)
        _busy(key, policy, "rerun_requested", task, pttl)
        return None
    if policy == "skip":
        log_acquire.info("Busy %r: skipped (%d ms left on the holder's lease)", key, pttl)
        _busy(key, policy, "skipped", task, pttl)
        return None
    if policy != "retry":  # "retry" is reported by the caller, once the retry is sent
        _busy(key, policy, "raised", task, pttl)
    raise AlreadyRunning(f"{key!r} is already running (the holder's lease has {pttl} ms left)", key)


def _throttled(key: str, policy: str, task: Any, left: float) -> None:
    """Apply ``policy`` to a call refused by the minimum interval (``left`` seconds to go)."""
    _busy(key, policy, "throttled", task, int(left * 1000))
    if policy == "skip":
        log_acquire.info("Throttled %r: skipped (%.2fs of its min_interval left)", key, left)
        return
    message = f"{key!r} ran less than min_interval ago: {left:.2f}s left"
    if policy in ("rerun", "retry"):
        raise _Throttled(message, key, left)
    raise AlreadyRunning(message + ("" if policy == "raise" else f" (waited {policy})"), key)


def _busy(key: str, policy: str, action: str, task: Any, pttl_ms: int) -> None:
    _send("busy", key, policy=policy, action=action, task=task, time_left=max(0, pttl_ms) / 1000.0)


def _held(spec: single_run, key: str, redis_key: str, token: str, fence: int, client: Any, sent: float,
          holder: dict[str, Any], task: Any, provisional: bool = False) -> Lease:
    """A lease just confirmed by Redis (the request sent at ``sent``): held, and renewed from now on.

    ``provisional``: handed over by a releaser for at most _HANDOFF_MS; renewed at once.
    """
    lasts = min(spec.ttl, _HANDOFF_MS / 1000.0) if provisional else spec.ttl
    lease = Lease(key, redis_key, token, fence, spec.ttl, client, sent + lasts, holder, spec.on_lost)
    if provisional:
        lease._renew_at = sent
    lease._task = task
    lease._every_ms = spec._every_ms
    _watchdog.add(lease)
    log_acquire.debug("Acquired %r fence=%s", key, fence)
    _send("acquired", key, lease=lease, task=task)
    return lease


def _give_back_quietly(client: Any, redis_key: str, token: str, ttl_ms: int) -> None:
    # Best effort on the way out of an interrupted call: if this does not get through either,
    # what it would remove expires by itself.
    with contextlib.suppress(Exception):
        _call(client, _LEAVE, redis_key, token, "", ttl_ms, "0", _HANDOFF_MS)


def _alive_ms(ttl: float) -> int:
    # How long a waiter's place stays valid without news from it: two wait slices and a second.
    return int(2000 * min(ttl / 4.0, _WAIT_SLICE) + 1000)


def _wait(
    spec: single_run,
    key: str,
    client: Any,
    redis_key: str,
    token: str,
    task_id: str,
    task: Any,
    holder: dict[str, Any],
    timeout: Optional[float],
    pttl_ms: int,
    sent: float,
) -> Optional[Lease]:
    """Block until the releasing holder hands us the key; None after ``timeout`` seconds.

    The caller already joined the queue (same round trip as the failed acquire). Each BLPOP is
    bounded by the holder's remaining TTL, so a holder that died is noticed when its lease runs
    out, and by a slice short enough to keep our place in the queue marked alive. However the
    wait ends -- a time limit, Ctrl-C, a lost connection -- it leaves the queue, and gives back a
    key handed to it that it will not use. (One loop, kept whole: its exits are the point.)
    """
    handoff = redis_key + ":h:" + token
    slice_cap = min(spec.ttl / 4.0, _WAIT_SLICE, _socket_budget(client))
    end = math.inf if timeout is None else sent + timeout
    try:
        while True:
            now = time.monotonic()
            if now >= end:
                # Leaving and learning whether the key came just now is one step: a key handed
                # over at the last moment is kept (and run), not dropped with a rerun it may owe.
                sent = time.monotonic()
                reply = _call(client, _LEAVE, redis_key, token, task_id, spec._ttl_ms, "1", _HANDOFF_MS)
                if reply[0] != 1:
                    return None
                fence = int(reply[1])
                break
            block = max(0.01, min(slice_cap, pttl_ms / 1000.0 + 0.002, end - now))
            asked = time.monotonic()
            got = _blpop(client, handoff, block)
            sent = time.monotonic()
            if got is not None and not spec.replicas:
                # Handed over provisionally (for _HANDOFF_MS, counted from before we asked): the
                # run starts at once, and the watchdog confirms the lease for a full ttl right away.
                log_acquire.debug("Acquired %r by hand-off", key)
                return _held(spec, key, redis_key, token, int(got[1]), client, asked, holder, task, provisional=True)
            if got is not None:
                # With replicas, confirmed first, and that write waited for: a confirmation that
                # comes too late finds the key gone, and the wait goes on.
                confirmed = _replicated(spec, client, _RENEW, redis_key, token, token, spec._ttl_ms)
                if int(confirmed) == 1:
                    fence = int(got[1])
                    break
            args = (token, spec._ttl_ms, task_id, _holder.text, "w", spec._alive_ms, "", spec._every_ms)
            reply = _call(client, _ACQUIRE, redis_key, *args)
            if reply[0] != 1 and len(reply) > 3 and int(reply[3]) == 1:
                pttl_ms = min(int(reply[1]), 50)  # free, inside its interval: look again soon
                time.sleep(int(reply[1]) / 1000.0)
                continue
            if reply[0] == 1:
                fence = int(reply[1])
                break
            pttl_ms = int(reply[1])
    except redis.RedisError as exc:
        _give_back_quietly(client, redis_key, token, spec._ttl_ms)
        raise RedisUnavailable(f"lost touch with Redis while waiting for {key!r}: {exc}", key) from exc
    except BaseException:
        _give_back_quietly(client, redis_key, token, spec._ttl_ms)
        raise
    log_acquire.debug("Acquired %r by hand-off", key)
    return _held(spec, key, redis_key, token, fence, client, sent, holder, task)


def _replicated(spec: single_run, client: Any, script: str, redis_key: str, token: str, *args: Any) -> Any:
    """Run a script and ``WAIT`` for ``spec.replicas`` replicas in the same round trip.

    A lease taken but not acknowledged in time is given back, and the run fails closed.
    """
    # WAIT counts the replicas that have this connection's writes, so both go to the node that
    # owns the key (on a cluster, the client of that one node) in one pipeline.
    node = _node_client(client, redis_key)
    pipe = node.pipeline(transaction=False)
    pipe.evalsha(_SHA[script], 1, redis_key, *args)
    pipe.execute_command("WAIT", spec.replicas, int(spec.replica_timeout * 1000))
    reply, acked = pipe.execute(raise_on_error=False)
    if isinstance(reply, redis.exceptions.NoScriptError):
        reply = _call(node, script, redis_key, *args)
        acked = node.execute_command("WAIT", spec.replicas, int(spec.replica_timeout * 1000))
    for result in (reply, acked):
        if isinstance(result, Exception):
            raise result
    took = reply == 1 if script == _RENEW else reply[0] == 1
    if int(acked) < spec.replicas and took:
        _call(client, _RELEASE, redis_key, token, "", spec._ttl_ms, "a", 0, _HANDOFF_MS)
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


def _socket_budget(client: Any) -> float:
    # A BLPOP longer than the client's socket timeout would fail with TimeoutError.
    try:
        socket_timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
    except AttributeError:
        return _WAIT_SLICE
    return _WAIT_SLICE if not socket_timeout else max(0.05, float(socket_timeout) * 0.8)


def _release(lease: Lease, mode: str, warn: bool = True) -> int:
    """Give the lease back (owner-checked); returns one of the _RELEASED... outcomes.

    ``mode`` "end" (a run returned: run again if a rerun is owed) or "abort". Whatever stops the
    release (an error of any kind, an interrupt), the lease leaves "held" first, so the watchdog
    stops renewing it and the key expires within its ttl; a Redis error is logged and reported as
    _UNCONFIRMED, anything else propagates once the lease is consistent. (Every outcome of the
    release script is handled here, so that the lifecycle's transitions stay in one place.)
    """
    if lease.fail_open:
        return _RELEASED
    if not _in_this_process(lease):
        return _NOT_MINE  # a forked child: the lease, and the token it inherited, are its parent's
    with _state_lock:
        if lease._state == _HELD:
            lease._state = _RELEASING
    if mode == "end" and not lease._next_token:
        # Kept until a release is answered, so that one repeated after no answer asks for the
        # same rerun token and recognises a rerun its first attempt was granted.
        lease._next_token = secrets.token_hex(16)
    next_token = lease._next_token if mode == "end" else ""
    sent = time.monotonic()
    try:
        reply = _call(lease._client, _RELEASE, lease.redis_key, lease._token, next_token, int(lease._ttl * 1000),
                      _RELEASE_MODE[mode], lease._every_ms, _HANDOFF_MS)
    except BaseException as exc:
        _settle(lease, _RELEASED_STATE)
        if not isinstance(exc, redis.RedisError):
            raise
        _send("released", lease.key, lease=lease, task=lease._task, confirmed=False)
        if warn:
            log_release.warning(
                "Could not release %r (%s); it expires by itself within %.1fs", lease.key, exc, lease.time_left
            )
        return _UNCONFIRMED
    outcome = int(reply[0])
    if outcome in (_RERUN, _RELEASED_OWED, _COOLING):
        # The arguments of the newest call, when they are to win (rerun_with="latest").
        at = 1 if outcome == _RELEASED_OWED else 2
        lease._rerun_args = _text(reply[at]) if len(reply) > at and reply[at] else None
    if outcome == _COOLING:
        # A rerun is owed, but not before min_interval has passed since the last start.
        with _state_lock:
            if lease._state == _RELEASING:
                lease._state = _HELD
        lease._cooling = int(reply[1]) / 1000.0
        return _COOLING
    if outcome == _RERUN:
        # A new acquisition: a new token and a larger fence, confirmed from when it was asked for.
        with _state_lock:
            lease._token, lease._next_token = next_token, ""
            lease.fence = int(reply[1])
            lease.acquired_at = time.time()
            lease._deadline = sent + lease._ttl
            lease._renew_at = sent + lease._ttl / 3.0
            lease._state = _HELD
        _watchdog.add(lease)
        _send("acquired", lease.key, lease=lease, task=lease._task)
        return _RERUN
    if outcome == _NOT_OWNER:
        _lose(lease, "at release the key was gone or held by another owner")
    elif time.monotonic() >= lease._deadline:
        _lose(lease, "the run outlived the lease's confirmed deadline")
    else:
        log_release.debug("Released %r", lease.key)
    _settle(lease, _RELEASED_STATE)
    if outcome != _NOT_OWNER:
        _send("released", lease.key, lease=lease, task=lease._task, confirmed=True)
    return outcome


def _settle(lease: Lease, state: str) -> None:
    """Move a lease out of "held" for good ("released", or "lost" which stays); drop it from renewal."""
    with _state_lock:
        if lease._state != _LOST:
            lease._state = state
    _watchdog.discard(lease)


def _lose(lease: Lease, reason: str, from_watchdog: bool = False) -> None:
    """Mark the lease lost and report it once: a WARNING and the user's on_lost callback.

    From the watchdog the callback runs on a thread of its own, so that a callback that blocks
    or raises (even SystemExit) can never stop renewal; at release it runs in the caller's thread.
    """
    with _state_lock:
        if lease._state == _LOST:
            return
        lease._state = _LOST
    _watchdog.discard(lease)
    log_renew.warning("Lease on %r (fence %s) was lost: %s", lease.key, lease.fence, reason)
    if from_watchdog:
        if lease._on_lost is not None or _signals is not None:
            _callbacks.put((lease, reason))
        return
    _send("lost", lease.key, lease=lease, task=lease._task, reason=reason)
    if lease._on_lost is None:
        return
    try:
        lease._on_lost(lease)
    except Exception:
        log_renew.exception("on_lost callback for %r raised", lease.key)


def _redis_failed(spec: single_run, key: str, client: Any, exc: Exception) -> Optional[Lease]:
    if "unknown command" in str(exc).lower() and type(client).__module__.startswith("fakeredis"):
        raise ConfigurationError(
            f"fakeredis cannot run the scripts of single_run for {key!r} ({exc}): install its Lua "
            "support with pip install 'fakeredis[lua]'",
            key,
        ) from exc
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


# ------------------------------------------------------------------------------------------------
# The scripts: one per operation, each a constant with its guarantee above it
# ------------------------------------------------------------------------------------------------
#
# A lease in Redis is a hash at ``P{key}``: t (owner token), f (fence), i (Celery task id), h
# (pid@host), s (taken at, server ms), p (":TOKEN" of the lease released last before it, see
# _RELEASE), r (a rerun is owed), a (the newest arguments). Its companions share the hash tag, so
# every script touches one Redis Cluster slot; the scripts derive them from KEYS[1]:
#   :fence   the last fence issued, and after a release ":token" of the lease released last
#   :q :w    the wait queue (tokens, first come first served) and each waiter's details
#   :h:TOKEN the hand-off list a waiter blocks on
#   :queued  "ID|MS": the task id of a send_once message waiting in the broker and when it was
#            marked (server ms); "p:ID|MS" while unconfirmed
# A script that fails half-way keeps what it wrote, so every key gets its expiry in the command
# that creates it, or right after it through pcall (deleted if the expiry is refused): no error,
# an ACL missing a command say, leaves a key that never expires.

# Shared Lua: the task id in a queued marker, and giving up a task's own marker.
_LUA_MARKER: Final = r"""
local function marker_id(v)
  if not v then return nil end
  local id = string.match(v, '^(.*)|%d+$') or v
  if string.sub(id, 1, 2) == 'p:' then id = string.sub(id, 3) end
  return id
end
local function unqueue(lease, tid)
  if tid == '' then return end
  local queued = lease .. ':queued'
  if marker_id(redis.call('GET', queued)) == tid then redis.call('DEL', queued) end
end
"""

# Shared Lua: a fence is the server clock in microseconds, above the last one issued for the key
# (kept ttl + 60 s in :fence), so it grows across expiry and restarts. ``tomb`` is ":TOKEN" of the
# lease released last, which the new lease keeps as p; nil takes it from the fence key.
_LUA_TAKE: Final = _LUA_MARKER + r"""
local function expire(key, ms)
  local ok = redis.pcall('PEXPIRE', key, ms)
  if type(ok) == 'table' and ok.err then
    redis.call('DEL', key)
    error(ok.err)
  end
end
local function take(lease, token, ttl, tid, holder, tomb)
  -- The digits are put together from TIME's two strings (seconds, microseconds): string.format
  -- would cost more than the commands around it.
  local t = redis.call('TIME')
  local us = string.sub('00000' .. t[2], -6)
  local f, keep = t[1] .. us, tonumber(ttl) + 60000
  -- One command writes the new fence and reads the last one; a fence not above the last (the
  -- server's clock stepped back) is written again as the last plus one.
  local old = redis.call('SET', lease .. ':fence', f, 'PX', keep, 'GET')
  if old then
    local last, rest = string.match(old, '^(%d+)(.*)$')
    if last and tonumber(f) <= tonumber(last) then
      f = string.format('%.0f', tonumber(last) + 1)
      redis.call('SET', lease .. ':fence', f, 'PX', keep)
    end
    if tomb == nil then tomb = rest end
  end
  redis.call('HSET', lease, 't', token, 'f', f, 'i', tid, 'h', holder, 's', t[1] .. string.sub(us, 1, 3),
             'p', tomb or '')
  expire(lease, ttl)
  return f
end
"""

# Shared Lua: hand the free key to the first waiter still alive, provisionally: the lease lasts
# _HANDOFF_MS until the waiter confirms it (a waiter killed while blocked keeps it no longer).
_LUA_HAND_OFF: Final = r"""
local function hand_off(lease, tomb, ms)
  -- A key inside its minimum interval is not handed on: its waiters poll until the interval ends.
  if redis.call('EXISTS', lease .. ':last') == 1 then return end
  local queue, winfo = lease .. ':q', lease .. ':w'
  while true do
    local w = redis.call('LPOP', queue)
    if not w then return end
    local info = redis.call('HGET', winfo, w)
    if info then
      redis.call('HDEL', winfo, w)
      local alive, ttl, tid, holder = string.match(info, '^(%d+)|(%d+)|([^|]*)|(.*)$')
      local t = redis.call('TIME')
      if alive and tonumber(alive) >= tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) then
        local f = take(lease, w, math.min(tonumber(ttl), tonumber(ms)), tid, holder, tomb)
        unqueue(lease, tid)
        local hk = lease .. ':h:' .. w
        redis.call('RPUSH', hk, f)
        expire(hk, ttl)
        return
      end
    end
  end
end
"""

# Take the lease if it is free, and give up this task's queued marker. If it is busy: report its
# PTTL, and as asked (ARGV[5]) flag a rerun ('r', with the caller's arguments ARGV[7] when they
# are to win) or join the wait queue ('w'). With a minimum interval (ARGV[8] ms), a free key whose
# last run started less than that ago is refused too, with the time left ({0, left, 0, 1}), and
# a run that takes it marks its start for that long. A caller whose token already holds it (a
# retried acquire, a waiter handed the key) confirms it for a full ttl.
# A holder with the caller's Celery task id is the caller's own previous attempt, releasing after
# self.retry(): the caller always waits (and under 'rerun' also asks for a rerun: the holder may
# be the same message, delivered again).
# ARGV: token, ttl ms, task id, holder, busy code, waiter lifetime ms, arguments, interval ms.
# Returns {1, fence} or {0, pttl, own, throttled}.
_ACQUIRE: Final = _LUA_TAKE + r"""
local lease, token, ttl, tid, busy = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[5]
local cur = redis.call('HMGET', lease, 't', 'i', 'f')
if not cur[1] then
  local every = tonumber(ARGV[8] or '0')
  if every > 0 then
    local left = redis.call('PTTL', lease .. ':last')
    if left > 0 then
      if busy ~= 'w' then unqueue(lease, tid) end
      return {0, left, 0, 1}
    end
  end
  local f = take(lease, token, ttl, tid, ARGV[4])
  unqueue(lease, tid)
  if every > 0 then
    -- One ms more: Redis counts the expiry from a whole millisecond, the fence in microseconds.
    redis.call('SET', lease .. ':last', f, 'PX', every + 1)
    if tid ~= '' and redis.call('GET', lease .. ':trail') == tid then redis.call('DEL', lease .. ':trail') end
  end
  if busy == 'w' then
    redis.call('LREM', lease .. ':q', 0, token)
    redis.call('HDEL', lease .. ':w', token)
  end
  return {1, f}
end
if cur[1] == token then
  redis.call('PEXPIRE', lease, ttl)
  redis.call('DEL', lease .. ':h:' .. token)
  return {1, cur[3]}
end
local own = 0
if tid ~= '' and cur[2] == tid then
  own = 1
  if busy == 'r' then
    redis.call('HSET', lease, 'r', '1')
    if ARGV[7] and ARGV[7] ~= '' then redis.call('HSET', lease, 'a', ARGV[7]) end
  end
  busy = 'w'
end
local pttl = redis.call('PTTL', lease)
if busy ~= 'w' then unqueue(lease, tid) end
if busy == 'r' then
  redis.call('HSET', lease, 'r', '1')
  if ARGV[7] and ARGV[7] ~= '' then redis.call('HSET', lease, 'a', ARGV[7]) end
elseif busy == 'w' then
  local queue, winfo = lease .. ':q', lease .. ':w'
  local keep = 2 * tonumber(ARGV[6])
  local t = redis.call('TIME')
  local until_ms = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[6]))
  local wttl, qttl = redis.call('PTTL', winfo), redis.call('PTTL', queue)
  local new = redis.call('HSET', winfo, token, until_ms .. '|' .. ttl .. '|' .. tid .. '|' .. ARGV[4])
  if wttl < keep then expire(winfo, keep) end
  if new == 1 then redis.call('RPUSH', queue, token) end
  if qttl < keep then expire(queue, keep) end
end
return {0, pttl, own, 0}
"""

# Replace the TTL, only while the caller owns the lease. ARGV: token, ttl ms. Returns 1 or 0.
_RENEW: Final = r"""
if redis.call('HGET', KEYS[1], 't') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# Give the lease back, only by its owner. With ARGV[4] = 'e' and a rerun owed, the lease is taken
# again at once under the new token ARGV[2], with a new fence (a rerun is a new acquisition) --
# unless a minimum interval (ARGV[5] ms) since the last start has not passed: then nothing changes
# and the time left is returned. Mode 't' (the owed rerun was sent as a task) releases as 'e' would
# without one. Otherwise the lease is deleted, the fence key remembers this token, and the first
# live waiter is handed the key. A release that a client retried after its first attempt got
# through finds the new token (a rerun) or its own token remembered, and answers as the first did.
# ARGV: token, next token, ttl ms, mode, interval ms, hand-off ms. Returns {0} not owner, {1}
# released, {2, fence, arguments} run again, {3, arguments} released although a rerun was owed
# (mode 'a'), {4, left, arguments} a rerun is owed once the interval has passed.
_RELEASE: Final = r"""
local lease, token, mode = KEYS[1], ARGV[1], ARGV[4]
local cur = redis.call('HMGET', lease, 't', 'r', 'f', 'i', 'h', 'a', 'p')
local owed = cur[2] and mode ~= 't'
if cur[1] == token and not (cur[2] and mode == 'e') then
  -- Given back for good: the common case comes first, before any helper is made. The lease's
  -- own fence is the last one issued (nobody can take one while it is held).
  redis.call('DEL', lease)
  redis.call('SET', lease .. ':fence', cur[3] .. ':' .. token, 'PX', tonumber(ARGV[3]) + 60000)
  if redis.call('EXISTS', lease .. ':q') == 0 then
    if owed then return {3, cur[6]} end
    return {1}
  end
end
""" + _LUA_TAKE + _LUA_HAND_OFF + r"""
if cur[1] ~= token then
  if cur[1] and cur[1] == ARGV[2] then return {2, cur[3], cur[6]} end
  -- Released already? The token released last is in the lease of whoever took the key since
  -- (its p), or else in the fence key.
  if cur[7] == ':' .. token then return {1} end
  local old = redis.call('GET', lease .. ':fence')
  if old and string.sub(old, -#token - 1) == ':' .. token then return {1} end
  return {0}
end
if cur[2] and mode == 'e' then
  if tonumber(ARGV[5]) > 0 then
    local left = redis.call('PTTL', lease .. ':last')
    if left > 0 then return {4, left, cur[6]} end
  end
  redis.call('HDEL', lease, 'r')
  local f = take(lease, ARGV[2], ARGV[3], cur[4] or '', cur[5] or '', '')
  if tonumber(ARGV[5]) > 0 then redis.call('SET', lease .. ':last', f, 'PX', tonumber(ARGV[5]) + 1) end
  return {2, f, cur[6]}
end
hand_off(lease, ':' .. token, ARGV[6])
if owed then return {3, cur[6]} end
return {1}
"""

# A waiter gives up: it leaves the queue and gives up its task's queued marker. If it was handed
# the key meanwhile, it keeps it when ARGV[4] is '1' (its wait ended just as the key came: it
# runs), or gives it back to the next waiter. ARGV: token, task id, ttl ms, keep, hand-off ms.
# Returns {1, fence} kept, {0} not handed (or given back).
_LEAVE: Final = _LUA_TAKE + _LUA_HAND_OFF + r"""
local lease, token, tid = KEYS[1], ARGV[1], ARGV[2]
redis.call('LREM', lease .. ':q', 0, token)
redis.call('HDEL', lease .. ':w', token)
redis.call('DEL', lease .. ':h:' .. token)
unqueue(lease, tid)
local cur = redis.call('HMGET', lease, 't', 'f')
if cur[1] ~= token then return {0} end
if ARGV[4] == '1' then
  redis.call('PEXPIRE', lease, ARGV[3])
  return {1, cur[2]}
end
redis.call('DEL', lease)
hand_off(lease, nil, ARGV[5])
return {0}
"""

# An operator's release, whoever holds the lease: return the holder's fields, delete the lease,
# hand the key on. ARGV: hand-off ms. Returns the fields t f i h s, or nil when free.
_FORCE: Final = _LUA_TAKE + _LUA_HAND_OFF + r"""
local cur = redis.call('HMGET', KEYS[1], 't', 'f', 'i', 'h', 's')
if not cur[1] then return false end
redis.call('DEL', KEYS[1])
hand_off(KEYS[1], nil, ARGV[1])
return cur
"""

# send_once: mark a message as queued, provisionally (ARGV[2] ms), unless one already is. Returns
# nil when the caller should publish (also when the marker is its own: a check that a client
# retried, or that the caller repeats after an error), else the id of the waiting message.
_MARK: Final = _LUA_MARKER + r"""
local id = marker_id(redis.call('GET', KEYS[1]))
if id and id ~= ARGV[1] then return id end
local t = redis.call('TIME')
local ms = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('SET', KEYS[1], 'p:' .. ARGV[1] .. '|' .. ms, 'PX', ARGV[2])
return false
"""

# send_once, after publishing: confirm the provisional marker for ARGV[2] ms (ARGV[3] '1'), or
# remove it after a failed publish ('0') -- in both cases only while it is still the caller's.
_CONFIRM: Final = _LUA_MARKER + r"""
local cur = redis.call('GET', KEYS[1])
if marker_id(cur) ~= ARGV[1] then return 0 end
if ARGV[3] == '1' then
  local ms = string.match(cur, '|(%d+)$') or '0'
  redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ms, 'PX', ARGV[2])
else
  redis.call('DEL', KEYS[1])
end
return 1
"""

# min_interval under rerun: at most one trailing run per key. ARGV: the caller's task id, a new task
# id, ms to keep the mark. Returns 1 (marked for the new id: send it), 2 (the caller is that
# trailing run, started early: mark kept, send itself again) or 0 (one is already on its way).
_TRAIL: Final = r"""
local k = KEYS[1] .. ':trail'
local cur = redis.call('GET', k)
if cur and cur == ARGV[1] then
  redis.call('PEXPIRE', k, ARGV[3])
  return 2
end
if cur then return 0 end
redis.call('SET', k, ARGV[2], 'PX', ARGV[3])
return 1
"""

# send_once(debounce=...): one burst per key at :debounce (i task id, f first call and d due, server
# ms; m max_wait ms; a the newest arguments; c '1' once published). A call joins the open burst:
# its arguments replace the stored ones and the due time moves to debounce after it, never past
# first + max_wait nor back. Otherwise it opens one, provisional (ARGV[6] ms) until published, and
# takes the queued marker if it is free. ARGV: task id, debounce ms, max_wait ms (0: none), arguments,
# queued ttl ms, provisional ms. Returns {1, id, ms to due} (publish: also for the caller's own
# unpublished burst, a call the client retried) or {0, id, ms to due} (joined burst id).
_DEBOUNCE: Final = _LUA_TAKE + r"""
local lease, tid = KEYS[1], ARGV[1]
local burst, queued = lease .. ':debounce', lease .. ':queued'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = redis.call('HMGET', burst, 'i', 'f', 'd', 'm', 'c')
if cur[1] and not (cur[1] == tid and cur[5] ~= '1') then
  local due = now + tonumber(ARGV[2])
  local cap = tonumber(cur[4] or '0') or 0
  if cap > 0 then due = math.min(due, (tonumber(cur[2] or '0') or 0) + cap) end
  due = math.max(due, tonumber(cur[3] or '0') or 0)
  redis.call('HSET', burst, 'd', string.format('%.0f', due), 'a', ARGV[4])
  if cur[5] == '1' then
    local keep = string.format('%.0f', tonumber(ARGV[5]) + due - now)
    redis.call('PEXPIRE', burst, keep)
    if marker_id(redis.call('GET', queued)) == cur[1] then redis.call('PEXPIRE', queued, keep) end
  end
  return {0, cur[1], due - now}
end
local first = string.format('%.0f', now)
local due = now + tonumber(ARGV[2])
redis.call('HSET', burst, 'i', tid, 'f', first, 'd', string.format('%.0f', due), 'm', ARGV[3], 'a', ARGV[4], 'c', '0')
expire(burst, ARGV[6])
if not redis.call('GET', queued) then redis.call('SET', queued, 'p:' .. tid .. '|' .. first, 'PX', ARGV[6]) end
return {1, tid, due - now}
"""

# send_once(debounce=...), after publishing: confirm the caller's burst (ARGV[3] '1') and its queued
# marker for ARGV[2] ms past the due time, or remove both after a failed publish ('0') -- only while
# they are still the caller's (also for any message that will never run: see _drop_marker).
# ARGV: task id, queued ttl ms, published. Returns 1 (confirmed, or something removed), or 0.
_DEBOUNCE_SENT: Final = _LUA_MARKER + r"""
local lease, tid = KEYS[1], ARGV[1]
local burst, queued = lease .. ':debounce', lease .. ':queued'
local cur = redis.call('HMGET', burst, 'i', 'd')
local mark = redis.call('GET', queued)
if ARGV[3] ~= '1' then
  local removed = 0
  if cur[1] == tid then removed = redis.call('DEL', burst) end
  if marker_id(mark) == tid then removed = removed + redis.call('DEL', queued) end
  return math.min(removed, 1)
end
if cur[1] ~= tid then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local keep = string.format('%.0f', tonumber(ARGV[2]) + math.max(0, (tonumber(cur[2] or '0') or 0) - now))
redis.call('HSET', burst, 'c', '1')
redis.call('PEXPIRE', burst, keep)
if marker_id(mark) == tid then
  redis.call('SET', queued, tid .. '|' .. (string.match(mark, '|(%d+)$') or '0'), 'PX', keep)
end
return 1
"""

# A debounce message starting: before its due time (the server's clock) it learns how long is left;
# at or after it, it gets the newest arguments and closes the burst (and gives up its queued marker),
# so a later call opens a new one. ARGV: task id. Returns {0, ms left}, {1, arguments}, or {2} when
# the burst is not (or no longer) this message's: expired, or already started once.
_DEBOUNCE_START: Final = _LUA_MARKER + r"""
local lease, tid = KEYS[1], ARGV[1]
local burst = lease .. ':debounce'
local cur = redis.call('HMGET', burst, 'i', 'd', 'a')
if cur[1] ~= tid then return {2} end
local t = redis.call('TIME')
local left = (tonumber(cur[2] or '0') or 0) - (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
if left > 0 then return {0, left} end
redis.call('DEL', burst)
unqueue(lease, tid)
return {1, cur[3]}
"""

_SHA: Final = {body: hashlib.sha1(body.encode()).hexdigest() for body in
               (_ACQUIRE, _RENEW, _RELEASE, _LEAVE, _FORCE, _MARK, _CONFIRM, _TRAIL,
                _DEBOUNCE, _DEBOUNCE_SENT, _DEBOUNCE_START)}


def _call(client: Any, script: str, redis_key: str, *args: Any) -> Any:
    """Run a script by SHA; after a Redis restart emptied the cache, send it once in full.

    A plain ``redis.Redis`` takes the direct path (below); every other client its own ``evalsha``.
    """
    if _unloaded and script in _unloaded.get(id(client), ()):
        # The cache was found empty for another script: this one is surely gone too, so it is
        # sent in full at once rather than after a NOSCRIPT of its own (one extra round trip per
        # flush, not one per script).
        _unloaded[id(client)].discard(script)
        return client.eval(script, 1, redis_key, *args)
    try:
        route = _direct_route(client)
        if route is not None:
            packed = _pack(script, redis_key, args)
            if packed is not None:
                return _send_direct(route, packed)
        return client.evalsha(_SHA[script], 1, redis_key, *args)
    except redis.exceptions.NoScriptError:
        if len(_unloaded) >= 1000:  # bounded: a forgotten client pays a NOSCRIPT per script
            _unloaded.clear()
        _unloaded[id(client)] = set(_SHA) - {script}
        return client.eval(script, 1, redis_key, *args)


_unloaded: dict[int, set[str]] = {}  # client id -> scripts its server has lost since (a restart)


# The direct path. redis-py's command layer (the checks, closures and hooks around every command)
# costs about as much client time as the two round trips of a lease. For a client that is exactly
# redis-py's own -- its methods unchanged, not wrapped by an instrumentation, a plain pool of plain
# connections -- _call packs EVALSHA itself (the "EVALSHA sha 1 key" prefix once per key) and does
# what Redis.execute_command does, with the same pieces: a connection from the client's pool, the
# connection's own send, read and retry policy (a dropped connection is disconnected and retried
# only on the errors that policy names; redis-py < 5.1 also requires them in retry_on_error), and
# the connection back to the pool. Replies are what the connection parsed (bytes, or str under
# decode_responses), as EVALSHA has no response callback. Anything else -- RedisCluster, Sentinel's
# pool, fakeredis, client-side caching, a single-connection client, a subclass that overrides how
# commands are sent, a custom EVALSHA callback, an encoding other than UTF-8 -- takes the normal
# path. A client is judged once, at its first call; what redis-py's observability hooks (8.x)
# would record about these commands is not recorded. With a pool of redis-py's default kind and
# size it goes one step further and keeps the connections of its scripts, see _Kept.

_REDIS_DIR: Final = os.path.dirname(os.path.abspath(redis.__file__)) + os.sep
_CLIENT_METHODS: Final = ("execute_command", "_execute_command", "_send_command_parse_response", "parse_response",
                          "evalsha", "eval")
_CONNECTION_METHODS: Final = ("send_packed_command", "read_response", "disconnect", "connect")
_RETRY_ON_ERROR_GATED: Final = hasattr(redis.Redis, "_disconnect_raise")  # redis-py < 5.1
# A route: (weak reference to the client, its pool or None for the normal path, the arguments
# of pool.get_connection, whether connections may ask to reconnect after a command, and the
# connections its pool lends the scripts for good, or None: see _Kept).
_Route = tuple[Callable[[], Any], Any, tuple[str, ...], bool, Optional["_Kept"]]
_routes: dict[int, _Route] = {}
_routes_lock = threading.Lock()
_prefixes: dict[str, dict[str, bytes]] = {}  # script -> redis key -> the packed "EVALSHA sha 1 key"
_HEADERS: Final = tuple(b"*%d\r\n" % n for n in range(32))


def _direct_route(client: Any) -> Optional[_Route]:
    """The route of ``client`` when it takes the direct path, else None."""
    route = _routes.get(id(client))
    if route is None or route[0]() is not client:
        route = _route(client)
    return route if route[1] is not None and route[1] is client.connection_pool else None


def _blpop(client: Any, key: str, timeout: float) -> Any:
    """``BLPOP key timeout``: None, or [key, value]. On the direct path where it applies, so
    that a wait cut off by an interrupt drops its connection (redis-py < 5 would lend it again
    with the BLOCKed command still on it, and the next command would read its reply)."""
    route = _direct_route(client)
    if route is None:
        return client.blpop([key], timeout=timeout)
    name, seconds = key.encode(), b"%.3f" % timeout
    return _send_direct(route, b"*3\r\n$5\r\nBLPOP\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(name), name, len(seconds), seconds))


def _route(client: Any) -> _Route:
    """Judge ``client`` once: its pool when the direct path applies, else None (remembered)."""
    pool = _direct_pool(client)
    checkout: tuple[str, ...] = ()
    reconnect = False
    kept = None
    if pool is not None:
        checkout = _checkout_arguments(pool)
        reconnect = callable(getattr(pool.connection_class, "should_reconnect", None))
        kept = _kept_for(pool)
    try:
        ref: Callable[[], Any] = weakref.ref(client)
    except TypeError:  # not weakly referenceable: judged at every call (nothing is remembered)
        return (lambda: client, None, (), False, None)
    route: _Route = (ref, pool, checkout, reconnect, kept)
    with _routes_lock:
        if len(_routes) >= 256:
            _routes.clear()
        _routes[id(client)] = route
    return route


def _checkout_arguments(pool: Any) -> tuple[str, ...]:
    # redis-py < 5.3 requires a command name here, and warns about one from 5.3 on.
    parameter = inspect.signature(type(pool).get_connection).parameters.get("command_name")
    return ("EVALSHA",) if parameter is not None and parameter.default is parameter.empty else ()


def _direct_pool(client: Any) -> Any:
    if not isinstance(client, redis.Redis) or getattr(client, "connection", None) is not None:
        return None
    cls, own = type(client), getattr(client, "__dict__", {})
    if any(name in own or not _from_redis_py(getattr(cls, name, None)) for name in _CLIENT_METHODS):
        return None
    callbacks = getattr(client, "response_callbacks", {})
    if "EVALSHA" in callbacks or "EVAL" in callbacks:
        return None
    pool = client.connection_pool
    if type(pool) not in (redis.ConnectionPool, redis.BlockingConnectionPool) or getattr(pool, "cache", None):
        return None
    conn_class = pool.connection_class
    if conn_class not in (redis.Connection, redis.SSLConnection, redis.UnixDomainSocketConnection) or not all(
        _from_redis_py(getattr(conn_class, name, None)) for name in _CONNECTION_METHODS
    ):
        return None
    kwargs = pool.connection_kwargs
    if str(kwargs.get("encoding", "utf-8")).lower().replace("_", "-") not in ("utf-8", "utf8"):
        return None
    return pool


def _from_redis_py(method: Any) -> bool:
    """True for a plain function defined inside the redis package (or no such method at all):
    not a subclass's override, nor a wrapper an instrumentation put in its place."""
    if method is None:
        return True
    return type(method) is types.FunctionType and method.__code__.co_filename.startswith(_REDIS_DIR)


def _pack(script: str, redis_key: str, args: tuple[Any, ...]) -> Optional[bytes]:
    """``EVALSHA sha 1 redis_key *args`` in RESP, as redis-py packs it; None for an argument of a
    type other than str, int or bytes (then redis-py packs it)."""
    cache = _prefixes.get(script)
    if cache is None:
        cache = _prefixes.setdefault(script, {})
    prefix = cache.get(redis_key)
    if prefix is None:
        if len(cache) >= 1024:
            cache.clear()
        key = redis_key.encode()
        prefix = cache[redis_key] = b"$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n1\r\n$%d\r\n%s\r\n" % (
            _SHA[script].encode(), len(key), key)
    count = len(args) + 4
    parts = [_HEADERS[count] if count < len(_HEADERS) else b"*%d\r\n" % count, prefix]
    fresh = _FRESH_ARGUMENTS.get(script, len(args))
    if not _pack_into(parts, args[:fresh]):
        return None
    if fresh < len(args):
        # What follows the tokens repeats from call to call (ttl, holder, policy, ...): packed once.
        rest = args[fresh:]
        tail = _tails.get((script, rest))
        if tail is None:
            more: list[bytes] = []
            if not _pack_into(more, rest):
                return None
            tail = b"".join(more)
            if len(tail) <= 512:
                if len(_tails) >= 256:
                    _tails.clear()
                _tails[(script, rest)] = tail
        parts.append(tail)
    return b"".join(parts)


def _pack_into(parts: list[bytes], args: tuple[Any, ...]) -> bool:
    for arg in args:
        kind = type(arg)
        if kind is str:
            data = arg.encode()
        elif kind is int:
            data = b"%d" % arg
        elif kind is bytes:
            data = arg
        else:
            return False
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return True


# How many leading arguments of a hot script are new at every call (its tokens); the rest is packed
# once per distinct value (they are the library's own ints and strs, so 1 and True never meet here).
_FRESH_ARGUMENTS: Final = {_ACQUIRE: 1, _RELEASE: 2}
_tails: dict[tuple[str, tuple[Any, ...]], bytes] = {}


def _send_direct(route: _Route, packed: bytes) -> Any:
    _ref, pool, checkout, reconnect, kept = route
    conn = pool.get_connection(*checkout) if kept is None else kept.take(checkout)
    try:
        return conn.retry.call_with_retry(lambda: _round_trip(conn, packed), lambda error: _dropped(conn, error))
    except BaseException as exc:
        # Cut off before its reply was read (an interrupt, a time limit): the reply would be read as
        # the next command's, so the connection goes (redis-py < 5 does not drop it on a
        # BaseException). An error reply was read whole and leaves the connection in step.
        if not isinstance(exc, redis.exceptions.ResponseError):
            conn.disconnect()
        raise
    finally:
        try:
            if reconnect and conn.should_reconnect():  # redis-py 8: asked to by a maintenance notice
                conn.disconnect()
                conn.connect()
        finally:
            if kept is None:
                pool.release(conn)
            else:
                kept.give(conn)


class _Kept:
    """The connections a pool lends to the scripts for good, instead of once per command.

    Taking a connection from redis-py's pool and giving it back costs several microseconds a
    command (redis-py 8: more than the library's own Python for a whole run). With a pool of
    redis-py's default kind and size (a ConnectionPool allowing at least _KEPT_MIN_POOL
    connections; every client made from a URL has one), the scripts therefore take a connection
    from the pool once and keep it, up to _KEPT_IDLE idle ones for the commands in flight at once.
    The pool still owns them: closing it disconnects them too, and they connect again on next use.
    A pool configured smaller, or a blocking one, lends a connection per command as configured.
    """

    __slots__ = ("_pool", "idle", "pid")

    def __init__(self, pool: Any) -> None:
        self._pool = weakref.ref(pool)  # kept as long as the pool, not longer (see _kept_for)
        self.pid = _holder.pid
        self.idle: list[Any] = []  # list.pop and append are atomic: no lock on the hot path

    def take(self, checkout: tuple[str, ...]) -> Any:
        """A connection for one command; ``checkout``: the route's pool.get_connection arguments."""
        if self.pid != _holder.pid:
            # A forked child: the parent's sockets are not its own (its pool starts afresh too).
            self.pid, self.idle = _holder.pid, []
        try:
            conn = self.idle.pop()
        except IndexError:
            return self._pool().get_connection(*checkout)  # type: ignore[union-attr]
        # What the pool checks at every checkout: a connection with bytes waiting, or closed by
        # the server, is connected anew (redis-py already drops one whose command was cut off).
        try:
            stale = conn.can_read()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
            stale = True
        if stale:
            conn.disconnect()
        return conn

    def give(self, conn: Any) -> None:
        if self.pid != _holder.pid:
            return
        if len(self.idle) < _KEPT_IDLE:
            self.idle.append(conn)
        else:
            self._pool().release(conn)  # type: ignore[union-attr]


# A pool lends its connections for good only while it allows this many (redis-py 8's default,
# 2**31 before): at most _KEPT_IDLE idle ones, so that most of it stays for its other uses.
_KEPT_MIN_POOL: Final = 100
_KEPT_IDLE: Final = 8
_kept: weakref.WeakKeyDictionary[Any, _Kept] = weakref.WeakKeyDictionary()  # pool -> its kept connections


def _kept_for(pool: Any) -> Optional[_Kept]:
    if type(pool) is not redis.ConnectionPool or getattr(pool, "max_connections", 0) < _KEPT_MIN_POOL:
        return None
    with _routes_lock:
        kept = _kept.get(pool)
        if kept is None:
            kept = _kept[pool] = _Kept(pool)
        return kept


def _round_trip(conn: Any, packed: bytes) -> Any:
    conn.send_packed_command((packed,))  # a sequence of chunks, as redis-py's packers return
    return conn.read_response()


def _dropped(conn: Any, error: Exception) -> None:
    """A connection error or timeout the retry policy supports: disconnect, then retry (or not)."""
    conn.disconnect()
    if _RETRY_ON_ERROR_GATED and not isinstance(error, tuple(conn.retry_on_error or ())):
        raise error



# ------------------------------------------------------------------------------------------------
# The watchdog: renewal of every held lease, one renewer thread per Redis node
# ------------------------------------------------------------------------------------------------


class _Watchdog:
    """One scheduler thread per process keeps every held lease alive.

    It never talks to Redis itself: it hands the leases that are due (a third of their TTL after
    their last confirmation, with those due within the next sixth) to one renewer thread per Redis
    node, which renews them in one pipeline. A node that hangs holds up only its own renewer, and
    the scheduler still reports each lease lost at its deadline. A thousand leases cost a round
    trip or two per renewal period, not one per lease.
    """

    _IDLE: Final = 30.0

    def __init__(self) -> None:
        self._leases: dict[int, Lease] = {}
        self._renewers: dict[int, _Renewer] = {}
        self._cond = _OSCondition()
        self._wake_at = math.inf
        self._running = False
        self._pid = os.getpid()
        # With nothing to renew it still wakes this often (the shortest renewal period seen, at
        # least 0.5 s), so that a new lease is due no earlier than the wake-up already planned:
        # an acquire then adds its lease without waking the thread (a notify per run costs the
        # run a thread switch).
        self._period = self._IDLE

    def add(self, lease: Lease) -> None:
        with self._cond:
            self._leases[id(lease)] = lease
            self._period = min(self._period, max(0.5, lease._ttl / 3.0))
            if not self._running:
                # Started on first use, and again if it ever died (it should not: see _loop).
                self._running = True
                _start_thread(self._loop, "single_task-watchdog")
            if lease._renew_at < self._wake_at:
                self._cond.notify()

    def discard(self, lease: Lease) -> None:
        with self._cond:
            self._leases.pop(id(lease), None)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        try:
            while self._pid == os.getpid():
                try:
                    self._tick()
                except BaseException:  # never let one bad round end renewal for the whole process
                    log_renew.exception("watchdog round failed")
                    time.sleep(0.1)
        finally:
            with self._cond:
                self._running = False

    def _tick(self) -> None:
        with self._cond:
            now = time.monotonic()
            held = [le for le in self._leases.values() if le._state == _HELD]
            due = [le for le in held if not le._renewing and le._renew_at - le._ttl / 6.0 <= now]
            expired = [le for le in held if le._deadline <= now]
            if not due and not expired:
                wake = min([le._renew_at for le in held if not le._renewing] + [le._deadline for le in held],
                           default=now + self._period)
                self._wake_at = wake
                self._cond.wait(max(0.0, wake - now))
                self._wake_at = math.inf
                return
            for lease in due:
                lease._renewing = True
        for lease in expired:
            _lose(lease, f"renewal not confirmed within its {lease._ttl}s lease", from_watchdog=True)
        by_node: dict[int, tuple[Any, list[Lease]]] = {}
        for lease in due:
            try:
                node = _node_client(lease._client, lease.redis_key)
            except Exception as exc:  # a cluster that lost the slot's owner, say: retry shortly
                log_renew.warning("Could not find the node of %r: %s", lease.key, exc)
                self._retry_soon(lease)
                continue
            by_node.setdefault(id(node), (node, []))[1].append(lease)
        for node, group in by_node.values():
            renewer = self._renewers.get(id(node))
            if renewer is None or not renewer.submit(group):
                renewer = self._renewers[id(node)] = _Renewer(self, node)
                renewer.submit(group)

    def _retry_soon(self, lease: Lease) -> None:
        # Due again in min(ttl/10, 0.5) s: _tick renews a lease a sixth of its ttl before its
        # renew_at, so that sixth is added, or a server refusing connections is asked in a loop.
        with _state_lock:
            lease._renew_at = time.monotonic() + min(lease._ttl / 10.0, 0.5) + lease._ttl / 6.0
            lease._renewing = False

    def _renew(self, node: Any, group: list[Lease]) -> None:
        """Renew ``group`` in one pipeline through ``node`` (on a renewer thread)."""
        try:
            self._renew_group(node, group)
        finally:
            self.wake()

    def _renew_group(self, node: Any, group: list[Lease]) -> None:
        tokens = [lease._token for lease in group]
        sent = time.monotonic()
        try:
            pipe = node.pipeline(transaction=False)
            for lease, token in zip(group, tokens):
                pipe.evalsha(_SHA[_RENEW], 1, lease.redis_key, token, int(lease._ttl * 1000))
            replies = pipe.execute(raise_on_error=False)
        except Exception as exc:  # RedisError, or a client the user's code closed
            log_renew.warning("Could not renew %d lease(s): %s; retrying", len(group), exc)
            for lease in group:
                self._retry_soon(lease)
            return
        for lease, token, reply in zip(group, tokens, replies):
            if isinstance(reply, redis.RedisError):
                # NOSCRIPT after a restart, or MOVED after a cluster reshard: once more on its own,
                # through this renewer's client, which loads the script, or (a move) the lease's
                # client, which follows it -- never a client whose gevent sockets belong to another
                # thread ("Cannot switch to a different thread").
                own = isinstance(reply, redis.exceptions.NoScriptError) or _gevent_sockets()
                again = node if own else lease._client
                try:
                    reply = _call(again, _RENEW, lease.redis_key, token, int(lease._ttl * 1000))
                except Exception as exc:
                    reply = exc
            with _state_lock:
                lease._renewing = False
                current = lease._state == _HELD and lease._token == token  # not given back, nor rerun since
                if current and not isinstance(reply, Exception) and int(reply) == 1:
                    lease._deadline = sent + lease._ttl
                    lease._renew_at = sent + lease._ttl / 3.0
            if not current:
                continue
            if isinstance(reply, Exception):
                log_renew.warning("Could not renew %r: %s", lease.key, reply)
                self._retry_soon(lease)
            elif int(reply) == 1:
                log_renew.debug("Renewed %r", lease.key)
            else:
                _lose(lease, "at renewal the key was gone or held by another owner", from_watchdog=True)


class _Renewer:
    """A thread that renews the leases of one Redis node, so that a node that hangs delays no other."""

    def __init__(self, watchdog: _Watchdog, node: Any) -> None:
        self.watchdog = watchdog
        self.node = node  # kept, so that its id stays its own
        self.client = _own_client(node)
        self.pending: list[Lease] = []
        self.cond = _OSCondition()
        self.alive = True
        _start_thread(self._loop, "single_task-renewer")

    def submit(self, group: list[Lease]) -> bool:
        """Queue ``group`` for renewal; False if this renewer has retired (start another)."""
        with self.cond:
            if not self.alive:
                return False
            self.pending.extend(group)
            self.cond.notify()
            return True

    def _loop(self) -> None:
        try:
            while self.watchdog._pid == os.getpid():
                with self.cond:
                    if not self.pending:
                        self.cond.wait(_Watchdog._IDLE)
                    if not self.pending:
                        self.alive = False  # idle: retire (submit sees it under the same lock)
                        return
                    group, self.pending = self.pending, []
                try:
                    self.watchdog._renew(self.client, group)
                except BaseException:
                    log_renew.exception("renewal round failed")
                    for lease in group:
                        self.watchdog._retry_soon(lease)
        finally:
            with self.cond:
                self.alive = False
                left, self.pending = self.pending, []
            for lease in left:
                self.watchdog._retry_soon(lease)


def _own_client(client: Any) -> Any:
    """The client a renewer sends through. Under gevent it is a twin with a pool of its own: the
    renewer is a real OS thread, and a gevent socket opened by a greenlet of the main thread cannot
    be used from another thread ("Cannot switch to a different thread")."""
    if not _gevent_sockets():
        return client
    pool: Any = getattr(client, "connection_pool", None)
    if type(pool) in (redis.ConnectionPool, redis.BlockingConnectionPool):  # not Sentinel's
        with contextlib.suppress(Exception):
            return type(client)(connection_pool=type(pool)(connection_class=pool.connection_class,
                                                           **pool.connection_kwargs))
    return client


class _Callbacks:
    """Runs on_lost callbacks reported by the watchdog, on a thread of their own."""

    def __init__(self) -> None:
        self._queue: list[tuple[Lease, str]] = []
        self._cond = _OSCondition()
        self._running = False

    def put(self, item: tuple[Lease, str]) -> None:
        with self._cond:
            self._queue.append(item)
            if not self._running:
                self._running = True
                _start_thread(self._loop, "single_task-callbacks")
            self._cond.notify()

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue:
                        self._cond.wait()
                    lease, reason = self._queue.pop(0)
                _send("lost", lease.key, lease=lease, task=lease._task, reason=reason)
                try:
                    if lease._on_lost is not None:
                        lease._on_lost(lease)
                except BaseException:  # SystemExit too: a callback must not end this thread
                    log_renew.exception("on_lost callback for %r raised", lease.key)
        finally:
            with self._cond:
                self._running = False


def _os_lock() -> Any:
    """A lock of the OS's, also when gevent has patched ``threading``: the watchdog's threads are
    real OS threads, and gevent's primitives neither block nor wake across them."""
    if "gevent" in sys.modules:
        try:
            from gevent import monkey

            if monkey.is_module_patched("threading"):
                return monkey.get_original("_thread", "allocate_lock")()
        except ImportError:
            pass
    import _thread

    return _thread.allocate_lock()


class _OSCondition:
    """The condition variable of the watchdog, its renewers and its callback thread, made of OS
    locks (see _os_lock). Each has one waiting thread; a notify with nobody waiting makes the next
    wait return at once, and every waiter looks again at what it waits for."""

    def __init__(self) -> None:
        self._mutex = _os_lock()
        self._wakeup = _os_lock()
        self._wakeup.acquire()  # held: no wake-up pending

    def __enter__(self) -> _OSCondition:
        self._mutex.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mutex.release()

    def notify(self) -> None:
        with contextlib.suppress(RuntimeError):  # a wake-up is pending already
            self._wakeup.release()

    def wait(self, timeout: Optional[float] = None) -> None:
        self._mutex.release()
        try:
            if timeout is None:
                self._wakeup.acquire()
            else:
                self._wakeup.acquire(True, max(0.0, timeout))
        finally:
            self._mutex.acquire()


def _gevent_sockets() -> bool:
    """True when gevent has patched ``socket`` in this process."""
    if "gevent" not in sys.modules:
        return False
    try:
        from gevent import monkey
    except ImportError:
        return False
    return bool(monkey.is_module_patched("socket"))


def _start_thread(target: Callable[[], None], name: str) -> None:
    """Start a daemon OS thread, a real one even when gevent has patched ``threading``."""
    if "gevent" in sys.modules:
        try:
            from gevent import monkey

            if monkey.is_module_patched("threading"):
                monkey.get_original("_thread", "start_new_thread")(target, ())
                return
        except ImportError:
            pass
    threading.Thread(target=target, name=name, daemon=True).start()


_state_lock = _os_lock()
_watchdog = _Watchdog()
_callbacks = _Callbacks()


def _after_fork_in_child() -> None:
    # Leases belong to the process that took them: a forked child neither renews, releases nor
    # reports them (they keep the parent's pid), and starts threads of its own when it takes a
    # lease. Locks that a thread of the parent held at the fork would never be released here.
    global _watchdog, _holder, _callbacks, _state_lock, _clients_lock, _routes_lock, _signals_lock
    _watchdog = _Watchdog()
    _callbacks = _Callbacks()
    _holder = _Holder()
    _state_lock = _os_lock()
    _clients_lock = threading.Lock()
    _routes_lock = threading.Lock()
    _signals_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- clients -------------------------------------------------------------------------------------

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()
_URL_SCHEMES: Final = ("redis://", "rediss://", "unix://")


_sync_client_types: set[type] = set()  # the client classes found to be blocking, by the checks below


def _check_client(client: Any) -> Any:
    if client is None or type(client) in _sync_client_types:
        return client
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
    if "evalsha" not in getattr(client, "__dict__", {}):  # the class decided it, not this one object
        _sync_client_types.add(type(client))
    return client


def _check_url(url: str, what: str) -> str:
    """Refuse a URL that is not Redis's or that redis-py cannot parse, naming where it came from."""
    if url in _valid_urls:  # parsing costs more than a whole run's own Python: once per URL
        return url
    if not url.startswith(_URL_SCHEMES):
        raise ConfigurationError(f"{what} {_redact(url)!r} is not a Redis URL; use redis://, rediss:// or unix://")
    try:
        redis.ConnectionPool.from_url(url)  # parses only; connects nothing
    except ValueError as exc:
        raise ConfigurationError(f"{what} {_redact(url)!r} cannot be parsed: {exc}") from None
    # redis-py reads a database that is not a number as 0: refuse it rather than share db 0.
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    db = parse_qs(parts.query).get("db", [""])[0] or (parts.path.strip("/") if not url.startswith("unix://") else "")
    if db and not db.isdigit():
        raise ConfigurationError(
            f"{what} {_redact(url)!r} names database {db!r}; a Redis database is a number, e.g. redis://host:6379/0"
        )
    if len(_valid_urls) < 256:
        _valid_urls.add(url)
    return url


_valid_urls: set[str] = set()


def _client_of(spec: single_run, task: Any) -> Any:
    """The Redis client of ``spec``: its own, or the one found for ``task``'s app (resolved once)."""
    client = spec._resolved_client
    if client is None:
        client = spec.client
        if client is None:
            client = _default_url(getattr(task, "app", None) if hasattr(task, "apply_async") else None)
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
            options: dict[str, Any] = {"socket_timeout": 10.0, "retry": retry,
                                       # redis-py < 5.1 retries only the errors listed here too
                                       "retry_on_error": [redis.exceptions.ConnectionError]}
            if not url.startswith("unix://"):  # redis-py < 5 refuses it for unix sockets
                options["socket_connect_timeout"] = 5.0
            client = redis.Redis.from_url(url, **options)
            _clients[url] = client
        return client


def _default_url(app: Any = None) -> str:
    """$SINGLE_TASK_REDIS_URL, else the Redis broker or result backend of the Celery app in play.

    That app is ``app`` (the task's own) when there is one, else the app current in this thread
    or set as default, else the one app of the process that uses Redis: Celery's current app is
    thread-local, so a producer's threads would otherwise see none.
    """
    url = os.environ.get(ENV_URL)
    if url:
        return _check_url(url, f"${ENV_URL}")
    tried = [f"${ENV_URL} (unset)"]
    try:
        from celery import _state
    except ImportError:
        raise ConfigurationError("no Redis to hold leases: pass client=..., or set $" + ENV_URL) from None
    chosen = [a for a in (app, getattr(_state._tls, "current_app", None), _state.default_app) if a is not None]
    for candidate in chosen:
        found = _redis_url_of(candidate, tried)
        if found:
            return found
    others = [a for a in list(_state._get_active_apps()) if a not in chosen]
    found_all = [(a, _redis_url_of(a, tried)) for a in others]
    usable = [(a, u) for a, u in found_all if u]
    if len(usable) == 1:
        return usable[0][1]
    if usable:
        names = ", ".join(repr(a.main) for a, _ in usable)
        raise ConfigurationError(
            f"no Redis to hold leases: several Celery apps use Redis ({names}) and none is current in this "
            f"thread; pass client=..., set ${ENV_URL}, or call app.set_default() on the one to use "
            f"(tried: {'; '.join(tried)})"
        )
    if not chosen and not others:
        tried.append("no Celery app is current in this thread, and the process has none")
    raise ConfigurationError("no Redis to hold leases: pass client=..., or set one of: " + "; ".join(tried))


def _redis_url_of(app: Any, tried: list[str]) -> Optional[str]:
    """The Redis URL of ``app``'s broker, else of its result backend; None (noted in ``tried``)."""
    conf = app.conf
    for name in ("broker_url", "result_backend"):
        first = _first_url(conf.get(name))
        if first and first.startswith(_URL_SCHEMES):
            return _check_url(first, f"Celery {name}")
        if first and first.startswith("redis+socket://"):
            return "unix://" + first[len("redis+socket://") :]
        tried.append(f"Celery app {getattr(app, 'main', '?')!r} {name} ({_redact(first) if first else 'unset'}: "
                     "not Redis)")
    return None


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


def _template_fields(template: str, what: str) -> list[str]:
    """The fields of a key template. Every key is a ``str.format`` template -- a decorator's, a
    with block's and a constant one alike -- so a literal brace is always written doubled."""
    try:
        return [field for _, field, _, _ in _formatter.parse(template) if field is not None]
    except ValueError as exc:
        raise ConfigurationError(
            f"{what} {template!r} is malformed: {exc}; keys are str.format templates, so write {{{{ and }}}} "
            "for a literal brace"
        ) from None


_literals: dict[str, Optional[str]] = {}  # template -> _literal_key(template), for single_run per use
_NOT_SEEN: Final = object()


def _literal_key(template: str) -> Optional[str]:
    """The key a template without fields stands for (braces undoubled, checked), else None."""
    literal = _literals.get(template, _NOT_SEEN)
    if literal is _NOT_SEEN:
        literal = None if _template_fields(template, "key") else template.format()
        if literal is not None:
            _check_key(literal)
        if len(_literals) >= 1024:
            _literals.clear()
        _literals[template] = literal
    return cast(Optional[str], literal)


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
        fields = _template_fields(template, f"key template of {self.name}")
        parsed = list(_formatter.parse(template))
        if not fields:
            self.constant = template.format()
            _check_key(self.constant)
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
                    f"its parameters are: {', '.join(params) or '(none)'} (for a literal brace write {{{{ or }}}})"
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
    if type(value) is float and minimum <= value < math.inf and (value > 0 or minimum <= 0):
        return value  # the common case, decided in one line (NaN fails the comparison)
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


def _task_of(wrapper: Callable[..., Any]) -> tuple[Any, Any]:
    """(the Celery task whose own ``run`` is ``wrapper`` and that is executing in this thread, also
    when called directly, or None -- a decorated helper that a task calls is not that task; the
    task executing in this thread, whichever it is, or None), from one look at the task stack."""
    if not _task_getter:
        # Imported once, lazily: a plain decorated function never pays for importing Celery, and
        # every call after the first skips the import machinery (microseconds on the hot path).
        _task_getter.append(_current_task_getter())
    task = _task_getter[0]()
    if task is None:
        return None, None
    run = getattr(task, "run", None)
    return (task if getattr(run, "__func__", run) is wrapper else None), task


def _current_task_getter() -> Callable[[], Any]:
    """Celery's ``get_current_task``, made cheap for the common case of no task in this thread.

    Celery keeps the task stack in a thread-local ``Local`` whose storage is a dict by thread
    ident; its ``top`` raises and catches two exceptions when this thread has no entry. Looking
    the entry up first costs one dict lookup; with an entry, Celery's own ``top`` answers.
    """
    try:
        from celery import _state
        from celery.utils.threads import Local
    except ImportError:
        return lambda: None
    stack: Any = getattr(_state, "_task_stack", None)
    local: Any = getattr(stack, "_local", None)
    storage = getattr(local, "__storage__", None) if type(local) is Local else None
    if not isinstance(storage, dict) or not callable(getattr(local, "__ident_func__", None)):
        return cast(Callable[[], Any], _state.get_current_task)  # another kind of stack: ask Celery

    def current_task() -> Any:
        # The ident function is read at every call: gevent and eventlet replace it.
        return stack.top if local.__ident_func__() in storage else None

    return current_task


def _run(
    spec: single_run,
    fn: Callable[..., R],
    wrapper: Callable[..., Any],
    renderer: _KeyRenderer,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Optional[R]:
    """One decorated call: acquire, run (again, while reruns are owed), release."""
    key = renderer.render(args, kwargs)
    found, outer = _task_of(wrapper)
    client = _client_of(spec, found)
    # Called directly (not by a worker), the task is only where the app and Redis come from.
    task = None if found is None or found.request.called_directly else found
    if task is not None and _DEBOUNCE_HEADER in (task.request.headers or ()):  # send_once(debounce=...)'s message
        args, kwargs = _debounced(spec, task, key, client, args, kwargs)
    # A decorated helper that a task calls records that task's id all the same: a redelivery of
    # the task's message then recognises the helper's lease as its own earlier attempt.
    if task is not None:
        task_id = task.request.id or ""
    else:
        task_id = "" if outer is None or outer.request.called_directly else str(outer.request.id or "")
    bound = found is not None and bool(args) and args[0] is found  # a bind=True task's self
    # The newest call's arguments, sent with its rerun request (the task's self is not stored).
    arguments = _encode_arguments(key, args[1:] if bound else args, kwargs) if spec.rerun_with == "latest" else ""
    self_arg = found if bound else None
    lease = _first_lease(spec, key, task, client, arguments, task_id, args[1:] if bound else args, kwargs)
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
                    if lease._rerun_args:
                        args, kwargs = _decode_arguments(lease._rerun_args, self_arg)
                    _pass_on_rerun(spec, fn, lease, task, args, kwargs, exc)
                raise
            outcome, args, kwargs = _end_of_run(spec, key, lease, task, client, args, kwargs, self_arg)
            if outcome == _RERUN:
                retakes = 0
                log_acquire.info("Running %r again: a rerun was requested during the last run", key)
                continue
            if spec.on_busy != "rerun" or outcome not in (_NOT_OWNER, _UNCONFIRMED) or retakes >= _RETAKES:
                return result
            # Rerun requests are kept in the lease, so a lost lease may have taken some with it.
            # Take the key again and run, or (busy) pass a request on to whoever holds it now.
            retakes += 1
            _current.reset(context_token)  # the lost lease is no longer ours: not a nested use
            context_token = _current.set(lease._parent)
            again = _retake(spec, key, task, client, arguments, task_id)
            if again is None:
                return result
            log_acquire.info("Running %r again: its lease was lost, and rerun requests with it", key)
            again._parent = lease._parent
            lease = again
            _current.reset(context_token)
            context_token = _current.set(lease)
    finally:
        _current.reset(context_token)


def _first_lease(spec: single_run, key: str, task: Any, client: Any, arguments: str, task_id: str,
                 call_args: tuple[Any, ...], kwargs: dict[str, Any]) -> Optional[Lease]:
    """Take the lease for a decorated call, or apply its on_busy policy (None: return at once)."""
    in_worker = task is not None and not task.request.is_eager
    policy = spec.on_busy
    if policy == "retry" and in_worker:
        try:
            return _acquire(spec, key, "retry", task, client, "", task_id)
        except AlreadyRunning as exc:
            retry = _busy_retry(spec, task, exc, getattr(exc, "left", None))
            _busy(key, "retry", "retry_sent", task, 0)
            raise retry from None
    if policy == "retry":
        policy = "raise"  # no broker to re-send through: the caller sees AlreadyRunning
    try:
        return _acquire(spec, key, policy, task, client, arguments, task_id)
    except _Throttled as exc:  # under "rerun": one run when the interval ends
        if not in_worker:
            raise ConfigurationError(
                f"{key!r} ran less than min_interval ago; on_busy='rerun' serves that with a task sent for "
                "when the interval ends, which needs a Celery worker: outside one use 'wait' or 'skip'",
                key,
            ) from None
        _send_trailing(spec, task, key, client, exc.left, call_args, kwargs)
        return None
    except AlreadyRunning:
        if task is not None and policy == "raise":
            _expect_already_running(task)
        raise


def _end_of_run(spec: single_run, key: str, lease: Lease, task: Any, client: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any], self_arg: Any) -> tuple[int, tuple[Any, ...], dict[str, Any]]:
    """Release after a run that returned; the outcome, and the arguments of a rerun it owes."""
    in_worker = task is not None and not task.request.is_eager
    outcome = _release(lease, "end")
    while outcome == _COOLING:  # a rerun is owed, but min_interval has not passed yet
        if lease._rerun_args:
            args, kwargs = _decode_arguments(lease._rerun_args, self_arg)
        if in_worker:
            _send_trailing(spec, task, key, client, lease._cooling, args[1:] if self_arg is not None else args, kwargs)
            outcome = _release(lease, "trail")
        else:
            time.sleep(lease._cooling)  # still holding the lease: nobody could run meanwhile
            outcome = _release(lease, "end")
    if outcome == _UNCONFIRMED and spec.on_busy == "rerun":
        outcome = _release_patiently(lease)
    if outcome == _RERUN and lease._rerun_args:
        args, kwargs = _decode_arguments(lease._rerun_args, self_arg)
    return outcome, args, kwargs


def _release_patiently(lease: Lease) -> int:
    """Retry a release that Redis did not answer while the lease may still be alive there: only
    its holder can see a rerun it owes. (A release that did get through retries as NOT_OWNER.)"""
    outcome = _UNCONFIRMED
    while outcome == _UNCONFIRMED and time.monotonic() < lease._deadline:
        time.sleep(0.05)
        outcome = _release(lease, "end", warn=False)
    return outcome


def _retake(spec: single_run, key: str, task: Any, client: Any, arguments: str, task_id: str) -> Optional[Lease]:
    """After a lost lease, take the key again, or ask its new holder for a rerun (None). Redis may
    be restarting: keep trying for one ttl before giving up with a WARNING."""
    give_up = time.monotonic() + spec.ttl
    while True:
        try:
            return _acquire(spec, key, "rerun", task, client, arguments, task_id)
        except _Throttled:
            return None  # free, inside its interval: a later run is due anyway
        except RedisUnavailable as exc:
            if time.monotonic() >= give_up:
                log_release.warning(
                    "Lease on %r was lost, and reruns requested during the run may be lost with it: %s",
                    key, exc.message,
                )
                return None
        time.sleep(0.1)


def _expect_already_running(task: Any) -> None:
    # A busy key under on_busy="raise" is an expected outcome, not a crash: like a task declared
    # with throws=(AlreadyRunning,), Celery then logs one INFO line instead of an ERROR with a
    # traceback. The result is FAILURE with AlreadyRunning all the same.
    throws = tuple(getattr(task, "throws", ()) or ())
    if AlreadyRunning not in throws:
        task.throws = (*throws, AlreadyRunning)


def _busy_retry(spec: single_run, task: Any, exc: AlreadyRunning, after: Optional[float] = None) -> Any:
    """Re-send the current Celery task after ``retry_countdown`` seconds (or ``after``: when a
    minimum interval ends), as Task.retry does, but without counting the attempt against the
    task's own ``max_retries``."""
    from celery.exceptions import Retry

    countdown = spec.retry_countdown * random.uniform(0.5, 1.5)  # spread a herd of retries
    if after is not None:
        countdown = after + 0.01 + random.uniform(0.0, min(0.5, spec.retry_countdown))
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
        task.apply_async(call_args, kwargs, **_routed_like(task, call_args, kwargs), task_id=str(uuid.uuid4()))
        log_release.warning(
            "Run of %r raised %s; the rerun it owed was sent as a new task", lease.key, type(exc).__name__
        )
        return
    log_release.warning(
        "Run of %r raised %s; the rerun it owed is dropped (outside a worker there is nobody to run it)",
        lease.key,
        type(exc).__name__,
    )


def _routed_like(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Options for a new message routed as the one that started this run (queue, routing key,
    priority, headers, time limits), but a task of its own: no id, retry count, callbacks or group."""
    options = dict(task.signature_from_request(task.request, args, kwargs).options)
    for name in ("task_id", "link", "link_error", "group_id", "group_index", "chord", "chain", "expires", "retries"):
        options.pop(name, None)
    return options


def _send_trailing(spec: single_run, task: Any, key: str, client: Any, left: float, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> None:
    """Under min_interval and rerun: make sure one run starts when the interval ends -- a task
    sent for that moment, at most one per key (the trailing edge of a throttle)."""
    redis_key = _lease_key(spec.prefix, key)
    new_id = str(uuid.uuid4())
    keep_ms = int(left * 1000) + 2 * spec._ttl_ms
    try:
        sent = int(_call(client, _TRAIL, redis_key, task.request.id or "", new_id, keep_ms))
    except redis.RedisError as exc:
        raise RedisUnavailable(f"could not schedule the run of {key!r} after its min_interval: {exc}", key) from exc
    if sent == 2:
        # This is that trailing task, started early (the worker's clock is not Redis's): again,
        # for the time left, keeping its id and its retry count.
        raise _busy_retry(spec, task, AlreadyRunning(f"{key!r} is inside its min_interval", key), left)
    if sent == 1:
        task.apply_async(args, kwargs, **_routed_like(task, args, kwargs), task_id=new_id, countdown=left + 0.01)
        log_acquire.info("Throttled %r: one run is sent for when its min_interval ends, in %.2fs", key, left)
    else:
        log_acquire.info("Throttled %r: a run is already sent for when its min_interval ends", key)


_MAX_ARGUMENT_BYTES: Final = 64 * 1024


def _encode_arguments(key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """A call's arguments as JSON for rerun_with="latest"; refused before anything reaches Redis."""
    try:
        text = json.dumps([list(args), kwargs], separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"rerun_with='latest' keeps the arguments of a busy call for {key!r} as JSON, and these are not ({exc}); "
            "pass ids, strings, numbers, lists and dicts, or use rerun_with='holder'"
        ) from None
    if len(text.encode()) > _MAX_ARGUMENT_BYTES:
        raise ValueError(
            f"rerun_with='latest' keeps the arguments of a busy call for {key!r}, and these are "
            f"{len(text.encode())} bytes as JSON (at most {_MAX_ARGUMENT_BYTES}); pass an id, and load the data "
            "in the run"
        )
    return text


def _decode_arguments(text: str, bound: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments _encode_arguments stored, for the rerun (``bound``: the task's self, if any).

    The one piece of data from Redis this module parses, and only as JSON: never pickle.
    """
    value = json.loads(text)
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], list) and isinstance(value[1], dict)):
        raise ValueError(f"the stored rerun arguments are not what single_run wrote: {text[:80]!r}")
    args = tuple(value[0])
    return ((bound, *args) if bound is not None else args), value[1]


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
    if isinstance(eta, datetime.datetime):
        if eta.tzinfo is None:  # Celery reads a naive eta in UTC (or in the app's timezone)
            zone = datetime.timezone.utc if task.app.conf.enable_utc else task.app.timezone
            eta = eta.replace(tzinfo=zone)
        delay = max(delay, (eta - datetime.datetime.now(datetime.timezone.utc)).total_seconds())
    return float(ttl) + max(0.0, float(delay))


# -- debounce ------------------------------------------------------------------------------------
#
# send_once(debounce=...) keeps one burst per key in Redis (see _DEBOUNCE): the task id that will
# run, when it is due by the server's clock, and the newest call's arguments as JSON. Only the
# burst's first call publishes a message, for its due time, marked by a header; every other call
# updates the burst and returns the same AsyncResult. A marked message that starts before its due
# time sends itself again for the time left, as Celery's retry does (same id, retries kept) but
# without holding a worker slot; at its due time it closes the burst and runs with the arguments
# stored last. A message without the header costs the run nothing: Redis is only asked for those.

_DEBOUNCE_HEADER: Final = "single_task_debounce"


def _send_debounced(task: Any, spec: single_run, key: str, client: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any], debounce: Any, max_wait: Any, options: dict[str, Any]) -> Any:
    """send_once with ``debounce``: join the open burst of ``key``, or open one and publish its message.

    (Longer than most: the option checks come first, before anything reaches Redis.)
    """
    if debounce is None:
        raise ConfigurationError(f"max_wait={max_wait!r} only applies with debounce=seconds (send_once of {key!r})",
                                 key)
    debounce_s = _check_seconds("debounce", debounce, minimum=0.001)
    max_wait_s = None if max_wait is None else _check_seconds("max_wait", max_wait, minimum=0.001)
    if max_wait_s is not None and max_wait_s < debounce_s:
        raise ConfigurationError(
            f"max_wait={max_wait!r} is shorter than debounce={debounce!r} for {key!r}: a burst would always run "
            "at max_wait; pass max_wait >= debounce, or max_wait=None for no cap",
            key,
        )
    for name in ("countdown", "eta"):
        if options.get(name) is not None:
            raise ConfigurationError(
                f"send_once(debounce=...) for {key!r} schedules the run itself; drop {name}={options[name]!r}", key)
    try:
        payload = json.dumps([list(args), kwargs], separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"send_once(debounce=...) keeps the newest arguments for {key!r} in Redis as JSON, and these are not "
            f"({exc}); pass ids, strings, numbers, lists and dicts"
        ) from None
    size = len(payload.encode())
    if size > _MAX_ARGUMENT_BYTES:
        raise ValueError(
            f"send_once(debounce=...) keeps the newest arguments for {key!r} in Redis, and these are {size} bytes "
            f"as JSON (at most {_MAX_ARGUMENT_BYTES}); pass an id, and load the data in the run"
        )
    if task.app.conf.task_always_eager:
        return task.apply_async(args, kwargs, **options)  # no broker to wait in: runs now, as apply_async does
    lease_key = _lease_key(spec.prefix, key)
    unsent = lease_key + ":debounce"
    task_id = options.pop("task_id", None) or _unsent.pop(unsent, None) or str(uuid.uuid4())
    ttl_ms = int(_queued_ttl(spec, task, options) * 1000)
    max_wait_ms = 0 if max_wait_s is None else max(1, int(max_wait_s * 1000))
    try:
        reply = _call(client, _DEBOUNCE, lease_key, task_id, max(1, int(debounce_s * 1000)), max_wait_ms, payload,
                      ttl_ms, _PROVISIONAL_MS)
    except BaseException as exc:
        _remember_unsent(unsent, task_id)
        if isinstance(exc, redis.RedisError):
            raise RedisUnavailable(f"could not debounce {key!r} in Redis, so nothing was sent: {exc}", key) from exc
        raise
    burst_id, due_ms = _text(reply[1]), max(0, int(reply[2]))
    if int(reply[0]) == 0:
        log_acquire.debug("Debounced %r: joined the burst of task %s, due in %d ms", key, burst_id, due_ms)
        _send("deduplicated", key, task=task, task_id=burst_id)
        return task.AsyncResult(burst_id)
    headers = {**(options.pop("headers", None) or {}), _DEBOUNCE_HEADER: "1"}
    try:
        result = task.apply_async(args, kwargs, task_id=task_id, countdown=due_ms / 1000.0, headers=headers,
                                  **options)
    except BaseException:
        with contextlib.suppress(Exception):  # nothing was queued, so no burst may say so
            _call(client, _DEBOUNCE_SENT, lease_key, task_id, ttl_ms, "0")
        raise
    try:
        _call(client, _DEBOUNCE_SENT, lease_key, task_id, ttl_ms, "1")
    except redis.RedisError as exc:
        log_acquire.warning("Could not confirm the debounce burst of %r (%s); it expires in %.0fs", key, exc,
                            _PROVISIONAL_MS / 1000.0)
    return result


def _debounced(spec: single_run, task: Any, key: str, client: Any, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A debounce message starting in a worker: raise Celery's Retry to send it again for its due
    time, or return the newest call's arguments (also in ``task.request``, so that a retry or a
    rerun sent from this run carries them, as a message that is no longer a debounce message)."""
    request = task.request
    try:
        reply = _call(client, _DEBOUNCE_START, _lease_key(spec.prefix, key), request.id or "")
    except redis.RedisError as exc:
        raise RedisUnavailable(f"could not read the debounced arguments of {key!r}, so it did not run: {exc}",
                               key) from exc
    if int(reply[0]) == 0:
        from celery.exceptions import Retry

        left = int(reply[1]) / 1000.0
        sig = task.signature_from_request(request, None, None, countdown=left, retries=request.retries)
        sig.apply_async()
        log_acquire.debug("Debounced %r: a later call moved its run, sent again for %.3fs from now", key, left)
        raise Retry(f"debounced: due in {left:.3f}s", when=left, sig=sig)
    request.headers.pop(_DEBOUNCE_HEADER, None)
    if int(reply[0]) == 2:
        log_acquire.info("Debounced %r: its burst is gone (expired, or this message started before); running "
                         "with the message's own arguments", key)
        return args, kwargs
    raw = reply[1]
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw or "")
    bound = task if args and args[0] is task else None
    try:
        if len(text.encode()) > _MAX_ARGUMENT_BYTES:
            raise ValueError(f"{len(text.encode())} bytes")
        newest, newest_kwargs = _decode_arguments(text, bound)
    except ValueError as exc:
        raise SingleTaskError(
            f"the debounced arguments of {key!r} in Redis are not what send_once stored ({exc}), so it did not "
            "run; something else wrote that key: keep other writers out of the library's prefix",
            key,
        ) from None
    request.args, request.kwargs = list(newest[1:] if bound is not None else newest), newest_kwargs
    return newest, newest_kwargs


def _spec_of(obj: Any) -> tuple[single_run, _KeyRenderer, Any]:
    """The single_run behind a decorated function or Celery task, and the task if it is bound."""
    run = getattr(obj, "run", None) if hasattr(obj, "apply_async") else obj
    found = getattr(run, "__single_run__", None)
    if found is None:
        raise ConfigurationError(f"{obj!r} is not decorated with @single_run")
    spec, renderer = found
    bound = obj if inspect.ismethod(run) else None
    return spec, renderer, bound


# -- queued markers die with their message -------------------------------------------------------
#
# A send_once marker says "a message for this key is waiting"; its run gives it up when it starts.
# A message that will never start must give it up too, or every send_once of its key returns a
# dead message until queued_ttl. The worker knows, and tells through Celery's signals:
# task_revoked (revoked, terminated, or expired: expired=True), task_rejected and task_unknown (a
# message it could not run). The handlers are connected once per process, at the first
# @single_run decoration in a process that has imported Celery -- under @app.task or @shared_task
# it always has, since the decorator above is looked up first -- so a process without Celery never
# imports it, and a worker has them before it takes its first message. Each finds the task's
# single_run, renders the key from the message's arguments and removes the marker (and a debounce
# burst) only while it still names that message's task id (_DEBOUNCE_SENT with '0'): a newer message's marker is never
# touched. They run in the worker's consumer, where Celery writes the revoked state to its result
# backend the same way: one round trip each.
#
# Celery announces a revoked message only when it gets to it. For a message the worker holds for
# its eta or countdown that is the eta, so those are swept every _SWEEP_S seconds against the
# worker's revoked ids and their expiry, from the consumer's own timer.

_SWEEP_S: Final = 0.5
_MAX_HELD: Final = 10000  # eta messages tracked per worker; beyond that they wait for their eta
_markers_watched: list[bool] = []  # non-empty once the handlers are connected in this process
_markers_lock = threading.Lock()
_eta_held: dict[str, Any] = {}  # task id -> the worker's Request of a decorated task held for its eta
_sweeping: list[Any] = []  # the timer entry of the sweep, once started


def _watch_queued_markers() -> None:
    """Connect the marker handlers to Celery's signals, once per process (a fork keeps them)."""
    with _markers_lock:
        if _markers_watched:
            return
        _markers_watched.append(True)
        try:
            from celery import signals
        except ImportError:
            return
        for signal, handler in ((signals.task_revoked, _on_task_revoked), (signals.task_rejected, _on_task_rejected),
                                (signals.task_unknown, _on_task_unknown), (signals.task_received, _on_task_received)):
            signal.connect(handler, weak=False, dispatch_uid=f"single_task.{handler.__name__}")


def _on_task_revoked(sender: Any = None, request: Any = None, terminated: bool = False, expired: bool = False,
                     **_: Any) -> None:
    if request is not None:
        why = "expired" if expired else "terminated" if terminated else "revoked"
        _drop_marker(sender, getattr(request, "id", None), getattr(request, "args", None),
                     getattr(request, "kwargs", None), why)


def _on_task_rejected(sender: Any = None, message: Any = None, **_: Any) -> None:
    headers = getattr(message, "headers", None) or {}
    _drop_rejected(sender, message, headers.get("task"), headers.get("id"))


def _on_task_unknown(sender: Any = None, message: Any = None, name: Any = None, id: Any = None,
                     **_: Any) -> None:
    _drop_rejected(sender, message, name, id)


def _drop_rejected(consumer: Any, message: Any, name: Any, task_id: Any) -> None:
    """A message the worker refused: its task (if this worker's app knows the name), its arguments
    if the worker could decode them (content it accepts only), and its marker."""
    try:
        task = getattr(getattr(consumer, "app", None), "tasks", {}).get(name) if name else None
        if task is None or not task_id:
            return
        args = kwargs = None
        with contextlib.suppress(Exception):  # a body it refused (ContentDisallowed) stays unread
            body = message.decode()
            if isinstance(body, (list, tuple)) and len(body) == 3:  # protocol 2: args, kwargs, embed
                args, kwargs = body[0], body[1]
            elif isinstance(body, dict):  # protocol 1
                args, kwargs = body.get("args"), body.get("kwargs")
    except Exception:
        log_release.exception("Could not look at a rejected message %s of %r", task_id, name)
        return
    _drop_marker(task, task_id, args, kwargs, "rejected")


def _on_task_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    # Every message a worker accepts passes here: the common case returns at the first test.
    try:
        if getattr(request, "eta", None) is None:
            return
        if getattr(getattr(request.task, "run", None), "__single_run__", None) is None or len(_eta_held) >= _MAX_HELD:
            return
        _eta_held[request.id] = request
        if not _sweeping:
            _sweeping.append(sender.timer.call_repeatedly(_SWEEP_S, _sweep_held))
    except Exception:
        log_release.exception("Could not track the eta message %s", getattr(request, "id", "?"))


def _sweep_held() -> None:
    """Release the markers of held eta messages that were revoked or expired since they came."""
    try:
        from celery.worker import state

        now = datetime.datetime.now(datetime.timezone.utc)
        for task_id, request in list(_eta_held.items()):
            expires = request.expires
            revoked = task_id in state.revoked
            if revoked or (expires is not None and expires < now):
                _eta_held.pop(task_id, None)
                _drop_marker(request.task, task_id, request.args, request.kwargs, "revoked" if revoked else "expired")
            elif request.eta <= now:
                _eta_held.pop(task_id, None)  # due: Celery checks it from here on, and tells task_revoked
    except Exception:
        log_release.exception("The sweep of held eta messages failed")


def _drop_marker(task: Any, task_id: Any, args: Any, kwargs: Any, why: str) -> None:
    """Remove the queued marker of ``task_id``'s key if it still names ``task_id``; log, never raise.

    ``args`` None means the arguments are unknown (a body the worker refused): then only a key
    that needs none of them can be found.
    """
    if not task_id or getattr(getattr(task, "run", None), "__single_run__", None) is None:
        return
    key = "?"
    try:
        spec, renderer, bound = _spec_of(task)
        call_args = tuple(args or ())
        call_kwargs = dict(kwargs or {})
        try:
            key = renderer.render((bound, *call_args) if bound is not None else call_args, call_kwargs,
                                  partial=args is None)
        except TypeError:
            if args is not None:
                raise
            log_release.info("Cannot tell the key of %s message %s without its arguments; its queued marker "
                             "expires by queued_ttl", why, task_id)
            return
        _check_key(key)
        # The marker, and a send_once(debounce=...) burst (later calls would join a dead message).
        removed = _call(_client_of(spec, task), _DEBOUNCE_SENT, _lease_key(spec.prefix, key), str(task_id), 0, "0")
    except Exception:
        log_release.warning("Could not release the queued marker of %r for %s message %s", key, why, task_id,
                            exc_info=True)
        return
    if removed:
        log_release.info("Released the queued marker of %r: its message %s was %s", key, task_id, why)


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
  0  success: listed; KEY is held (show); released (release, release --queued); KEY is free (wait)
  1  the negative answer: KEY is not held (show, release); KEY has no queued marker (release
     --queued); still held at --timeout (wait)
  2  usage or configuration error, Redis unreachable, or release without --force

examples:
  python -m single_task --url redis://localhost:6379/0 list
  python -m single_task -A proj.celery list 'sync:*' --json
  python -m single_task show sync:42
  python -m single_task release sync:42 --force
  python -m single_task release sync:42 --queued --force
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
    """The argparse parser of ``python -m single_task`` (a table of options more than code)."""
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
                  "key at once. Without --force it only shows the holder and exits 2.\n\n"
                  "With --queued it removes KEY's send_once marker instead (the lease is left alone), for\n"
                  "a message that will never run (a purged queue): the next send_once then publishes. A\n"
                  "message still in the broker runs all the same. Without --force it only shows the\n"
                  "marker's task id and exits 2.")
    sub.add_argument("key", metavar="KEY", help="the key as passed to single_run (what `list` prints)")
    sub.add_argument("--force", action="store_true", help="really delete the lease (or the marker)")
    sub.add_argument("--queued", action="store_true", help="release KEY's queued marker, not its lease")

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
    table = [("KEY", "KIND", "HOLDER", "TASK ID", "SINCE (UTC)", "LEFT", "FENCE", "NOTE")]
    for row in rows:
        if row["kind"] == "lease":
            where = f"{row['host']}:{row['pid']}" if row["host"] else "?"
            table.append((_printable(row["key"]), "lease", where, row["task_id"] or "-",
                          _utc(row["held_since_ms"]), _seconds(row["time_left_s"]), str(row["fence"]), _note(row)))
        else:
            note = f"age {_seconds(row['age_s'])}" + (", being published" if row["provisional"] else "")
            table.append((_printable(row["key"]), "queued", "-", _printable(row["task_id"] or row["value"]),
                          _utc(row["marked_at_ms"]), _seconds(row["time_left_s"]), "-", note))
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
    redis_key = _lease_key(prefix, args.key)
    # The fence key holds the last fence, and after a release ":token" of the lease released.
    digits = _text(client.get(redis_key + ":fence") or "").partition(":")[0]
    last_fence = int(digits) if digits.isdigit() else None
    cooling = client.pttl(redis_key + ":last")  # min_interval: the last start, kept that long
    cooling_s = cooling / 1000.0 if isinstance(cooling, int) and cooling > 0 else None
    if args.json:
        print(json.dumps({"key": args.key, "lease": lease, "queued": queued[0] if queued else None,
                          "last_fence": last_fence, "cooling_down_s": cooling_s}, ensure_ascii=False))
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
            print(f"queued:     {_marker_text(queued[0])}")
        else:
            print("queued:     none")
        print(f"last fence: {last_fence if last_fence is not None else '-'}")
        if cooling_s is not None:
            print(f"throttle:   cooling down, {_seconds(cooling_s)} left of its min_interval")
    return _EXIT_OK if lease is not None else _EXIT_NO


def _cli_release(client: Any, prefix: str, args: Any) -> int:
    if args.queued:
        return _cli_release_queued(client, prefix, args)
    rows = _describe(client, prefix, [("lease", args.key)])
    if not rows:
        print(f"{_printable(args.key)} is not held: nothing to release")
        return _EXIT_NO
    if not args.force:
        return _refused(f"{_printable(args.key)} is held by {_holder_text(rows[0])}",
                        "the holder may still be running; pass --force to delete the lease")
    # One script reads the holder, deletes the lease and hands the key to the first waiter, so
    # what is printed is exactly what was removed.
    reply = _call(client, _FORCE, _lease_key(prefix, args.key), _HANDOFF_MS)
    removed = {} if not reply else {k: _text(v) for k, v in zip("tfihs", reply) if v is not None}
    if not removed:
        print(f"{_printable(args.key)} was freed meanwhile: nothing to release")
        return _EXIT_NO
    row = _lease_row(args.key, removed, -2, 0, None)
    print(f"released {_printable(args.key)}: removed the lease held by {_holder_text(row)}")
    return _EXIT_OK


def _cli_release_queued(client: Any, prefix: str, args: Any) -> int:
    """``release KEY --queued``: remove the marker only while it names the task id just read (the
    script send_once uses after a failed publish), so what is printed is exactly what was removed;
    a marker replaced in between is read again."""
    marker = _lease_key(prefix, args.key) + ":queued"
    for _ in range(3):
        rows = _describe(client, prefix, [("queued", args.key)])
        if not rows:
            print(f"{_printable(args.key)} has no queued marker: nothing to release")
            return _EXIT_NO
        if not args.force:
            return _refused(f"{_printable(args.key)} is queued: {_marker_text(rows[0])}",
                            "its message may still be waiting in the broker; pass --force to remove the marker")
        if int(_call(client, _CONFIRM, marker, rows[0]["task_id"], 0, "0")) == 1:
            print(f"released {_printable(args.key)}: removed the queued marker of {_marker_text(rows[0])}")
            return _EXIT_OK
    raise _CliError(f"the queued marker of {args.key!r} kept changing while it was released; try again")


def _refused(shown: str, why: str) -> int:
    """``release`` without ``--force``: show what would be removed, say why not, exit 2."""
    print(shown)
    print(f"single_task: not released: {why}", file=sys.stderr)
    return _EXIT_ERROR


def _marker_text(row: dict[str, Any]) -> str:
    """A queued marker in words: its task id, age, whether it is still being published, time left."""
    parts = [f"task {_printable(row['task_id'])}"]
    if row["age_s"] is not None:
        parts.append(f"marked {_seconds(row['age_s'])} ago")
    if row["provisional"]:
        parts.append("being published")
    if row["time_left_s"] is not None:
        parts.append(f"{_seconds(row['time_left_s'])} left")
    return ", ".join(parts)


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
                rows.append(_queued_row(key, first, pttl, now_ms))
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


def _queued_row(key: str, value: Any, pttl: Any, now_ms: Optional[int]) -> dict[str, Any]:
    text = _text(value)
    task_id, sep, marked = text.rpartition("|")
    if not sep or not marked.isdigit():
        task_id, marked = text, ""
    provisional = task_id.startswith("p:")  # being published
    task_id = task_id[2:] if provisional else task_id
    since = int(marked) if marked else None
    pttl = int(pttl) if isinstance(pttl, int) else -2
    return {"key": key, "kind": "queued", "task_id": task_id, "value": text, "provisional": provisional,
            "marked_at": None if since is None else _iso(since), "marked_at_ms": since,
            "age_s": None if since is None or now_ms is None else max(0.0, (now_ms - since) / 1000.0),
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
