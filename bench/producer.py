"""Producer side: what ``send_once`` costs the caller, next to a plain ``task.delay``.

A real Celery app with a Redis broker on a redis-server of its own; no worker, so messages just
accumulate in the broker queue, which is emptied (with the markers of the publishing
``send_once``) after every round, untimed. Three contenders, interleaved round by round:

* ``task.delay(n)``: publishes one message (one ``LPUSH``);
* ``send_once(task, (n,))`` with nothing queued for the key (a fresh ``n`` each call): the marker
  script, then the same publish;
* ``send_once(task, (n,))`` while a message for the key is queued: the marker script finds it
  and returns that message's ``AsyncResult``; nothing is published.

All three call the same decorated task, so only the producer path differs.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from celery import Celery

from bench.measure import Counts, Cycle, Timed, count_commands, run_interleaved
from single_task import is_queued, send_once, single_run
from support.redis_server import RedisServer

QUEUE = "bench-send"  # the default queue of the app: every contender publishes here
HELD_QUEUE = "bench-send-held"  # the message the refused calls see as queued (never emptied)
DUP_N = 0  # the key whose message is queued; the publishing send_once uses n >= 1

DELAY = "`task.delay(n)`: publishes one message"
FIRST = "`send_once(task, (n,))`, nothing queued for the key: marker + publish"
REFUSED = "`send_once(task, (n,))`, a message for the key already queued: refused"
NAMES = (DELAY, FIRST, REFUSED)
_KEY_N = re.compile(rb"bench:send:(\d+)")


def _fresh_key(redis_key: bytes) -> bool:
    """A key of a publishing call's run (n >= 1), not the held message's (n = 0)."""
    m = _KEY_N.search(redis_key)
    return m is not None and int(m.group(1)) != DUP_N


@dataclass
class ProducerResult:
    timed: dict[str, Timed] = field(default_factory=dict)
    counts: dict[str, Counts] = field(default_factory=dict)
    published: dict[str, float] = field(default_factory=dict)  # messages in the queue per call (counting run)
    used_memory: tuple[int, int] = (0, 0)  # after the warm-up's cleanup / after the last round's
    keys_at_end: list[str] = field(default_factory=list)  # what the broker server holds after the last cleanup
    error: Optional[str] = None


def _app(url: str) -> tuple[Celery, Any]:
    app = Celery("single_task_bench_producer", broker=url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                    task_default_queue=QUEUE, broker_connection_retry_on_startup=True)

    @app.task(name="bench.send_once")
    @single_run(key="bench:send:{n}", client=url)
    def job(n: int) -> None:
        return None

    return app, job


def measure_producer(server: RedisServer, rounds: int, batch: int, count_cycles: int) -> ProducerResult:
    result = ProducerResult()
    probe = server.client()
    app, job = _app(server.url)
    try:
        _measure(result, probe, job, rounds, batch, count_cycles)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        app.pool.force_close_all()
        app.close()
        probe.close()
    return result


def _measure(result: ProducerResult, probe: Any, job: Any, rounds: int, batch: int, count_cycles: int) -> None:
    held = send_once(job, (DUP_N,), queue=HELD_QUEUE)
    if not is_queued(job, DUP_N) or probe.llen(HELD_QUEUE) != 1:
        raise RuntimeError("setup: expected the held message to be queued, and alone in its queue")
    held_id = held.id

    def cleanup() -> None:
        # The publishing calls' markers: whatever the library names them, they contain the key
        # "bench:send:<n>" with n >= 1 (the held message's key has n = 0 and stays).
        doomed = [k for k in probe.scan_iter(match="*bench:send:*", count=1000) if _fresh_key(k)]
        pipe = probe.pipeline(transaction=False)
        pipe.delete(QUEUE)
        for k in doomed:
            pipe.delete(k)
        pipe.execute()

    fresh = itertools.count(DUP_N + 1)

    def delay() -> None:
        job.delay(next(fresh))

    def first() -> None:
        send_once(job, (next(fresh),))

    def refused() -> None:
        if send_once(job, (DUP_N,)).id != held_id:
            raise RuntimeError("send_once: a refused duplicate returned another message's result")

    cycles: dict[str, Cycle] = {DELAY: delay, FIRST: first, REFUSED: refused}
    for name, cycle in cycles.items():
        for _ in range(5):
            cycle()
        cleanup()
        result.counts[name] = count_commands(cycle, probe, count_cycles)
        result.published[name] = probe.llen(QUEUE) / count_cycles
        cleanup()
    if probe.llen(HELD_QUEUE) != 1 or not is_queued(job, DUP_N):
        raise RuntimeError("the held message's queue (or its marker) changed")
    result.used_memory = (int(probe.info("memory")["used_memory"]), 0)
    result.timed = run_interleaved(cycles, rounds, batch, after_round=cleanup)
    result.used_memory = (result.used_memory[0], int(probe.info("memory")["used_memory"]))
    result.keys_at_end = sorted(k.decode(errors="replace") for k in probe.scan_iter(count=1000))
