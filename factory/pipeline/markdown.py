"""Text from profiles, paths and data sets as it lands in Markdown (``report.md``, ``MODEL_CARD.md``):
inert. A user's string must not open an HTML tag (``<script>``, ``<img onerror=...>``), start a heading, a
list or a table row, end a table cell or break out of inline code."""

from __future__ import annotations

import html
import re

_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~>-])")


def md_text(value: object) -> str:
    """``value`` as plain Markdown text: one line, HTML escaped, Markdown's punctuation backslash-escaped."""
    one_line = " ".join(str(value).split())
    return _SPECIAL.sub(r"\\\1", html.escape(one_line, quote=False))


def md_code(value: object) -> str:
    """``value`` inside inline code (between single backticks): one line, no backtick to close it early."""
    return " ".join(str(value).split()).replace("`", "'")


_CELL_SPECIAL = re.compile(r"([\\`\[\]|])")


def md_cell(value: object) -> str:
    """``value`` as a table cell: one line, HTML escaped, and no ``|`` (ends the cell), link bracket or backtick
    left active; the report's own names (``params_m``) read as they are."""
    one_line = " ".join(str(value).split())
    return _CELL_SPECIAL.sub(r"\\\1", html.escape(one_line, quote=False))
