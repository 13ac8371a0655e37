"""Markdown reports as one self-contained HTML file: figures embedded, readable offline."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from markdown_it import MarkdownIt

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; line-height: 1.45; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; }
th { background: #f2f2f2; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f6f6f6; padding: 0 0.2em; }
"""
_IMG = re.compile(r'<img src="([^"]+\.png)"')


def markdown_to_html(text: str, base_dir: Path, *, title: str) -> str:
    """Render ``text`` (Markdown with tables) to a standalone HTML page.

    Every ``.png`` image is read from ``base_dir`` and embedded as a base64 ``data:`` URI, so
    the page needs no other file. A missing image raises ``FileNotFoundError`` naming it.
    """
    body = MarkdownIt("commonmark").enable("table").render(text)

    def embed(match: re.Match[str]) -> str:
        path = base_dir / match.group(1)
        if not path.is_file():
            msg = f"report figure {path} is missing"
            raise FileNotFoundError(msg)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img src="data:image/png;base64,{data}"'

    body = _IMG.sub(embed, body)
    return (
        f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>\n"
        f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )


def write_html(markdown_path: Path, *, title: str) -> Path:
    """Write ``<name>.html`` beside a Markdown report (images resolved relative to it)."""
    out = markdown_path.with_suffix(".html")
    out.write_text(markdown_to_html(markdown_path.read_text(), markdown_path.parent, title=title))
    return out
