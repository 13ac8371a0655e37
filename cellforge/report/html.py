"""Markdown reports as one self-contained HTML file: figures embedded, readable offline.

A report quotes text that the host did not write: a language model's plan, a pilot's metrics, a
script's messages. None of it may become markup. So the Markdown is rendered with raw HTML off
(a ``<script>`` in a plan is shown as text), an image is embedded only when it names one of the
run's own figures (a ``.png`` file inside the report's folder, by a relative name; anything else is shown as its
alt text, never fetched), links keep markdown-it's scheme check (no ``javascript:``), and the page
carries a Content-Security-Policy that allows no script, no remote load and no form at all.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

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
#: The page may show inline styles and embedded images; nothing runs, nothing is fetched, nothing is sent.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; form-action 'none'; base-uri 'none'"
_FIGURE = re.compile(r"(?:[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}/){0,4}[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}\.png")
_CELL = re.compile(r"(<t[hd][^>]*>)(.*?)(</t[hd]>)", re.DOTALL)
_TAG = re.compile(r"(<[^>]+>)")


def _breakable_cells(body: str) -> str:
    """Let ``snake_case`` names in table cells wrap after each underscore (``<wbr>``), tags untouched."""

    def cell(match: re.Match[str]) -> str:
        parts = _TAG.split(match.group(2))
        text = "".join(p if p.startswith("<") else p.replace("_", "_<wbr>") for p in parts)
        return match.group(1) + text + match.group(3)

    return _CELL.sub(cell, body)


def _renderer(base_dir: Path) -> MarkdownIt:
    """CommonMark with tables, raw HTML off, images limited to the run's own figures (embedded)."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    def image(renderer: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        token = tokens[idx]
        src = str(token.attrGet("src") or "")
        alt = html.escape(token.content or src)
        path = (base_dir / src).resolve()
        if not _FIGURE.fullmatch(src) or not path.is_relative_to(base_dir.resolve()) or not path.is_file():
            return f"<em>[figure not shown: {alt}]</em>"
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img src="data:image/png;base64,{data}" alt="{alt}" />'

    md.add_render_rule("image", image)
    return md


def markdown_to_html(text: str, base_dir: Path, *, title: str) -> str:
    """Render ``text`` (Markdown with tables) to a standalone HTML page.

    Raw HTML in ``text`` is shown as text, never as markup. An image is embedded as a base64
    ``data:`` URI when it names a ``.png`` file inside ``base_dir`` by a plain relative path (the run's figures);
    any other image (a remote address, a path outside the folder, a missing file) is replaced by
    its alt text, so the page needs no other file and fetches nothing. Table cells may wrap after
    underscores, so a wide metrics table fits the page.
    """
    body = _breakable_cells(_renderer(base_dir).render(text))
    return (
        f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n<title>{html.escape(title)}</title>\n"
        f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )


def write_html(markdown_path: Path, *, title: str) -> Path:
    """Write ``<name>.html`` beside a Markdown report (images resolved relative to it)."""
    out = markdown_path.with_suffix(".html")
    out.write_text(markdown_to_html(markdown_path.read_text(), markdown_path.parent, title=title))
    return out
