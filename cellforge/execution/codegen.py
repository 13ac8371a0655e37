"""Render training scripts from the template library.

A template is a model file in ``templates/`` (its docstring, then the model's code); the
rendered script is that docstring, the library's shared code (``templates/_common.py``:
data loading, features, reference predictors, the Lightning loop, validation metrics and
outputs), the model's code and a ``main()`` call: one standalone file the sandbox runs.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

from cellforge.errors import ConfigError

TEMPLATE_DIR = Path(__file__).parent / "templates"
_CONFIG_LINE = re.compile(r"^CONFIG = .*$", re.MULTILINE)


def templates() -> list[str]:
    """Names of the available model templates."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.py") if not p.stem.startswith("_"))


def template_source(template: str) -> str:
    """The source of one template's own file.

    Raises
    ------
    ConfigError
        Unknown template; the message lists the valid ones.
    """
    if template not in templates():
        msg = f"unknown model template {template!r}; available: {templates()}"
        raise ConfigError(msg)
    return (TEMPLATE_DIR / f"{template}.py").read_text()


def is_cell_level(template: str) -> bool:
    """True for a template whose model works on cells (``CELL_LEVEL = True``), not on condition profiles.

    Raises
    ------
    ConfigError
        Unknown template (see :func:`template_source`).
    """
    return re.search(r"^CELL_LEVEL = True\b", template_source(template), re.MULTILINE) is not None


def render(template: str, config: dict[str, Any]) -> str:
    """Script text of ``template`` with its ``CONFIG`` line set to ``config``.

    Raises
    ------
    ConfigError
        Unknown template; the message lists the valid ones.
    """
    text = template_source(template)
    body = ast.parse(text).body
    doc_end = body[0].end_lineno if body and isinstance(body[0], ast.Expr) else 0
    lines = text.splitlines(keepends=True)
    docstring, model = "".join(lines[:doc_end]), "".join(lines[doc_end:])
    common = (TEMPLATE_DIR / "_common.py").read_text()
    script = f"{docstring}\n{common}{model}\n\nif __name__ == \"__main__\":\n    main()\n"
    return set_config(script, {"template": template, **config})


def set_config(script: str, config: dict[str, Any]) -> str:
    """Replace the one-line ``CONFIG = {...}`` of a script."""
    if not _CONFIG_LINE.search(script):
        msg = "script has no one-line 'CONFIG = {...}' to set"
        raise ConfigError(msg)
    # A Python literal (True/False/None), keys sorted so equal configs render equal lines.
    line = "CONFIG = " + repr(dict(sorted(json.loads(json.dumps(config)).items())))
    return _CONFIG_LINE.sub(lambda _: line, script, count=1)


def get_config(script: str) -> dict[str, Any]:
    """The ``CONFIG`` dictionary of a script (empty if it has none or it is not a literal dict)."""
    match = _CONFIG_LINE.search(script)
    if not match:
        return {}
    try:
        value = ast.literal_eval(match.group(0).removeprefix("CONFIG = "))
    except (ValueError, SyntaxError):
        return {}
    return value if isinstance(value, dict) else {}
