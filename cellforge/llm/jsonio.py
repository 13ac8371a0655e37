"""Reading the JSON object in a model's reply (shared by the LLM client and the offline planner)."""

from __future__ import annotations

import json
import re
from typing import Any


def extract_json(text: str) -> Any:
    """The JSON object in a reply: a fenced ```json block or the outermost braces."""
    fenced = re.search(r"```(?:json)?\s*(\{.*\})\s*```", text, re.DOTALL)
    raw = fenced.group(1) if fenced else text[text.find("{") : text.rfind("}") + 1]
    return json.loads(raw)


def _plain(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".:").strip()


def copied_descriptions(answer: Any, path: str = "") -> list[str]:
    """Fields of a validated answer whose text is the schema's own description of that field.

    A small model shown a JSON schema sometimes fills a free-text field with the field's
    ``description`` (measured: Qwen2.5-Coder-1.5B as method designer answered the architecture
    "The model in one paragraph."). Such an answer validates, yet says nothing. Strings, and
    strings in lists, are compared after case and whitespace are folded and a final period is
    dropped; nested models are searched too.

    Parameters
    ----------
    answer : pydantic.BaseModel
        A validated answer.
    path : str
        Prefix of the field names reported (used when recursing).

    Returns
    -------
    list[str]
        ``"field: 'text'"`` for each copied description (empty when there is none).
    """
    from pydantic import BaseModel

    found: list[str] = []
    for name, info in type(answer).model_fields.items():
        value = getattr(answer, name)
        where = f"{path}{name}"
        items = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else [value]
        for item in items:
            if isinstance(item, BaseModel):
                found += copied_descriptions(item, where + ".")
            elif isinstance(item, str) and info.description and item.strip() and _plain(item) == _plain(info.description):
                found.append(f"{where}: {item.strip()!r}")
    return found
