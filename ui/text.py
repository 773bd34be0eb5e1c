"""User text on screen: shown as typed, never interpreted as Markdown or HTML.

Gradio's ``gr.Markdown`` renders Markdown, raw HTML and (with its default delimiters) LaTeX.
Text a person typed (an instruction) is passed through :func:`md_literal` before it is
placed in Markdown, and the components showing it switch LaTeX off (:data:`NO_LATEX`):
``<b>x</b>`` then shows as those eight characters and ``![](http://…)`` as text (nothing is
fetched), with no link made of a bare URL either.  Whitespace shows as typed too: line breaks
as line breaks, tabs and runs of spaces at their width.
"""

from __future__ import annotations

import html
import re
import string

NO_LATEX: list = []   # ``latex_delimiters`` of a Markdown component that shows user text
_ESCAPES = {ch: "\\" + ch for ch in string.punctuation}
_ESCAPES.update({ch: html.escape(ch) for ch in "<>&"})
_ESCAPES["\t"] = "    "
_BREAK = re.compile(r"\r\n?|\n")
_SPACES = re.compile(r"^ +| {2,}| +$")   # spaces Markdown would collapse or drop


def md_literal(text: str) -> str:
    """``text`` escaped so that Markdown renders exactly it: HTML's ``<>&`` as entities, every
    other ASCII punctuation character backslash-escaped (CommonMark allows escaping each),
    line breaks as ``<br>``, tabs as four spaces and spaces Markdown would collapse or drop
    (runs, and those starting or ending a line) as no-break spaces."""
    lines = _BREAK.split("".join(_ESCAPES.get(ch, ch) for ch in str(text)))
    return "<br>".join(_SPACES.sub(lambda m: "&nbsp;" * len(m.group()), line) for line in lines)
