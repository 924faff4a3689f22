"""Misuse: every mistake a user could really make gets a clear error, as early as possible.

"Clear" means the error's type says what kind of problem it is (``ConfigurationError`` for a
setting or key that cannot work, ``RedisUnavailable`` when Redis could not be asked, Python's own
``TypeError`` for wrong call arguments) and its message names the problem (the option, the key,
the function) and, where there is one, the fix. "Early" means at construction or decoration when
the mistake is visible there, and before anything is written to Redis otherwise. After a misuse
that reaches Redis, no key of the library is left behind.
"""

from __future__ import annotations

import contextlib
import functools
import math
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from single_task import (
    AlreadyRunning,
    ConfigurationError,
    RedisUnavailable,
    SingleTaskError,
    current_lease,
    is_running,
    send_once,
    single_run,
)
from support.redis_server import RedisServer, free_port


def library_keys(r: redis.Redis) -> list[str]:
    return sorted(r.keys("single_task:*"))  # type: ignore[arg-type]


def lease_leftovers(r: redis.Redis) -> list[str]:
    """Every key of the library except fence counters, which a run that did happen leaves (with
    an expiry) on purpose, so that fences keep growing."""
    return [k for k in library_keys(r) if not k.endswith(":fence")]


def work(n: int) -> int:
    return n


# -- the key ------------------------------------------------------------------------------------


def test_a_key_field_naming_no_parameter_is_refused_at_decoration_with_the_parameters() -> None:
    with pytest.raises(ConfigurationError, match=r"\{acount_id\}.*names no parameter.*account_id"):

        @single_run(key="sync:{acount_id}")
        def sync(account_id: int) -> None: ...


@pytest.mark.parametrize("template", ["sync:{0}", "sync:{}"])
def test_a_positional_key_field_is_refused_at_decoration_asking_for_a_name(template: str) -> None:
    with pytest.raises(ConfigurationError, match=r"positional field.*name the parameter instead, e\.g\. \{n\}"):
        single_run(key=template)(work)


@pytest.mark.parametrize("template", ["sync:{n", "sync:n}", "sync:{n}}"])
def test_a_malformed_key_template_is_refused_at_decoration(template: str) -> None:
    with pytest.raises(ConfigurationError, match="malformed") as caught:
        single_run(key=template)(work)
    assert template in str(caught.value)


def test_an_unknown_conversion_in_a_key_template_is_refused_at_decoration() -> None:
    with pytest.raises(ConfigurationError, match=r"sync:\{n!z\}.*conversion"):
        single_run(key="sync:{n!z}")(work)


def test_a_key_field_on_star_args_is_refused_at_decoration_pointing_to_a_key_callable() -> None:
    def many(*ids: int) -> None: ...

    with pytest.raises(ConfigurationError, match=r"\*ids; use a key callable"):
        single_run(key="batch:{ids}")(many)


def test_an_empty_key_is_refused_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="key must not be empty"):
        single_run(key="")


@pytest.mark.parametrize("key", [42, b"sync:1", ["sync", 1]])
def test_a_key_that_is_neither_a_template_nor_a_callable_is_refused_at_construction(key: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"key must be a str template or a callable, not {type(key).__name__}"):
        single_run(key=key)


def test_a_constant_key_over_1024_bytes_is_refused_at_construction() -> None:
    with pytest.raises(ConfigurationError, match=r"2000 bytes.*limited to 1024"):
        single_run(key="x" * 2000)


def test_a_rendered_key_over_1024_bytes_fails_the_call_before_redis_is_touched(redis_url: str, r: redis.Redis) -> None:
    ran = []
    job = single_run(key="doc:{text}", client=redis_url)(lambda text: ran.append(text))
    with pytest.raises(ConfigurationError, match=r"is 1504 bytes; keys are limited to 1024 bytes") as caught:
        job("€" * 500)  # 500 characters, 1500 bytes of UTF-8: the limit is in bytes
    assert caught.value.key is not None and caught.value.key.startswith("doc:€")
    assert ran == []
    assert library_keys(r) == []


