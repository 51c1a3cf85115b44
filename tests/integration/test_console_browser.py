"""The console in a real browser: `loraflow ui` as a user starts it (a subprocess, auth on), driven
by Playwright in Debian's Chromium (``.ci/chromium``; this machine cannot download a browser).

People log in with keys, browse to an eval report, review ten sampled outputs with the keyboard
(ratings, a correction, categories) and find them in the flywheel's next dataset, run a blind
pairwise round whose result lands on the report, and are refused without the review scope or
without a form's CSRF token. The pages are screenshotted on the way into a temporary folder, or
into ``LORAFLOW_TEST_SCREENSHOTS`` (``docs/screenshots.py`` points it at ``docs/img``).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from loraflow.registry.redact import Redactor
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from loraflow.server.embedded import wait_until_ok
from loraflow.server.engine.supervisor import free_port, log_tail
from tests import console_world
from tests.conftest import CHROMIUM_ARGS, chromium_binary
from tests.console_world import World
from tests.factories import LORAFLOW, no_loraflow_env
from tests.services import Tiny

pytestmark = pytest.mark.integration
SCREENSHOTS = os.environ.get("LORAFLOW_TEST_SCREENSHOTS")  # read before the per-test env is cleared
CORRECTION = '{"team": "support", "topic": "corrected by a reviewer"}'


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, driven by Playwright (pytest-playwright's own fixtures trip pytest 9's
    deprecations through pytest-base-url, so these are the few lines it would give)."""
    chromium = chromium_binary()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=list(CHROMIUM_ARGS))
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh context (no cookies) per test."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(20_000)
    yield context.new_page()
    context.close()


