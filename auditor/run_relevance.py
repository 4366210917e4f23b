"""The copy of the relevance matrix a run keeps (``relevance.npz`` in its folder): its one layout, written and read here.

The store writes it when the audit starts; the report's heatmap and the comparison of two runs read it back. Plain
arrays only (matrix, categories, head names), so reading it never unpickles anything.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from auditor.errors import AuditorError

RELEVANCE_NAME = "relevance.npz"


@dataclass(frozen=True)
class Relevance:
    categories: list[str]
    head_names: list[str]
    matrix: np.ndarray  # [categories, heads]

    def top(self, category: str, k: int) -> list[str]:
        row = self.matrix[self.categories.index(category)]
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))  # ties broken by head order: stable across runs
        return [self.head_names[i] for i in order[:k]]


def relevance_bytes(categories, head_names, matrix: np.ndarray) -> bytes:
    """The ``relevance.npz`` content of a [categories, heads] matrix; a ValueError when the shapes disagree."""
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.shape != (len(categories), len(head_names)):
        raise ValueError(f"relevance matrix shape {matrix.shape} != ({len(categories)}, {len(head_names)})")
    buf = io.BytesIO()
    np.savez_compressed(buf, matrix=matrix, categories=np.array(list(categories), dtype=str),
                        head_names=np.array(list(head_names), dtype=str))
    return buf.getvalue()


def read_relevance(path: Path) -> Relevance | None:
    """The run's ``relevance.npz``, or None when the run has none."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            rel = Relevance([str(c) for c in z["categories"]], [str(h) for h in z["head_names"]],
                            np.asarray(z["matrix"], dtype=np.float64))
    except (EOFError, zipfile.BadZipFile, OSError, KeyError, ValueError) as exc:
        raise AuditorError(f"{path}: unreadable relevance matrix ({exc})") from None
    if rel.matrix.shape != (len(rel.categories), len(rel.head_names)):
        raise AuditorError(f"{path}: matrix shape {rel.matrix.shape} does not match its categories and heads")
    return rel
