"""The Celery app the chaos workers run: one task per policy, each over its own few keys.

Every task is decorated with ``@single_run`` itself, as the README shows it (a decorated helper
function that a task calls is not the task: its lease records no Celery task id, so a redelivered
message could not know the lease of its own killed attempt). The task class's ``__call__`` wraps
the decorated ``run``, so it sees what the decorator did with the call (ran it, skipped it,
coalesced it into a rerun, timed out waiting, failed closed) and writes it down. The record is one JSON line per event,
appended with a single ``write()`` to a file of the process's own (``<pid>.jsonl`` in
``$CHAOS_RECORD_DIR``), so it survives SIGKILL and every fault the lock's Redis goes through.
Times are ``time.monotonic()``: on Linux that is CLOCK_MONOTONIC, one clock for every process.

Environment: ``$SINGLE_TASK_TEST_URL`` is the broker (support/worker.py sets it),
``$SINGLE_TASK_REDIS_URL`` the Redis that holds the leases (single_task reads it itself),
``$CHAOS_TTL`` the lease ttl in seconds.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Optional

from celery import Celery

from single_task import AlreadyRunning, Lease, RedisUnavailable, current_lease, single_run

BROKER_URL = os.environ.get("SINGLE_TASK_TEST_URL", "redis://127.0.0.1:6379/0")
RECORD_DIR = os.environ.get("CHAOS_RECORD_DIR", "")
TTL = float(os.environ.get("CHAOS_TTL", "2"))
WAIT_TIMEOUT = 3 * TTL
# Unacked messages of a worker that died whole come back after this many seconds. It must exceed
# the longest time one acks_late task can hold its message (a run, its reruns and a wait).
VISIBILITY_TIMEOUT = float(os.environ.get("CHAOS_VISIBILITY_TIMEOUT", "60"))

# policy name -> (task name, key prefix, number of keys); ten keys in all.
POLICIES: dict[str, tuple[str, str, int]] = {
    "skip": ("chaos.skip", "skip", 3),
    "wait": ("chaos.wait", "wait", 3),
    "rerun": ("chaos.rerun", "rerun", 2),
    "rerun_durable": ("chaos.rerun_durable", "durable", 2),
}

app = Celery("chaos", broker=BROKER_URL)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "unacked_restore_interval": 2,  # look for messages of dead workers every 2 s ...
        "unacked_restore_throttle": 1,  # ... and really scan each time (default: every 10th)
    },
)

# -- the record ----------------------------------------------------------------------------------

_fd: Optional[int] = None
_fd_pid = 0
_fd_lock = threading.Lock()  # the watchdog thread records lost leases too


def record(**fields: Any) -> None:
    """Append one event as a JSON line to this process's own file, in one write()."""
    global _fd, _fd_pid
    pid = os.getpid()
    with _fd_lock:
        if _fd is None or _fd_pid != pid:  # first event, or first in a forked child
            _fd = os.open(os.path.join(RECORD_DIR, f"{pid}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            _fd_pid = pid
        fd = _fd
    fields["pid"] = pid
    os.write(fd, (json.dumps(fields, separators=(",", ":")) + "\n").encode())


def _on_lost(lease: Lease) -> None:
    record(ev="lost", key=lease.key, fence=lease.fence, t=time.monotonic())


# -- the work ------------------------------------------------------------------------------------

_iterations: dict[str, int] = {}


def _body(call_id: str, seconds: float) -> bool:
    """One run: record its start, sleep in short slices (a kill lands anywhere), record its end."""
    lease = current_lease()
    it = _iterations.get(call_id, 0)
    _iterations[call_id] = it + 1
    key = lease.key if lease is not None else None
    fence = lease.fence if lease is not None else 0
    held = lease is not None and not lease.fail_open
    record(ev="start", id=call_id, key=key, fence=fence, lease=held, it=it, t=time.monotonic())
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / 0.05) + 2):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(left, 0.05))
    lost = lease.lost if lease is not None else None
    record(ev="end", id=call_id, key=key, fence=fence, it=it, lost=lost, t=time.monotonic())
    return True


def _options(policy: str) -> dict[str, Any]:
    options: dict[str, Any] = {"ttl": TTL, "on_busy": "rerun" if policy.startswith("rerun") else policy,
                               "on_lost": _on_lost}
    if policy == "wait":
        options["timeout"] = WAIT_TIMEOUT
    return options


class Recorded(app.Task):  # type: ignore[name-defined,misc]
    """Records each execution of the task (``call``) and what became of it (``ret``) around the
    decorated ``run``. It calls ``run`` itself, not ``Task.__call__``, which would push a request
    of its own (without the task id) in eager mode; the worker and ``apply()`` have pushed the
    task and its request already."""

    policy = ""

    def __call__(self, n: int, seconds: float, call_id: str) -> str:
        policy = self.policy
        request = self.request
        t0 = time.monotonic()
        redelivered = bool((request.delivery_info or {}).get("redelivered"))
        record(ev="call", id=call_id, task=request.id, policy=policy, key=f"{POLICIES[policy][1]}:{n}", t=t0,
               redelivered=redelivered)
        try:
            ran = self.run(n, seconds, call_id)
        except AlreadyRunning:
            outcome = "wait_timeout"
        except RedisUnavailable:
            outcome = "unavailable"
        except Exception as exc:  # recorded and re-raised: the checker counts them
            record(ev="ret", id=call_id, t0=t0, t=time.monotonic(), outcome=f"error:{type(exc).__name__}",
                   runs=_iterations.pop(call_id, 0), error=str(exc)[:300])
            raise
        else:
            outcome = "ran" if ran else "coalesced" if policy.startswith("rerun") else "skipped"
        record(ev="ret", id=call_id, t0=t0, t=time.monotonic(), outcome=outcome, runs=_iterations.pop(call_id, 0))
        return outcome


@app.task(name="chaos.skip", bind=True, base=Recorded, policy="skip")
@single_run(key="skip:{n}", **_options("skip"))
def skip_task(self: Any, n: int, seconds: float, call_id: str) -> bool:
    return _body(call_id, seconds)


@app.task(name="chaos.wait", bind=True, base=Recorded, policy="wait")
@single_run(key="wait:{n}", **_options("wait"))
def wait_task(self: Any, n: int, seconds: float, call_id: str) -> bool:
    return _body(call_id, seconds)


@app.task(name="chaos.rerun", bind=True, base=Recorded, policy="rerun")
@single_run(key="rerun:{n}", **_options("rerun"))
def rerun_task(self: Any, n: int, seconds: float, call_id: str) -> bool:
    return _body(call_id, seconds)


# The configuration under which a rerun owed by a holder that is killed is still kept: the
# message is acknowledged only after the run (acks_late), a child killed mid-run gives it back to
# the queue (reject_on_worker_lost), and a worker killed whole gives it back after the broker's
# visibility timeout. The message comes back with the same task id, and single_run treats a
# holder with the caller's own task id as the caller's previous attempt: it waits for that dead
# lease to expire instead of coalescing into it, then runs.
@app.task(name="chaos.rerun_durable", bind=True, base=Recorded, policy="rerun_durable", acks_late=True,
          reject_on_worker_lost=True)
@single_run(key="durable:{n}", **_options("rerun_durable"))
def rerun_durable_task(self: Any, n: int, seconds: float, call_id: str) -> bool:
    return _body(call_id, seconds)
