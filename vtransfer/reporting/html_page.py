"""Self-contained HTML pages rendered from the jinja2 templates shipped in ``templates/``.

``page.html.j2`` is the document (inline CSS, no external assets);
``macros.html.j2`` draws a :class:`~vtransfer.reporting.tables.Table` and a
figure whose PNG is embedded as a base64 data URI; each report has its own
template that extends the page. Autoescaping is on: every string a report
passes in (titles, class names, run information) is escaped.
"""

from __future__ import annotations

import base64
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape


def png_data_uri(png: bytes) -> str:
    """PNG bytes as a ``data:image/png;base64,…`` URI, for an ``<img src>`` that needs no file beside the page."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_ENV = Environment(
    loader=PackageLoader("vtransfer.reporting", "templates"),
    autoescape=select_autoescape(enabled_extensions=("html", "html.j2"), default_for_string=True),
    undefined=StrictUndefined,  # a misspelt name in a template fails instead of rendering as nothing
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_ENV.filters["png_data_uri"] = png_data_uri


def render_page(template: str, **context: Any) -> str:
    """Render ``templates/<template>`` (one that extends ``page.html.j2``, which needs ``title``) with ``context``."""
    return _ENV.get_template(template).render(**context)
