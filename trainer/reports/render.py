"""What every report page shares: the Jinja2 environment over ``templates/`` and the write.

Autoescape is on for every template (``select_autoescape()`` alone would not match
``*.html.j2``), so model output and user text are never markup. Jinja2 comes with
``pip install 'loraflow[eval]'`` and is imported only when a page is rendered.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from loraflow.registry.errors import MissingDependencyError

if TYPE_CHECKING:
    import jinja2

TEMPLATES = Path(__file__).parent / "templates"
PAGE_EXTRA = "the HTML report needs pip install 'loraflow[eval]'"


def require_page_libraries() -> None:
    """Refuse now, not at the end of a long run, when a page could not be rendered (Jinja2 and
    matplotlib come with the ``eval`` extra). Nothing is imported: only looked for."""
    if any(importlib.util.find_spec(module) is None for module in ("jinja2", "matplotlib")):
        raise MissingDependencyError(PAGE_EXTRA)


def environment() -> jinja2.Environment:
    """The templates' environment: autoescaped, strict about undefined names, block lines trimmed."""
    try:
        import jinja2
    except ImportError as exc:
        raise MissingDependencyError(PAGE_EXTRA) from exc
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "j2"), default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def write_page(page: str, path: Path) -> Path:
    """``page`` to ``path`` (UTF-8), creating its folder; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
