"""Do the producer-side features cost the uncontended path anything when they are not used?

``rerun_with="latest"``, ``send_once(debounce=...)``, ``min_interval``, queued markers released on
revoke and ``single_task.signals`` went into single_task.py in four consecutive commits of that
file (``FEATURE_COMMITS``). This phase measures, in one child process and in the same interleaved
rounds, the module just before them (``git show ac72e36^:single_task.py``), the module after each
of the four commits (the last one is "features"), and the working tree's single_task.py ("HEAD":
what users get now; later commits changed other things too, so it is shown for reference only).
Each old copy is written to a temporary directory and imported under a name of its own, so every
copy has its own watchdog thread, locks and caches and shares nothing with the others but redis-py.

Per version, two uncontended cycles: a decorated call of a zero-argument function, and a ``with``
block on a ``single_run`` built once. Each on two kinds of client: a plain ``redis.Redis``, and a
subclass that overrides ``execute_command`` (calling it unchanged). The second kind is there
because b4fed55 also brought, besides the features, a direct path that packs ``EVALSHA`` itself for
plain ``redis.Redis`` clients only (its commit message says so): on a plain client, features ÷
before is the features' cost *net of* that speed-up, while on the subclass every version sends its
scripts through redis-py's command layer alike. Every contender has its own key and its own client.

Counted first (``measure.count_commands``: round trips, commands, ``INFO commandstats`` time),
in a few windows whose contender order rotates; then every contender's calls into redis-py's
``execute_command`` per cycle (the interpreter's profiling hook), which shows the path each version
took; then the timed rounds (``measure.run_interleaved``: the first contender rotates each round).

Without git, or without those commits (a tarball, a shallow clone), the phase says it is
unavailable and why; nothing is measured in their place.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from types import FrameType, ModuleType
from typing import Any, Callable, Optional

import redis

from bench.measure import Counts, Cycle, Timed, count_commands, percentile, round_ratios, run_interleaved

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILE = "single_task.py"
FEATURE_COMMITS = ("ac72e36", "9279b51", "4e2bb94", "b4fed55")  # oldest first

BEFORE, FEATURES, HEAD = "before", "features", "HEAD"
# (name, git revision of single_task.py or None for the working tree's, what it adds to the previous one)
STEPS: tuple[tuple[str, Optional[str], str], ...] = (
    (BEFORE, "ac72e36^", "the module just before the features"),
    ("ac72e36", "ac72e36", "queued markers record when they were marked; one Lua helper reads them in every script"),
    ("9279b51", "9279b51", "`single_task.signals`"),
    ("4e2bb94", "4e2bb94", "queued markers released when their message is revoked, expires or is rejected"),
    (FEATURES, "b4fed55", "`min_interval`, `rerun_with=\"latest\"`; the same commit also carries "
                          "`send_once(debounce=...)` and the direct path for plain `redis.Redis` clients"),
    (HEAD, None, "every later commit, and whatever the working tree changes"),
)
VERSIONS = tuple(name for name, _rev, _adds in STEPS)

CALLS = {"decorated": "decorated call", "with": "`with spec` (single_run built once)"}
CLIENTS = {"plain": "`redis.Redis`", "layer": "`redis.Redis` subclass (command layer)"}
PROFILED_CYCLES = 20  # cycles per contender under the profiling hook

RULE = ("met when, for each call and each client, the per-round ratio features ÷ before (the two "
        "versions' batch medians of the same round) has a p10–p90 spread that contains 1.0, or the "
        "ratio of the two medians is ≤ 1.0; otherwise missed, by how far that ratio is above 1.0")


def contender(call: str, client: str, version: str) -> str:
    return f"{call}|{client}|{version}"


class Unavailable(Exception):
    """The versions to compare cannot be had here (no git, no history): reported, not faked."""


@dataclass(frozen=True)
class Version:
    name: str
    source: str  # where the measured file came from
    adds: str
    sha256: str  # of the file measured, 12 hex digits


@dataclass
class Comparison:
    """One version against ``before`` for one call and client: medians, their ratio, the rule."""

    call: str
    client: str
    version_us: float
    before_us: float
    ratios: list[float]  # per round

    @property
    def ratio(self) -> float:
        return self.version_us / self.before_us

    @property
    def p10(self) -> float:
        return percentile(self.ratios, 0.1)

    @property
    def p90(self) -> float:
        return percentile(self.ratios, 0.9)

    @property
    def met(self) -> bool:
        return self.ratio <= 1.0 or self.p10 <= 1.0 <= self.p90


@dataclass
class FeaturesResult:
    versions: list[Version] = field(default_factory=list)
    timed: dict[str, Timed] = field(default_factory=dict)
    counts: dict[str, list[Counts]] = field(default_factory=dict)  # every counted window's
    layer_calls: dict[str, float] = field(default_factory=dict)  # redis-py execute_command calls per cycle
    failed: dict[str, str] = field(default_factory=dict)  # version or contender -> why it was not measured
    info: dict[str, Any] = field(default_factory=dict)  # the child's parser, and what was left at the end
    unavailable: Optional[str] = None  # why nothing could be measured
    error: Optional[str] = None

    def compare(self, call: str, client: str, version: str = FEATURES) -> Optional[Comparison]:
        t, b = self.timed.get(contender(call, client, version)), self.timed.get(contender(call, client, BEFORE))
        if not (t and b and t.samples and b.samples):
            return None
        return Comparison(call, client, t.median_us, b.median_us, round_ratios(t, b))

    def verdict(self) -> tuple[Optional[bool], list[Comparison]]:
        """The rule over every call and client (None when one of them was not measured)."""
        found = [self.compare(call, client) for call in CALLS for client in CLIENTS]
        measured = [c for c in found if c is not None]
        if len(measured) < len(found):
            return None, measured
        return all(c.met for c in measured), measured


# -- in the bench process ---------------------------------------------------------------------------


def _git(*args: str) -> bytes:
    try:
        proc = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise Unavailable(f"git could not be run ({type(exc).__name__}: {exc})") from exc
    if proc.returncode != 0:
        said = proc.stderr.decode(errors="replace").strip().splitlines() or [f"exit status {proc.returncode}"]
        raise Unavailable(f"`git {' '.join(args)}` said: {said[-1]}")
    return proc.stdout


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def _sources(tmp: str) -> list[tuple[Version, Optional[str]]]:
    """Every version to measure and the path of its copy (None: the working tree's, imported as is)."""
    try:
        _git("rev-parse", "--git-dir")
    except Unavailable as exc:
        raise Unavailable(f"{ROOT} is not a git checkout, so the old versions of {FILE} cannot be had "
                          f"({exc})") from None
    full = []
    for commit in FEATURE_COMMITS:
        try:
            full.append(_git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}").decode().strip())
        except Unavailable:
            raise Unavailable(f"commit {commit} is not in this checkout's history") from None
    history = _git("log", "--format=%H", f"{FEATURE_COMMITS[0]}^..{FEATURE_COMMITS[-1]}", "--", f"./{FILE}")
    if history.decode().split() != full[::-1]:
        raise Unavailable(f"the commits of {FILE} from {FEATURE_COMMITS[0]}^ to {FEATURE_COMMITS[-1]} are not "
                          f"exactly {', '.join(FEATURE_COMMITS)}")
    out: list[tuple[Version, Optional[str]]] = []
    for name, rev, adds in STEPS:
        if rev is None:
            with open(os.path.join(ROOT, FILE), "rb") as f:
                data = f.read()
            dirty = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", f"./{FILE}"],
                                   capture_output=True, timeout=60).returncode != 0
            head = _git("rev-parse", "--short", "HEAD").decode().strip()
            source = f"the working tree's {FILE} (git {head}" + (", modified in the work tree)" if dirty else ")")
            out.append((Version(name, source, adds, _digest(data)), None))
            continue
        data = _git("show", f"{rev}:./{FILE}")
        path = os.path.join(tmp, f"single_task_{name}.py")
        with open(path, "wb") as f:
            f.write(data)
        out.append((Version(name, f"`git show {rev}:{FILE}`", adds, _digest(data)), path))
    return out


