"""Entry point of one latency leg in a child process: ``python -m bench.parser_child ...``.

redis-py picks its reply parser and command packer once, when ``redis`` is first imported: hiredis
if it imports, else its pure-Python ones. With ``BENCH_REDIS_PARSER=python`` this module makes
``import hiredis`` fail (``sys.modules["hiredis"] = None``) before anything imports redis, so one
``python -m bench`` measures both, each in a process of its own. See bench/latency.py.
"""

import os
import sys

if os.environ.get("BENCH_REDIS_PARSER") == "python":
    sys.modules["hiredis"] = None  # type: ignore[assignment]

from bench.latency import child_main  # the parser must be chosen first

if __name__ == "__main__":
    sys.exit(child_main())
