"""Near-duplicate detection: a faiss inner-product index over unit-length pooled CLIP embeddings."""

from __future__ import annotations

import numpy as np


class Deduplicator:
    """Keeps the first of near-duplicates: `check(key, vector)` returns the earlier key it duplicates, or
    None (and then remembers this one). Cosine >= threshold counts as a duplicate."""

    def __init__(self, threshold: float):
        self.threshold = float(threshold)
        self.index = None
        self.keys: list[str] = []

    def _ensure(self, dim: int):
        import faiss

        if self.index is None:
            self.index = faiss.IndexFlatIP(dim)
        elif self.index.d != dim:
            raise ValueError(f"embedding dimension {dim} differs from the index's {self.index.d}")

    @staticmethod
    def _unit(vectors: np.ndarray) -> np.ndarray:
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        return np.ascontiguousarray(
            vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        )

    def add(self, keys: list[str], vectors: np.ndarray) -> None:
        """Remember samples already written (e.g. loaded back from done shards on resume)."""
        if len(keys) == 0:
            return
        vectors = self._unit(vectors)
        self._ensure(vectors.shape[1])
        self.index.add(vectors)
        self.keys.extend(keys)

    def check(self, key: str, vector: np.ndarray) -> str | None:
        vector = self._unit(vector)
        self._ensure(vector.shape[1])
        if self.index.ntotal:
            scores, ids = self.index.search(vector, 1)
            if ids[0, 0] >= 0 and scores[0, 0] >= self.threshold:
                return self.keys[int(ids[0, 0])]
        self.index.add(vector)
        self.keys.append(key)
        return None

    def __len__(self) -> int:
        return len(self.keys)
