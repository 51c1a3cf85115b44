"""The console's pages and forms over a real registry (SQLite, artifact and traffic stores on disk),
through its ASGI app: who sees what, CSRF, reviews, blind pairs and operator actions. The same
flows run in a real browser in ``tests/e2e/test_console_browser.py``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loraflow.registry.redact import Redactor
from loraflow.registry.reviews import current_reviews
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from loraflow.server.console.app import build_console
from loraflow.server.console.session import COOKIE, Signer
from tests import console_world
from tests.console_world import EMAIL, World
from tests.factories import make_adapter, make_base

pytestmark = pytest.mark.unit
CSRF = re.compile(r'name="csrf" value="([0-9a-f]+)"')


def _world(tmp_path: Path, redactor: Redactor, *, auth: bool) -> tuple[Settings, World]:
    settings = Settings(home=tmp_path / "home", server={"auth": auth})
    registry = Registry.open(settings)
    world = console_world.build(
        registry,
        redactor,
        base=make_base(tmp_path / "base"),
        adapters=(make_adapter(tmp_path / "a1", seed=1), make_adapter(tmp_path / "a2", seed=2)),
        data=tmp_path / "data",
    )
    return settings, world


@pytest.fixture
def local(tmp_path: Path, redactor: Redactor) -> Iterator[tuple[TestClient, World]]:
    """Auth off: the local console, open to whoever reaches it."""
    settings, world = _world(tmp_path, redactor, auth=False)
    with TestClient(build_console(settings, world.registry), follow_redirects=False) as client:
        yield client, world
    world.registry.close()


@pytest.fixture
def guarded(tmp_path: Path, redactor: Redactor) -> Iterator[tuple[TestClient, World]]:
    """Auth on: people log in with API keys."""
    settings, world = _world(tmp_path, redactor, auth=True)
    with TestClient(build_console(settings, world.registry), follow_redirects=False) as client:
        yield client, world
    world.registry.close()


def csrf_of(client: TestClient, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    found = CSRF.search(page.text)
    assert found is not None, f"no CSRF token on {path}"
    return found.group(1)


def login(client: TestClient, key: str) -> None:
    token = csrf_of(client, "/login")
    done = client.post("/login", data={"csrf": token, "key": key})
    assert done.status_code == 303 and done.headers["location"] == "/", done.text


def test_every_page_renders_and_links_the_lineage(local: tuple[TestClient, World]) -> None:
    client, world = local
    home = client.get("/")
    assert home.status_code == 200 and "support" in home.text and "other" in home.text
    assert "default-src 'self'" in home.headers["content-security-policy"]
    version = client.get("/adapters/support/v/2").text
    for link in ("/datasets/support-data/v/1", f"/evaluations/{world.evaluation.id}"):
        assert link in version
    assert "the gate" not in version.lower() or "Gate for production" in version
    v1 = client.get("/adapters/support/v/1").text
    assert "production" in v1 and "promote" in v1  # promoted: the alias move in the lineage
    ev = client.get(f"/evaluations/{world.evaluation.id}")
    assert "No blind pairwise picks yet" in ev.text and f"/evaluations/{world.evaluation.id}/page" in ev.text
    diff = client.get("/adapters/support/diff?a=1&b=2").text
    assert "digest" in diff  # the two versions' weights differ
    dataset = client.get("/datasets/support-data/v/1").text
    assert "test" in dataset and "support@v2" in dataset
    rollout = client.get(f"/adapters/support/rollouts/{world.rollout.id}").text
    assert "shadow 100%" in rollout and "What the figures say now" in rollout


def test_a_stored_report_page_is_served_verified_and_sandboxed(local: tuple[TestClient, World]) -> None:
    client, world = local
    page = client.get(f"/evaluations/{world.evaluation.id}/page")
    assert page.status_code == 200 and "Evaluation of support@v2" in page.text
    assert page.headers["content-security-policy"].startswith("sandbox")  # its script never runs
    drift = client.get(f"/drift/{world.drift.id}/page")
    assert "stored-drift-page" in drift.text and drift.headers["content-security-policy"].startswith(
        "sandbox"
    )
    # A tampered page is refused, not served: the artifact store re-hashes every read.
    digest = world.evaluation.page_digest
    assert digest is not None
    stored = next(Path(world.registry.settings.resolved_artifact_uri).rglob(f"{digest}/report.html"))
    stored.write_text(stored.read_text().replace("Evaluation of", "forged"))
    refused = client.get(f"/evaluations/{world.evaluation.id}/page")
    assert refused.status_code != 200 and "forged" not in refused.text


def test_the_local_console_escapes_what_users_wrote(tmp_path: Path, redactor: Redactor) -> None:
    settings, world = _world(tmp_path, redactor, auth=False)
    world.registry.register(
        "xss",
        make_adapter(tmp_path / "x", seed=9),
        base_model=str(tmp_path / "base"),
        task="<script>alert(1)</script>",
    )
    with TestClient(build_console(settings, world.registry)) as client:
        page = client.get("/adapters/xss").text
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    world.registry.close()


def test_auth_on_sends_strangers_to_the_login_and_refuses_bad_keys(guarded: tuple[TestClient, World]) -> None:
    client, world = guarded
    assert client.get("/").headers["location"] == "/login"
    assert client.get(f"/evaluations/{world.evaluation.id}/page").status_code == 303
    token = csrf_of(client, "/login")
    bad = client.post("/login", data={"csrf": token, "key": "lf-not-a-key"})
    assert bad.status_code == 401 and "invalid or revoked API key" in bad.text
    cookie = client.cookies[COOKIE]
    assert world.keys["reader"] not in cookie  # the key is never in the cookie
    login(client, world.keys["reader"])
    set_cookie = client.get("/").headers.get("set-cookie", "")
    assert set_cookie == "" or "httponly" in set_cookie.lower()


def test_a_key_sees_only_its_adapters_and_reviews_only_with_the_review_scope(
    guarded: tuple[TestClient, World],
) -> None:
    client, world = guarded
    login(client, world.keys["reader"])
    home = client.get("/").text
    assert "support" in home and "/adapters/other" not in home
    assert client.get("/adapters/other").status_code == 404  # as missing as a name that does not exist
    refused = client.get("/review/support")
    assert refused.status_code == 403 and "review" in refused.text
    assert "Promote" not in client.get("/adapters/support").text  # no operator forms for a reader
    client.cookies.clear()
    login(client, world.keys["outsider"])
    assert client.get("/adapters/support").status_code == 404
    assert client.get(f"/evaluations/{world.evaluation.id}").status_code == 404
    assert client.get("/review/support").status_code == 404


def test_a_revoked_keys_login_ends_at_once(guarded: tuple[TestClient, World]) -> None:
    client, world = guarded
    login(client, world.keys["reviewer"])
    assert client.get("/review/support").status_code == 200
    world.registry.revoke_api_key("reviewer")
    assert client.get("/review/support").headers["location"] == "/login"


def test_a_forged_form_is_refused_and_changes_nothing(guarded: tuple[TestClient, World]) -> None:
    client, world = guarded
    login(client, world.keys["reviewer"])
    rid = world.requests[0]["request_id"]
    for data in ({"rating": "1"}, {"rating": "1", "csrf": "0" * 64}):
        forged = client.post(f"/review/support/r/{rid}", data=data)
        assert forged.status_code == 403 and "CSRF" in forged.text
    # A token from another session is as good as none.
    other = TestClient(client.app, follow_redirects=False)
    login(other, world.keys["reviewer"])
    theirs = csrf_of(other, "/review/support")
    assert client.post(f"/review/support/r/{rid}", data={"rating": "1", "csrf": theirs}).status_code == 403
    assert world.registry.reviews("support") == []


def test_a_review_is_stored_redacted_beside_the_customers_feedback(guarded: tuple[TestClient, World]) -> None:
    client, world = guarded
    login(client, world.keys["reviewer"])
    rid = world.requests[1]["request_id"]  # the customer rated it -1
    token = csrf_of(client, f"/review/support/r/{rid}")
    done = client.post(
        f"/review/support/r/{rid}",
        data={
            "csrf": token,
            "rating": "-1",
            "category": ["wrong_field", "format"],
            "correction": f'{{"team": "support", "contact": "{EMAIL}"}}',
        },
    )
    assert done.status_code == 303 and done.headers["location"].startswith("/review/support/r/")
    assert done.headers["location"] != f"/review/support/r/{rid}"  # on to the next unreviewed one
    (review,) = world.registry.reviews("support")
    assert (review.reviewer, review.version, review.rating) == ("reviewer", 1, -1)
    assert review.categories == ["wrong_field", "format"]
    assert (
        review.correction is not None
        and EMAIL not in review.correction
        and "<EMAIL_ADDRESS_" in review.correction
    )
    events = [e for e in world.registry.history("support").events if e.action == "review.add"]
    assert events and events[-1].actor == "reviewer" and EMAIL not in str(events[-1].after)
    feedback = list(world.registry.traffic.read("feedback", adapter="support"))
    assert len(feedback) == 2  # the customer's own ratings are still there, untouched
    # The version page and the queue show it.
    assert "wrong_field" in client.get("/adapters/support/v/1").text
    queue = client.get("/review/support?category=format").text
    assert rid in queue and world.requests[2]["request_id"] not in queue


def test_bad_reviews_are_refused_by_name(guarded: tuple[TestClient, World]) -> None:
    client, world = guarded
    login(client, world.keys["reviewer"])
    rid = world.requests[2]["request_id"]
    token = csrf_of(client, f"/review/support/r/{rid}")
    for data, words in (
        ({"rating": "5"}, "rating is +1 or -1"),
        ({"category": "nonsense"}, "unknown category &#39;nonsense&#39;"),
        ({}, "has none of them"),
    ):
        refused = client.post(f"/review/support/r/{rid}", data={"csrf": token, **data})
        assert refused.status_code == 400 and words in refused.text, refused.text
    missing = client.post("/review/support/r/req-20200101-" + "0" * 32, data={"csrf": token, "rating": "1"})
    assert missing.status_code == 404
    assert client.get("/review/support?slice=nope").status_code == 400
    assert world.registry.reviews("support") == []


def test_a_blind_pairwise_round_lands_on_the_report(guarded: tuple[TestClient, World]) -> None:
    client, world = guarded
    login(client, world.keys["reviewer"])
    path = f"/pairwise/evaluation/{world.evaluation.id}"
    rnd_pairs = 6  # 8 examples, 2 where production already answered like the candidate
    for _ in range(rnd_pairs):
        page = client.get(path).text
        item = re.search(r'name="item" value="([^"]+)"', page)
        assert item is not None
        a = re.search(r'data-testid="answer-a">([^<]*)<', page)
        assert a is not None
        # The reviewer prefers the answer that routes to support: the candidate's, wherever it is shown.
        pick = "a" if "support" in a.group(1) else "b"
        done = client.post(path, data={"csrf": CSRF.findall(page)[-1], "item": item.group(1), "pick": pick})
        assert done.status_code == 303
    assert "judged every pair" in client.get(path).text
    votes = world.registry.pairwise_votes("evaluation", world.evaluation.id)
    assert len(votes) == rnd_pairs and {v.choice for v in votes} == {"candidate"}
    report = client.get(f"/evaluations/{world.evaluation.id}").text
    assert 'data-testid="preference-rate">100.0%' in report and "6 blind picks" in report
    again = client.post(path, data={"csrf": csrf_of(client, path), "item": votes[0].item, "pick": "a"})
    assert again.status_code == 409


def test_the_blind_order_is_a_fair_coin_stable_per_reviewer_and_item() -> None:
    """Which answer shows as A: the same on every reload, unguessable without the key, and fair."""
    signer = Signer(b"k" * 32, ttl_s=60)
    flips = [signer.coin("evaluation", 1, str(item), "reviewer") for item in range(400)]
    assert 160 <= sum(flips) <= 240  # a fair coin: 200 +- 4 standard deviations
    assert flips == [signer.coin("evaluation", 1, str(item), "reviewer") for item in range(400)]
    other = Signer(b"j" * 32, ttl_s=60)
    assert flips != [other.coin("evaluation", 1, str(item), "reviewer") for item in range(400)]
    assert flips != [signer.coin("evaluation", 1, str(item), "someone else") for item in range(400)]


def test_shadow_pairs_come_from_the_rollouts_recorded_answers(local: tuple[TestClient, World]) -> None:
    client, world = local
    page = client.get(f"/pairwise/rollout/{world.rollout.id}").text
    assert "4 of 4 pairs left" in page


def test_operators_promote_and_operate_rollouts_with_the_clis_rules(
    guarded: tuple[TestClient, World],
) -> None:
    client, world = guarded
    login(client, world.keys["reviewer"])
    token = csrf_of(client, "/adapters/support")
    refused = client.post(
        "/adapters/support/promote", data={"csrf": token, "version": "2", "alias": "staging"}
    )
    assert refused.status_code == 403
    client.cookies.clear()
    login(client, world.keys["operator"])
    token = csrf_of(client, "/adapters/support")
    # production moves only through the rollout while one runs: the store's rule, shown as the CLI shows it
    busy = client.post("/adapters/support/promote", data={"csrf": token, "version": "2", "expect": "1"})
    assert busy.status_code == 409
    paused = client.post(f"/adapters/support/rollouts/{world.rollout.id}/pause", data={"csrf": token})
    assert paused.status_code == 303
    rollout = world.registry.rollout("support")
    assert rollout is not None and rollout.state == "paused" and rollout.decisions[-1].actor == "operator"
    aborted = client.post(
        f"/adapters/support/rollouts/{world.rollout.id}/abort", data={"csrf": token, "reason": "enough"}
    )
    assert aborted.status_code == 303 and world.registry.rollout("support") is None
    done = client.post("/adapters/support/promote", data={"csrf": token, "version": "2", "expect": "1"})
    assert done.status_code == 303, done.text
    assert world.registry.get("support").aliases["production"] == 2
    move = world.registry.history("support").moves[-1]
    assert (move.to_version, move.actor) == (2, "operator")
    stale = client.post("/adapters/support/promote", data={"csrf": token, "version": "1", "expect": "1"})
    assert stale.status_code == 409  # compare-and-swap: production is no longer v1
    assert world.registry.get("support").aliases["production"] == 2


def test_reviews_count_by_their_latest(local: tuple[TestClient, World]) -> None:
    client, world = local
    rid = world.requests[4]["request_id"]
    for rating in ("1", "-1"):
        token = csrf_of(client, f"/review/support/r/{rid}")
        assert (
            client.post(f"/review/support/r/{rid}", data={"csrf": token, "rating": rating}).status_code == 303
        )
    reviews = world.registry.reviews("support")
    assert len(reviews) == 2 and current_reviews(reviews)[rid].rating == -1
    assert world.registry.settings.actor in {r.reviewer for r in reviews}
