"""recall_at_k against an independent, full-matrix implementation of CLIP_benchmark's formula."""
from __future__ import annotations

import numpy as np
import pytest

from retrieval.metrics import recall_at_k


def reference_recall(images: np.ndarray, texts: np.ndarray, text_to_image: np.ndarray, k: int) -> tuple[float, float]:
    """CLIP_benchmark's zero-shot retrieval recall, on the full score matrix: (t2i, i2t) in percent."""
    scores = texts @ images.T
    positive_pairs = np.zeros_like(scores, dtype=bool)
    positive_pairs[np.arange(len(texts)), text_to_image] = True

    def recall(scores: np.ndarray, positive_pairs: np.ndarray) -> float:
        topk = np.argsort(-scores, axis=1)[:, :k]
        nb_true_positive = np.take_along_axis(positive_pairs, topk, axis=1).sum(axis=1)
        return float((nb_true_positive > 0).mean() * 100)

    return recall(scores, positive_pairs), recall(scores.T, positive_pairs.T)


def reference_ranks(images: np.ndarray, texts: np.ndarray, text_to_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based rank of the first correct item in a full sort, for each caption and each image."""
    scores = texts @ images.T
    order_t2i = np.argsort(-scores, axis=1)
    t2i = np.array([np.flatnonzero(row == text_to_image[i])[0] + 1 for i, row in enumerate(order_t2i)])
    order_i2t = np.argsort(-scores.T, axis=1)
    i2t = np.array([np.flatnonzero(text_to_image[row] == j)[0] + 1 for j, row in enumerate(order_i2t)])
    return t2i, i2t


def check_against_reference(images: np.ndarray, texts: np.ndarray, text_to_image: np.ndarray, chunk: int) -> None:
    ks = (1, 5, 10)
    got = recall_at_k(images, texts, text_to_image, ks=ks, chunk=chunk)
    t2i_ranks, i2t_ranks = reference_ranks(images, texts, text_to_image)
    for k in ks:
        t2i, i2t = reference_recall(images, texts, text_to_image, k)
        assert got.t2i[f"R@{k}"] == pytest.approx(t2i)
        assert got.i2t[f"R@{k}"] == pytest.approx(i2t)
    for direction, ranks in (("t2i", t2i_ranks), ("i2t", i2t_ranks)):
        assert getattr(got, direction)["median_rank"] == pytest.approx(np.median(ranks))
        assert getattr(got, direction)["mean_rank"] == pytest.approx(np.mean(ranks))
    expected_rsum = sum(sum(reference_recall(images, texts, text_to_image, k)) for k in ks)
    assert got.rsum == pytest.approx(expected_rsum)
    assert (got.n_images, got.n_captions) == (len(images), len(texts))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_clip_benchmark_on_random_embeddings(seed: int) -> None:
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((50, 16))
    text_to_image = np.repeat(np.arange(50), 5)
    # Captions near their image, so recall sits between 0 and 100 and every k matters.
    texts = images[text_to_image] + 1.5 * rng.standard_normal((250, 16))
    check_against_reference(images, texts, text_to_image, chunk=7)


def test_matches_clip_benchmark_with_unequal_captions_per_image() -> None:
    rng = np.random.default_rng(3)
    images = rng.standard_normal((40, 16)).astype(np.float32)
    counts = np.where(np.arange(40) % 2 == 0, 1, 3)
    text_to_image = rng.permutation(np.repeat(np.arange(40), counts))
    texts = images[text_to_image] + 1.2 * rng.standard_normal((len(text_to_image), 16)).astype(np.float32)
    check_against_reference(images, texts, text_to_image, chunk=6)


def test_chunk_size_does_not_change_the_result() -> None:
    rng = np.random.default_rng(4)
    images = rng.standard_normal((30, 8))
    text_to_image = rng.integers(0, 30, 90)
    text_to_image[:30] = np.arange(30)
    texts = images[text_to_image] + rng.standard_normal((90, 8))
    assert recall_at_k(images, texts, text_to_image, chunk=1) == recall_at_k(images, texts, text_to_image, chunk=1000)


def test_hand_made_case_with_known_answer() -> None:
    # Three images on the axes; captions placed so their ranks are known by construction.
    images = np.eye(3)
    texts = np.array(
        [
            [1.0, 0.0, 0.0],  # image 0: rank 1
            [0.1, 0.9, 0.0],  # image 0: image 1 scores higher -> rank 2
            [0.0, 1.0, 0.0],  # image 1: rank 1
            [0.2, 0.3, 0.5],  # image 1: image 2 scores 0.5, image 1 0.3 -> rank 2
            [0.5, 0.3, 0.2],  # image 2: last -> rank 3
        ]
    )
    text_to_image = np.array([0, 0, 1, 1, 2])
    got = recall_at_k(images, texts, text_to_image, ks=(1, 2))

    assert got.t2i == {"R@1": 40.0, "R@2": 80.0, "median_rank": 2.0, "mean_rank": 1.8}
    # Image 0's best caption (0) and image 1's (2) come first; image 2's only caption
    # scores 0.2 and is beaten by caption 3 (0.5) -> ranks 1, 1, 2.
    assert got.i2t == {"R@1": pytest.approx(200 / 3), "R@2": 100.0, "median_rank": 1.0, "mean_rank": pytest.approx(4 / 3)}
    assert got.rsum == pytest.approx(40 + 80 + 200 / 3 + 100)


def test_ties_count_against_the_query() -> None:
    # Two identical images with identical captions: a tie is no evidence of retrieval.
    images = np.array([[1.0, 0.0], [1.0, 0.0]])
    texts = np.array([[1.0, 0.0], [1.0, 0.0]])
    got = recall_at_k(images, texts, np.array([0, 1]), ks=(1, 2))
    assert (got.t2i["R@1"], got.t2i["R@2"], got.t2i["median_rank"]) == (0.0, 100.0, 2.0)
    assert (got.i2t["R@1"], got.i2t["R@2"], got.i2t["median_rank"]) == (0.0, 100.0, 2.0)


def test_an_encoder_that_scores_everything_alike_gets_chance_or_worse() -> None:
    # Every vector the same: every caption ties with every image.
    text_to_image = np.repeat(np.arange(10), 3)
    got = recall_at_k(np.ones((10, 4)), np.ones((30, 4)), text_to_image, ks=(1, 10))
    assert got.t2i == {"R@1": 0.0, "R@10": 100.0, "median_rank": 10.0, "mean_rank": 10.0}
    # An image's 3 correct captions tie with each other (no penalty) and with the 27 wrong ones.
    assert got.i2t["R@1"] == 0.0 and got.i2t["median_rank"] == 28.0


def test_a_correct_caption_tied_with_its_image_s_other_caption_is_no_penalty() -> None:
    images = np.eye(2)
    texts = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    got = recall_at_k(images, texts, np.array([0, 0, 1]), ks=(1,))
    assert got.i2t["R@1"] == 100.0 and got.t2i["R@1"] == 100.0


@pytest.mark.parametrize(
    ("images", "texts", "text_to_image", "message"),
    [
        (np.ones((2, 3)), np.ones((2, 4)), np.array([0, 1]), "same width"),
        (np.ones((2, 3)), np.ones((2, 3)), np.array([0]), "one per caption"),
        (np.ones((2, 3)), np.ones((2, 3)), np.array([0.0, 1.0]), "integers"),
        (np.ones((2, 3)), np.ones((2, 3)), np.array([0, 2]), "caption 1 points at image 2"),
        (np.ones((2, 3)), np.ones((2, 3)), np.array([0, 0]), "image 1"),
    ],
)
def test_bad_input_is_named(images, texts, text_to_image, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        recall_at_k(images, texts, text_to_image)
