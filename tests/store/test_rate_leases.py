"""Budget slices of API keys' limits, leased by many gateways at once: the database never
grants more than the limit (SQLite, and PostgreSQL when given)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings

pytestmark = pytest.mark.store


@pytest.fixture
def reg(db_url: str, tmp_path: Path) -> Iterator[Registry]:
    registry = Registry.open(Settings(home=tmp_path / "home", database_url=db_url))
    yield registry
    registry.close()


def test_gateways_leasing_at_once_never_get_more_than_the_limit(
    reg: Registry, db_url: str, tmp_path: Path
) -> None:
    granted: list[int] = []
    lock = threading.Lock()

    def gateway() -> None:  # each its own registry: its own connections, as another process has
        own = Registry.open(Settings(home=tmp_path / "home", database_url=db_url))
        try:
            while True:
                lease = own.lease_budget(
                    key="tenant", kind="requests", bucket=100, span=13, want=7, limit=250
                )
                if lease.granted == 0:
                    return
                with lock:
                    granted.append(lease.granted)
        finally:
            own.close()

    threads = [threading.Thread(target=gateway) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(granted) == 250  # all of it, and not one more
    assert (
        reg.lease_budget(key="tenant", kind="requests", bucket=100, span=13, want=1, limit=250).granted == 0
    )
    assert reg.lease_budget(key="other", kind="requests", bucket=100, span=13, want=1, limit=250).granted == 1


def test_a_grant_counts_until_its_bucket_leaves_the_window_and_what_is_given_back_counts_no_more(
    reg: Registry,
) -> None:
    def lease(bucket: int, want: int) -> int:
        return reg.lease_budget(key="k", kind="tokens", bucket=bucket, span=13, want=want, limit=1000).granted

    assert lease(7, 600) == 600
    assert lease(19, 1000) == 400  # bucket 7 is still inside the 13 buckets ending with 19
    reg.return_budget(key="k", kind="tokens", bucket=7, amount=100)  # 100 of them were not spent
    assert lease(19, 1000) == 100
    assert lease(20, 1000) == 500  # bucket 7 has left the window


def test_slots_are_shared_given_back_and_reclaimed_from_a_holder_that_stopped_renewing(reg: Registry) -> None:
    def take(holder: str, slots: int, ttl_s: float = 30) -> int:
        return reg.lease_slots(key="k", holder=holder, slots=slots, limit=3, ttl_s=ttl_s)

    assert take("a", 2) == 2
    assert take("b", 2) == 1  # one left
    assert take("a", 1) == 1  # a gives one back
    assert take("b", 2) == 2
    assert take("c", 1) == 0
    assert take("a", 1, ttl_s=-1) == 1  # a's lease has expired (it stopped renewing: it died)
    assert take("c", 1) == 1  # reclaimed
    reg.renew_slots(holder="c", ttl_s=timedelta(minutes=1).total_seconds())
    assert take("d", 1) == 0
