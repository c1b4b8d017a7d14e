"""The bilinear co-occurrence model θ[i, j] between visual words i and caption words j.

Fitted from training pairs (image words a, caption words b) by soft counts
count(i, j) = Σ_pairs a_i b_j, count(i) = Σ a_i, count(j) = Σ b_j, then either
  ratio: θ = count(i, j) / (count(i) + count(j))
  pmi:   θ = log p(i, j) / (p(i) p(j)), add-α smoothed, clipped at 0 for positive PMI.
The score of an image and a caption is F = aᵀ θ b.
"""
from __future__ import annotations

import numpy as np

THETA_KINDS = ("ratio", "pmi")


def cooccurrence_counts(image_words: np.ndarray, caption_words: np.ndarray) -> np.ndarray:
    """count(i, j) summed over aligned rows (pairs) of image words and caption words."""
    return (image_words.T.astype(np.float64) @ caption_words.astype(np.float64))


def fit_theta(
    image_words: np.ndarray,
    caption_words: np.ndarray,
    kind: str = "pmi",
    alpha: float = 0.1,
    positive: bool = True,
) -> np.ndarray:
    """θ (n_visual, n_text) from aligned training pairs, as ratio or (positive) PMI."""
    if kind not in THETA_KINDS:
        raise ValueError(f"theta kind must be one of {THETA_KINDS}, got {kind!r}")
    counts = cooccurrence_counts(image_words, caption_words)
    if kind == "ratio":
        count_i = image_words.sum(0, dtype=np.float64)[:, None]
        count_j = caption_words.sum(0, dtype=np.float64)[None, :]
        theta = counts / np.maximum(count_i + count_j, 1e-12)
    else:
        joint = counts + alpha
        joint /= joint.sum()
        with np.errstate(divide="ignore"):  # alpha=0 gives log 0 = -inf for unseen pairs, as it should
            theta = np.log(joint) - np.log(joint.sum(1, keepdims=True)) - np.log(joint.sum(0, keepdims=True))
        if positive:
            theta = np.maximum(theta, 0.0)
    return theta.astype(np.float32)
