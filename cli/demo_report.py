"""The demo's summary: one row per step, shown as a table at the end and written as the demo's one
HTML page, with links to every report it wrote."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from rich.markup import escape
from rich.table import Table


@dataclass
class Summary:
    """One row per step: what it did and how long it took, for the table and the HTML page."""

    rows: list[tuple[str, str, float]] = field(default_factory=list)
    links: list[tuple[str, Path]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    _step: float = field(default_factory=time.monotonic)

    def done(self, step: str, outcome: str) -> None:
        now = time.monotonic()
        self.rows.append((step, outcome, now - self._step))
        self._step = now

    def table(self) -> Table:
        table = Table("step", "outcome", "time", title="loraflow demo")
        for step, outcome, seconds in self.rows:
            table.add_row(escape(step), escape(outcome), f"{seconds:.0f} s")
        table.add_row("total", "", f"{time.monotonic() - self.started:.0f} s")
        return table


def write_demo_report(path: Path, *, name: str, summary: Summary) -> Path:
    """Write the page next to the reports it links (links are relative, so the folder can move)."""
    from jinja2 import Environment, PackageLoader

    # autoescape=True: select_autoescape() matches *.html, never this *.html.j2, and the page shows
    # what users named (the adapter) and what the steps said.
    env = Environment(loader=PackageLoader("loraflow.cli", "templates"), autoescape=True)
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
