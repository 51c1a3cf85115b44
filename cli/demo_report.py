"""The demo's summary: one row per step, shown as a table at the end and written as the demo's one
HTML page, with links to every report it wrote and real answers side by side."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table


@dataclass(frozen=True)
class SideBySide:
    """Some examples of one evaluation: each prompt, its reference, and what each system answered."""

    title: str
    systems: list[str]  # column labels
    rows: list[tuple[str, str, list[str]]]  # prompt, reference, one answer per system


@dataclass
class Summary:
    """One row per step: what it did and how long it took, for the table and the HTML page."""

    model: str = ""
    rows: list[tuple[str, str, float]] = field(default_factory=list)
    links: list[tuple[str, Path]] = field(default_factory=list)
    examples: list[SideBySide] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    _step: float = field(default_factory=time.monotonic)

    def done(self, step: str, outcome: str) -> None:
        now = time.monotonic()
        self.rows.append((step, outcome, now - self._step))
        self._step = now

    def side_by_side(
        self, title: str, report: dict[str, Any], n: int, *, only: list[int] | None = None
    ) -> None:
        """The first ``n`` examples of an eval report (of those in ``only``, if given), not picked:
        what each system answered."""
        keys = list(report["systems"])
        picked = [
            report["examples"][i] for i in (only if only is not None else range(len(report["examples"])))
        ]
        rows = [
            (ex["prompt"], ex["reference"], [str(ex["outputs"][k]["text"]) for k in keys])
            for ex in picked[:n]
        ]
        self.examples.append(SideBySide(title, [report["systems"][k]["label"] for k in keys], rows))

    def general_suite(self, title: str, report: dict[str, Any], n: int) -> None:
        """The first ``n`` items of an eval report's general regression suite, side by side."""
        suite = report.get("regression") or {}
        keys = list(suite.get("systems", {}))
        labels = [report["systems"][k]["label"] for k in keys]
        rows = [
            (item["prompt"], item["reference"], [str(item["outputs"][k]) for k in keys])
            for item in suite.get("items", [])[:n]
        ]
        self.examples.append(SideBySide(title, labels, rows))

    def to_json(self, name: str) -> dict[str, Any]:
        """The steps and their times, for scripts (``bench/demo_time.py`` reads it)."""
        return {
            "adapter": name,
            "model": self.model,
            "steps": [{"step": s, "outcome": o, "seconds": round(t, 1)} for s, o, t in self.rows],
            "total_s": round(time.monotonic() - self.started, 1),
            "written": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def table(self) -> Table:
        table = Table("step", "outcome", "time", title="loraflow demo")
        for step, outcome, seconds in self.rows:
            table.add_row(escape(step), escape(outcome), f"{seconds:.0f} s")
        table.add_row("total", "", f"{time.monotonic() - self.started:.0f} s")
        return table


def write_demo_report(path: Path, *, name: str, summary: Summary) -> Path:
    """Write the page next to the reports it links (links are relative, so the folder can move),
    and the steps' times beside it as ``demo.json``."""
    from jinja2 import Environment, PackageLoader

    # autoescape=True: select_autoescape() matches *.html, never this *.html.j2, and the page shows
    # what users named (the adapter) and what the steps said.
    env = Environment(loader=PackageLoader("loraflow.cli", "templates"), autoescape=True)
    html = env.get_template("demo_report.html.j2").render(
        name=name,
        model=summary.model,
        rows=summary.rows,
        examples=summary.examples,
        total=time.monotonic() - summary.started,
        links=[(label, os.path.relpath(target, path.parent)) for label, target in summary.links],
        written=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html)
    (path.parent / "demo.json").write_text(json.dumps(summary.to_json(name), indent=2) + "\n")
    return path
