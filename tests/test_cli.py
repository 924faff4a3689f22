"""`python -m single_task`: list, show, release and wait, with exit codes a shell script can rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import single_task
from single_task import current_lease, main, single_run
from support.redis_server import RedisServer
from tests.conftest import ROOT


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the command line in this process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def cli_process(*args: str, env: Any = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ, **(env or {}))
    environment.pop("SINGLE_TASK_REDIS_URL", None) if env is None or "SINGLE_TASK_REDIS_URL" not in env else None
    return subprocess.run([sys.executable, "-m", "single_task", *args], cwd=ROOT, capture_output=True, text=True,
                          env=environment, timeout=timeout)


@pytest.fixture
def held(redis_url: str) -> Iterator[dict[str, Any]]:
    """Three leases held by this process (one with braces in its key) and one queued marker."""
    leases: dict[str, Any] = {}
    specs = [single_run(key=k, client=redis_url, ttl=30) for k in ("report", "a}}b", "sync:42")]
    for spec in specs:
        lease = spec.__enter__()
        leases[lease.key] = lease
    r = redis.Redis.from_url(redis_url)
    r.set("single_task:{queued-only}:queued", "4b9d3a1e-task-id", px=60000)
    # Leftovers that are not leases: a fence counter, a stale wait queue, and unrelated keys.
    r.set("single_task:{old}:fence", "123")
    r.rpush("single_task:{report}:q", "tok")
    r.hset("single_task:{report}:w", "tok", "1|2|3|{}")
    r.set("other:{report}", "x")
    r.hset("single_task:{not-a-lease}:w", "a", "b")
    yield leases
    for spec in reversed(specs):
        spec.__exit__(None, None, None)


def test_list_shows_every_lease_and_queued_marker_and_nothing_else(capsys: Any, redis_url: str,
                                                                   held: dict[str, Any]) -> None:
    code, out, err = cli(capsys, "--url", redis_url, "list")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["KEY", "KIND", "HOLDER"]
    assert [line.split()[0] for line in lines[1:-1]] == ["a}b", "queued-only", "report", "sync:42"]
    report = next(line for line in lines if line.startswith("report "))
    assert f"{single_task._HOST}:{os.getpid()}" in report and str(held["report"].fence) in report
    assert "1 waiting" in report
    assert "4b9d3a1e-task-id" in next(line for line in lines if line.startswith("queued-only"))
    assert lines[-1].startswith("3 lease(s), 1 queued marker(s)")


def test_list_json_gives_holder_times_and_fence(capsys: Any, redis_url: str, held: dict[str, Any]) -> None:
    code, out, _ = cli(capsys, "list", "--json", "--url", redis_url)  # options after the command work too
    rows = {(row["key"], row["kind"]): row for row in json.loads(out)}
    assert code == 0 and set(rows) == {("report", "lease"), ("a}b", "lease"), ("sync:42", "lease"),
                                       ("queued-only", "queued")}
    row = rows[("sync:42", "lease")]
    assert row["host"] == single_task._HOST and row["pid"] == os.getpid() and row["task_id"] is None
    assert row["fence"] == held["sync:42"].fence
    assert 25 < row["time_left_s"] <= 30 and 0 <= row["held_for_s"] < 5
    assert row["held_since"].endswith("+00:00") and row["rerun_owed"] is False
    assert rows[("queued-only", "queued")]["task_id"] == "4b9d3a1e-task-id"


def test_list_filters_by_a_glob_over_the_keys(capsys: Any, redis_url: str, held: dict[str, Any]) -> None:
    assert [row["key"] for row in json.loads(cli(capsys, "--url", redis_url, "list", "sync:*", "--json")[1])] == \
        ["sync:42"]
    assert [row["key"] for row in json.loads(cli(capsys, "--url", redis_url, "list", "[ar]*", "--json")[1])] == \
        ["a}b", "report"]
    assert [row["key"] for row in json.loads(cli(capsys, "--url", redis_url, "list", "a}?", "--json")[1])] == ["a}b"]
    code, out, _ = cli(capsys, "--url", redis_url, "list", "nothing*")
    assert code == 0 and out.startswith("no leases or queued markers")


def test_list_shows_the_celery_task_id_and_an_owed_rerun(capsys: Any, redis_url: str, r: redis.Redis) -> None:
    r.hset("single_task:{t}", mapping={"t": "tok", "f": "7", "i": "c0ffee", "s": str(int(time.time() * 1000)),
                                       "h": "99@web-1", "r": "1"})
    r.pexpire("single_task:{t}", 5000)
    code, out, _ = cli(capsys, "--url", redis_url, "list")
    assert code == 0
    line = out.splitlines()[1]
    assert line.split()[:4] == ["t", "lease", "web-1:99", "c0ffee"] and "rerun owed" in line


def test_list_works_where_keys_is_disabled(capsys: Any) -> None:
    with RedisServer("--rename-command", "KEYS", "") as server:
        with single_run(key="no-keys-here", client=server.url):
            code, out, _ = cli(capsys, "--url", server.url, "list", "--json")
    assert code == 0 and [row["key"] for row in json.loads(out)] == ["no-keys-here"]


def test_a_prefix_from_the_option_or_the_environment(capsys: Any, redis_url: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with single_run(key="mine", client=redis_url, prefix="app1:"):
        assert json.loads(cli(capsys, "--url", redis_url, "list", "--json")[1]) == []
        assert [row["key"] for row in json.loads(cli(capsys, "--url", redis_url, "--prefix", "app1:", "list",
                                                     "--json")[1])] == ["mine"]
        monkeypatch.setenv("SINGLE_TASK_PREFIX", "app1:")
        assert cli(capsys, "--url", redis_url, "show", "mine")[0] == 0


def test_show_exits_0_for_a_held_key_and_1_for_a_free_one(capsys: Any, redis_url: str,
                                                          held: dict[str, Any]) -> None:
    code, out, _ = cli(capsys, "--url", redis_url, "show", "a}b")
    assert code == 0
    assert f"held by {single_task._HOST} pid {os.getpid()}" in out and f"fence:      {held['a}b'].fence}" in out
    assert "redis key:  single_task:{a}b}" in out
    code, out, _ = cli(capsys, "--url", redis_url, "show", "old")
    assert code == 1 and "lease:      free" in out and "last fence: 123" in out
    code, out, _ = cli(capsys, "--url", redis_url, "show", "queued-only", "--json")
    shown = json.loads(out)
    assert code == 1 and shown["lease"] is None and shown["queued"]["task_id"] == "4b9d3a1e-task-id"


def test_release_refuses_without_force_and_says_what_it_removed_with_it(capsys: Any, redis_url: str,
                                                                         r: redis.Redis) -> None:
    lost: list[str] = []
    with single_run(key="stuck", client=redis_url, ttl=1.0, on_lost=lambda lease: lost.append(lease.key)) as lease:
        code, out, err = cli(capsys, "--url", redis_url, "release", "stuck")
        assert code == 2 and "--force" in err and f"pid {os.getpid()}" in out
        assert r.exists("single_task:{stuck}")
        code, out, err = cli(capsys, "--url", redis_url, "release", "stuck", "--force")
        assert code == 0 and err == ""
        assert out.startswith("released stuck: removed the lease held by") and f"fence {lease.fence}" in out
        assert not r.exists("single_task:{stuck}")
        deadline = time.monotonic() + 3
        while not lost and time.monotonic() < deadline:  # the holder learns at its next renewal
            time.sleep(0.05)
        assert lost == ["stuck"] and lease.lost
    code, out, _ = cli(capsys, "--url", redis_url, "release", "stuck", "--force")
    assert code == 1 and "not held" in out


def test_a_released_key_goes_to_a_waiting_run(capsys: Any, redis_url: str) -> None:
    got: list[int] = []

    @single_run(key="handover", client=redis_url, ttl=4, on_busy="wait", timeout=10)
    def job() -> None:
        lease = current_lease()
        assert lease is not None
        got.append(lease.fence)

    with single_run(key="handover", client=redis_url, ttl=4) as first:
        waiter = threading.Thread(target=job)
        waiter.start()
        time.sleep(0.3)
        assert cli(capsys, "--url", redis_url, "release", "handover", "--force")[0] == 0
        waiter.join(10)
    assert got and got[0] > first.fence


def test_wait_exits_0_when_the_key_is_freed_and_1_on_timeout(capsys: Any, redis_url: str) -> None:
    assert cli(capsys, "--url", redis_url, "wait", "never-held")[0] == 0
    with single_run(key="busy", client=redis_url):
        started = time.monotonic()
        code, _, err = cli(capsys, "--url", redis_url, "wait", "busy", "--timeout", "0.3")
        assert code == 1 and "still held after 0.3s" in err and 0.25 < time.monotonic() - started < 2
    holding = threading.Event()

    def hold_for_half_a_second() -> None:
        with single_run(key="busy2", client=redis_url):
            holding.set()
            time.sleep(0.5)

    holder = threading.Thread(target=hold_for_half_a_second)
    holder.start()
    assert holding.wait(5)
    started = time.monotonic()
    code, out, _ = cli(capsys, "--url", redis_url, "wait", "busy2", "--timeout", "10", "--interval", "0.05")
    holder.join(5)
    assert code == 0 and out.startswith("busy2 is free") and 0.3 < time.monotonic() - started < 3


def _markers(r: redis.Redis) -> None:
    """A confirmed marker marked 5 s ago and one still being published, by the server's clock."""
    seconds, micros = r.time()
    now_ms = seconds * 1000 + micros // 1000
    r.set("single_task:{sent}:queued", f"0f1e2d3c-sent|{now_ms - 5000}", px=60000)
    r.set("single_task:{publishing}:queued", f"p:9a8b7c6d-publishing|{now_ms}", px=5000)


