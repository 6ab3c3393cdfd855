"""Every ```python block of README.md runs on its own, as a reader copies it: in a fresh namespace
(a name that only an earlier block defines is a NameError here), in an empty working folder.

A block that cannot run here says so in its first line, visibly in the README:
`# needs network: ...` (downloads weights) or `# needs a GPU: ...` (run when CUDA is available).
A failure is reported at the README's own line numbers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, NamedTuple

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
MARKERS = ("# needs network", "# needs a GPU")

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(NamedTuple):
    line: int  # README line of the block's first code line
    heading: str
    code: str


def readme_blocks(text: str) -> List[Block]:
    """The ```python blocks of `text`, each with its line number and the heading above it."""
    blocks, heading, lines = [], "top", text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            heading = line.lstrip("#").strip()
        if line.strip() == "```python":
            start = i + 1
            end = start
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            blocks.append(Block(start + 1, heading, "\n".join(lines[start:end]) + "\n"))
            i = end
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def _id(block: Block) -> str:
    return f"L{block.line}-" + re.sub(r"[^a-z0-9]+", "-", block.heading.lower()).strip("-")


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 4, [b.line for b in BLOCKS]
    for block in BLOCKS:
        first = block.code.lstrip().split("\n", 1)[0]
        if first.startswith("# needs"):
            assert first.startswith(MARKERS), f"README line {block.line}: unknown marker {first!r}; use one of {MARKERS}"


@pytest.mark.parametrize("block", BLOCKS, ids=_id)
def test_readme_block_runs_on_its_own(block, tmp_path, monkeypatch):
    first = block.code.lstrip().split("\n", 1)[0]
    if first.startswith("# needs network"):
        pytest.skip(f"README line {block.line}: {first[2:]}")
    if first.startswith("# needs a GPU") and not torch.cuda.is_available():
        pytest.skip(f"README line {block.line}: {first[2:]}")
    monkeypatch.chdir(tmp_path)
    # Leading newlines put the block at its README line numbers in a traceback.
    code = compile("\n" * (block.line - 1) + block.code, str(README), "exec")
    exec(code, {"__name__": "__readme__"})


def test_readme_references_resolve():
    """Links point at files of the repository, `make X` names a target of the Makefile, and no
    reference needs what a reader does not have (the internal tracker's issue numbers, a python3
    without the venv's packages)."""
    text = README.read_text()
    root = README.parent
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (root / target).exists(), f"README links to {target}, which is not in the repository"
    makefile = (root / "Makefile").read_text()
    for target in set(re.findall(r"`make ([a-z][a-z-]*)", text)):
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"README names `make {target}`: no such target"
    assert not re.search(r"\bissues? #?\d+", text, re.I), re.search(r".{40}\bissues? #?\d+.{20}", text, re.I)
    assert "python3 scripts/" not in text  # the system python3 lacks torch: `make gpu-plan` uses the venv
