"""The demo's one HTML page: its summary table, and links to every report it wrote."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraflow.cli.demo import Summary


def write_demo_report(path: Path, *, name: str, summary: Summary) -> Path:
    """Write the page next to the reports it links (links are relative, so the folder can move)."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("loraflow.cli", "templates"), autoescape=select_autoescape())
    html = env.get_template("demo_report.html.j2").render(
        name=name,
        rows=summary.rows,
        total=time.monotonic() - summary.started,
        links=[(label, os.path.relpath(target, path.parent)) for label, target in summary.links],
        written=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html)
    return path
