"""`loraflow drift`: a version's sampled traffic over a window, against its training split.

Every figure the gateway exports live (PSI of prompt and output lengths, format validity,
refusal and negative-feedback rates) is computed here the same way
(:func:`~loraflow.registry.drift.window_figures`), over the sampled records in the sink.
Embedding drift needs torch, so only this job computes it: prompts of both sides are
embedded with all-MiniLM-L6-v2 (the model of the dataset profile) and compared by

- the cosine distance between the two centroids, and
- a kernel two-sample test: MMD² with a Gaussian kernel (median-distance bandwidth), and
  its p-value by permutation. A small p-value says the live prompts are not drawn from
  the training distribution; the centroid distance says how far they moved.

Each figure gets a verdict (``ok``, ``watch``, ``act``, or ``unknown`` below
``drift.min_requests``) from ``[drift]``; the report is stored on the version
(:meth:`Registry.record_drift`, with its page from :mod:`loraflow.trainer.reports.drift_page`),
and the gateways export its embedding figures. Its ``reviews`` section says what people
reviewing the version's sampled requests in the console found (every review of the version so
far, not only the window's: :func:`~loraflow.registry.reviews.reviewed_counts` and the failure
categories, :func:`~loraflow.registry.reviews.category_summary`).
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

from loraflow.registry import domain
from loraflow.registry.drift import (
    Answer,
    Profile,
    Verdict,
    answer,
    shares,
    verdict,
    window_figures,
)
from loraflow.registry.refs import parse_ref
from loraflow.registry.reviews import category_summary, reviewed_counts
from loraflow.registry.service import Registry
from loraflow.registry.settings import DriftSettings
from loraflow.registry.traffic import answer_text, current_feedback, request_turns
from loraflow.trainer.embed import Embedder

VERDICT_ORDER: dict[Verdict, int] = {"unknown": 0, "ok": 1, "watch": 2, "act": 3}


def prompt_text(request: dict[str, Any]) -> str:
    """The user's side of a recorded request, as ``Example.prompt_text`` renders a training example."""
    turns = request_turns(request) or []
    return "\n".join(str(m.get("content")) for m in turns if m.get("role") == "user")


def mmd_test(x: Any, y: Any, *, permutations: int = 200, seed: int = 0) -> tuple[float, float]:
    """(MMD², permutation p-value) of two samples of vectors, Gaussian kernel, median heuristic."""
    import numpy as np

    pooled = np.concatenate([x, y]).astype(np.float64)
    sq = np.sum(pooled**2, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * pooled @ pooled.T, 0.0)
    off = d2[~np.eye(len(pooled), dtype=bool)]
    bandwidth = float(np.median(off)) or 1.0
    k = np.exp(-d2 / bandwidth)
    n = len(x)

    def stat(idx: Any) -> float:
        a, b = idx[:n], idx[n:]
        kxx, kyy, kxy = k[np.ix_(a, a)], k[np.ix_(b, b)], k[np.ix_(a, b)]
        m, l_ = len(a), len(b)
        xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        yy = (kyy.sum() - np.trace(kyy)) / (l_ * (l_ - 1))
        return float(xx + yy - 2 * kxy.mean())

    order = np.arange(len(pooled))
    observed = stat(order)
    rng = np.random.default_rng(seed)
    exceed = sum(stat(rng.permutation(order)) >= observed for _ in range(permutations))
    return observed, (exceed + 1) / (permutations + 1)


def embedding_drift(
    embedder: Embedder, reference: list[str], live: list[str], *, seed: int
) -> dict[str, float]:
    import numpy as np

    ref, cur = embedder.embed(reference), embedder.embed(live)
    a, b = ref.mean(axis=0), cur.mean(axis=0)
    cosine = float(a @ b / ((np.linalg.norm(a) * np.linalg.norm(b)) or 1.0))
    mmd, p_value = mmd_test(ref, cur, seed=seed)
    return {
        "embedding_centroid_distance": round(1.0 - cosine, 6),
        "embedding_mmd": round(mmd, 6),
        "embedding_mmd_p_value": round(p_value, 6),
    }


def _verdicts(
    figures: dict[str, float | None], profile: Profile | None, settings: DriftSettings, enough: bool
) -> dict[str, Verdict]:
    out: dict[str, Verdict] = {}
    for feature in ("psi_prompt_tokens", "psi_output_tokens"):
        out[feature] = verdict(figures.get(feature), settings.psi_watch, settings.psi_act)
    share = profile.json_share if profile else None
    valid = figures.get("format_valid_rate")
    if share is not None and share >= 0.5 and valid is not None:  # a task whose answers are JSON
        out["format_valid_rate"] = verdict(
            share - valid, settings.format_drop_watch, settings.format_drop_act
        )
    out["refusal_rate"] = verdict(figures.get("refusal_rate"), settings.refusal_watch, settings.refusal_act)
    out["negative_feedback_rate"] = verdict(
        figures.get("negative_feedback_rate"),
        settings.negative_feedback_watch,
        settings.negative_feedback_act,
    )
    if "embedding_mmd_p_value" in figures:
        distance = figures.get("embedding_centroid_distance")
        moved = verdict(distance, settings.embedding_watch, settings.embedding_act)
        significant = (figures.get("embedding_mmd_p_value") or 1.0) < settings.embedding_p_value
        out["embedding"] = moved if significant else "ok"
    if not enough:
        out = dict.fromkeys(out, "unknown")
    return out


