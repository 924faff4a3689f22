"""Redis is found from any thread of a producer or web process (not a worker), through the app."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from single_task import ConfigurationError, single_run
from tests.conftest import ROOT

# The app is made in the main thread, as a web server's settings module would; every entry point
# is then called from another thread, where Celery's thread-local current app is not set.
PRODUCER = """
import json, os, threading
from celery import Celery
from single_task import is_queued, is_running, send_once, single_run

app = Celery("producer", broker=os.environ["URL"], backend=os.environ["URL"])
app.conf.update(task_always_eager=os.environ.get("EAGER") == "1")
{extra_app}

@app.task
@single_run(key="t:{{n}}")
def job(n):
    return "ran"

@single_run(key="plain:{{n}}")
def plain(n):
    return "plain ran"

results = {{}}

def call(name, fn):
    try:
        results[name] = fn()
    except Exception as exc:
        results[name] = f"{{type(exc).__name__}}: {{exc}}"

def in_thread():
    call("send_once", lambda: send_once(job, (1,)).id is not None)
    call("is_running", lambda: is_running(job, 1))
    call("is_queued", lambda: is_queued(job, 1))
    call("direct", lambda: job(2))
    call("delay", lambda: job.delay(3).get(timeout=10) if app.conf.task_always_eager else "skipped")
    call("plain", lambda: plain(4))
    def block():
        with single_run(key="block") as lease:
            return lease.fence > 0
    call("with", block)

t = threading.Thread(target=in_thread)
t.start()
t.join()
print(json.dumps(results))
"""


def run_producer(url: str, eager: bool, extra_app: str = "") -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "SINGLE_TASK_REDIS_URL"}
    env.update(PYTHONPATH=ROOT, URL=url, EAGER="1" if eager else "0")
    code = PRODUCER.format(extra_app=textwrap.dedent(extra_app))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_every_entry_point_finds_redis_from_a_producers_thread(redis_url: str) -> None:
    assert run_producer(redis_url, eager=False) == {
        "send_once": True, "is_running": False, "is_queued": True, "direct": "ran", "delay": "skipped",
        "plain": "plain ran", "with": True,
    }


def test_an_eager_delay_from_a_thread_runs_under_its_lease(redis_url: str) -> None:
    results = run_producer(redis_url, eager=True)
    assert results["delay"] == "ran" and results["direct"] == "ran"


def test_with_two_redis_apps_and_none_chosen_the_error_names_them(redis_url: str) -> None:
    other = f'other = Celery("other", broker="{redis_url.rsplit("/", 1)[0]}/1")'
    results = run_producer(redis_url, eager=False, extra_app=other)
    # The task knows its app, so the task's entry points still work.
    assert results["send_once"] is True and results["direct"] == "ran"
    # A plain function or a with block has no app of its own: the two candidates are named.
    for name in ("plain", "with"):
        message = str(results[name])
        assert message.startswith("ConfigurationError") and "'producer'" in message and "'other'" in message
        assert "set_default" in message and "client=" in message


def test_app_set_default_chooses_among_several(redis_url: str) -> None:
    other = f'other = Celery("other", broker="{redis_url.rsplit("/", 1)[0]}/1")\napp.set_default()'
    results = run_producer(redis_url, eager=False, extra_app=other)
    assert results["plain"] == "plain ran" and results["with"] is True


def test_no_app_in_the_process_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    code = textwrap.dedent("""
        import threading
        from single_task import single_run
        out = []
        def call():
            try:
                with single_run(key="x"):
                    pass
            except Exception as exc:
                out.append(str(exc))
        t = threading.Thread(target=call); t.start(); t.join()
        print(out[0])
    """)
    env = {k: v for k, v in os.environ.items() if k != "SINGLE_TASK_REDIS_URL"}
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "no Redis to hold leases" in out.stdout and "client=" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("url", ["redis://localhost:6379/abc", "redis://localhost/0?db=x", "unix:///tmp/r.sock?db=a"])
def test_a_url_whose_database_is_not_a_number_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"database|.db."):
        single_run(key="k", client=url)
