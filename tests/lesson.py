"""`make lesson`: `diff run.cpp runq.cpp` over the lesson, the sections a first
reading goes through (the fast-path sections after the command line left
out): what quantization changes."""

import subprocess
import sys
import tempfile
from pathlib import Path

from sections import sections

ROOT = Path(__file__).resolve().parent.parent
FAST_PATHS = {"Vector helpers", "Fast matmul"}  # bannered sections a first reading skips


def lesson(path):
    return "".join(text for name, text in sections(path.read_text()) if name not in FAST_PATHS)


def lesson_diff():
    """The diff's lines, in diff's own format (as llama2.c's `diff run.c runq.c` is counted)."""
    with tempfile.TemporaryDirectory() as d:
        a, b = Path(d) / "run.cpp", Path(d) / "runq.cpp"
        a.write_text(lesson(ROOT / "run.cpp"))
        b.write_text(lesson(ROOT / "runq.cpp"))
        return subprocess.run(["diff", str(a), str(b)], capture_output=True, text=True, cwd=d).stdout.splitlines(True)


if __name__ == "__main__":
    sys.stdout.writelines(lesson_diff())