def measure_features(host: str, port: int, rounds: int, batch: int, count_cycles: int,
                     windows: int) -> FeaturesResult:
    """Run the phase in a child process against the server at host:port (the caller's own)."""
    result = FeaturesResult()
    with tempfile.TemporaryDirectory(prefix="single_task-features-") as tmp:
        try:
            sources = _sources(tmp)
        except Unavailable as exc:
            result.unavailable = str(exc)
            return result
        result.versions = [v for v, _path in sources]
        config = {"host": host, "port": port, "rounds": rounds, "batch": batch, "count": count_cycles,
                  "windows": windows, "versions": [[v.name, path] for v, path in sources]}
        config_path, out_path = os.path.join(tmp, "config.json"), os.path.join(tmp, "out.json")
        with open(config_path, "w") as f:
            json.dump(config, f)
        cmd = [sys.executable, "-m", "bench.features", "--config", config_path, "--out", out_path]
        proc = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            result.error = f"child exited with {proc.returncode}: {proc.stderr.strip()[-1500:]}"
            return result
        with open(out_path) as f:
            out = json.load(f)
    result.timed = {name: Timed.from_json(data) for name, data in out["timed"].items()}
    result.counts = {name: [Counts.from_json(c) for c in legs] for name, legs in out["counts"].items()}
    result.layer_calls = out["layer_calls"]
    result.failed = out["failed"]
    result.info = out["info"]
    imported = result.info.get("sha256", {})  # what the child read (the working tree's file may change)
    result.versions = [replace(v, sha256=imported.get(v.name, v.sha256)) for v in result.versions]
    return result


# -- in the child process ---------------------------------------------------------------------------


