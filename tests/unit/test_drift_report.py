"""`loraflow drift`'s report says what reviewers found in the version's requests (its `reviews`
section, shown as a table on the page), and its page is stored beside it: the same page `--html`
writes. Reports stored before the section existed still render."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from loraflow.cli.main import app
from loraflow.registry.redact import Redactor
from loraflow.registry.service import Registry
from loraflow.registry.settings import DriftSettings
from loraflow.trainer.drift import drift_report
from loraflow.trainer.reports.drift_page import render_html
from tests.factories import make_adapter, served_record, write_traffic

pytestmark = pytest.mark.unit

NOW = datetime.now(UTC).replace(microsecond=0)


def record(version: int, i: int) -> dict[str, Any]:
    return served_record(
        NOW - timedelta(minutes=10 + i),
        adapter="support",
        version=version,
        prompt=f"Where is order {i}?",
        answer=f'{{"order": {i}}}',
    )


@pytest.fixture
def reviewed(registry: Registry, base_dir: Path, tmp_path: Path, redactor: Redactor) -> Registry:
    """support@v1 with three reviewed requests (one reviewed twice) and one not; v2 with one."""
    for seed in (1, 2):
        registry.register("support", make_adapter(tmp_path / f"a{seed}", seed=seed), base_model=str(base_dir))
    records = [record(1, i) for i in range(4)] + [record(2, 9)]
    a, b, c, _, other = (
        r["request_id"] for r in write_traffic(registry.traffic, "requests", records, redactor)
    )
    registry.add_review(a, reviewer="dana", redactor=redactor, rating=1)  # replaced below
    registry.add_review(a, reviewer="erin", redactor=redactor, rating=-1, categories=["refusal", "format"])
    registry.add_review(
        b, reviewer="dana", redactor=redactor, correction='{"order": 1}', categories=["format"]
    )
    registry.add_review(c, reviewer="dana", redactor=redactor, rating=1)
    registry.add_review(other, reviewer="dana", redactor=redactor, rating=-1, categories=["hallucination"])
    return registry


def test_the_report_carries_the_versions_reviews(reviewed: Registry) -> None:
    _, report = drift_report(reviewed, DriftSettings(), "support@v1", window=timedelta(hours=1), now=NOW)
    assert report["requests"]["answered"] == 4
    assert report["reviews"] == {
        "reviewed": 3,
        "positive": 1,
        "negative": 1,
        "corrected": 1,
        "categories": {"format": 2, "refusal": 1},  # the latest review of a request counts
    }
    assert list(report["reviews"]["categories"]) == ["format", "refusal"]  # most frequent first
    _, v2 = drift_report(reviewed, DriftSettings(), "support@v2", window=timedelta(hours=1), now=NOW)
    assert v2["reviews"]["categories"] == {"hallucination": 1} and v2["reviews"]["reviewed"] == 1


def test_a_version_nobody_reviewed_has_an_empty_section(
    registry: Registry, base_dir: Path, tmp_path: Path
) -> None:
    registry.register("support", make_adapter(tmp_path / "a1", seed=1), base_model=str(base_dir))
    _, report = drift_report(registry, DriftSettings(), "support@v1", window=timedelta(hours=1), now=NOW)
    assert report["reviews"] == {
        "reviewed": 0,
        "positive": 0,
        "negative": 0,
        "corrected": 0,
        "categories": {},
    }
    page = render_html(report)
    assert 'id="review-counts"' in page and 'id="review-categories"' not in page


def test_the_cli_stores_the_page_it_writes_with_the_reviews_table(reviewed: Registry, tmp_path: Path) -> None:
    html = tmp_path / "drift.html"
    args = ["drift", "support@v1", "--window", "1h", "--no-embeddings", "--html", str(html)]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    (stored,) = reviewed.drift_history("support", 1)
    assert printed["id"] == stored.id and printed["reviews"] == stored.report["reviews"]
    assert stored.report["reviews"]["categories"] == {"format": 2, "refusal": 1}
    assert stored.page_digest is not None
    page = reviewed.page(stored.page_digest)
    assert page == html.read_text(encoding="utf-8")  # the stored page is the one --html wrote
    assert page == render_html(stored.report)
    reviews = page.split('<section id="reviews">')[1].split("</section>")[0]
    assert (
        '<td class="num">3</td><td class="num">1</td><td class="num">1</td><td class="num">1</td>' in reviews
    )
    assert '<tr><td>format</td><td class="num">2</td></tr>' in reviews
    assert '<tr><td>refusal</td><td class="num">1</td></tr>' in reviews

    result = CliRunner().invoke(app, args)  # the table view says it too; a second report and page
    assert result.exit_code == 0, result.output
    said = result.stdout.replace("\n", " ")
    assert "3 requests of support@v1 reviewed: 1 rated down, 1 corrected" in said
    assert "failure categories: format 2, refusal 1" in said
    assert len(reviewed.drift_history("support", 1)) == 2

    # --no-store: nothing stored, the page still written.
    result = CliRunner().invoke(app, [*args, "--no-store"])
    assert result.exit_code == 0, result.output
    assert len(reviewed.drift_history("support", 1)) == 2 and html.is_file()


def test_old_reports_render_without_the_section_and_review_text_is_escaped(
    registry: Registry, base_dir: Path, tmp_path: Path
) -> None:
    registry.register("support", make_adapter(tmp_path / "a1", seed=1), base_model=str(base_dir))
    _, report = drift_report(registry, DriftSettings(), "support@v1", window=timedelta(hours=1), now=NOW)
    old = {k: v for k, v in report.items() if k != "reviews"}  # as stored before the section existed
    page = render_html(old)
    assert "Drift of support@v1" in page and 'id="reviews"' not in page
    report["reviews"] |= {"reviewed": 1, "categories": {"<script>alert(1)</script>": 1}}
    page = render_html(report)
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_without_the_page_libraries_drift_refuses_before_it_stores_anything(
    reviewed: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "matplotlib" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    args = ["drift", "support@v1", "--window", "1h", "--no-embeddings"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 8, result.output  # MISSING_DEPENDENCY
    assert result.stderr == "error: the HTML report needs pip install 'loraflow[eval]'\n"
    assert reviewed.drift_history("support", 1) == []
    result = CliRunner().invoke(app, [*args, "--no-store"])  # no page to store or write: none needed
    assert result.exit_code == 0, result.output