def test_a_key_of_exactly_1024_bytes_works(redis_url: str, r: redis.Redis) -> None:
    key = "é" * 512  # 1024 bytes of UTF-8
    with single_run(key=key, client=redis_url) as lease:
        assert lease.key == key
        assert r.exists(lease.redis_key)
    assert lease_leftovers(r) == []


def test_a_key_callable_that_raises_fails_the_call_naming_the_function_and_takes_no_lock(
    redis_url: str, r: redis.Redis
) -> None:
    def key_of(account: dict[str, int]) -> str:
        return f"sync:{account['id']}"

    @single_run(key=key_of, client=redis_url)
    def sync(account: dict[str, int]) -> None:
        raise AssertionError("the body must not run")

    with pytest.raises(ConfigurationError, match=r"key callable of .*sync raised KeyError: 'id'") as caught:
        sync({"pk": 1})
    assert isinstance(caught.value.__cause__, KeyError)
    assert library_keys(r) == []


@pytest.mark.parametrize("returned", [7, None, b"sync:7", ""])
def test_a_key_callable_returning_no_non_empty_str_fails_the_call(
    redis_url: str, r: redis.Redis, returned: Any
) -> None:
    @single_run(key=lambda n: returned, client=redis_url)
    def job(n: int) -> None:
        raise AssertionError("the body must not run")

    with pytest.raises(ConfigurationError, match=f"must return a non-empty str, not {returned!r}"):
        job(7)
    assert library_keys(r) == []


def test_a_key_callable_that_cannot_take_the_functions_arguments_is_refused_at_decoration() -> None:
    def sync(account_id: int, full: bool = False) -> None: ...

    with pytest.raises(ConfigurationError, match=r"key callable .*sync.*account_id"):
        single_run(key=lambda: "sync")(sync)


def test_a_template_that_renders_empty_fails_the_call(redis_url: str, r: redis.Redis) -> None:
    job = single_run(key="{name}", client=redis_url)(lambda name: name)
    with pytest.raises(ConfigurationError, match=r"key '\{name\}' of .* rendered empty"):
        job("")
    assert library_keys(r) == []


def test_a_template_field_that_cannot_be_looked_up_fails_the_call_naming_the_template(
    redis_url: str, r: redis.Redis
) -> None:
    job = single_run(key="user:{user.id}", client=redis_url)(lambda user: user)
    with pytest.raises(ConfigurationError, match=r"could not build key 'user:\{user\.id\}'.*AttributeError"):
        job(None)
    assert library_keys(r) == []


