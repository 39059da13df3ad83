"""Split run.cpp / runq.cpp into their banner-delimited sections.

A section starts at a line of dashes comment (`// ------...`) and is named by
the comment line after it, up to the first ':' or '.'."""

import re

BANNER = "// " + "-" * 76 + "\n"


def sections(text):
    """[(name, text)] in file order; the part before the first banner is 'preamble'."""
    parts = text.split(BANNER)
    out = [("preamble", parts[0])]
    for part in parts[1:]:
        first = part.split("\n", 1)[0]
        name = re.split(r"[:.]", first.removeprefix("// "), maxsplit=1)[0].strip()
        out.append((name, BANNER + part))
    return out