def test_list_and_show_give_each_markers_task_id_and_age(capsys: Any, redis_url: str, r: redis.Redis) -> None:
    _markers(r)
    code, out, _ = cli(capsys, "--url", redis_url, "list")
    assert code == 0
    sent = next(line for line in out.splitlines() if line.startswith("sent "))
    assert sent.split()[:4] == ["sent", "queued", "-", "0f1e2d3c-sent"] and "age 5." in sent
    assert "being published" not in sent
    publishing = next(line for line in out.splitlines() if line.startswith("publishing "))
    assert "9a8b7c6d-publishing" in publishing and "being published" in publishing
    rows = {row["key"]: row for row in json.loads(cli(capsys, "--url", redis_url, "list", "--json")[1])}
    assert rows["sent"]["task_id"] == "0f1e2d3c-sent" and 5 <= rows["sent"]["age_s"] < 7
    assert rows["sent"]["provisional"] is False and rows["publishing"]["provisional"] is True
    code, out, _ = cli(capsys, "--url", redis_url, "show", "sent")
    assert code == 1  # no lease
    assert "queued:     task 0f1e2d3c-sent, marked 5." in out and "s ago, " in out
    code, out, _ = cli(capsys, "--url", redis_url, "show", "publishing")
    assert "queued:     task 9a8b7c6d-publishing, marked 0." in out and "being published" in out