def test_a_call_missing_a_key_argument_raises_typeerror_and_takes_no_lock(redis_url: str, r: redis.Redis) -> None:
    job = single_run(key="job:{n}", client=redis_url)(work)
    with pytest.raises(TypeError, match="'n'"):
        job(m=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'n'"):
        job()  # type: ignore[call-arg]
    assert library_keys(r) == []


def test_wrong_call_arguments_raise_typeerror_before_any_lock_is_asked_for(redis_url: str, r: redis.Redis) -> None:
    job = single_run(key="job:{n}", client=redis_url)(work)
    with pytest.raises(TypeError, match="positional argument"):
        job(1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'m'"):
        job(1, m=2)  # type: ignore[call-arg]
    assert library_keys(r) == []
    # Under contention the TypeError must not turn into a skip (None) or a wait.
    with single_run(key="job:1", client=redis_url), pytest.raises(TypeError):
        threaded(job, 1, 2)


def threaded(fn: Any, *args: Any) -> Any:
    """Call ``fn`` in another thread (this one may hold the key: a call here would be nested) and
    return its result or raise its exception."""
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append((True, fn(*args)))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(20)
    assert outcome, "the call did not return within 20 s"
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


@pytest.mark.parametrize(
    "key",
    ["konto:Zürich", "帳戶:四十二", "emoji:\U0001f512", "tab\tand\nnewline", "nul\x00byte", "  spaces  "],
)
def test_keys_with_any_unicode_text_work_and_is_running_sees_them(redis_url: str, r: redis.Redis, key: str) -> None:
    @single_run(key="{name}", client=redis_url)
    def job(name: str) -> tuple[bool, bool]:
        return is_running(job, name), is_running(job, name + "x")

    assert job(key) == (True, False)
    assert is_running(job, key) is False
    assert lease_leftovers(r) == []


def test_differently_normalised_unicode_keys_are_different_keys(redis_url: str) -> None:
    # "é" as one code point and as "e" + combining accent: Python and Redis see different keys,
    # so normalise user-supplied text yourself if both forms can occur.
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    job = single_run(key="{name}", client=redis_url)(lambda name: name)
    with single_run(key=composed, client=redis_url):
        assert is_running(job, composed) is True
        assert is_running(job, decomposed) is False


def test_a_key_that_is_not_valid_unicode_fails_clearly(redis_url: str, r: redis.Redis) -> None:
    job = single_run(key="file:{name}", client=redis_url)(lambda name: name)
    bad = "report-\udce9.csv"  # what os.fsdecode gives for a Latin-1 file name on a UTF-8 system
    with pytest.raises(ConfigurationError, match=r"surrogate|not valid") as caught:
        job(bad)
    assert caught.value.key == f"file:{bad}"
    with pytest.raises(ConfigurationError, match=r"surrogate|not valid"):
        is_running(job, bad)
    assert library_keys(r) == []


# -- the options --------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [0, -1, 0.001, 0.009, math.nan, math.inf, -math.inf])
def test_a_ttl_that_is_not_positive_finite_and_at_least_10ms_is_refused(ttl: float) -> None:
    with pytest.raises(ConfigurationError, match=r"ttl=.* is out of range: it must be a finite number >= 0\.01s"):
        single_run(key="k", ttl=ttl)


@pytest.mark.parametrize("ttl", ["30", None, True, [30]])
def test_a_ttl_that_is_not_a_number_is_refused(ttl: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"ttl must be a number of seconds, not {type(ttl).__name__}"):
        single_run(key="k", ttl=ttl)


@pytest.mark.parametrize("on_busy", ["Skip", "queue", "", None, "retry "])
def test_an_unknown_on_busy_is_refused_listing_the_policies(on_busy: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"not a policy; use one of 'skip', 'raise', 'wait', 'retry', 'rerun'"):
        single_run(key="k", on_busy=on_busy)


@pytest.mark.parametrize("on_busy", ["skip", "raise", "retry", "rerun"])
def test_a_timeout_with_a_policy_that_never_waits_is_refused(on_busy: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"timeout=5 only applies to on_busy='wait' .*{on_busy!r} never waits"):
        single_run(key="k", on_busy=on_busy, timeout=5)


@pytest.mark.parametrize("timeout", [-1, math.nan, "5"])
def test_a_wait_timeout_that_is_not_a_non_negative_number_is_refused(timeout: Any) -> None:
    with pytest.raises(ConfigurationError, match="timeout"):
        single_run(key="k", on_busy="wait", timeout=timeout)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retry_countdown": -1}, r"retry_countdown=-1 is out of range"),
        ({"queued_ttl": 0}, r"queued_ttl=0 is out of range"),
        ({"prefix": "locks:{app}:"}, r"prefix 'locks:\{app\}:' must not contain braces"),
        ({"prefix": b"locks:"}, r"prefix must be a str, not bytes"),
        ({"on_lost": "log"}, r"on_lost must be callable, not str"),
        ({"replicas": -1}, r"replicas=-1 must be a whole number"),
    ],
)
def test_other_unusable_options_are_refused_at_construction_naming_the_option(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        single_run(key="k", **options)


# -- the client ---------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["localhost:6379", "http://127.0.0.1:6379/0", "127.0.0.1", "redis//127.0.0.1"])
def test_a_client_string_that_is_not_a_redis_url_is_refused_at_construction(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"is not a Redis URL; use redis://, rediss:// or unix://"):
        single_run(key="k", client=url)


def test_a_url_with_a_password_is_redacted_in_the_error() -> None:
    with pytest.raises(ConfigurationError) as caught:
        single_run(key="k", client="http://user:hunter2@127.0.0.1:6379/0")
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:port/0", "redis://127.0.0.1:6379/0?socket_timeout=soon"])
def test_a_redis_url_that_cannot_be_parsed_is_refused_at_construction(url: str) -> None:
    with pytest.raises(ConfigurationError, match="client URL"):
        single_run(key="k", client=url)


def test_a_bad_url_in_the_environment_is_refused_naming_the_variable(monkeypatch: Any) -> None:
    monkeypatch.setenv("SINGLE_TASK_REDIS_URL", "localhost:6379")
    job = single_run(key="k")(work)
    with pytest.raises(ConfigurationError, match=r"\$SINGLE_TASK_REDIS_URL.*not a Redis URL"):
        job(1)


@pytest.mark.parametrize("client", [{"host": "localhost"}, 6379, object()])
def test_a_client_that_is_not_a_redis_client_is_refused_at_construction(client: Any) -> None:
    expected = f"client must be a redis-py client or a Redis URL, not {type(client).__name__}"
    with pytest.raises(ConfigurationError, match=expected):
        single_run(key="k", client=client)


def test_a_connection_pool_is_refused_at_construction(redis_url: str) -> None:
    with pytest.raises(ConfigurationError, match="not ConnectionPool"):
        single_run(key="k", client=redis.ConnectionPool.from_url(redis_url))


def test_the_client_class_instead_of_an_instance_is_refused_at_construction() -> None:
    with pytest.raises(ConfigurationError, match=r"instance.*Redis\("):
        single_run(key="k", client=redis.Redis)


def test_an_asyncio_client_is_refused_at_construction(redis_url: str) -> None:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_url)
    with pytest.raises(ConfigurationError, match=r"asyncio|async"):
        single_run(key="k", client=client)


