"""The demo's one HTML page escapes what it shows: the adapter's name and each step's outcome."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraflow.cli.demo_report import Summary, write_demo_report

pytestmark = pytest.mark.unit


def test_the_demo_page_escapes_names_and_outcomes(tmp_path: Path) -> None:
    summary = Summary()
    summary.done("train <b>v1</b>", "passed <script>alert(1)</script>")
    summary.links.append(("eval <i>v1</i>", tmp_path / "eval-v1.html"))
    page = write_demo_report(tmp_path / "demo.html", name="<img src=x onerror=alert(1)>", summary=summary)
    html = page.read_text()
    assert "<script>" not in html and "<img" not in html and "<b>v1" not in html and "<i>v1" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert 'href="eval-v1.html"' in html  # the link is relative, so the folder can move
