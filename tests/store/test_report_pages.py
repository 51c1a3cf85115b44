"""Eval and drift reports keep their HTML pages in the artifact store (SQLite, and PostgreSQL when
given): the row holds the page's digest, the page comes back verified, and a page changed on disk
is refused."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from loraflow.registry.errors import IntegrityError, NotFoundError
from loraflow.registry.service import PAGE_FILE, Registry
from loraflow.registry.settings import Settings
from tests.factories import gate_report, make_adapter

pytestmark = pytest.mark.store

PAGE = '<!DOCTYPE html>\n<html lang="en"><body><h1>Evaluation of support@v1 é ✓</h1></body></html>\n'
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@pytest.fixture
def reg(db_url: str, tmp_path: Path, base_dir: Path) -> Iterator[Registry]:
    r = Registry.open(Settings(home=tmp_path / "home", database_url=db_url))
    r.register("support", make_adapter(tmp_path / "a1", seed=1), base_model=str(base_dir))
    yield r
    r.close()


def evaluate(reg: Registry, page: str | None) -> int:
    return reg.record_evaluation(
        "support",
        1,
        dataset=None,
        split="test",
        split_digest="d" * 64,
        production_version=None,
        report=gate_report(1, production=None),
        page=page,
    ).id


def test_an_eval_report_keeps_its_page_beside_it(reg: Registry) -> None:
    with_page, without = evaluate(reg, PAGE), evaluate(reg, None)
    stored = reg.evaluation(with_page)
    assert stored.page_digest is not None and reg.page(stored.page_digest) == PAGE
    assert reg.evaluation(without).page_digest is None
    assert [e.page_digest for e in reg.evaluations("support", 1)] == [stored.page_digest, None]
    # Content-addressed: the same page again is the same file, stored once.
    assert reg.evaluation(evaluate(reg, PAGE)).page_digest == stored.page_digest
    with pytest.raises(NotFoundError):
        reg.evaluation(999)


def test_a_drift_report_keeps_its_page_beside_it(reg: Registry) -> None:
    window = {"window_start": NOW - timedelta(hours=24), "window_end": NOW}
    report = {"adapter": "support", "version": 1, "verdict": "ok", "figures": {}}
    first = reg.record_drift("support", 1, **window, report=report, page=PAGE.replace("Evaluation", "Drift"))
    second = reg.record_drift("support", 1, **window, report=report)
    assert first.page_digest is not None and second.page_digest is None
    assert "<h1>Drift of support@v1 é ✓</h1>" in reg.page(first.page_digest)
    assert reg.drift_report(first.id).page_digest == first.page_digest
    assert [(d.id, d.page_digest) for d in reg.drift_history("support", 1)] == [
        (first.id, first.page_digest),
        (second.id, None),
    ]
    assert reg.drift_reports()["support@v1"].id == second.id


def test_a_page_changed_in_the_store_is_refused(reg: Registry) -> None:
    digest = reg.evaluation(evaluate(reg, PAGE)).page_digest
    assert digest is not None
    stored = Path(reg.artifacts.root) / "sha256" / digest[:2] / digest / PAGE_FILE
    stored.write_text(PAGE.replace("support@v1", "support@v9"), encoding="utf-8")
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        reg.page(digest)


def test_a_digest_that_is_no_page_is_not_found(reg: Registry) -> None:
    adapter_digest = reg.get_version("support", 1).digest
    with pytest.raises(NotFoundError):
        reg.page(adapter_digest)  # an adapter's files hold no page
    with pytest.raises(NotFoundError):
        reg.page("0" * 64)