def test_a_client_with_decode_responses_works(redis_url: str, r: redis.Redis) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    job = single_run(key="decoded", client=client, on_busy="raise")(lambda: current_lease())
    lease = job()
    assert lease is not None and lease.fence > 0
    with single_run(key="decoded", client=redis_url), pytest.raises(AlreadyRunning):
        job()
    assert lease_leftovers(r) == []


def test_an_unreachable_redis_fails_fast_naming_the_key_and_runs_nothing() -> None:
    ran: list[int] = []

    @single_run(key="sync:{n}", client=f"redis://127.0.0.1:{free_port()}/0")
    def job(n: int) -> None:
        ran.append(n)

    start = time.monotonic()
    with pytest.raises(RedisUnavailable, match=r"could not take the lease for 'sync:1', so it did not run") as caught:
        job(1)
    assert time.monotonic() - start < 2.0
    assert caught.value.key == "sync:1"
    assert ran == []


@pytest.fixture(scope="module")
def password_server() -> Iterator[RedisServer]:
    # Set after start: the helper's readiness ping carries no password.
    with RedisServer() as server:
        server.client().config_set("requirepass", "secret")
        yield server


@pytest.mark.parametrize(
    "credentials",
    [":wrong@", "default:wrong@", "nobody:secret@", ""],
    ids=["password", "user+password", "user", "none"],
)
def test_wrong_credentials_fail_naming_the_key_and_authentication(
    password_server: RedisServer, credentials: str
) -> None:
    ran: list[int] = []

    @single_run(key="auth:{n}", client=f"redis://{credentials}127.0.0.1:{password_server.port}/0")
    def job(n: int) -> None:
        ran.append(n)

    with pytest.raises(RedisUnavailable, match=r"'auth:1'.*(?i:auth|password)") as caught:
        job(1)
    assert "wrong" not in str(caught.value) and "secret" not in str(caught.value)
    with pytest.raises(RedisUnavailable, match=r"'auth:2'.*(?i:auth|password)"):
        is_running(job, 2)
    assert ran == []
    assert password_server.client(password="secret").keys("single_task:*") == []