@dataclass(frozen=True)
class Console:
    url: str
    world: World
    env: dict[str, str]
    home: Path
    shots: Path

    def shot(self, page: Page, name: str) -> None:
        page.screenshot(path=self.shots / f"console-{name}.png", full_page=True)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, tiny: Tiny, redactor: Redactor) -> Iterator[Console]:
    root = tmp_path_factory.mktemp("console")
    home = root / "home"
    env = {"LORAFLOW_HOME": str(home), "LORAFLOW_SERVER__AUTH": "true", "LORAFLOW_USER": "tester"}
    with no_loraflow_env():
        registry = Registry.open(Settings(home=home, server={"auth": True}))
        world = console_world.build(
            registry,
            redactor,
            base=tiny.base,
            adapters=(tiny.adapter(1), tiny.adapter(2)),
            data=root / "data",
        )
        port = free_port()
        log = (root / "ui.log").open("w")
        proc = subprocess.Popen(
            [str(LORAFLOW), "ui", "--port", str(port)],
            cwd=root,
            env={k: v for k, v in os.environ.items() if not k.startswith("LORAFLOW_")} | env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        if not wait_until_ok(f"{url}/healthz", 60, alive=lambda: proc.poll() is None):
            proc.kill()
            pytest.fail(f"loraflow ui did not come up (exit {proc.poll()}): {log_tail(root / 'ui.log')}")
        shots = Path(SCREENSHOTS) if SCREENSHOTS else root / "screenshots"
        shots.mkdir(parents=True, exist_ok=True)
        try:
            yield Console(url=url, world=world, env=env, home=home, shots=shots)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
            registry.close()


def login(page: Page, console: Console, key: str) -> None:
    page.context.clear_cookies()
    page.goto(f"{console.url}/")
    expect(page).to_have_url(f"{console.url}/login")
    page.get_by_label("API key").fill(console.world.keys[key])
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{console.url}/")


def test_browse_to_a_versions_eval_report(page: Page, console: Console) -> None:
    login(page, console, "reader")
    expect(page.get_by_test_id("adapters")).to_contain_text("support")
    expect(page.get_by_test_id("adapters")).not_to_contain_text("someone else")  # `other` is not its adapter
    console.shot(page, "adapters")
    page.get_by_role("link", name="support", exact=True).click()
    expect(page.get_by_test_id("versions")).to_contain_text("support@v2")
    console.shot(page, "adapter")
    page.get_by_test_id("versions").get_by_role("link", name="support@v2").click()
    expect(page.get_by_test_id("lineage")).to_contain_text("support-data@v1")
    console.shot(page, "version")
    page.get_by_test_id("lineage").get_by_role("link", name=f"eval {console.world.evaluation.id}").click()
    expect(page.get_by_test_id("headline")).to_contain_text("production support v1")
    stored = page.frame_locator("iframe.report")
    expect(stored.locator("h1")).to_have_text("Evaluation of support@v2")  # the page `loraflow eval` stored
    expect(stored.locator("#metrics")).to_contain_text("exact_match")
    console.shot(page, "eval")


def test_a_key_without_the_review_scope_is_refused(page: Page, console: Console) -> None:
    login(page, console, "reader")
    response = page.goto(f"{console.url}/review/support")
    assert response is not None and response.status == 403
    expect(page.get_by_test_id("error")).to_contain_text("needs a key with the 'review' scope")
    response = page.goto(f"{console.url}/pairwise/evaluation/{console.world.evaluation.id}")
    assert response is not None and response.status == 403


def test_a_forged_form_without_its_csrf_token_is_refused(page: Page, console: Console) -> None:
    login(page, console, "reviewer")
    before = len(console.world.registry.reviews("support"))
    rid = console.world.requests[0]["request_id"]
    page.goto(f"{console.url}/review/support/r/{rid}")
    page.evaluate("document.querySelector('#review-form input[name=csrf]').remove()")
    page.get_by_label("+1 good").check()
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.get_by_role("button", name="Save and next").click()
    assert posted.value.status == 403
    expect(page.get_by_test_id("error")).to_contain_text("CSRF token is missing")
    assert len(console.world.registry.reviews("support")) == before


def _submit(page: Page) -> None:
    before = page.url
    page.keyboard.press("Control+Enter")
    page.wait_for_url(lambda url: url != before)


def test_review_ten_records_and_see_them_in_the_flywheels_next_dataset(page: Page, console: Console) -> None:
    login(page, console, "reviewer")
    page.goto(f"{console.url}/review/support?version=1&rating=unreviewed")
    expect(page.get_by_test_id("queue")).to_contain_text("EMAIL_ADDRESS")  # redacted as stored
    expect(page.get_by_test_id("queue")).not_to_contain_text(console_world.EMAIL)
    console.shot(page, "review-queue")
    page.get_by_role("link", name="Start reviewing").click()
    reviewed = []
    for i in range(10):
        expect(page.get_by_test_id("review-form")).to_be_visible()
        reviewed.append(page.url.split("/r/")[1].split("?")[0])
        if i == 0:
            page.keyboard.press("-")
            page.keyboard.press("1")  # wrong_field
            page.keyboard.press("c")
            page.keyboard.type(CORRECTION)
            console.shot(page, "review")
        elif i <= 6:
            page.keyboard.press("+")
        elif i <= 8:
            page.keyboard.press("-")
            page.keyboard.press("2")  # format
        else:
            page.keyboard.press("3")  # refusal, and no rating
        _submit(page)
    reviews = {r.request_id: r for r in console.world.registry.reviews("support")}
    assert set(reviewed) <= set(reviews) and len(set(reviewed)) == 10
    first = reviews[reviewed[0]]
    assert (first.rating, first.categories, first.correction) == (-1, ["wrong_field"], CORRECTION)
    assert [reviews[r].rating for r in reviewed[1:]] == [1] * 6 + [-1, -1, None]
    assert reviews[reviewed[9]].categories == ["refusal"]

    # The flywheel's next dataset, as a user builds it.
    built = subprocess.run(
        [str(LORAFLOW), "flywheel", "build-dataset", "support", "--since", "2h", "--until", "now", "--json"],
        cwd=console.home.parent,
        env={k: v for k, v in os.environ.items() if not k.startswith("LORAFLOW_")}
        | console.env
        | {"LORAFLOW_FLYWHEEL__MIN_EXAMPLES": "4"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    out = json.loads(built.stdout)
    counts = out["counts"]
    assert (counts["review_corrected"], counts["review_positive"], counts["dropped_review_negative"]) == (
        1,
        6,
        2,
    )
    # The two requests the customer rated and nobody reviewed still count by the customer's rating.
    assert (counts["positive"], counts["dropped_negative"]) == (1, 1)
    dataset = console.world.registry.get_dataset(out["dataset"])
    answers = [
        row["messages"][-1]["content"]
        for split in ("train", "val", "test")
        for line in console.world.registry.dataset_split(dataset, split).decode().splitlines()
        for row in [json.loads(line)]
    ]
    assert CORRECTION in answers
    categories = dataset.lineage["review_categories"]
    assert categories["1"] == {"format": 2, "wrong_field": 1, "refusal": 1}


def test_a_blind_pairwise_round_lands_on_the_report(page: Page, console: Console) -> None:
    login(page, console, "reviewer")
    evaluation = console.world.evaluation
    page.goto(f"{console.url}/evaluations/{evaluation.id}")
    expect(page.get_by_test_id("preference-none")).to_be_visible()
    page.get_by_role("link", name="Judge pairs blind").click()
    shown = 0
    while page.get_by_test_id("pick-form").count():
        if shown == 0:
            console.shot(page, "pairwise")
        a = page.get_by_test_id("answer-a").inner_text()
        before = page.get_by_test_id("pair-prompt").inner_text()
        page.keyboard.press("a" if '"support"' in a else "b")  # the reviewer prefers the right team
        expect(page.get_by_test_id("pair-prompt").or_(page.get_by_test_id("round-done"))).not_to_have_text(
            before
        )
        shown += 1
    assert shown == 6
    page.get_by_role("link", name="Back to the report").click()
    expect(page.get_by_test_id("preference-rate")).to_have_text("100.0%")
    expect(page.get_by_test_id("preference-ci")).to_contain_text("[61.0%, 100.0%]")
    console.shot(page, "eval-preference")
