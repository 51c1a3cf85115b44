"""`pytest --shuffle SEED` (tests/shuffle.py), run in an inner pytest session over small files."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.unit

CONFTEST = """
import pytest
from tests.services import pytest_collection_modifyitems
pytest_plugins = ["tests.shuffle"]

def pytest_configure(config):
    for name in ("unit", "e2e"):
        config.addinivalue_line("markers", f"{name}: a tier")
"""


def _order(pytester: pytest.Pytester, *args: str) -> list[str]:
    result = pytester.runpytest("-v", "-p", "no:randomly", *args)
    result.assert_outcomes(passed=12)
    return [line.split(" ")[0] for line in result.outlines if " PASSED" in line]


def test_shuffle_keeps_tiers_and_modules_together_and_repeats_by_seed(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    for module, tier in (("test_a", "e2e"), ("test_b", "unit"), ("test_c", "unit"), ("test_d", "unit")):
        pytester.makepyfile(
            **{
                module: f"import pytest\npytestmark = pytest.mark.{tier}\n"
                + "".join(f"def test_{i}():\n    pass\n" for i in range(3))
            }
        )
    plain = _order(pytester)
    runs = {seed: _order(pytester, "--shuffle", str(seed)) for seed in range(6)}
    assert _order(pytester, "--shuffle", "4") == runs[4]  # a seed gives its order again
    assert len({tuple(order) for order in runs.values()}) > 1  # and seeds give different orders
    for order in [plain, *runs.values()]:
        assert sorted(order) == sorted(plain)
        modules = [test.split("::")[0] for test in order]
        assert modules[-3:] == ["test_a.py"] * 3  # the e2e module still runs last
        runs_of_modules = [m for i, m in enumerate(modules) if i == 0 or modules[i - 1] != m]
        assert len(runs_of_modules) == 4  # each module's tests stay together
    firsts = [[test.split("::")[1] for test in order[:3]] for order in runs.values()]
    assert any(tests != ["test_0", "test_1", "test_2"] for tests in firsts)  # tests inside a module too
    result = pytester.runpytest("--shuffle", "9", "--co")
    assert "shuffled order: --shuffle 9" in result.stdout.str()
