"""The `loraflow eval` HTML report: one offline page that a real browser renders with its plots.

The integration test opens the page in headless Chromium (``.ci/chromium`` installs it
and ``.ci/run`` exports LORAFLOW_TEST_CHROMIUM): the DOM Chromium builds has the
metrics table, both inline SVG plots, the differing examples and every section, a
``<script>`` in a model output stays text, and the screenshot is not blank.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from loraflow.trainer.reports.eval_page import render_html, write_html
from tests.conftest import CHROMIUM_ARGS, chromium_binary

METRICS = ["exact_match", "token_f1", "rouge_l", "json_valid", "label_accuracy", "output_tokens", "latency_s"]
HIGHER_IS_BETTER: dict[str, bool | None] = {
    "exact_match": True,
    "token_f1": True,
    "rouge_l": True,
    "json_valid": True,
    "label_accuracy": True,
    "output_tokens": None,
    "latency_s": False,
}
N_EXAMPLES = 20
# The examples on which the systems' exact_match differs; on every other one they agree.
DIFFERING = [1, 4, 5, 8, 11, 13, 16, 19]
SCRIPT = "<script>document.title='pwned'</script>"


# ---------------------------------------------------------------- a report to render


def _stats(rng: random.Random, mean: float | None) -> dict[str, Any]:
    if mean is None:
        return {"mean": None, "ci": None}
    spread = 0.15 * mean if mean > 1 else 0.1
    lo, hi = mean - rng.uniform(0.2, 1) * spread, mean + rng.uniform(0.2, 1) * spread
    if mean <= 1:  # a proportion's interval stays in [0, 1]
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    return {"mean": mean, "ci": [round(lo, 4), round(hi, 4)]}


def _diff(rng: random.Random, diff: float | None) -> dict[str, Any]:
    if diff is None:
        return {"diff": None, "ci": None}
    return {
        "diff": diff,
        "ci": [round(diff - rng.uniform(0.02, 0.1), 4), round(diff + rng.uniform(0.02, 0.1), 4)],
    }


def _report(*, production: bool = True, extras: bool = True) -> dict[str, Any]:
    rng = random.Random(20261123)
    keys = ["base", "production", "candidate"] if production else ["base", "candidate"]
    means = {
        "base": [0.05, 0.31, 0.28, 0.40, None, 41.3, 0.82],
        "production": [0.55, 0.74, 0.71, 0.95, None, 18.2, 0.41],
        "candidate": [0.85, 0.91, 0.90, 0.95, None, 16.7, 0.38],
    }
    examples = []
    for i in range(N_EXAMPLES):
        agreed = float(i % 3 == 0)
        outputs: dict[str, Any] = {}
        for key in keys:
            if i in DIFFERING:
                score = {"base": 0.0, "production": float(i % 2), "candidate": 1.0}[key]
            else:
                score = agreed
            text = f'{{"order_id": {1000 + i}, "status": "{"shipped" if score else "pending"}"}}'
            if key == "base" and i == DIFFERING[0]:
                text = f"Sure! {SCRIPT} Here is the order."
            outputs[key] = {
                "text": text,
                "finish_reason": "length" if key == "base" and i % 4 == 0 else "stop",
                "output_tokens": rng.randint(8, 60),
                "latency_s": round(rng.uniform(0.2, 1.2), 3),
                "scores": {
                    "exact_match": score,
                    "token_f1": round(min(1.0, score + rng.uniform(0.0, 0.5)), 3),
                    "rouge_l": round(min(1.0, score + rng.uniform(0.0, 0.5)), 3),
                    "json_valid": 1.0,
                    "label_accuracy": None,
                },
            }
            if extras:
                outputs[key]["judge"] = {
                    "score": round(rng.uniform(0, 1), 2),
                    "reasoning": f"Order {1000 + i}: status {'right' if score else 'wrong'}.",
                }
        examples.append(
            {
                "index": i,
                "prompt": f"What is the status of order {1000 + i}? Reply as JSON.",
                "reference": f'{{"order_id": {1000 + i}, "status": "shipped"}}',
                "label": "order" if i % 2 else None,
                "outputs": outputs,
            }
        )
    labels = {
        "base": "prompted base (3-shot)",
        "production": "production orders@v1",
        "candidate": "candidate orders@v2",
    }
    models = {"base": "tiny-llama", "production": "orders@v1", "candidate": "orders@v2"}
    systems = {
        key: {
            "label": labels[key],
            "model": models[key],
            "metrics": {m: _stats(rng, means[key][j]) for j, m in enumerate(METRICS)},
        }
        for key in keys
    }
    comparisons = {
        key: {
            m: _diff(rng, None if means[key][j] is None else round(means["candidate"][j] - means[key][j], 4))
            for j, m in enumerate(METRICS)
        }
        for key in keys
        if key != "candidate"
    }
    report: dict[str, Any] = {
        "schema": 1,
        "candidate": "orders@v2",
        "adapter": "orders",
        "version": 2,
        "dataset": "orders@v1",
        "split": "test",
        "split_digest": "3f" * 32,
        "n": N_EXAMPLES,
        "confidence": 0.95,
        "primary_metric": "exact_match",
        "metrics": METRICS,
        "higher_is_better": HIGHER_IS_BETTER,
        "production": {"version": 1} if production else None,
        "systems": systems,
        "comparisons": comparisons,
        "regression": None,
        "judge": None,
        "examples": examples,
        "engine": {"gateway": "supervised", "base_model": "/models/tiny-llama", "vllm": "0.32.0"},
        "settings": {"max_new_tokens": 128, "bootstrap": {"resamples": 2000, "seed": 0}},
        "created_at": "2026-11-23T10:00:00+00:00",
    }
    if extras:
        report["regression"] = {
            "suite": "builtin",
            "n": 24,
            "metric": "token_f1",
            "systems": {key: _stats(rng, 0.6 + 0.01 * j) for j, key in enumerate(keys)},
            "comparisons": {key: _diff(rng, -0.01) for key in keys if key != "candidate"},
        }
        report["lm_eval"] = {
            "version": "0.4.13",
            "tasks": [
                {
                    "suite": "lm-eval:capitals",
                    "n": 5,
                    "metric": "exact_match,none",
                    "higher_is_better": True,
                    "systems": {key: _stats(rng, 0.5) for key in keys},
                    "comparisons": {key: _diff(rng, -0.2) for key in keys if key != "candidate"},
                }
            ],
        }
        report["judge"] = {
            "model": "gpt-x",
            "url": "http://127.0.0.1:9000/v1",
            "rubric": "Score 1 when the status matches the reference, 0 otherwise.",
            "systems": {
                key: {**_stats(rng, 0.4 + 0.2 * j), "scored": 18, "unparsed": 2} for j, key in enumerate(keys)
            },
        }
    return report


GATE = {
    "alias": "production",
    "passed": False,
    "rules": [
        {"rule": "beats_base", "passed": True, "detail": "exact_match gain over base is +0.80"},
        {
            "rule": "beats_production",
            "passed": False,
            "detail": "exact_match gain over production v1 is +0.30 (95% CI [-0.02, +0.60]); "
            "needs >= +0.01 with the lower bound above 0",
        },
    ],
}


# ---------------------------------------------------------------- a DOM to look at


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def iter(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def find_all(self, tag: str) -> list[Node]:
        return [n for n in self.iter() if n.tag == tag]

    def by_id(self, id_: str) -> Node:
        found = [n for n in self.iter() if n.attrs.get("id") == id_]
        assert len(found) == 1, f"expected one element with id={id_!r}, found {len(found)}"
        return found[0]

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)


class _TreeBuilder(HTMLParser):
    VOID = frozenset(
        {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        if any(n.tag == tag for n in self.stack[1:]):
            while self.stack.pop().tag != tag:
                pass

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def _parse(html: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def _body_rows(table: Node) -> list[Node]:
    (tbody,) = table.find_all("tbody")
    return tbody.find_all("tr")


def _header_cells(table: Node) -> list[str]:
    (thead,) = table.find_all("thead")
    return [th.attrs.get("data-system", "") or th.text().strip() for th in thead.find_all("th")]


def _assert_self_contained(html: str) -> None:
    lowered = html.lower()
    for needle in ("<link", 'src="http', "src='http", 'href="http', "href='http", "@import", "url(http"):
        assert needle not in lowered, f"the page refers outside itself: {needle}"


# ---------------------------------------------------------------- Chromium


def _chromium() -> str:
    return chromium_binary()


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [
            binary,
            "--headless",
            *CHROMIUM_ARGS,
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.integration
def test_the_report_renders_in_a_browser_with_its_tables_plots_and_sections(tmp_path: Path) -> None:
    binary = _chromium()
    report = _report()
    page = write_html(report, tmp_path / "report" / "eval.html", gate=GATE)
    html = page.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in html
    _assert_self_contained(html)

    dom = _parse(_run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", page.as_uri()).stdout)

    metrics = dom.by_id("metrics")
    rows = _body_rows(metrics)
    assert [r.attrs["data-metric"] for r in rows] == METRICS
    assert [r.attrs["data-metric"] for r in rows if "primary" in r.attrs.get("class", "")] == ["exact_match"]
    assert _header_cells(metrics) == ["metric", "base", "production", "candidate", "base", "production"]
    cells = {r.attrs["data-metric"]: [td.text().strip() for td in r.find_all("td")] for r in rows}
    assert cells["label_accuracy"] == ["\u2013"] * 5  # no example had the metric: an en dash
    assert cells["exact_match"][2].startswith("0.850 [")
    assert cells["exact_match"][3].startswith("+0.800 [")
    assert cells["output_tokens"][0].startswith("41.3 [")

    assert dom.by_id("plot-metrics").find_all("svg")
    assert dom.by_id("plot-differences").find_all("svg")
    differences = _body_rows(dom.by_id("differences"))
    assert [int(r.attrs["data-index"]) for r in differences] == DIFFERING

    for section in ("regression", "judge", "gate"):
        assert dom.by_id(section).tag == "section"
    suites = [r.find_all("td")[0].text().strip() for r in _body_rows(dom.by_id("regression"))]
    assert suites == ["builtin", "lm-eval:capitals"]
    gate = dom.by_id("gate").text()
    assert "beats_production" in gate and "✗" in gate and "✓" in gate
    assert "gpt-x" in dom.by_id("judge").text() and "status right" in dom.by_id("judge").text()

    # The model's <script> is text in a cell, not an element: the page has no scripts at all.
    assert not dom.find_all("script")
    assert SCRIPT in differences[0].text()
    assert dom.find_all("title")[0].text() != "pwned"

    screenshot = tmp_path / "page.png"
    _run_chromium(
        binary,
        tmp_path / "profile-shot",
        f"--screenshot={screenshot}",
        "--window-size=1200,2000",
        page.as_uri(),
    )
    from PIL import Image

    with Image.open(screenshot) as image:
        assert image.size == (1200, 2000)
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is None or len(colours) > 10, "the screenshot is blank"


@pytest.mark.unit
def test_without_production_the_report_has_two_systems_and_one_comparison() -> None:
    report = _report(production=False, extras=False)
    html = render_html(report)
    _assert_self_contained(html)
    dom = _parse(html)

    metrics = dom.by_id("metrics")
    assert len(_body_rows(metrics)) == len(METRICS)
    headers = _header_cells(metrics)
    assert headers == ["metric", "base", "candidate", "base"]
    assert "production" not in " ".join(th.text() for th in metrics.find_all("th"))
    assert "none" in dom.find_all("header")[0].text()
    assert dom.by_id("plot-metrics").find_all("svg")
    assert len(_body_rows(dom.by_id("differences"))) == len(DIFFERING)
    ids = {n.attrs.get("id") for n in dom.iter()}
    assert not {"regression", "judge", "gate"} & ids


@pytest.mark.unit
def test_when_no_example_differs_the_heatmap_is_a_sentence() -> None:
    report = _report(production=False, extras=False)
    for example in report["examples"]:
        for output in example["outputs"].values():
            output["scores"]["exact_match"] = 1.0
    dom = _parse(render_html(report))
    figure = dom.by_id("plot-differences")
    assert not figure.find_all("svg")
    assert "score the same" in figure.text()
    assert "differences" not in {n.attrs.get("id") for n in dom.iter()}
