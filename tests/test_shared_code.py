"""run.cpp and runq.cpp share every section except the ones quantization
changes, line for line, so that `diff run.cpp runq.cpp` is the lesson."""

import difflib

from conftest import ROOT
from sections import sections

# The only sections allowed to differ.
ENGINE_SPECIFIC = {"preamble", "Weights", "Run state", "Matmul", "The forward pass"}


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
