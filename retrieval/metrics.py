"""Retrieval evaluation: recall@k and ranks both ways, computed in bounded memory."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class RecallResult:
    """Retrieval quality both ways on one set of images and captions.

    `t2i` / `i2t`: {"R@k": percent of queries whose right answer is in the top k, ...,
    "median_rank", "mean_rank"}; `rsum`: the sum of the R@k of both ways.
    """

    t2i: dict[str, float]
    i2t: dict[str, float]
    rsum: float
    n_images: int
    n_captions: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (`seesay eval --json`'s keys)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RecallResult":
        """Back from the JSON form (keys other than the fields, such as `encoder`, are left out)."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(RecallResult)})


def recall_at_k(
    image_vecs: np.ndarray,
    text_vecs: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 128,
) -> RecallResult:
    """Score every caption against every image by inner product and report retrieval quality.

    text→image: a caption's rank is that of its own image. image→text: an image's rank is
    that of its best-scoring caption, so an image is a hit at k when any of its captions is
    in its top k (the CLIP paper / CLIP_benchmark convention). A rank is 1 + the number of
    wrong items scoring at least as high as the best correct one: ties count against the
    query, as with CLIP_benchmark's top-k, which may put any tied wrong item first. (Counting
    ties in the query's favour lets an encoder that scores everything alike reach 100%.)
    Scores are computed `chunk` queries at a time, never as the full matrix.

    Returns a RecallResult: recalls are percentages and rsum sums the R@k of both ways.
    Every image needs at least one caption.
    """
    image_vecs, text_vecs, text_to_image = _validate(image_vecs, text_vecs, text_to_image, ks, chunk)
    n_images = len(image_vecs)
    t2i_ranks = [
        _ranks(text_vecs[s:e] @ image_vecs.T, np.arange(e - s), text_to_image[s:e])
        for s, e in _spans(len(text_vecs), chunk)
    ]
    # Captions grouped by image, so each image chunk's correct pairs are one contiguous slice.
    order = np.argsort(text_to_image, kind="stable")
    starts = np.searchsorted(text_to_image[order], np.arange(n_images + 1))
    i2t_ranks = []
    for s, e in _spans(n_images, chunk):
        captions = order[starts[s] : starts[e]]
        i2t_ranks.append(_ranks(image_vecs[s:e] @ text_vecs.T, text_to_image[captions] - s, captions))

    t2i = _summary(np.concatenate(t2i_ranks), ks)
    i2t = _summary(np.concatenate(i2t_ranks), ks)
    rsum = sum(t2i[f"R@{k}"] + i2t[f"R@{k}"] for k in ks)
    return RecallResult(t2i, i2t, float(rsum), n_images, len(text_vecs))


def _spans(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _ranks(scores: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """1-based rank of each query's best correct item, after every wrong item that ties with it.

    (rows[j], cols[j]) are the correct pairs.
    """
    correct = scores[rows, cols]
    best = np.full(len(scores), -np.inf, dtype=scores.dtype)
    np.maximum.at(best, rows, correct)
    correct_at_best = np.zeros(len(scores), dtype=np.int64)
    np.add.at(correct_at_best, rows, correct >= best[rows])
    return 1 + (scores >= best[:, None]).sum(axis=1) - correct_at_best


def _summary(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    out = {f"R@{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}
    out["median_rank"] = float(np.median(ranks))
    out["mean_rank"] = float(np.mean(ranks))
    return out


def _validate(
    image_vecs: np.ndarray, text_vecs: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int], chunk: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    dtype = np.result_type(image_vecs, text_vecs, np.float32)
    image_vecs = np.asarray(image_vecs, dtype=dtype)
    text_vecs = np.asarray(text_vecs, dtype=dtype)
    text_to_image = np.asarray(text_to_image)
    if image_vecs.ndim != 2 or text_vecs.ndim != 2 or image_vecs.shape[1] != text_vecs.shape[1]:
        raise ValueError(
            f"image_vecs {image_vecs.shape} and text_vecs {text_vecs.shape} must be 2-D with the same width"
        )
    if len(image_vecs) == 0 or len(text_vecs) == 0:
        raise ValueError("recall needs at least one image and one caption")
    if text_to_image.shape != (len(text_vecs),) or not np.issubdtype(text_to_image.dtype, np.integer):
        raise ValueError(f"text_to_image must be {len(text_vecs)} integers, one per caption; got {text_to_image.shape} {text_to_image.dtype}")
    bad = np.flatnonzero((text_to_image < 0) | (text_to_image >= len(image_vecs)))
    if bad.size:
        raise ValueError(f"caption {bad[0]} points at image {text_to_image[bad[0]]}, outside 0..{len(image_vecs) - 1}")
    uncaptioned = np.flatnonzero(np.bincount(text_to_image, minlength=len(image_vecs)) == 0)
    if uncaptioned.size:
        raise ValueError(f"{uncaptioned.size} images have no caption (first: image {uncaptioned[0]}); image→text recall needs one")
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    return image_vecs, text_vecs, text_to_image
