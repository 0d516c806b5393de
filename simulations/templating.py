"""HTML pages from Jinja2 templates: the sweep report, the privacy audit page and the MIA page.

The templates live in simulations/templates/*.html.j2 (package data, so a non-editable install
ships them) and share base.html.j2: one document skeleton (doctype, charset, title, style).
Autoescaping is on: every value from data (hospital names, configuration) is escaped; the only
unescaped inserts are sections already rendered by these templates (jinja2.Markup).
"""

from __future__ import annotations

import base64
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The shared environment; StrictUndefined so a misspelt variable fails instead of vanishing."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("simulations", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )


def render(template: str, **context: Any) -> str:
    """Render simulations/templates/`template` with `context`; the result is safe markup."""
    return environment().get_template(template).render(**context)


def data_uri(png: str | Path) -> str:
    """A PNG file as a data URI: pages stay single files that can be mailed or archived."""
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


def page(title: str, sections: list[str]) -> str:
    """A standalone HTML document (base.html.j2) holding already rendered `sections` in order."""
    return render("audit.html.j2", title=title, sections=[Markup(s) for s in sections])
