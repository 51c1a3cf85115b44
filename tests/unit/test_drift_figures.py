"""The drift rules that every view shares (registry/drift.py), the profile schema they read, and the
live metrics' help text."""

from __future__ import annotations

import json

import pytest

from loraflow.registry.drift import Answer, Histogram, Profile, figure_verdict, window_figures
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


def test_a_profile_round_trips_through_its_stored_json_and_leaves_out_what_was_not_recorded() -> None:
    hist = Histogram.from_values([10, 12, 14, 30])
    profile = Profile.model_validate(
        {
            "tokens": {"total": 66, "max": 30},
            "lengths": {"prompt_tokens": {"edges": hist.edges, "shares": hist.shares, "n": 4}},
        }
    )
    stored = json.loads(json.dumps(profile.to_json()))
    assert set(stored) == {"tokens", "lengths"}  # no "format": null, no "embedding": null
    assert Profile.model_validate(stored) == profile
    assert profile.json_share is None and profile.lengths["prompt_tokens"] == hist
    # what the gateway and `loraflow drift` compute from it: live lengths far past the reference
    rows = [Answer(at=0.0, prompt_tokens=90, output_tokens=None, json_ok=True, refusal=False)] * 5
    figures = window_figures(rows, [], profile)
    assert figures["psi_prompt_tokens"] is not None and figures["psi_prompt_tokens"] > 1.0
    assert figures["psi_output_tokens"] is None  # no reference for output lengths


def test_a_profile_written_by_an_older_release_still_reads() -> None:
    old = {"train": {"examples": 40, "prompt_tokens": {"p50": 31}}}  # migration 0001's shape
    profile = Profile.model_validate(old)
    assert profile.lengths == {} and profile.tokens is None and profile.json_share is None
    assert profile.to_json() == old  # kept as it was, not dropped
    assert window_figures([], [], profile)["psi_prompt_tokens"] is None