def test_release_queued_refuses_without_force_and_says_what_it_removed_with_it(
        capsys: Any, redis_url: str, r: redis.Redis) -> None:
    _markers(r)
    with single_run(key="sent", client=redis_url) as lease:  # a lease on the same key is left alone
        code, out, err = cli(capsys, "--url", redis_url, "release", "sent", "--queued")
        assert code == 2 and "--force" in err and "0f1e2d3c-sent" in out and "marked 5." in out
        assert r.exists("single_task:{sent}:queued")
        code, out, err = cli(capsys, "--url", redis_url, "release", "sent", "--queued", "--force")
        assert code == 0 and err == ""
        assert out.startswith("released sent: removed the queued marker of task 0f1e2d3c-sent, marked 5.")
        assert not r.exists("single_task:{sent}:queued") and r.exists("single_task:{sent}")
        assert not lease.lost
    code, out, _ = cli(capsys, "--url", redis_url, "release", "sent", "--queued", "--force")
    assert code == 1 and out.startswith("sent has no queued marker")
    code, out, _ = cli(capsys, "--url", redis_url, "release", "publishing", "--queued", "--force")
    assert code == 0 and "task 9a8b7c6d-publishing" in out and "being published" in out


def test_help_explains_the_commands_and_exit_codes() -> None:
    result = cli_process("--help")
    assert result.returncode == 0
    for word in ("list", "show", "release", "wait", "--url", "SINGLE_TASK_REDIS_URL", "exit codes", "--force",
                 "--queued"):
        assert word in result.stdout
    assert "--queued" in cli_process("release", "--help").stdout
    assert cli_process().returncode == 2  # no command: the help, and a usage error


