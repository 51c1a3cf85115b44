"""The HTML page for ``loraflow eval``: one self-contained file that opens offline.

``render_html`` turns the evaluation report (the dict ``loraflow eval`` writes as
JSON) into a page from ``templates/eval_report.html.j2``: what was compared on
which split, the metrics table with bootstrap intervals and the candidate's paired
differences, two inline SVG plots (each metric per system with its interval, and a
heatmap of the examples on which the systems disagree on the primary metric), those
examples themselves, and the regression suite, judge and promotion gate when there
are any. Nothing is fetched when the page opens: the CSS is inline, the plots are
inline SVG, and model outputs are escaped text, never markup.

Jinja2 and matplotlib come with ``pip install 'loraflow[eval]'``; both are imported
only when a page is rendered.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.registry.gate import regression_suites
from loraflow.trainer.reports.charts import figure, svg
from loraflow.trainer.reports.render import environment, write_page

if TYPE_CHECKING:
    from matplotlib.axes import Axes

TEMPLATE = "eval_report.html.j2"
# The differences table lists at most this many examples; the heatmap shows a few more.
MAX_DIFFERENCE_ROWS = 50
MAX_HEATMAP_ROWS = 100
# How many examples' judge reasoning the judge section quotes.
JUDGE_SAMPLES = 4
# Metrics that are not proportions: their plots start at zero instead of spanning [0, 1].
_UNBOUNDED = frozenset({"output_tokens", "latency_s"})
_DIGITS = {"output_tokens": 1}
_COLOURS = {"base": "#7f7f7f", "production": "#1f77b4", "candidate": "#d62728"}
_OTHER_COLOURS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_MISSING = "\u2013"  # an en dash


@dataclass(frozen=True)
class Cell:
    """One number on the page: its value, its interval and a CSS class (better/worse/changed)."""

    value: str
    ci: str = ""
    cls: str = ""


@dataclass(frozen=True)
class MetricRow:
    name: str
    primary: bool
    direction: str
    systems: list[Cell]
    comparisons: list[Cell]


@dataclass(frozen=True)
class Output:
    text: str
    score: str
    finish_reason: str
    judge_score: str
    judge_reasoning: str


@dataclass(frozen=True)
class ExampleRow:
    index: int
    prompt: str
    reference: str
    label: str
    outputs: list[Output]


def render_html(report: dict[str, Any], *, gate: dict[str, Any] | None = None) -> str:
    """The report as one HTML5 page; ``gate`` is the promotion gate's verdict, shown when given."""
    return environment().get_template(TEMPLATE).render(_context(report, gate))


def write_html(report: dict[str, Any], path: Path, *, gate: dict[str, Any] | None = None) -> Path:
    """Render the page to ``path`` (UTF-8), creating its folder; returns ``path``."""
    return write_page(render_html(report, gate=gate), path)


# ---------------------------------------------------------------- formatting


