"""The gateway's own drift figures: a sliding window of every answered request, per adapter version.

Cheap enough for the event loop: each request appends one tuple (token counts from the
engine's usage, whether the answer parsed as JSON, whether it was a refusal or empty);
feedback sets its rating (one per request and key: a repeated rating replaces the
earlier). At scrape time :class:`DriftCollector` compares the window with the profile of
the version's training split (``data prepare``) and exports the figures, plus the latest
stored ``loraflow drift`` report (embedding drift, computed in a job because it needs torch).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraflow.registry.drift import Answer, Profile, answer, window_figures
from loraflow.registry.refs import parse_ref, version_ref
from loraflow.registry.settings import DriftSettings

VersionKey = tuple[str, int]  # (adapter, version)


class LiveDrift:
    def __init__(self, settings: DriftSettings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.answers: dict[VersionKey, deque[Answer]] = {}
        # (request id, key) -> (when, rating): a key that rates a request again replaces its rating
        self.ratings: dict[VersionKey, OrderedDict[tuple[str, str | None], tuple[float, int]]] = {}

    def observe(self, adapter: str, version: int, text: str, usage: dict[str, Any] | None) -> None:
        window = self.answers.setdefault((adapter, version), deque(maxlen=self.settings.window_max_requests))
        window.append(answer(text, usage, at=self.clock()))

    def observe_feedback(
        self, adapter: str, version: int, rating: int, *, request_id: str, key: str | None
    ) -> None:
        window = self.ratings.setdefault((adapter, version), OrderedDict())
        window.pop((request_id, key), None)
        window[(request_id, key)] = (self.clock(), rating)
        while len(window) > self.settings.window_max_requests:
            window.popitem(last=False)

    def figures(self, key: VersionKey, profile: Profile | None) -> dict[str, float | None]:
        since = self.clock() - self.settings.window_s
        answers = [a for a in self.answers.get(key, ()) if a.at >= since]
        ratings = [r for t, r in self.ratings.get(key, {}).values() if t >= since]
        return window_figures(answers, ratings, profile)

    def versions(self) -> list[VersionKey]:
        return sorted(set(self.answers) | set(self.ratings))


# Figures a `loraflow drift` report stores under "figures", exported as they are.
STORED_FIGURES = ("embedding_centroid_distance", "embedding_mmd", "embedding_mmd_p_value")


class DriftCollector(Collector):
    """``loraflow_drift_*{adapter,version}``: the live window's figures and the latest stored report's."""

    def __init__(
        self,
        live: LiveDrift,
        profiles: Callable[[], dict[str, Profile]],
        reports: Callable[[], dict[str, dict[str, Any]]],
    ) -> None:
        self.live = live
        self.profiles = profiles  # "NAME@vN" -> its training split's profile
        self.reports = reports  # "NAME@vN" -> latest stored drift report

    def collect(self) -> Iterator[Metric]:
        labels = ["adapter", "version"]
        drift = self.live.settings
        thresholds = f"drift.psi_watch {drift.psi_watch:g}, drift.psi_act {drift.psi_act:g}"
        families = {
            "requests": GaugeMetricFamily(
                "loraflow_drift_window_requests", "Answered requests in the drift window.", labels=labels
            ),
            "psi_prompt_tokens": GaugeMetricFamily(
                "loraflow_drift_psi_prompt_tokens",
                f"PSI of prompt lengths against the training split ({thresholds}).",
                labels=labels,
            ),
            "psi_output_tokens": GaugeMetricFamily(
                "loraflow_drift_psi_output_tokens",
                f"PSI of output lengths against the training split ({thresholds}).",
                labels=labels,
            ),
            "format_valid_rate": GaugeMetricFamily(
                "loraflow_drift_format_valid_rate", "Share of answers that parse as JSON.", labels=labels
            ),
            "refusal_rate": GaugeMetricFamily(
                "loraflow_drift_refusal_rate", "Share of answers that are refusals or empty.", labels=labels
            ),
            "negative_feedback_rate": GaugeMetricFamily(
                "loraflow_drift_negative_feedback_rate", "Share of feedback rated -1.", labels=labels
            ),
        }
        stored = {
            name: GaugeMetricFamily(
                f"loraflow_drift_{name}", f"{name} from the latest loraflow drift report.", labels=labels
            )
            for name in STORED_FIGURES
        }
        profiles = self.profiles()
        for adapter, version in self.live.versions():
            values = [adapter, f"v{version}"]
            figures = self.live.figures((adapter, version), profiles.get(version_ref(adapter, version)))
            for name, family in families.items():
                value = figures.get(name)
                if value is not None:
                    family.add_metric(values, value)
        for ref, report in self.reports().items():
            parsed = parse_ref(ref, param="ref")
            for name, family in stored.items():
                figure = (report.get("figures") or {}).get(name)
                if figure is not None:
                    family.add_metric([parsed.name, f"v{parsed.version}"], float(figure))
        yield from families.values()
        yield from stored.values()
