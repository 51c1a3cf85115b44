"""`loraflow data prepare`: validated file -> deduplicated, split, profiled, registered DatasetVersion.

Steps, each recorded in the version's report:

1. validate every line (nothing is prepared from a file with bad lines)
2. drop exact duplicates (same normalized conversation) and near duplicates
   (MinHash LSH over word 3-shingles; Jaccard threshold configurable)
3. split deterministically (seeded), stratified by ``label``/``task`` when present
4. prove the splits share no example after normalization
5. profile the training split: token lengths and sentence embeddings, which the
   drift metrics compare live traffic against
6. store the split files under their digest and register the DatasetVersion
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow.registry import domain
from loraflow.registry.drift import FormatProfile, Histogram, Profile, TokenStats, json_valid
from loraflow.registry.errors import InvalidArgumentError
from loraflow.registry.service import Registry
from loraflow.trainer.data import Example, Validation, token_stats
from loraflow.trainer.embed import Embedder, embedding_profile

SPLITS = ("train", "val", "test")
DATA_FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "profile.json", "report.json")
_WS = re.compile(r"\s+")


def normalized(example: Example) -> str:
    """The text two examples must share to count as exact duplicates (case and spacing ignored)."""
    return _WS.sub(" ", example.text().lower()).strip()


def fingerprint(example: Example) -> str:
    """What two examples share when they are the same after normalization (split overlap, sealing)."""
    return hashlib.sha256(normalized(example).encode()).hexdigest()


@dataclass(frozen=True)
class Dedup:
    kept: list[Example]
    exact_dropped: list[int]  # line numbers
    near_dropped: list[int]


def minhash(example: Example, *, num_perm: int = 128) -> Any:
    """The example's MinHash over its normalized text's word 3-shingles (seeded, so signatures
    from two calls compare): what near-duplicate detection compares."""
    from datasketch import MinHash

    words = normalized(example).split()
    signature = MinHash(num_perm=num_perm, seed=1)
    for i in range(max(1, len(words) - 2)):
        signature.update(" ".join(words[i : i + 3]).encode())
    return signature


def deduplicate(examples: list[Example], *, threshold: float = 0.85, num_perm: int = 128) -> Dedup:
    from datasketch import MinHashLSH

    seen: set[str] = set()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept: list[Example] = []
    exact: list[int] = []
    near: list[int] = []
    for ex in examples:
        fp = fingerprint(ex)
        if fp in seen:
            exact.append(ex.line)
            continue
        seen.add(fp)
        mh = minhash(ex, num_perm=num_perm)
        if lsh.query(mh):
            near.append(ex.line)
            continue
        lsh.insert(str(ex.line), mh)
        kept.append(ex)
    return Dedup(kept=kept, exact_dropped=exact, near_dropped=near)


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise InvalidArgumentError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must each be in [0, 1) "
            "and sum to less than 1",
            param="test_fraction",
        )


def split(
    examples: list[Example], *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Example]]:
    """Seeded split, stratified by label when any example has one."""
    check_fractions(val_fraction, test_fraction)
    strata: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        strata[ex.label or ""].append(ex)
    out: dict[str, list[Example]] = {name: [] for name in SPLITS}
    rng = random.Random(seed)
    for key in sorted(strata):
        group = sorted(strata[key], key=lambda e: e.line)
        rng.shuffle(group)
        n_test = round(len(group) * test_fraction)
        n_val = round(len(group) * val_fraction)
        out["test"] += group[:n_test]
        out["val"] += group[n_test : n_test + n_val]
        out["train"] += group[n_test + n_val :]
    for name in SPLITS:
        out[name].sort(key=lambda e: e.line)
    return out


def overlap(splits: dict[str, list[Example]]) -> dict[str, int]:
    """Examples shared between each pair of splits, after normalization."""
    prints = {name: {fingerprint(e) for e in exs} for name, exs in splits.items()}
    return {f"{a}-{b}": len(prints[a] & prints[b]) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1 :]}


def split_profile(train: list[Example], embedder: Embedder | None) -> Profile:
    """What drift is measured against: token lengths (totals, and quantile bins of prompt and output
    lengths as the engine counts them), the share of answers that are JSON, and prompt embeddings."""
    counted = [e for e in train if e.tokens is not None and e.prompt_tokens is not None]
    lengths = {}
    if counted:
        lengths = {
            "prompt_tokens": Histogram.from_values([e.prompt_tokens or 0 for e in counted]),
            # the answer, its end-of-turn token included: the engine's completion_tokens
            "output_tokens": Histogram.from_values(
                [(e.tokens or 0) - (e.prompt_tokens or 0) for e in counted]
            ),
        }
    answers = [e.messages[-1].content for e in train]
    return Profile(
        tokens=TokenStats.model_validate(token_stats([e.tokens for e in train if e.tokens is not None])),
        lengths=lengths,
        format=FormatProfile(json_share=round(sum(json_valid(a) for a in answers) / len(answers), 6)),
        embedding=(
            embedding_profile(embedder, [e.prompt_text() for e in train]) if embedder is not None else None
        ),
    )


def prepare(
    validation: Validation,
    *,
    name: str,
    registry: Registry,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    near_duplicate_threshold: float = 0.85,
    embedder: Embedder | None = None,
) -> tuple[domain.DatasetVersionInfo, dict[str, Any]]:
    if not validation.ok:
        raise InvalidArgumentError(
            f"{validation.path} has {len(validation.errors)} bad lines; "
            "run `loraflow data validate` to list them",
            param="FILE",
        )
    dedup = deduplicate(validation.examples, threshold=near_duplicate_threshold)
    splits = split(dedup.kept, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    shared = overlap(splits)
    if any(shared.values()):  # cannot happen after global dedup; checked, not assumed
        raise InvalidArgumentError(f"splits overlap after normalization: {shared}", param="FILE")
    if not splits["train"]:
        raise InvalidArgumentError(
            "no training examples left after deduplication and splitting", param="FILE"
        )

    profile = split_profile(splits["train"], embedder)
    report = {
        "source": str(validation.path),
        "input_examples": len(validation.examples),
        "exact_duplicates_dropped": len(dedup.exact_dropped),
        "near_duplicates_dropped": len(dedup.near_dropped),
        "dropped_lines": {"exact": dedup.exact_dropped, "near": dedup.near_dropped},
        "near_duplicate_threshold": near_duplicate_threshold,
        "seed": seed,
        "fractions": {"val": val_fraction, "test": test_fraction},
        "stratified_by_label": any(e.label for e in dedup.kept),
        "overlap_after_normalization": shared,
    }
    source_sha = hashlib.sha256(validation.path.read_bytes()).hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_dataset_files(folder, {k: [e.to_json() for e in v] for k, v in splits.items()}, profile, report)
        version = registry.register_dataset(
            name,
            folder,
            DATA_FILES,
            counts={k: len(v) for k, v in splits.items()},
            lineage={
                "kind": "file",
                "source": str(validation.path.resolve()),
                "source_sha256": source_sha,
                "seed": seed,
                "fractions": report["fractions"],
            }
            | (  # the tokenizer the token profile was counted with: train checks its base against it
                {"base_model": validation.base_model, "base_model_fingerprint": validation.base_fingerprint}
                if validation.base_fingerprint
                else {}
            ),
            profile=profile,
        )
    return version, report


def write_dataset_files(
    folder: Path, rows: dict[str, list[dict[str, Any]]], profile: Profile, report: dict[str, Any]
) -> None:
    """The files of a dataset version (:data:`DATA_FILES`): one JSONL per split, the profile, the report."""
    for name in SPLITS:
        with (folder / f"{name}.jsonl").open("w") as fh:
            for row in rows.get(name, []):
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    (folder / "profile.json").write_text(json.dumps(profile.to_json(), indent=2))
    (folder / "report.json").write_text(json.dumps(report, indent=2))


def load_split(
    registry: Registry, version: domain.DatasetVersionInfo, split_name: str
) -> list[dict[str, Any]]:
    """The rows of one split of a registered dataset version, verified against its digest."""
    return split_rows(registry.dataset_split(version, split_name))


def split_rows(raw: bytes) -> list[dict[str, Any]]:
    """The JSON objects of a split's JSONL file."""
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
