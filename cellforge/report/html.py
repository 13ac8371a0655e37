"""Markdown reports as one self-contained HTML file: figures embedded, readable offline."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from markdown_it import MarkdownIt

#: Readable at a laptop's width without zooming: body text 16 px, tables 14 px, nothing smaller
#: than 13 px; a table wider than the column scrolls inside itself instead of widening the page.
_STYLE = """
body { font-family: system-ui, sans-serif; font-size: 16px; max-width: 1100px; margin: 2em auto; padding: 0 1em; line-height: 1.45; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; display: block; max-width: 100%; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.4em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
code { background: #f6f6f6; padding: 0 0.2em; font-size: 14px; overflow-wrap: anywhere; }
"""
_IMG = re.compile(r'<img src="([^"]+\.png)"')
_CELL = re.compile(r"(<t[hd][^>]*>)(.*?)(</t[hd]>)", re.DOTALL)
_TAG = re.compile(r"(<[^>]+>)")


def _breakable_cells(body: str) -> str:
    """Let ``snake_case`` names in table cells wrap after each underscore (``<wbr>``), tags untouched."""

    def cell(match: re.Match[str]) -> str:
        parts = _TAG.split(match.group(2))
        text = "".join(p if p.startswith("<") else p.replace("_", "_<wbr>") for p in parts)
        return match.group(1) + text + match.group(3)

    return _CELL.sub(cell, body)


def markdown_to_html(text: str, base_dir: Path, *, title: str) -> str:
    """Render ``text`` (Markdown with tables) to a standalone HTML page.

    Every ``.png`` image is read from ``base_dir`` and embedded as a base64 ``data:`` URI, so
    the page needs no other file. A missing image raises ``FileNotFoundError`` naming it.
    Table cells may wrap after underscores, so a wide metrics table fits the page.
    """
    body = MarkdownIt("commonmark").enable("table").render(text)

    def embed(match: re.Match[str]) -> str:
        path = base_dir / match.group(1)
        if not path.is_file():
            msg = f"report figure {path} is missing"
            raise FileNotFoundError(msg)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img src="data:image/png;base64,{data}"'

    body = _breakable_cells(_IMG.sub(embed, body))
    return (
        f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>\n"
        f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )


def write_html(markdown_path: Path, *, title: str) -> Path:
    """Write ``<name>.html`` beside a Markdown report (images resolved relative to it)."""
    out = markdown_path.with_suffix(".html")
    out.write_text(markdown_to_html(markdown_path.read_text(), markdown_path.parent, title=title))
    return out