def _num(metric: str, value: float | None, *, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _MISSING
    digits = _DIGITS.get(metric, 3)
    if round(value, digits) == 0:
        value = 0.0  # no "-0.000"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _ci(metric: str, ci: Sequence[float | None] | None, *, signed: bool = False) -> str:
    if not ci or len(ci) != 2 or ci[0] is None or ci[1] is None:
        return ""
    return f"[{_num(metric, ci[0], signed=signed)}, {_num(metric, ci[1], signed=signed)}]"


def _diff_class(diff: dict[str, Any], higher_is_better: bool | None) -> str:
    """better/worse when the interval excludes zero, changed for a metric without a direction, else ''."""
    ci = diff.get("ci")
    if not ci or ci[0] is None or ci[1] is None or ci[0] <= 0 <= ci[1]:
        return ""
    if higher_is_better is None:
        return "changed"
    return "better" if (ci[0] > 0) == higher_is_better else "worse"


def _direction(higher_is_better: bool | None) -> str:
    if higher_is_better is None:
        return ""
    return "↑" if higher_is_better else "↓"


def _summary(metric: str, stats: dict[str, Any] | None) -> Cell:
    stats = stats or {}
    return Cell(_num(metric, stats.get("mean")), _ci(metric, stats.get("ci")))


def _comparison(metric: str, diff: dict[str, Any] | None, higher_is_better: bool | None) -> Cell:
    if not diff:
        return Cell(_MISSING)
    return Cell(
        _num(metric, diff.get("diff"), signed=True),
        _ci(metric, diff.get("ci"), signed=True),
        _diff_class(diff, higher_is_better),
    )


# ---------------------------------------------------------------- page model


def _context(report: dict[str, Any], gate: dict[str, Any] | None) -> dict[str, Any]:
    systems: dict[str, dict[str, Any]] = report["systems"]
    keys = list(systems)
    comparisons: dict[str, dict[str, Any]] = report.get("comparisons") or {}
    primary: str = report["primary_metric"]
    hib: dict[str, bool | None] = report.get("higher_is_better") or {}
    metrics: list[str] = list(report["metrics"])

    rows = [
        MetricRow(
            name=m,
            primary=m == primary,
            direction=_direction(hib.get(m)),
            systems=[_summary(m, (systems[k].get("metrics") or {}).get(m)) for k in keys],
            comparisons=[_comparison(m, comparisons[c].get(m), hib.get(m)) for c in comparisons],
        )
        for m in metrics
    ]
    differing = _differing(report, keys, primary)
    production = report.get("production")
    judge = report.get("judge")
    return {
        "report": report,
        "title": f"{report.get('candidate', '?')} on {report.get('dataset', '?')}",
        "digest": str(report.get("split_digest") or "")[:12],
        "production_version": f"v{production['version']}" if production else "none",
        "engine": report.get("engine") or {},
        "systems": [
            {"key": k, "label": systems[k].get("label") or k, "model": systems[k].get("model") or ""}
            for k in keys
        ],
        "comparisons": list(comparisons),
        "primary": primary,
        "confidence": f"{float(report.get('confidence') or 0.95):.0%}",
        "primary_direction": _direction(hib.get(primary)),
        "rows": rows,
        "metrics_svg": _metrics_svg(report, keys, metrics),
        "differences_svg": _differences_svg(report, keys, primary, differing),
        "n_examples": len(report.get("examples") or []),
        "n_differing": len(differing),
        "heatmap_gaps": any(
            _primary_score(e, k, primary) is None for e in differing[:MAX_HEATMAP_ROWS] for k in keys
        ),
        "heatmap_rows": min(len(differing), MAX_HEATMAP_ROWS),
        "differences": [_example_row(e, keys, primary) for e in differing[:MAX_DIFFERENCE_ROWS]],
        "regression": [_regression(suite, keys) for suite in regression_suites(report)],
        "judge": _judge(judge, report, keys, differing) if judge else None,
        "gate": gate,
        "settings": json.dumps(report.get("settings") or {}, indent=2, sort_keys=True, default=str),
    }


def _primary_score(example: dict[str, Any], key: str, primary: str) -> float | None:
    output = (example.get("outputs") or {}).get(key) or {}
    score = (output.get("scores") or {}).get(primary)
    return None if score is None else float(score)


def _differing(report: dict[str, Any], keys: list[str], primary: str) -> list[dict[str, Any]]:
    """The examples whose primary-metric scores are not all equal across the systems."""
    return [e for e in report.get("examples") or [] if len({_primary_score(e, k, primary) for k in keys}) > 1]


def _example_row(example: dict[str, Any], keys: list[str], primary: str) -> ExampleRow:
    outputs = []
    for key in keys:
        output = (example.get("outputs") or {}).get(key) or {}
        judged = output.get("judge") or {}
        outputs.append(
            Output(
                text=_MISSING if output.get("text") is None else str(output["text"]),
                score=_num(primary, _primary_score(example, key, primary)),
                finish_reason=str(output.get("finish_reason") or ""),
                judge_score=_num("judge", judged.get("score")) if judged else "",
                judge_reasoning=str(judged.get("reasoning") or ""),
            )
        )
    label = example.get("label")
    return ExampleRow(
        index=int(example["index"]),
        prompt=str(example.get("prompt", "")),
        reference=str(example.get("reference", "")),
        label="" if label is None else str(label),
        outputs=outputs,
    )


def _regression(suite: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    metric = str(suite.get("metric", ""))
    higher = bool(suite.get("higher_is_better", True))
    systems = suite.get("systems") or {}
    comparisons = suite.get("comparisons") or {}
    return {
        "suite": suite.get("suite"),
        "n": suite.get("n"),
        "metric": metric,
        "direction": _direction(higher),
        "systems": [(k, _summary(metric, systems.get(k))) for k in keys if k in systems],
        "comparisons": [(k, _comparison(metric, comparisons[k], higher)) for k in comparisons],
    }


def _judge(
    judge: dict[str, Any], report: dict[str, Any], keys: list[str], differing: list[dict[str, Any]]
) -> dict[str, Any]:
    systems = judge.get("systems") or {}
    rows = [
        (k, _summary("judge", systems[k]), systems[k].get("scored"), systems[k].get("unparsed"))
        for k in keys
        if k in systems
    ]
    # Quote the judge where the systems differ first: that is where its reasoning helps.
    seen: set[int] = set()
    samples: list[ExampleRow] = []
    for example in [*differing, *(report.get("examples") or [])]:
        if len(samples) >= JUDGE_SAMPLES or int(example["index"]) in seen:
            continue
        seen.add(int(example["index"]))
        if any("judge" in (o or {}) for o in (example.get("outputs") or {}).values()):
            samples.append(_example_row(example, keys, report["primary_metric"]))
    return {
        "model": judge.get("model"),
        "url": judge.get("url"),
        "rubric": judge.get("rubric"),
        "systems": rows,
        "samples": samples,
    }


# ---------------------------------------------------------------- plots


def _colour(key: str, position: int) -> str:
    return _COLOURS.get(key, _OTHER_COLOURS[position % len(_OTHER_COLOURS)])


def _metrics_svg(report: dict[str, Any], keys: list[str], metrics: list[str]) -> str | None:
    """Small multiples: one axis per metric, each system's mean as a point with its interval."""
    systems = report["systems"]
    primary = report["primary_metric"]
    hib: dict[str, bool | None] = report.get("higher_is_better") or {}

    def stats(metric: str, key: str) -> tuple[float | None, tuple[float, float] | None]:
        entry = (systems[key].get("metrics") or {}).get(metric) or {}
        mean, ci = entry.get("mean"), entry.get("ci")
        interval = (float(ci[0]), float(ci[1])) if ci and None not in ci else None
        return (None if mean is None else float(mean)), interval

    plotted = [m for m in metrics if any(stats(m, k)[0] is not None for k in keys)]
    if not plotted:
        return None
    ncols = min(4, len(plotted))
    nrows = math.ceil(len(plotted) / ncols)
    fig = figure(2.7 * ncols, 2.3 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(plotted):
            ax.set_visible(False)
            continue
        metric = plotted[i]
        values: list[float] = []
        for x, key in enumerate(keys):
            mean, interval = stats(metric, key)
            if mean is None:
                continue
            # A percentile interval need not contain the mean; matplotlib refuses negative error bars.
            yerr = None
            if interval is not None:
                yerr = [[max(0.0, mean - interval[0])], [max(0.0, interval[1] - mean)]]
                values.extend(interval)
            ax.errorbar(
                [x],
                [mean],
                yerr=yerr,
                fmt="o",
                color=_colour(key, x),
                markersize=6,
                capsize=5,
                elinewidth=1.5,
            )
            values.append(mean)
        _metric_axis(ax, metric, keys, values, primary=metric == primary, hib=hib.get(metric))
    return svg(fig, "metrics")


def _metric_axis(
    ax: Axes, metric: str, keys: list[str], values: list[float], *, primary: bool, hib: bool | None
) -> None:
    ax.set_xlim(-0.6, len(keys) - 0.4)
    ax.set_xticks(range(len(keys)), keys, fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(
        metric + (" (primary)" if primary else ""), fontsize=9, fontweight="bold" if primary else "normal"
    )
    if hib is not None:
        ax.set_ylabel("higher is better" if hib else "lower is better", fontsize=7, color="#555555")
    if metric not in _UNBOUNDED and all(0.0 <= v <= 1.0 for v in values):
        ax.set_ylim(-0.05, 1.05)
    elif values and min(values) >= 0:
        ax.set_ylim(bottom=0, top=max(values) * 1.1 or 1.0)


def _differences_svg(
    report: dict[str, Any], keys: list[str], primary: str, differing: list[dict[str, Any]]
) -> str | None:
    """A heatmap: rows are the differing examples by index, columns the systems, colour the score."""
    if not differing:
        return None
    import numpy as np

    shown = differing[:MAX_HEATMAP_ROWS]
    # NaN (no score) is drawn in the colour map's "bad" colour.
    scores = np.array([[_nan(_primary_score(e, k, primary)) for k in keys] for e in shown], dtype=float)
    finite = scores[np.isfinite(scores)]
    lo, hi = (0.0, 1.0) if finite.size == 0 else (float(finite.min()), float(finite.max()))
    if primary not in _UNBOUNDED and lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    elif lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    hib = (report.get("higher_is_better") or {}).get(primary)
    import matplotlib

    cmap = matplotlib.colormaps["RdYlGn" if hib is not False else "RdYlGn_r"].with_extremes(bad="#dddddd")
    if hib is None:
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")

    rows = len(shown)
    fig = figure(1.8 + 1.2 * len(keys), min(1.4 + 0.24 * rows, 26.0))
    ax = fig.subplots()
    image = ax.imshow(scores, cmap=cmap, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(keys)), keys, fontsize=8)
    ax.xaxis.tick_top()
    step = max(1, math.ceil(rows / 60))
    ax.set_yticks(range(0, rows, step), [f"#{e['index']}" for e in shown[::step]], fontsize=7)
    ax.set_ylabel("example", fontsize=8)
    ax.tick_params(length=0)
    if rows <= 60:  # write the scores in the cells, in a colour that reads on the cell's
        for r in range(rows):
            for c in range(len(keys)):
                value = float(scores[r, c])
                if math.isnan(value):
                    text, ink = "n/a", "black"
                else:
                    red, green, blue, _ = cmap(min(1.0, max(0.0, (value - lo) / (hi - lo))))
                    text = _num(primary, value)
                    ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
                ax.text(c, r, text, ha="center", va="center", fontsize=7, color=ink)
    bar = fig.colorbar(image, ax=ax, shrink=min(1.0, 6.0 / max(rows, 1) + 0.3), pad=0.02)
    bar.set_label(primary, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return svg(fig, "differences")


def _nan(value: float | None) -> float:
    return math.nan if value is None else value
