"""What the debugger reads: the failing region of the script and a compact outline of the rest.

A rendered template is 60-70k characters (18-20k tokens), beyond a small local model's
window and minutes of prompt processing on two cores; a traceback names the line that broke.
The debugger gets the lines around the deepest frame in ``train.py`` (or, without a traceback,
the region the failure class points to), the script's outline (imports, ``CONFIG``, each
top-level ``def``/``class`` with its line), the error output, and this run's history of fixes
(:func:`cellforge.execution.journal.debug_history`).
"""

from __future__ import annotations

import re
from typing import Any

_FRAME = re.compile(r'File "(?:[^"]*/)?train\.py", line (\d+)')
_OUTLINE = re.compile(r"^(?:def |class |async def |CONFIG = |import |from \S+ import |if __name__)")
#: Lines shown before and after the failing line (about 300 tokens: a small local model reads ~20 prompt tokens/s here).
BEFORE, AFTER = 16, 8
#: A script this short is shown whole.
WHOLE_LINES = 60
#: Where to look, by failure class, when no traceback names a line of the script.
_HINTS = {
    "bad_output": r"predictions|write_h5ad|outputs",
    "timeout": r"max_epochs|for epoch|\.fit\(|range\(",
    "out_of_memory": r"batch_size|toarray|\.todense|np\.zeros|np\.ones",
}


def failing_line(script: str, error: str) -> int | None:
    """The 1-based line of ``train.py`` in the deepest traceback frame of ``error`` that lies in the script, or None."""
    n = len(script.splitlines())
    lines = [int(m) for m in _FRAME.findall(error or "") if 1 <= int(m) <= n]
    return lines[-1] if lines else None


def focus(script: str, error: str, failure: str) -> dict[str, Any]:
    """The region of ``script`` the failure points to, and an outline of the rest.

    Parameters
    ----------
    script
        The failing ``train.py``.
    error
        Its error output (traceback, or the host's contract message).
    failure
        The failure class (``code_error``, ``bad_output``, ``timeout``, ...).

    Returns
    -------
    dict
        ``excerpt`` (verbatim lines, so an edit's ``find`` can be copied from it),
        ``excerpt_lines`` (``"a-b of n"``), ``failing_line`` (or None) and ``outline``
        (``"<line>: <text>"`` entries; empty when the script is shown whole).
    """
    lines = script.splitlines()
    n = len(lines)
    if n <= WHOLE_LINES:
        return {"excerpt": script, "excerpt_lines": f"1-{n} of {n} (whole script)", "failing_line": failing_line(script, error), "outline": []}
    line = failing_line(script, error)
    if line is None:
        pattern = re.compile(_HINTS.get(failure, r"CONFIG = "))
        hits = [i + 1 for i, text in enumerate(lines) if pattern.search(text)]
        line = hits[-1] if hits else n
    start, end = max(1, line - BEFORE), min(n, line + AFTER)
    excerpt = "\n".join(lines[start - 1 : end])
    outline = [f"{i + 1}: {text[:100]}" for i, text in enumerate(lines) if _OUTLINE.match(text) and not start <= i + 1 <= end and not text.startswith(("import ", "from "))]
    return {"excerpt": excerpt, "excerpt_lines": f"{start}-{end} of {n}", "failing_line": failing_line(script, error), "outline": outline[:30]}


#: Longest line of error output the debugger reads; longer ones keep their start and end.
MAX_LINE = 300


def condense_error(text: str, *, max_chars: int = 1500, max_line: int = MAX_LINE) -> str:
    """The error output as the debugger reads it: the last traceback whole, long lines cut in the middle.

    An exception message can be one line of 30,000 characters (pandas listing every gene name);
    the last characters of the output are then that list alone, without the frames or the
    exception's type. Here the text from the last ``Traceback`` on is kept, every line longer
    than ``max_line`` keeps its first and last ``max_line // 2`` characters, and if the result is
    still over ``max_chars`` the middle frames give way (the first lines and the end stay).
    """
    start = text.rfind("Traceback (most recent call last):")
    body = text[start:] if start >= 0 else text
    half = max_line // 2
    lines = [line if len(line) <= max_line else f"{line[:half]} ... [{len(line) - 2 * half} characters cut] ... {line[-half:]}" for line in body.splitlines()]
    out = "\n".join(lines)
    if len(out) <= max_chars:
        return out
    head, tail = lines[:3], []
    size = sum(len(x) + 1 for x in head) + 40
    for line in reversed(lines[3:]):
        if size + len(line) + 1 > max_chars:
            break
        tail.insert(0, line)
        size += len(line) + 1
    return "\n".join([*head, "  ... [frames cut] ...", *tail])