@pytest.mark.parametrize(("url", "says"), [
    ("http://localhost:6379", "is not a Redis URL"),
    ("redis://127.0.0.1:1/0", "cannot reach Redis at redis://127.0.0.1:1/0"),
    ("redis://user:secret@127.0.0.1:1/0", "cannot reach Redis at redis://***@127.0.0.1:1/0"),
])
def test_a_bad_or_unreachable_url_is_one_clear_line_and_exit_2(url: str, says: str) -> None:
    result = cli_process("--url", url, "list")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and says in result.stderr and "secret" not in result.stderr


def test_without_a_url_it_uses_the_environment_or_a_celery_app(redis_url: str) -> None:
    with single_run(key="found-me", client=redis_url):
        by_env = cli_process("list", "--json", env={"SINGLE_TASK_REDIS_URL": redis_url})
        by_app = cli_process("-A", "tests.celery_app", "list", "--json", env={"SINGLE_TASK_TEST_URL": redis_url})
        neither = cli_process("list")
    assert [row["key"] for row in json.loads(by_env.stdout)] == ["found-me"], by_env.stderr
    assert [row["key"] for row in json.loads(by_app.stdout)] == ["found-me"], by_app.stderr
    assert neither.returncode == 2 and "pass --url" in neither.stderr


def test_the_exit_codes_are_real_process_exit_codes(redis_url: str) -> None:
    with single_run(key="proc", client=redis_url):
        assert cli_process("--url", redis_url, "show", "proc").returncode == 0
        assert cli_process("--url", redis_url, "wait", "proc", "--timeout", "0.2").returncode == 1
        assert cli_process("--url", redis_url, "release", "proc").returncode == 2
    assert cli_process("--url", redis_url, "show", "proc").returncode == 1
    assert cli_process("--url", redis_url, "wait", "proc").returncode == 0


@pytest.mark.slow
def test_list_is_fast_on_a_redis_with_a_million_unrelated_keys(capsys: Any) -> None:
    with RedisServer() as server:
        client = server.client()
        # MSET in batches, not DEBUG POPULATE: Redis 7 refuses DEBUG unless configured to allow it.
        pipe = client.pipeline(transaction=False)
        for start in range(0, 1_000_000, 10_000):
            pipe.mset({f"unrelated:{n}": "x" for n in range(start, start + 10_000)})
        pipe.execute()
        assert client.dbsize() == 1_000_000
        with single_run(key="needle", client=server.url), single_run(key="another", client=server.url):
            started = time.monotonic()
            code, out, _ = cli(capsys, "--url", server.url, "list", "--json")
            took = time.monotonic() - started
    print(f"\nlist over 1,000,000 unrelated keys + 2 leases: {took:.2f}s")
    assert code == 0 and sorted(row["key"] for row in json.loads(out)) == ["another", "needle"]
    assert took < 20
