"""The drift rules that every view shares (registry/drift.py) and the live metrics' help text."""

from __future__ import annotations

import pytest

from loraflow.registry.drift import figure_verdict
from loraflow.registry.settings import DriftSettings
from loraflow.server.traffic.live import DriftCollector, LiveDrift

pytestmark = pytest.mark.unit


def test_each_figure_gets_its_own_verdict_and_the_embedding_figures_share_one() -> None:
    verdicts = {"psi_prompt_tokens": "watch", "embedding": "act"}
    assert figure_verdict(verdicts, "psi_prompt_tokens") == "watch"
    assert figure_verdict(verdicts, "embedding_mmd") == "act"
    assert figure_verdict(verdicts, "embedding_centroid_distance") == "act"
    assert figure_verdict(verdicts, "refusal_rate") == ""
    assert figure_verdict({}, "embedding_mmd") == ""


def test_the_psi_metrics_state_the_configured_thresholds() -> None:
    live = LiveDrift(DriftSettings(psi_watch=0.2, psi_act=0.4))
    live.observe("support", 1, "{}", {"prompt_tokens": 5, "completion_tokens": 2})
    collector = DriftCollector(live, profiles=dict, reports=dict)
    docs = {family.name: family.documentation for family in collector.collect()}
    for name in ("loraflow_drift_psi_prompt_tokens", "loraflow_drift_psi_output_tokens"):
        assert "drift.psi_watch 0.2, drift.psi_act 0.4" in docs[name], docs[name]
