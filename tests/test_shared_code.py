"""run.cpp and runq.cpp share every section except the ones quantization
changes, line for line, so that `make lesson` (their diff without the fast
paths) is the lesson; and each reads as a lesson first."""

import difflib
import re

from conftest import ROOT
from lesson import FAST_PATHS, lesson_diff
from sections import sections

# The only sections allowed to differ.
ENGINE_SPECIFIC = {"preamble", "Weights", "Run state", "Matmul", "The forward pass", "Fast matmul"}


def test_shared_sections_are_identical():
    run = sections((ROOT / "run.cpp").read_text())
    runq = sections((ROOT / "runq.cpp").read_text())
    assert [n for n, _ in run] == [n for n, _ in runq], "the two files must have the same sections in order"
    assert ENGINE_SPECIFIC <= {n for n, _ in run}
    for (name, a), (_, b) in zip(run, runq):
        if name not in ENGINE_SPECIFIC and a != b:
            diff = "".join(list(difflib.unified_diff(a.splitlines(True), b.splitlines(True), "run.cpp",
                                                     "runq.cpp"))[:40])
            raise AssertionError(f"section '{name}' differs between run.cpp and runq.cpp:\n{diff}")


def test_lesson_reads_first():
    """The lesson in data-flow order, forward() within the first 45% of each
    file, the fast paths in bannered sections after the command line, and
    `make lesson` at most 450 lines (llama2.c's `diff run.c runq.c`: 311)."""
    for name in ("run.cpp", "runq.cpp"):
        text = (ROOT / name).read_text()
        names = [n for n, _ in sections(text)]
        lesson_order = ["preamble", "Errors", "Memory", "Checkpoint header", "Weights", "KV cache", "Run state",
                        "Kernels shared by both engines", "Matmul", "The forward pass", "Tokenizer", "Sampler",
                        "Generate and chat", "Command line"]
        assert names[:len(lesson_order)] == lesson_order, names
        assert FAST_PATHS <= set(names[len(lesson_order):]), names
        line = text[:re.search(r"^static float\* forward\(", text, re.M).start()].count("\n") + 1
        lines = text.count("\n")
        assert line <= 0.45 * lines, f"{name}: forward() starts at line {line} of {lines}"
    n = len(lesson_diff())
    assert 0 < n <= 450, f"make lesson prints {n} lines"
