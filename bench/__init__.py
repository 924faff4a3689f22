"""Benchmark of single_task against the cheapest correct lock and its peers, on one private Redis.

Run from the repository root::

    python -m bench            # full run, a few minutes; writes bench/RESULTS.md
    python -m bench --quick    # small counts, for a smoke test

Everything that is compared is measured in the same run, interleaved round by round, and every
number is also given as a ratio to the floor measured alongside it, so machine drift and other
load hit all contenders alike. The lock cycles are measured twice in the same run, with redis-py's
pure-Python parser and with hiredis (when installed; else the report says it was skipped), each in
child processes of their own. See ``bench/main.py`` for the phases. The benchmark uses only
single_task's public API, so it keeps measuring whatever the library does inside.
"""
