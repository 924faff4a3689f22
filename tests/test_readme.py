"""The README runs as written: every Python block in a fresh interpreter against a real
redis-server, and the setup commands at the top are one runnable command line each.

A block is named by the line of its opening fence in README.md. A block can carry instructions
for this test in an HTML comment on the line just above its fence (invisible on the rendered
page): ``<!-- readme-test: skip -->`` leaves it out.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from support.redis_server import RedisServer
from tests.conftest import ROOT

README = os.path.join(ROOT, "README.md")
# Written literally in the README, where a user has their Redis; replaced by the test's server.
USER_URL = "redis://localhost:6379/0"
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
TOP_END = "## What it guarantees"  # the heading after "The problem": the top section ends there


@dataclass
class Block:
    line: int  # the line of the opening fence, counting from 1
    lang: str
    code: str
    marker: str  # the readme-test comment above the fence, if any
    in_top: bool


def readme_blocks(path: str = README) -> list[Block]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks: list[Block] = []
    in_top = True
    i = 0
    while i < len(lines):
        if lines[i].startswith(TOP_END):
            in_top = False
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, lang = opening.groups()
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        body = [line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:end]]
        above = lines[i - 1].strip() if i else ""
        marker = re.fullmatch(r"<!--\s*readme-test:\s*(.*?)\s*-->", above)
        blocks.append(Block(i + 1, lang, "\n".join(body) + "\n", marker.group(1) if marker else "", in_top))
        i = end + 1
    return blocks


BLOCKS = readme_blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]
TOP_SHELL = [b for b in BLOCKS if b.in_top and b.lang in ("sh", "bash", "shell", "console")]


def test_the_readme_has_the_blocks_this_test_runs() -> None:
    assert len(PYTHON) >= 4, [b.line for b in BLOCKS]
    assert all(b.lang for b in BLOCKS if b.in_top), "a block at the top without a language tag"


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as started:
        yield started


@pytest.mark.parametrize("block", [b for b in PYTHON if b.marker != "skip"], ids=lambda b: f"README.md:{b.line}")
def test_each_python_block_runs_as_written(block: Block, server: RedisServer, tmp_path: object) -> None:
    server.client().flushall()  # our own server: each block starts from an empty Redis
    code = block.code.replace(USER_URL, server.url)
    script = os.path.join(str(tmp_path), f"readme_line_{block.line}.py")
    with open(script, "w", encoding="utf-8") as f:
        f.write(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SINGLE_TASK_")}
    env.update(PYTHONPATH=ROOT, SINGLE_TASK_REDIS_URL=server.url)
    result = subprocess.run([sys.executable, script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, (
        f"README.md line {block.line}: the python block exited with {result.returncode}\n"
        f"{result.stdout}{result.stderr}")


@pytest.mark.parametrize("block", TOP_SHELL, ids=lambda b: f"README.md:{b.line}")
def test_each_setup_command_at_the_top_is_one_command_line(block: Block) -> None:
    commands = [line for line in block.code.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) == 1, f"README.md line {block.line}: {len(commands)} command lines, not 1: {commands}"
    syntax = subprocess.run(["bash", "-n", "-c", commands[0]], capture_output=True, text=True)
    assert syntax.returncode == 0, f"README.md line {block.line}: not a valid shell line: {syntax.stderr}"


def test_the_top_gives_the_demo_first_and_the_tests_second() -> None:
    # .ci/run runs the first command line of the first shell block as the demo, and checks its output.
    assert len(TOP_SHELL) == 2, [b.line for b in TOP_SHELL]
    first, second = (b.code.strip() for b in TOP_SHELL)
    assert first.endswith("-m demo") and "'.[demo]'" in first, first
    assert "pytest" in second and "'.[test]'" in second, second