def _histograms(profile: Profile | None, answers: list[Answer]) -> dict[str, Any]:
    """Per length: the bins, the training shares and the live shares (the report's charts)."""
    out = {}
    for feature, hist in (profile.lengths if profile else {}).items():
        values = [getattr(a, feature) for a in answers if getattr(a, feature) is not None]
        out[feature] = {"edges": hist.edges, "train": hist.shares, "live": shares(hist.edges, values)}
    return out


def reviews_section(registry: Registry, version: domain.VersionInfo) -> dict[str, Any]:
    """What reviewers found in the version's sampled requests: how many they reviewed, rated up or
    down and corrected (the latest review of each request), and the failure categories they tagged,
    most frequent first."""
    reviews = registry.reviews(version.adapter, version.version)
    counts = reviewed_counts(reviews).get(
        version.version, {"reviewed": 0, "positive": 0, "negative": 0, "corrected": 0}
    )
    return counts | {"categories": category_summary(reviews).get(version.version, {})}


def drift_report(
    registry: Registry,
    settings: DriftSettings,
    model: str,
    *,
    window: timedelta,
    now: datetime,
    embedder: Embedder | None = None,
    seed: int = 0,
) -> tuple[domain.VersionInfo, dict[str, Any]]:
    """Compute the report of ``model`` (NAME, NAME:ALIAS or NAME@vN) over ``[now - window, now)``."""
    version = registry.resolve(parse_ref(model, param="model"))
    since = now - window
    corrupt_before = len(registry.traffic.corrupt)
    records = [
        r
        for r in registry.traffic.read("requests", adapter=version.adapter, since=since, until=now)
        if r["version"] == version.version
    ]
    served = [r for r in records if r["status"] == 200 and not r.get("error")]
    ratings = [
        int(f["rating"])
        for f in current_feedback(
            registry.traffic.read("feedback", adapter=version.adapter, since=since, until=now)
        )
        if f["version"] == version.version
    ]
    profile = registry.get_dataset(version.dataset).profile if version.dataset else None
    answers = [
        answer(
            answer_text(r),
            r.get("usage"),
            at=datetime.fromisoformat(r["at"]).timestamp(),
        )
        for r in served
    ]
    figures = window_figures(answers, ratings, profile)
    enough = len(served) >= settings.min_requests
    notes = []
    corrupt = registry.traffic.corrupt[corrupt_before:]
    if corrupt:
        notes.append(
            f"{len(corrupt)} traffic lines that are not records were skipped "
            f"(the first: {corrupt[0].path} line {corrupt[0].line})"
        )
    lost = sum(int(loss["records"]) for loss in registry.traffic.losses(since=since, until=now))
    if lost:
        notes.append(f"{lost} sampled records of the window were lost (a gateway died with them queued)")
    if embedder is not None and version.dataset and served:
        from loraflow.trainer.prepare import load_split

        rng = random.Random(seed)
        train = [
            "\n".join(m["content"] for m in row["messages"][:-1] if m["role"] == "user")
            for row in load_split(registry, registry.get_dataset(version.dataset), "train")
        ]
        live = [prompt_text(r["request"]) for r in served]
        k = settings.embedding_sample
        figures |= embedding_drift(
            embedder,
            rng.sample(train, min(k, len(train))),
            rng.sample(live, min(k, len(live))),
            seed=seed,
        )
    elif embedder is None:
        notes.append("embedding drift not computed (--no-embeddings)")
    elif not version.dataset:
        notes.append("the version records no training dataset: nothing to compare prompts with")
    if profile is None or not profile.lengths:
        notes.append("the training dataset has no length profile (prepared before loraflow 0.x): no PSI")
    verdicts = _verdicts(figures, profile, settings, enough)
    overall = max(verdicts.values(), key=lambda v: VERDICT_ORDER[v], default="unknown")
    report = {
        "adapter": version.adapter,
        "version": version.version,
        "dataset": version.dataset,
        "window": {"start": since.isoformat(), "end": now.isoformat(), "seconds": window.total_seconds()},
        "requests": {"recorded": len(records), "answered": len(served), "feedback": len(ratings)},
        "figures": figures,
        "verdicts": verdicts,
        "verdict": overall,
        "thresholds": settings.model_dump(),
        "histograms": _histograms(profile, answers),
        "reviews": reviews_section(registry, version),
        "notes": notes,
    }
    return version, report
