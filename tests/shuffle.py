"""``pytest --shuffle SEED``: run the suite in a shuffled order, to find tests that depend on the
order they run in. The modules of each tier run in a shuffled order, and so do the tests inside
each module; tiers keep their order (fast to slow) and a module's tests stay together, so module-
and session-scoped fixtures (a trained adapter, the shared engine) are still set up once. The
seed is printed in the header, so a failing order can be run again."""

from __future__ import annotations

import random
from itertools import groupby

import pytest

from tests.services import tier_rank


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--shuffle",
        type=int,
        metavar="SEED",
        default=None,
        help="shuffle the modules of each tier and the tests of each module with this seed",
    )


def pytest_report_header(config: pytest.Config) -> str | None:
    seed = config.getoption("--shuffle")
    return None if seed is None else f"shuffled order: --shuffle {seed}"


def shuffled(items: list[pytest.Item], seed: int) -> list[pytest.Item]:
    rng = random.Random(seed)
    order: list[pytest.Item] = []
    for _, tier in groupby(items, key=tier_rank):  # items arrive sorted by tier
        modules: dict[str, list[pytest.Item]] = {}
        for item in tier:
            modules.setdefault(item.nodeid.split("::")[0], []).append(item)
        groups = list(modules.values())
        rng.shuffle(groups)
        for group in groups:
            rng.shuffle(group)
            order.extend(group)
    return order


@pytest.hookimpl(trylast=True)  # after the tier order (tests/services.py)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seed = config.getoption("--shuffle")
    if seed is not None:
        items[:] = shuffled(items, seed)
