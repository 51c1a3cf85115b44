"""`loraflow flywheel build-dataset`: served traffic becomes the next version of an adapter's dataset.

:func:`build_dataset` turns an adapter's sampled traffic over a window into the next version
of its training dataset, recording the count after every step in the version's lineage:

1. read the requests the gateways sampled in ``[until - since, until)``, the feedback
   customers gave for them (the latest rating per request wins) and the reviews people gave
   them in the console (``Registry.reviews``; the latest review of a request counts,
   :func:`~loraflow.registry.reviews.current_reviews`); failed requests are dropped
2. choose each answer by who said what, first match wins: a reviewer's correction, the
   customer's correction (either becomes the answer), the reviewer's rating, the customer's
   rating (+1 keeps the served answer, -1 drops it: a reviewer's -1 drops an answer its
   customer rated +1), else unrated (kept only with ``flywheel.include_unrated``). The counts
   say which source decided (``review_corrected``, ``corrected``, ``review_positive``,
   ``positive``, ``unrated``, ``dropped_review_negative``, ``dropped_negative``,
   ``dropped_unrated``), and ``review_categories`` the failure categories reviewers tagged in
   the window's requests, per version (:func:`~loraflow.registry.reviews.category_summary`)
3. redact again (the gateway redacted before writing; this is defence in depth), and
   validate every example against the base's tokenizer and chat template
4. drop duplicates among the new examples (exact, and MinHash near duplicates) and any
   example already in the previous dataset (any split)
5. cap near-duplicate clusters at ``flywheel.max_per_cluster``, so one frequent request
   cannot dominate
6. split the new examples (seeded): a share becomes fresh test examples, a share val,
   the rest train; the previous test split is carried over whole (still sealed), and a
   ``flywheel.replay_share`` of the new training split is drawn from the previous one,
   against forgetting
7. profile the training split and register the dataset version

The window's end is rounded down to the hour unless given, so a second run over the same
traffic builds the same files, and the version is found by its digest instead of
registered again. :mod:`loraflow.trainer.flywheel.cycle` goes on from that dataset.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from loraflow.registry import domain
from loraflow.registry.artifacts import digest_of, sha256_file
from loraflow.registry.errors import InvalidArgumentError, NotFoundError
from loraflow.registry.redact import redactor_from_settings
from loraflow.registry.refs import DEFAULT_ALIAS
from loraflow.registry.reviews import category_summary, current_reviews
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from loraflow.registry.traffic import answer_text, current_feedback, request_turns
from loraflow.trainer.data import Example, validate_records
from loraflow.trainer.prepare import (
    DATA_FILES,
    SPLITS,
    deduplicate,
    fingerprint,
    load_split,
    minhash,
    overlap,
    split,
    split_profile,
    write_dataset_files,
)


@dataclass
class Built:
    dataset: domain.DatasetVersionInfo
    report: dict[str, Any]
    created: bool  # False: the same splits were already registered (found by digest)


def window_end(until: datetime | None) -> datetime:
    """``until``, else the top of the current UTC hour: two scheduled runs within one hour read the
    same traffic and build the same files (found by digest); later traffic waits for the next run."""
    return until if until is not None else datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


def _window_text(start: datetime, end: datetime, *, defaulted: bool) -> str:
    text = f"between {start:%Y-%m-%d %H:%M} and {end:%Y-%m-%d %H:%M} UTC"
    if defaulted:
        text += (
            f" (the window ends at the top of the hour: traffic after {end:%H:%M} is left for the next run; "
            "pass --until now to include it)"
        )
    return text


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{step.replace('_', ' ')} {n}" for step, n in counts.items() if n) or "none"


def _previous_dataset(registry: Registry, adapter: domain.AdapterInfo) -> domain.DatasetVersionInfo | None:
    """The dataset production was trained on (else the newest version's)."""
    production = adapter.aliases.get(DEFAULT_ALIAS)
    versions = sorted(adapter.versions, key=lambda v: v.version, reverse=True)
    chosen = next((v for v in versions if v.version == production), versions[0] if versions else None)
    if chosen is None or chosen.dataset is None:
        return None
    return registry.get_dataset(chosen.dataset)


def _conversation(record: dict[str, Any], answer: str) -> dict[str, Any] | None:
    turns = request_turns(record.get("request") or {})
    if turns is None:
        return None
    return {"messages": [*turns, {"role": "assistant", "content": answer}]}


def _cap_clusters(examples: list[Example], *, threshold: float, cap: int) -> tuple[list[Example], int]:
    """Keep at most ``cap`` examples per cluster of near duplicates (MinHash LSH, word 3-shingles)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    sizes: dict[str, int] = {}
    kept, dropped = [], 0
    for ex in examples:
        mh = minhash(ex)
        hits = lsh.query(mh)
        if hits:
            head = min(hits)
            if sizes[head] >= cap:
                dropped += 1
                continue
            sizes[head] += 1
        else:
            key = str(ex.line)
            lsh.insert(key, mh)
            sizes[key] = 1
        kept.append(ex)
    return kept, dropped


def _too_few(name: str, usable: int, needed: int, counts: dict[str, int], window: str) -> NoReturn:
    raise InvalidArgumentError(
        f"only {usable} usable new examples from {name}'s traffic {window}; flywheel.min_examples is "
        f"{needed}. Counts: {_counts_text(counts)}. Rate, correct or review more answers (unrated ones count "
        "only with flywheel.include_unrated), or widen --since",
        param="since",
    )


def build_dataset(
    registry: Registry,
    settings: Settings,
    name: str,
    *,
    since: timedelta,
    until: datetime | None = None,
    base_model: str | None = None,
    embedder: Any = None,
) -> Built:
    """The next dataset version of adapter ``name`` from its traffic in ``[until - since, until)``."""
    fw = settings.flywheel
    adapter = registry.get(name)
    end = window_end(until)
    start = end - since
    counts: dict[str, int] = {}
    corrupt_before = len(registry.traffic.corrupt)

    requests = list(registry.traffic.read("requests", adapter=name, since=start, until=end))
    counts["requests"] = len(requests)
    if not requests:
        raise NotFoundError(
            f"no sampled traffic of {name} {_window_text(start, end, defaulted=until is None)}. "
            f"Check that the gateways serving {name} sample it ([traffic] sample_rate, [traffic.adapters]) "
            f"and write where this command reads ({settings.resolved_traffic_uri}), or widen --since",
            param="since",
        )
    ratings: dict[str, dict[str, Any]] = {}
    for given in current_feedback(registry.traffic.read("feedback", adapter=name, since=start)):
        ratings[given["request_id"]] = given  # the latest of the keys allowed to rate it wins
    in_window = {r["request_id"] for r in requests}
    reviews = {
        request_id: review
        for request_id, review in current_reviews(registry.reviews(name)).items()
        if request_id in in_window
    }
    # Per version, as the JSON of the report and the lineage keeps it (keys are strings there).
    review_categories = {str(v): tags for v, tags in category_summary(reviews.values()).items()}
    counts["skipped_corrupt_lines"] = len(registry.traffic.corrupt) - corrupt_before
    counts["lost_records"] = sum(
        int(loss["records"]) for loss in registry.traffic.losses(since=start, until=end)
    )
    served = [r for r in requests if r.get("status") == 200 and not r.get("error")]
    counts["dropped_failed"] = len(requests) - len(served)

    rows: list[dict[str, Any]] = []
    for kind in (
        "review_corrected",
        "corrected",
        "review_positive",
        "positive",
        "unrated",
        "dropped_review_negative",
        "dropped_negative",
        "dropped_unrated",
        "dropped_shape",
    ):
        counts[kind] = 0
    for record in sorted(served, key=lambda r: (r["at"], r["request_id"])):
        review = reviews.get(record["request_id"])
        fb = ratings.get(record["request_id"])
        if review is not None and review.correction:
            answer, kind = review.correction, "review_corrected"
        elif fb is not None and fb.get("correction"):
            answer, kind = fb["correction"], "corrected"
        elif review is not None and review.rating is not None and review.rating > 0:
            answer, kind = answer_text(record), "review_positive"
        elif review is not None and review.rating is not None:
            counts["dropped_review_negative"] += 1
            continue
        elif fb is not None and fb["rating"] > 0:
            answer, kind = answer_text(record), "positive"
        elif fb is not None:
            counts["dropped_negative"] += 1
            continue
        elif fw.include_unrated:
            answer, kind = answer_text(record), "unrated"
        else:
            counts["dropped_unrated"] += 1
            continue
        row = _conversation(record, answer)
        if row is None:
            counts["dropped_shape"] += 1
            continue
        counts[kind] += 1
        rows.append(row)
    if len(rows) < fw.min_examples:  # the steps below only drop: say so before loading the tokenizer
        _too_few(name, len(rows), fw.min_examples, counts, _window_text(start, end, defaulted=until is None))

    # 3. Defence in depth: redact again (a no-op on what the gateway already redacted).
    redactor = redactor_from_settings(settings)
    redacted = 0
    for row in rows:
        row["messages"], found = redactor.redact_value(row["messages"])
        redacted += sum(found.values())
    counts["pii_redacted_again"] = redacted

    previous = _previous_dataset(registry, adapter)
    window = {"start": start.isoformat(), "end": end.isoformat()}
    if (
        previous is not None
        and previous.lineage.get("kind") == "traffic"
        and (
            previous.lineage.get("adapter"),
            previous.lineage.get("window"),
        )
        == (name, window)
    ):
        # Production was trained on this very window's dataset (a run that already finished): build
        # over what that one was built over, which gives the same files, found below by digest.
        prior = previous.lineage.get("previous")
        previous = registry.get_dataset(prior) if prior else None
    base = base_model or adapter.base_model
    from loraflow.trainer.model import load_tokenizer, locate_base_model, token_counter

    checked = validate_records(
        enumerate(rows, start=1),
        Path(f"traffic of {name}"),
        count_tokens=token_counter(load_tokenizer(locate_base_model(base))),
        max_length=settings.trainer.max_length,
    )
    counts["dropped_invalid"] = len(checked.errors)

    # 4. Duplicates among the new examples, then against everything the previous dataset holds.
    dedup = deduplicate(checked.examples, threshold=fw.near_duplicate_threshold)
    counts["dropped_exact_duplicates"] = len(dedup.exact_dropped)
    counts["dropped_near_duplicates"] = len(dedup.near_dropped)
    old: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    if previous is not None:
        old = {s: load_split(registry, previous, s) for s in SPLITS}
    seen = {
        fingerprint(Example(messages=r["messages"], line=0, format="messages"))
        for s in SPLITS
        for r in old[s]
    }
    fresh = [e for e in dedup.kept if fingerprint(e) not in seen]
    counts["dropped_seen_before"] = len(dedup.kept) - len(fresh)

    # 5. One frequent request must not dominate.
    fresh, capped = _cap_clusters(fresh, threshold=fw.cluster_threshold, cap=fw.max_per_cluster)
    counts["dropped_cluster_cap"] = capped
    counts["new_examples"] = len(fresh)
    if len(fresh) < fw.min_examples:
        _too_few(name, len(fresh), fw.min_examples, counts, _window_text(start, end, defaulted=until is None))

    # 6. Split the new examples; carry the old test split whole; replay some of the old train split.
    # The split is seeded over the examples in content order, not arrival order: requests served
    # concurrently are written in any order, and the same traffic must give the same dataset.
    fresh = [e.model_copy(update={"line": i}) for i, e in enumerate(sorted(fresh, key=fingerprint), 1)]
    new = split(fresh, val_fraction=fw.val_fraction, test_fraction=fw.test_fraction, seed=fw.seed)
    replay_n = min(len(old["train"]), round(len(new["train"]) * fw.replay_share / (1 - fw.replay_share)))
    replay = random.Random(fw.seed).sample(old["train"], replay_n) if replay_n else []
    splits_rows = {
        "train": [e.to_json() for e in new["train"]] + replay,
        "val": old["val"] + [e.to_json() for e in new["val"]],
        "test": old["test"] + [e.to_json() for e in new["test"]],
    }
    counts |= {
        "replayed_from_previous_train": len(replay),
        "previous_test_kept": len(old["test"]),
        "fresh_test": len(new["test"]),
    }
    as_examples = {
        s: [Example(messages=r["messages"], line=i, format="messages") for i, r in enumerate(rows_, 1)]
        for s, rows_ in splits_rows.items()
    }
    shared = overlap(as_examples)
    if any(shared.values()):  # the old splits were disjoint and the new examples are unseen
        raise InvalidArgumentError(f"the new splits would overlap: {shared}", param="since")

    # 7. Profile the training split (token lengths need the tokenizer: validate it once more).
    train_checked = validate_records(
        enumerate(splits_rows["train"], start=1),
        Path("train"),
        count_tokens=token_counter(load_tokenizer(locate_base_model(base))),
        max_length=settings.trainer.max_length,
    )
    profile = split_profile(train_checked.examples, embedder)
    filters = {
        "include_unrated": fw.include_unrated,
        "near_duplicate_threshold": fw.near_duplicate_threshold,
        "cluster_threshold": fw.cluster_threshold,
        "max_per_cluster": fw.max_per_cluster,
        "replay_share": fw.replay_share,
        "test_fraction": fw.test_fraction,
        "val_fraction": fw.val_fraction,
        "seed": fw.seed,
    }
    report = {
        "source": f"traffic of adapter {name}",
        "counts": counts,
        "filters": filters,
        "review_categories": review_categories,
    }
    dataset_name = previous.name if previous is not None else f"{name}-traffic"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_dataset_files(folder, splits_rows, profile, report)
        digest = digest_of({f: sha256_file(folder / f) for f in DATA_FILES})
        existing = registry.find_dataset(dataset_name, digest)
        if existing is not None:
            return Built(dataset=existing, report=report, created=False)
        lineage = {
            "kind": "traffic",
            "adapter": name,
            "window": window,
            "previous": previous.ref if previous is not None else None,
            "filters": filters,
            "counts": counts,
            "review_categories": review_categories,
        }
        version = registry.register_dataset(
            dataset_name,
            folder,
            DATA_FILES,
            counts={s: len(r) for s, r in splits_rows.items()},
            lineage=lineage,
            profile=profile,
        )
    return Built(dataset=version, report=report, created=True)
