"""Apply a model's unified diff to one script, strictly: every hunk's context must match.

Models write diffs with wrong line numbers more often than wrong context, so each hunk is
located by its context and removed lines (the nearest match to the stated line wins); file
headers (``---``/``+++``) are ignored: the diff always applies to the one script.
"""

from __future__ import annotations

import re

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def _hunks(diff: str) -> list[tuple[int, list[str], list[str]]]:
    """(stated start line, old lines, new lines) of each hunk."""
    hunks: list[tuple[int, list[str], list[str]]] = []
    current: tuple[int, list[str], list[str]] | None = None
    for line in diff.splitlines():
        head = _HUNK.match(line)
        if head:
            current = (int(head.group(1)), [], [])
            hunks.append(current)
            continue
        if current is None or line.startswith(("---", "+++")) and not current[1] and not current[2]:
            continue
        if line.startswith("\\"):  # "\ No newline at end of file"
            continue
        tag, text = (line[:1], line[1:]) if line else (" ", "")
        if tag == " ":
            current[1].append(text)
            current[2].append(text)
        elif tag == "-":
            current[1].append(text)
        elif tag == "+":
            current[2].append(text)
        else:
            msg = f"diff line {line[:60]!r} starts with neither ' ', '-' nor '+'"
            raise ValueError(msg)
    if not hunks:
        raise ValueError("the diff has no '@@ -a,b +c,d @@' hunk")
    return hunks


def apply_unified_diff(script: str, diff: str) -> str:
    """``script`` with ``diff`` applied.

    Raises
    ------
    ValueError
        No hunk, a malformed line, or a hunk whose context and removed lines do not occur in
        the script (the message quotes the first line that was not found).
    """
    lines = script.splitlines()
    offset = 0
    for stated, old, new in _hunks(diff):
        if not old:  # pure insertion at the stated line
            at = max(0, min(len(lines), stated - 1 + offset))
        else:
            starts = [i for i in range(len(lines) - len(old) + 1) if lines[i : i + len(old)] == old]
            if not starts:
                stripped = [i for i in range(len(lines) - len(old) + 1) if [x.rstrip() for x in lines[i : i + len(old)]] == [x.rstrip() for x in old]]
                starts = stripped
            if not starts:
                first = next((o for o in old if o not in lines), old[0])
                msg = f"hunk at line {stated}: its lines do not occur in the script, e.g. {first[:100]!r}"
                raise ValueError(msg)
            at = min(starts, key=lambda i: abs(i - (stated - 1 + offset)))
        lines[at : at + len(old)] = new
        offset += len(new) - len(old)
    return "\n".join(lines) + ("\n" if script.endswith("\n") or not script else "")
