"""README.md's Python examples run as written, each as if pasted into a fresh file.

Every ```python fenced block of README.md runs on CPU in a namespace of its own, so it
must hold its imports, model and data (```bash and other fences are commands or output:
not run). Two markers, each an HTML comment (invisible on GitHub) on a line of its own
directly above the fence, say otherwise:

* ``<!-- continues -->``: the block goes on from the previous Python block; the two (and
  any chain of continuations) run together, in one namespace.
* ``<!-- requires: cuda -->``: the block needs a CUDA device; without one it is only
  compiled, and its run is skipped with that reason.

Loop lengths: the examples train for realistic numbers of steps (``range(2000)``), far
too long for the test suite, so every one-argument call ``range(n)`` in them runs as
``range(min(n, LOOP_CAP))`` (an AST rewrite, :class:`CapRange`). In the README
``range(n)`` only ever sets how many steps a loop trains, so every loop body still runs,
``LOOP_CAP`` times. Nothing else is changed, and tracebacks give README.md line numbers.

The blocks run in this process (a fresh interpreter each would add seconds of imports
per block), with the working directory a temporary one for the files they save, and on
one intra-op thread: the examples' small ops gain nothing from more, and on a shared CPU
their threads wait on each other (a second-order conv4 task: 0.04 s on one thread, up to
2.4 s on two of a loaded 2-core machine).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
LOOP_CAP = 2
REQUIREMENTS = ("cuda",)
_MARKER = re.compile(r"<!--\s*(continues|requires:\s*(\S+))\s*-->")


@dataclass
class Example:
    """One example to run: a README block and the blocks that continue it."""

    line: int  # README line of the first block's opening fence (1-based)
    heading: str  # the section the first block is in
    source: str = field(default="", repr=False)
    requires: set[str] = field(default_factory=set)
    blocks: int = 0  # README blocks joined in this example

    @property
    def name(self) -> str:
        return f"README.md:{self.line} ({self.heading})"


def examples(markdown: str) -> list[Example]:
    """The Python examples of ``markdown``, continuations joined to their predecessor.

    Fences are recognised at the start of a line only. Raises ValueError for a marker
    that is not directly above a ```python fence, a continuation with no Python block
    before it, an unknown requirement and a fence that is never closed.
    """
    found: list[Example] = []
    heading = "top"
    markers: list[tuple[int, re.Match[str]]] = []  # (README line, marker) above the next line
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line, number = lines[i], i + 1
        marker = _MARKER.fullmatch(line.strip())
        if marker:
            markers.append((number, marker))
            i += 1
            continue
        if markers and line != "```python":
            at, first = markers[0]
            raise ValueError(f"line {at}: marker {first.group(0)!r} must be directly above a ```python fence")
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j] == "```"), None)
            if end is None:
                raise ValueError(f"line {number}: fence {line!r} is never closed")
            if line == "```python":
                _add_block(found, Example(number, heading), markers, lines[i + 1 : end])
                markers = []
            i = end
        i += 1
    if markers:
        at, first = markers[0]
        raise ValueError(f"line {at}: marker {first.group(0)!r} must be directly above a ```python fence")
    return found


def _add_block(found: list[Example], new: Example, markers: list[tuple[int, re.Match[str]]], code: list[str]) -> None:
    """Append the block ``code`` (its fence at line ``new.line``) to ``found``: as ``new``,
    or to the last example when a marker says it continues it."""
    continues = any(m.group(1) == "continues" for _, m in markers)
    if continues and not found:
        raise ValueError(f"line {new.line}: <!-- continues --> but no Python block comes before it")
    example = found[-1] if continues else new
    if not continues:
        found.append(example)
    for at, m in markers:
        if m.group(2) is not None:
            if m.group(2) not in REQUIREMENTS:
                raise ValueError(f"line {at}: unknown requirement {m.group(2)!r}, expected one of {REQUIREMENTS}")
            example.requires.add(m.group(2))
    # Blank lines put each block at its README line numbers, so tracebacks point there.
    example.source += "\n" * (new.line - example.source.count("\n")) + "\n".join(code) + "\n"
    example.blocks += 1


class CapRange(ast.NodeTransformer):
    """Rewrites ``range(n)`` to ``range(min(n, LOOP_CAP))`` (one-argument calls only)."""

    def visit_Call(self, node: ast.Call) -> ast.Call:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "range" and len(node.args) == 1 and not node.keywords:
            capped = ast.Call(ast.Name("min", ast.Load()), [node.args[0], ast.Constant(LOOP_CAP)], [])
            node.args = [ast.copy_location(capped, node.args[0])]
        return node


def compile_capped(source: str, filename: str = "README.md") -> CodeType:
    """``source`` compiled with its ``range(n)`` calls capped, errors naming ``filename``."""
    return compile(ast.fix_missing_locations(CapRange().visit(ast.parse(source, filename))), filename, "exec")


README_EXAMPLES = examples(README.read_text())


def test_every_python_fence_is_found() -> None:
    # A fence the parser missed (indented, say) would never run.
    assert sum(e.blocks for e in README_EXAMPLES) == README.read_text().count("```python")


@pytest.mark.parametrize("example", README_EXAMPLES, ids=lambda e: e.name)
def test_readme_example_runs(example: Example, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = compile_capped(example.source)  # a block skipped below still has to be valid Python
    if "cuda" in example.requires and not torch.cuda.is_available():
        pytest.skip(f"{example.name} is marked <!-- requires: cuda --> and torch sees no CUDA device")
    monkeypatch.chdir(tmp_path)  # files an example saves (maml.pt) land here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the module docstring
    try:
        exec(code, {"__name__": "__main__"})
    finally:
        torch.set_num_threads(threads)


def test_markers_join_continuations_and_read_requirements() -> None:
    markdown = "\n".join([
        "# A", "```python", "a = 1", "```", "text",
        "<!-- continues -->", "```python", "b = a + 1", "```",
        "## B", "```bash", "echo no", "```",
        "<!-- requires: cuda -->", "```python", "c = 3", "```",
    ])
    first, second = examples(markdown)
    assert (first.line, first.heading, first.requires) == (2, "A", set())
    assert first.source.splitlines()[2:] == ["a = 1", "", "", "", "", "b = a + 1"]  # README line numbers kept
    namespace: dict = {}
    exec(compile_capped(first.source, "<test>"), namespace)  # the continuation sees its predecessor's names
    assert namespace["b"] == 2
    assert (second.line, second.heading, second.requires) == (15, "B", {"cuda"})


@pytest.mark.parametrize(("markdown", "message"), [
    ("<!-- continues -->\n```python\nx = 1\n```", "no Python block comes before it"),
    ("<!-- requires: tpu -->\n```python\nx = 1\n```", "unknown requirement 'tpu'"),
    ("<!-- requires: cuda -->\n\n```python\nx = 1\n```", "must be directly above a ```python fence"),
    ("<!-- requires: cuda -->\n```bash\nls\n```", "must be directly above a ```python fence"),
    ("```python\nx = 1\n", "never closed"),
])
def test_misplaced_markers_are_errors(markdown: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        examples(markdown)


def test_cap_range_caps_only_one_argument_ranges() -> None:
    namespace: dict = {}
    source = "a = list(range(2000))\nb = list(range(1))\nc = list(range(0, 5))"
    exec(compile_capped(source, "<test>"), namespace)
    assert (namespace["a"], namespace["b"], namespace["c"]) == (list(range(LOOP_CAP)), [0], [0, 1, 2, 3, 4])
