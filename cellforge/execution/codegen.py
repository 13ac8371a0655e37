"""Render training scripts from the template library."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cellforge.errors import ConfigError

TEMPLATE_DIR = Path(__file__).parent / "templates"
_CONFIG_LINE = re.compile(r"^CONFIG = .*$", re.MULTILINE)


def templates() -> list[str]:
    """Names of the available model templates."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.py"))


def render(template: str, config: dict[str, Any]) -> str:
    """Script text of ``template`` with its ``CONFIG`` line set to ``config``.

    Raises
    ------
    ConfigError
        Unknown template; the message lists the valid ones.
    """
    path = TEMPLATE_DIR / f"{template}.py"
    if not path.exists():
        msg = f"unknown model template {template!r}; available: {templates()}"
        raise ConfigError(msg)
    return set_config(path.read_text(), config)


def set_config(script: str, config: dict[str, Any]) -> str:
    """Replace the one-line ``CONFIG = {...}`` of a script."""
    if not _CONFIG_LINE.search(script):
        msg = "script has no one-line 'CONFIG = {...}' to set"
        raise ConfigError(msg)
    line = "CONFIG = " + json.dumps(config, sort_keys=True)
    return _CONFIG_LINE.sub(lambda _: line, script, count=1)


def get_config(script: str) -> dict[str, Any]:
    """The ``CONFIG`` dictionary of a script (empty if it has none or it is not JSON)."""
    match = _CONFIG_LINE.search(script)
    if not match:
        return {}
    try:
        return json.loads(match.group(0).removeprefix("CONFIG = "))
    except json.JSONDecodeError:
        return {}
