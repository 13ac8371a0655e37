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


def _model_region(lines: list[str]) -> tuple[int, int] | None:
    """1-based first and last line of the worked example's model region (``predict_deltas``), or None."""
    from cellforge.execution.contract import MODEL_BEGIN, MODEL_END

    begin = next((i for i, text in enumerate(lines) if text.startswith(MODEL_BEGIN)), None)
    end = next((i for i, text in enumerate(lines) if text.startswith(MODEL_END)), None)
    if begin is None or end is None or end <= begin:
        return None
    return begin + 1, end + 1


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
    region = _model_region(lines)
    if line is None and region is not None:
        # no line named, and the script has the worked example's model region: the model's own code is there
        start, end = region
        outline = [f"{i + 1}: {text[:100]}" for i, text in enumerate(lines) if _OUTLINE.match(text) and not start <= i + 1 <= end and not text.startswith(("import ", "from "))]
        return {"excerpt": "\n".join(lines[start - 1 : end]), "excerpt_lines": f"{start}-{end} of {n}", "failing_line": None, "outline": outline[:30]}
    if line is None:
        pattern = re.compile(_HINTS.get(failure, r"CONFIG = "))
        hits = [i + 1 for i, text in enumerate(lines) if pattern.search(text)]
        line = hits[-1] if hits else n
    start, end = max(1, line - BEFORE), min(n, line + AFTER)
    excerpt = "\n".join(lines[start - 1 : end])
    outline = [f"{i + 1}: {text[:100]}" for i, text in enumerate(lines) if _OUTLINE.match(text) and not start <= i + 1 <= end and not text.startswith(("import ", "from "))]
    return {"excerpt": excerpt, "excerpt_lines": f"{start}-{end} of {n}", "failing_line": failing_line(script, error), "outline": outline[:30]}


#: The debugger's context keys in prompt order: what stays the same between its calls first (limits, the
#: script region, whose argument notes and unchanged lines lead it), then what grows (the history of
#: fixes), then what is new every call (the failure and its error output). A llama.cpp server keeps the
#: tokens of its last prompt and processes a new one from the first token that differs; at ~20 prompt
#: tokens/s on two cores every token of a shared prefix is 50 ms saved.
DEBUGGER_ORDER = ("limits", "excerpt_lines", "script", "outline", "config", "history", "failure", "failing_line", "log_tail")


def debugger_context(**fields: Any) -> dict[str, Any]:
    """The debugger's context with its keys in :data:`DEBUGGER_ORDER` (keys not listed there follow, as given)."""
    ordered = {key: fields[key] for key in DEBUGGER_ORDER if key in fields}
    return {**ordered, **{k: v for k, v in fields.items() if k not in ordered}}


#: Longest line of error output the debugger reads; longer ones keep their start and end.
MAX_LINE = 300


#: Lines printed before the last traceback that the debugger also reads.
LINES_BEFORE = 2


def condense_error(text: str, *, max_chars: int = 1500, max_line: int = MAX_LINE) -> str:
    """The error output as the debugger reads it: the last traceback, its frames in ``train.py`` kept, long lines cut in the middle.

    The :data:`LINES_BEFORE` non-empty lines printed just before the traceback come first (the
    worked example prints the shapes of the model function's arguments there: a 1.5B model's
    shape errors name sizes the debugger cannot otherwise place).

    An exception message can be one line of 30,000 characters (anndata listing every gene
    name); the last characters of the output are then that list alone, without the frames or
    the exception's type. Here the text from the last ``Traceback`` on is kept; frames in
    library code give way first (the last two stay), every frame in ``train.py`` stays; every
    line longer than ``max_line`` keeps its first and last ``max_line // 2`` characters; if the
    result is still over ``max_chars``, its start and end stay.
    """
    start = text.rfind("Traceback (most recent call last):")
    body = text[start:] if start >= 0 else text
    half = max_line // 2
    # the script's last words before it failed (the worked example prints its arguments' shapes there)
    before = [line for line in text[:start].splitlines() if line.strip()][-LINES_BEFORE:] if start > 0 else []
    lines = [line if len(line) <= max_line else f"{line[:half]} ... [{len(line) - 2 * half} characters cut] ... {line[-half:]}" for line in body.splitlines()]
    # group into frames: a 'File "..."' line and the indented source lines under it
    groups: list[list[str]] = []
    for line in lines:
        if line.lstrip().startswith('File "') or not groups or not line.startswith(" "):
            groups.append([line])
        else:
            groups[-1].append(line)
    frames = [i for i, g in enumerate(groups) if g[0].lstrip().startswith('File "')]
    own = {i for i in frames if _FRAME.search(g0 := groups[i][0]) and g0}
    library = [i for i in frames if i not in own]
    dropped = set(library[:-2])
    kept: list[str] = []
    for i, group in enumerate(groups):
        if i in dropped:
            if not kept or kept[-1] != "  ... [library frames cut] ...":
                kept.append("  ... [library frames cut] ...")
            continue
        kept.extend(group)
    out = "\n".join([*(line if len(line) <= max_line else line[:max_line] + " ..." for line in before), *kept])
    if len(out) <= max_chars:
        return out
    return out[: max_chars // 2] + "\n  ... [cut] ...\n" + out[-max_chars // 2 :]