def test_the_right_password_works(password_server: RedisServer) -> None:
    url = f"redis://:secret@127.0.0.1:{password_server.port}/0"
    assert single_run(key="auth-ok", client=url)(lambda: "ran")() == "ran"


def test_wrong_credentials_are_not_an_outage_so_fail_open_does_not_run_unlocked(password_server: RedisServer) -> None:
    ran = []
    url = f"redis://:wrong@127.0.0.1:{password_server.port}/0"
    job = single_run(key="auth-open", client=url, fail_open=True)(lambda: ran.append(1))
    with pytest.raises(SingleTaskError, match=r"'auth-open'.*(?i:auth)"):
        job()
    assert ran == []


@contextlib.contextmanager
def not_redis(reply: bytes) -> Iterator[int]:
    """A TCP server on a free loopback port that answers every connection with ``reply`` and
    hangs up, or (for b"") accepts and never says anything."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.1)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            if reply:
                with contextlib.suppress(OSError):
                    conn.sendall(reply)
                conn.close()
            else:
                held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize(
    "reply",
    [b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", b"SSH-2.0-OpenSSH_9.2\r\n", b"\x00\x01\xff garbage\r\n"],
    ids=["http", "ssh", "garbage"],
)
def test_a_server_that_is_not_redis_fails_fast_naming_the_key(reply: bytes) -> None:
    ran: list[int] = []
    with not_redis(reply) as port:

        @single_run(key="svc:{n}", client=f"redis://127.0.0.1:{port}/0")
        def job(n: int) -> None:
            ran.append(n)

        start = time.monotonic()
        # redis-py names it a protocol error; 4.5, reconnecting once, says the connection is not ready.
        pattern = r"(?i)could not take the lease for 'svc:1'.*(Protocol Error|not ready)"  # hiredis: "error"
        with pytest.raises(RedisUnavailable, match=pattern):
            job(1)
        assert time.monotonic() - start < 2.0
    assert ran == []


def test_a_server_that_never_answers_fails_within_the_socket_timeout() -> None:
    ran = []
    with not_redis(b"") as port:
        job = single_run(key="silent", client=f"redis://127.0.0.1:{port}/0")(lambda: ran.append(1))
        start = time.monotonic()
        with pytest.raises(RedisUnavailable, match=r"could not take the lease for 'silent'.*Timeout"):
            job()
        assert time.monotonic() - start < 15.0  # the 10 s socket timeout of clients built from URLs
    assert ran == []


# -- what gets decorated ------------------------------------------------------------------------


def test_decorating_a_class_is_refused_saying_functions_are_supported() -> None:
    with pytest.raises(ConfigurationError, match=r"decorates functions, not the class .*Report"):

        @single_run(key="report")
        class Report: ...


def test_decorating_a_coroutine_function_is_refused_saying_async_is_not_supported() -> None:
    with pytest.raises(ConfigurationError, match=r"fetch is a coroutine function.*does not support async functions"):

        @single_run(key="fetch")
        async def fetch() -> None: ...


def test_decorating_an_async_generator_function_is_refused() -> None:
    async def stream() -> Any:
        yield 1

    with pytest.raises(ConfigurationError, match="does not support async functions"):
        single_run(key="stream")(stream)


def test_decorating_a_generator_function_is_refused_saying_the_body_would_run_outside_the_lease() -> None:
    with pytest.raises(ConfigurationError, match=r"rows is a generator function.*outside the lease"):

        @single_run(key="rows")
        def rows() -> Iterator[int]:
            yield 1


@pytest.mark.parametrize("wrapper", [staticmethod, classmethod])
def test_single_run_above_staticmethod_or_classmethod_is_refused_with_the_fix(wrapper: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"@{wrapper.__name__} above @single_run"):
        single_run(key="k")(wrapper(work))


def test_single_run_below_staticmethod_works_on_the_class_and_on_instances(redis_url: str) -> None:
    class Jobs:
        @staticmethod
        @single_run(key="static:{n}", client=redis_url)
        def run(n: int) -> int:
            return n

    assert Jobs.run(1) == 1
    assert Jobs().run(2) == 2


def test_a_partial_or_callable_object_works_with_an_explicit_key(redis_url: str) -> None:
    class Sync:
        def __call__(self, n: int) -> int:
            return n

    assert single_run(key="partial", client=redis_url)(functools.partial(work, 3))() == 3
    assert single_run(key="obj:{n}", client=redis_url)(Sync())(4) == 4


def test_a_partial_without_a_key_is_refused_asking_for_one() -> None:
    with pytest.raises(ConfigurationError, match="key="):
        single_run()(functools.partial(work, 3))


def test_bare_single_run_without_parentheses_is_explained_at_a_positional_call() -> None:
    @single_run  # type: ignore[arg-type]
    def job(n: int) -> int:
        return n

    with pytest.raises(ConfigurationError, match=r"@single_run without parentheses\? Write @single_run\(\)"):
        job(1)  # type: ignore[call-arg]


@pytest.mark.parametrize("call", [lambda job: job(n=1), lambda job: job()], ids=["keyword", "no-arguments"])
def test_bare_single_run_without_parentheses_is_explained_at_any_call(call: Any) -> None:
    @single_run  # type: ignore[arg-type]
    def job(n: int = 0) -> int:
        return n

    with pytest.raises(ConfigurationError, match=r"@single_run\(\)"):
        call(job)


def test_bare_single_run_under_app_task_is_refused_at_decoration_with_the_fix() -> None:
    from celery import Celery

    app = Celery("misuse_bare", broker="memory://", backend="cache+memory://")
    with pytest.raises(ConfigurationError, match=r"@single_run\(\)"):

        @app.task
        @single_run  # type: ignore[arg-type]
        def job(n: int) -> int:
            return n


def test_single_run_above_app_task_is_refused_at_decoration_with_the_fix() -> None:
    from celery import Celery

    app = Celery("misuse_above", broker="memory://", backend="cache+memory://")
    fix = r"(?s)above @app\.task.*put it below.*@app\.task\n    @single_run\(\.\.\.\)"
    with pytest.raises(ConfigurationError, match=fix):

        @single_run(key="k")  # type: ignore[arg-type]
        @app.task
        def job(n: int) -> int:
            return n


@pytest.mark.parametrize("key", ["twice", None], ids=["same-key", "default-key"])
def test_decorating_twice_with_the_same_key_is_refused_at_decoration(key: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"twice|already decorated"):
        single_run(key=key)(single_run(key=key)(work))


# -- using it -----------------------------------------------------------------------------------


@pytest.mark.parametrize("on_busy", ["skip", "raise", "wait", "rerun"])
def test_nested_use_of_the_same_key_in_one_thread_raises_at_once_and_keeps_the_outer_lease(
    redis_url: str, r: redis.Redis, on_busy: Any
) -> None:
    inner = single_run(key="nest:{n}", client=redis_url, on_busy=on_busy)(work)

    @single_run(key="nest:{n}", client=redis_url)
    def outer(n: int) -> str:
        lease = current_lease()
        assert lease is not None
        start = time.monotonic()
        with pytest.raises(AlreadyRunning, match=r"already held by this very run .*would wait for itself") as caught:
            inner(n)
        assert time.monotonic() - start < 1.0
        assert caught.value.key == f"nest:{n}"
        assert not lease.lost and r.hget(lease.redis_key, "t") is not None
        return "outer done"

    assert outer(1) == "outer done"
    assert lease_leftovers(r) == []


def test_a_nested_with_block_on_the_same_key_raises_and_the_outer_block_still_releases(
    redis_url: str, r: redis.Redis
) -> None:
    lock = single_run(key="nest-with", client=redis_url, on_busy="wait")
    with lock as outer:
        with pytest.raises(AlreadyRunning, match="'nest-with' is already held by this very run"), lock:
            pass
        assert current_lease() is outer and not outer.lost
    assert current_lease() is None
    assert lease_leftovers(r) == []


def test_nested_use_of_a_different_key_works(redis_url: str, r: redis.Redis) -> None:
    with single_run(key="outer", client=redis_url), single_run(key="inner", client=redis_url) as inner:
        assert inner.key == "inner"
    assert lease_leftovers(r) == []


@pytest.mark.parametrize(
    ("key", "on_busy", "message"),
    [
        ("sync:{n}", "raise", "needs a plain string key"),
        (lambda n: "sync", "raise", "needs a plain string key"),
        (None, "raise", "needs a plain string key"),
        ("report", "rerun", "cannot be rerun"),
    ],
    ids=["template", "callable", "none", "rerun"],
)
def test_a_with_block_that_cannot_work_is_refused_before_redis_is_asked(key: Any, on_busy: Any, message: str) -> None:
    lock = single_run(key=key, on_busy=on_busy, client=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(ConfigurationError, match=message), lock:
        raise AssertionError("the block must not run")


def test_retry_outside_a_worker_raises_already_running(redis_url: str, r: redis.Redis) -> None:
    job = single_run(key="retry-here", client=redis_url, on_busy="retry")(work)
    with single_run(key="retry-here", client=redis_url), pytest.raises(AlreadyRunning) as caught:
        threaded(job, 1)
    assert caught.value.key == "retry-here"
    assert lease_leftovers(r) == []


def test_is_running_on_an_undecorated_function_is_refused_naming_it() -> None:
    with pytest.raises(ConfigurationError, match=r"work.*is not decorated with @single_run"):
        is_running(work, 1)


def test_is_running_with_wrong_arguments_raises_typeerror(redis_url: str) -> None:
    job = single_run(key="job:{n}", client=redis_url)(work)
    with pytest.raises(TypeError):
        is_running(job, 1, 2)


def test_is_running_needs_only_the_arguments_its_key_uses(redis_url: str) -> None:
    def sync(account_id: int, payload: str, full: bool = False) -> None: ...

    job = single_run(key="sync:{account_id}", client=redis_url)(sync)
    with single_run(key="sync:7", client=redis_url):
        assert is_running(job, 7) is True
        assert is_running(job, account_id=7) is True
        assert is_running(job, 8, "x", full=True) is False
    with pytest.raises(TypeError, match="account_id"):
        is_running(job, payload="x")


def test_send_once_on_a_plain_function_is_refused_asking_for_the_task(redis_url: str) -> None:
    job = single_run(key="job:{n}", client=redis_url)(work)
    with pytest.raises(ConfigurationError, match="send_once needs the Celery task"):
        send_once(job, (1,))


def test_retry_on_a_task_with_no_retries_left_still_runs_after_the_holder(
    redis_url: str, r: redis.Redis, worker_factory: Any
) -> None:
    # on_busy="retry" re-sends without counting the attempt, so a task with max_retries=0 (or
    # one that has used them all) is not failed by contention.
    from tests.misuse_app import app, no_retries_left

    app.conf.update(broker_url=redis_url, result_backend=redis_url)
    worker_factory("tests.misuse_app", pool="solo", concurrency=1)
    with single_run(key="no-retries:1", client=redis_url):
        result = no_retries_left.apply_async((1,))
        deadline = time.monotonic() + 20
        while result.state != "RETRY" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert result.state == "RETRY"  # busy: re-sent, not failed with MaxRetriesExceededError
    assert result.get(timeout=30) == 0  # ran, and the re-send did not count as a retry
    assert lease_leftovers(r) == []
