"""The HTML page for ``loraflow drift``: the figures with their verdicts, and a chart per length.

One self-contained file (inline CSS and SVG) from ``templates/drift_report.html.j2``; the
verdict shown beside each figure is :func:`~loraflow.registry.drift.figure_verdict`, the
one rule the CLI and the demo print too. A report's ``reviews`` section (what reviewers found
in the version's requests, and their failure categories) is a small table; reports stored
before it existed render without one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraflow.registry.drift import figure_verdict
from loraflow.trainer.reports.charts import figure, svg
from loraflow.trainer.reports.render import environment, write_page

TEMPLATE = "drift_report.html.j2"


def render_html(report: dict[str, Any]) -> str:
    """The drift report (the dict ``loraflow drift`` stores) as one HTML5 page."""
    charts = []
    for feature, hist in report["histograms"].items():
        fig = figure(6.0, 2.6)
        ax = fig.add_subplot()
        labels = [f"≤{e:g}" for e in hist["edges"]] + [f">{hist['edges'][-1]:g}"]
        xs = list(range(len(labels)))
        ax.bar([x - 0.2 for x in xs], hist["train"], width=0.4, label="training split", color="#7f7f7f")
        ax.bar([x + 0.2 for x in xs], hist["live"], width=0.4, label="live traffic", color="#d62728")
        ax.set_xticks(xs, labels, rotation=45, fontsize=7)
        ax.set_ylabel("share")
        ax.set_title(feature.replace("_", " "))
        ax.legend(fontsize=7)
        charts.append(svg(fig, f"drift-{feature}"))
    rows = [
        (name, value, figure_verdict(report["verdicts"], name)) for name, value in report["figures"].items()
    ]
    return (
        environment()
        .get_template(TEMPLATE)
        .render(report=report, rows=rows, charts=charts, reviews=report.get("reviews"))
    )


def write_html(report: dict[str, Any], path: Path) -> Path:
    """Render the page to ``path`` (UTF-8), creating its folder; returns ``path``."""
    return write_page(render_html(report), path)
