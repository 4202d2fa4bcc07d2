"""HTML pages from the package's jinja2 templates (``sparsedecomp/templates``), autoescaped.

Every page extends ``base.html.j2`` (the shared CSS, no scripts or files fetched: a page is one self-contained
file) and fills its ``title`` and ``content`` blocks. Values reach a page only through template variables, so any
text from a checkpoint, a config or the command line is escaped (``<script>`` shows as text); markup is written in
the templates, never assembled in Python.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import jinja2

TEMPLATE_PACKAGE = ("sparsedecomp", "templates")


def render(template_name: str, **context: Any) -> str:
    """The template ``template_name`` (e.g. ``"decomposition.html.j2"``) rendered with ``context``; an undefined
    variable raises ``jinja2.UndefinedError`` instead of rendering as blank."""
    return environment().get_template(template_name).render(**context)


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The one environment: package templates, autoescaping for ``.html`` / ``.html.j2`` templates, strict
    undefined variables, and the :func:`fmt` filter."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader(*TEMPLATE_PACKAGE),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2"), default_for_string=True),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["fmt"] = fmt
    return env


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table cell: ``–`` for ``None``, a float to ``digits`` significant digits, anything else as
    ``str``."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)
