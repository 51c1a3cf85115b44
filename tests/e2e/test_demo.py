"""`loraflow demo --tiny` end to end, as a user runs it: a subprocess in an empty folder, its own
engine. (The default run, on SmolLM2, takes about ten minutes: its figures are in the README.)

What it must show happened, checked in the registry it leaves behind rather than in its wording:
v1 passed the gate and was promoted; the traffic was sampled with its PII redacted (no raw address
or phone number anywhere under the data folder); feedback was given; drift was recorded; the
flywheel's v2 was trained on a dataset built from that traffic, passed the gate, and took production
through a rollout on live traffic that the gateway's controller advanced on its own (shadow, canary,
all traffic); the sabotaged v3 was refused by the gate and, forced into a rollout, rolled back by the
controller on live figures, so production stayed v2. And its output carries none of the libraries'
own bars and warnings.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape

from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from loraflow.server.console.app import build_console

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent

# What the libraries print when nobody quiets them: tqdm and datasets bars, warnings, log records.
NOISE = re.compile(r"it/s\]|examples/s\]|Warning:|warnings\.warn|^\S+ (INFO|WARNING) |Traceback", re.M)


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.hrefs += [v for k, v in attrs if tag == "a" and k == "href" and v]


def test_the_demo_runs_the_whole_loop(tmp_path: Path) -> None:
    from loraflow.cli.demo import EMAIL, PHONE

    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLOW_")}
    done = subprocess.run(
        [str(BIN / "loraflow"), "demo", "--tiny"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert not NOISE.search(output), NOISE.search(output)
    for step in range(1, 10):
        assert f"[{step}/9]" in done.stdout
    assert "loraflow demo" in done.stdout and "total" in done.stdout  # the summary table

    home = tmp_path / ".loraflow"
    registry = Registry.open(Settings(home=home))
    try:
        adapter = registry.get("demo-orders")
        assert adapter.aliases["production"] == 2, adapter.aliases
        moves = registry.history("demo-orders").moves
        assert [m.to_version for m in moves if m.alias == "production"] == [1, 2]
        # The demo promotes only through the gate (never with force), so each move above passed it;
        # what it passed on:
        for version, rival in ((1, "base"), (2, "production")):
            systems = registry.evaluations("demo-orders", version)[-1].report["systems"]
            f1 = {key: s["metrics"]["token_f1"]["mean"] for key, s in systems.items()}
            assert f1["candidate"] > f1[rival], (version, f1)
        v2 = registry.get_version("demo-orders", 2)
        dataset = registry.get_dataset(v2.dataset or "")
        assert dataset.lineage["kind"] == "traffic" and dataset.lineage["previous"] == "demo-orders@v1"
        v3 = registry.get_version("demo-orders", 3)
        assert v3.dataset == "demo-orders-sabotaged@v1"
        assert not registry.gate("demo-orders", 3).passed
        assert registry.evaluations("demo-orders", 3)[-1].dataset == v2.dataset  # production's test split
        drift = registry.drift_reports()
        assert drift["demo-orders@v1"].report["verdict"] in ("watch", "act")
        good, bad = registry.rollouts("demo-orders")
        assert (good.candidate, good.state, bad.candidate, bad.state) == (2, "succeeded", 3, "rolled_back")
        assert [d.action for d in good.decisions] == ["start", "advance", "advance", "succeed"]
        assert all("rollout controller" in d.actor for d in good.decisions[1:])  # nobody else moved it
        assert good.decisions[0].figures["gate"]["passed"]  # type: ignore[index]
        assert bad.decisions[0].figures["forced"] and bad.decisions[-1].action == "rollback"  # type: ignore[index]
        failed = [g for g in (bad.decisions[-1].figures or {})["guards"] if g["verdict"] == "fail"]
        assert failed, bad.decisions[-1]  # the figures that decided it
        # The demo ends with the command that opens the console on its registry; the console
        # serves the eval and drift pages the demo stored beside their reports.
        assert f"console: LORAFLOW_HOME={home.resolve()} loraflow ui" in " ".join(done.stdout.split())
        # The demo's own stores (this tier's environment names the session's S3 bucket).
        local = Settings(home=home, database_url=None, artifact_uri=None)
        with TestClient(build_console(local, own := Registry.open(local))) as console:
            assert "demo-orders" in console.get("/").text
            for evaluation in registry.evaluations("demo-orders"):
                assert evaluation.page_digest is not None, evaluation.id
                page = console.get(f"/evaluations/{evaluation.id}/page")
                assert page.status_code == 200, page.text[-2000:]
                assert f"Evaluation of {evaluation.ref}" in page.text
            stored_drift = registry.drift_history("demo-orders")
            assert stored_drift and all(d.page_digest for d in stored_drift)
            assert console.get(f"/drift/{stored_drift[-1].id}/page").status_code == 200
        own.close()
    finally:
        registry.close()

    # Nothing under the data folder holds the PII the e-mails carried, written or logged.
    for path in home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert EMAIL.encode() not in data and PHONE.encode() not in data, path

    # One page, linking an eval report per evaluated version and the drift report, all present.
    (page,) = home.glob("demo/demo-orders/demo.html")
    links = Links()
    links.feed(page.read_text())
    assert len(links.hrefs) == 4, links.hrefs  # v1, v2, v3 and the shifted slice's drift
    for href in links.hrefs:
        assert (page.parent / href).is_file(), href
    # The steps' times, for scripts: the table's rows.
    timing = json.loads((page.parent / "demo.json").read_text())
    assert [s["step"] for s in timing["steps"]][:3] == ["base model", "dataset", "train + evaluate + gate v1"]
    assert len(timing["steps"]) == 9 and sum(s["seconds"] for s in timing["steps"]) <= timing["total_s"]
    # Real answers side by side: v1's against the prompted base's, on held-out orders.
    v1_report = registry_report(home, 1)
    first = v1_report["examples"][0]
    html = page.read_text()
    assert "demo-orders@v1 against the prompted base" in html
    for answer in first["outputs"].values():
        assert escape(answer["text"]) in html, answer["text"]


def registry_report(home: Path, version: int) -> dict[str, Any]:
    registry = Registry.open(Settings(home=home))
    try:
        return registry.evaluations("demo-orders", version)[-1].report
    finally:
        registry.close()
