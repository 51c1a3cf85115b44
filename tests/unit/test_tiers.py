"""The suite's own rules, enforced by the hooks in tests/conftest.py: every test carries exactly one
tier marker, and under LORAFLOW_TEST_REQUIRE_SERVICES a test that did not run as written (skipped,
xfailed, xpassed) fails the run. Each hook runs in an inner pytest session (pytester) over small
test files written here."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_ENV, TIERS

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.unit

# The inner session loads the real hooks, and knows the real markers.
CONFTEST = """
import pytest
from tests.conftest import TIERS, pytest_collection_modifyitems, pytest_sessionfinish

def pytest_configure(config):
    for name in (*TIERS, "slow"):
        config.addinivalue_line("markers", f"{name}: a marker of the suite")
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    pytester.makeconftest(CONFTEST)
    return pytester


def test_the_tiers_are_the_markers_pyproject_registers_less_slow() -> None:
    ini = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    registered = {line.split(":")[0] for line in ini["tool"]["pytest"]["ini_options"]["markers"]}
    assert set(TIERS) == registered - {"slow"}


def test_a_test_without_exactly_one_tier_stops_the_run_naming_it(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        test_marks="""
        import pytest

        def test_none():
            pass

        @pytest.mark.slow
        def test_slow_is_not_a_tier():
            pass

        @pytest.mark.unit
        @pytest.mark.store
        def test_two():
            pass

        @pytest.mark.unit
        def test_one():
            pass

        @pytest.mark.parametrize("x", [pytest.param(1, marks=pytest.mark.e2e), 2])
        def test_param(x):
            pass
        """
    )
    # `-m unit` would deselect the unmarked tests silently; the hook runs before it does.
    result = inner.runpytest("-m", "unit")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: 4 tests need exactly one tier marker*",
            "  test_marks.py::test_none: no tier marker",
            "  test_marks.py::test_slow_is_not_a_tier: no tier marker",
            "  test_marks.py::test_two: store, unit",
            "  test_marks.py::test_param[2]: no tier marker",
        ]
    )
    assert "test_one" not in result.stderr.str() and "test_param[1]" not in result.stderr.str()
    assert result.parseoutcomes().get("passed", 0) == 0  # nothing ran


def test_one_tier_per_test_runs_whichever_way_it_is_given(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        test_module="""
        import pytest
        pytestmark = [pytest.mark.integration, pytest.mark.slow]

        def test_from_the_module():
            pass
        """,
        test_class="""
        import pytest

        @pytest.mark.helm
        class TestChart:
            def test_from_the_class(self):
                pass

        @pytest.mark.parametrize("x", [pytest.param(1, marks=pytest.mark.lint)])
        def test_from_the_param(x):
            pass
        """,
    )
    result = inner.runpytest()
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=3)
    assert inner.runpytest("-m", "helm").parseoutcomes() == {"passed": 1, "deselected": 2}


NOT_AS_WRITTEN = """
import pytest
pytestmark = pytest.mark.unit

def test_passes():
    pass

def test_{kind}():
    {body}
"""
KINDS = {
    "skipped": "pytest.skip('no server')",
    "xfailed": "pytest.xfail('known bug')",
}


@pytest.mark.parametrize("kind", KINDS)
def test_under_require_services_a_skip_or_xfail_fails_the_run(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    inner.makepyfile(test_it=NOT_AS_WRITTEN.format(kind=kind, body=KINDS[kind]))
    without = inner.runpytest()
    assert without.ret == pytest.ExitCode.OK
    without.assert_outcomes(passed=1, **{kind: 1})

    monkeypatch.setenv(REQUIRE_ENV, "1")
    required = inner.runpytest()
    assert required.ret == pytest.ExitCode.TESTS_FAILED
    required.assert_outcomes(passed=1, **{kind: 1})
    required.stdout.fnmatch_lines([f"{REQUIRE_ENV} is set and tests did not run as written (1 {kind})*"])


def test_under_require_services_an_xpass_fails_the_run_even_when_not_strict(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner.makepyfile(
        test_it="""
        import pytest
        pytestmark = pytest.mark.unit

        @pytest.mark.xfail(strict=False, reason="was a bug")
        def test_fixed_since():
            pass
        """
    )
    assert inner.runpytest().ret == pytest.ExitCode.OK
    monkeypatch.setenv(REQUIRE_ENV, "1")
    required = inner.runpytest()
    assert required.ret == pytest.ExitCode.TESTS_FAILED
    required.assert_outcomes(xpassed=1)


def test_under_require_services_a_clean_run_passes(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner.makepyfile(test_it=NOT_AS_WRITTEN.format(kind="passes_too", body="pass"))
    monkeypatch.setenv(REQUIRE_ENV, "1")
    result = inner.runpytest()
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=2)


def test_the_suite_makes_an_unexpected_pass_a_failure(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.getini("xfail_strict") is True