class CommandLayerClient(redis.Redis):
    """A ``redis.Redis`` whose ``execute_command`` is its own: single_task's direct path (b4fed55 on)
    leaves such a client to redis-py's command layer, so every version sends its scripts alike."""

    def execute_command(self, *args: Any, **options: Any) -> Any:
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


def _load(name: str, path: Optional[str]) -> ModuleType:
    if path is None:
        return importlib.import_module("single_task")
    spec = importlib.util.spec_from_file_location(f"single_task_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before running it, as an import would
    spec.loader.exec_module(module)
    return module


@dataclass
class _Built:
    cycle: Cycle
    running: Callable[[], bool]  # does the key's lease exist right now (the module's is_running)


def _build(mod: Any, call: str, client: redis.Redis, key: str) -> _Built:
    if call == "decorated":
        def fn() -> int:
            return 1

        job = mod.single_run(key=key, client=client)(fn)  # as @single_run(...) would

        def cycle() -> None:
            if job() != 1:
                raise RuntimeError(f"{key}: the decorated call did not run")

        return _Built(cycle, lambda: bool(mod.is_running(job)))
    spec = mod.single_run(key=key, client=client)

    def block() -> None:
        with spec:
            pass

    probe = mod.single_run(key=key, client=client)(lambda: None)
    return _Built(block, lambda: bool(mod.is_running(probe)))


def _layer_calls(cycle: Cycle, cycles: int) -> float:
    """redis-py ``execute_command`` calls per cycle in this thread (the profiling hook counts them)."""
    where = os.path.dirname(os.path.abspath(redis.__file__)) + os.sep
    calls = [0]

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        code = frame.f_code
        if event == "call" and code.co_name == "execute_command" and code.co_filename.startswith(where):
            calls[0] += 1

    sys.setprofile(hook)
    try:
        for _ in range(cycles):
            cycle()
    finally:
        sys.setprofile(None)
    return calls[0] / cycles


def _run(config: dict[str, Any], out: dict[str, Any], stack: ExitStack) -> None:
    host, port = config["host"], config["port"]
    modules: dict[str, Any] = {}
    for name, path in config["versions"]:
        try:
            modules[name] = _load(name, path)
            with open(modules[name].__file__, "rb") as f:
                out["info"].setdefault("sha256", {})[name] = _digest(f.read())
        except Exception as exc:
            out["failed"][name] = f"does not import: {type(exc).__name__}: {exc}"
    # In the order of the report's rows: the versions of one call and client run one after another
    # in every round, so the batches a per-round ratio compares are never far apart in time.
    built: dict[str, _Built] = {}
    for call in CALLS:
        for kind in CLIENTS:
            for name, mod in modules.items():
                label = contender(call, kind, name)
                client = (redis.Redis if kind == "plain" else CommandLayerClient)(host=host, port=port)
                stack.callback(client.close)
                try:
                    built[label] = _build(mod, call, client, f"bench:features:{call}:{kind}:{name}")
                    for _ in range(20):
                        built[label].cycle()
                except Exception as exc:
                    out["failed"][label] = f"{type(exc).__name__}: {exc}"
                    built.pop(label, None)
    probe = redis.Redis(host=host, port=port)
    stack.callback(probe.close)
    names = list(built)
    for window in range(config["windows"]):
        shift = window % len(names) if names else 0
        for label in names[shift:] + names[:shift]:
            try:
                counts = count_commands(built[label].cycle, probe, config["count"])
                out["counts"].setdefault(label, []).append(counts.to_json())
            except Exception as exc:
                out["failed"].setdefault(label, f"while counting: {type(exc).__name__}: {exc}")
    for label in names:
        try:
            out["layer_calls"][label] = _layer_calls(built[label].cycle, PROFILED_CYCLES)
        except Exception as exc:
            out["failed"].setdefault(label, f"while profiling: {type(exc).__name__}: {exc}")
    timed = run_interleaved({label: b.cycle for label, b in built.items()}, config["rounds"], config["batch"])
    out["timed"] = {label: t.to_json() for label, t in timed.items()}
    # Every copy's leases must be gone: each module's own is_running, and what the server keeps.
    out["info"]["still_running"] = [label for label, b in built.items() if b.running()]
    keys = list(probe.scan_iter(match="*bench:features:*", count=1000))
    out["info"]["keys_left"] = len(keys)
    out["info"]["keys_without_expiry"] = sum(1 for k in keys if probe.pttl(k) < 0)


def child_main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.features")
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # as in the bench process: expected outcomes must not print
    with open(args.config) as f:
        config = json.load(f)
    import redis.connection

    out: dict[str, Any] = {"timed": {}, "counts": {}, "layer_calls": {}, "failed": {}, "info": {
        "parser_class": getattr(redis.connection, "DefaultParser", type(None)).__name__,
        "redis_py": redis.__version__}}
    with ExitStack() as stack:
        _run(config, out, stack)
    out["info"]["threads"] = dict(Counter(t.name for t in threading.enumerate()))
    with open(args.out, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
