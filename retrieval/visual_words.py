"""Images → visual words: colour words (k-means bins of pixel colours) and object words
(top ImageNet labels of the pretrained EfficientNet-Lite0)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
from PIL import Image

from indexer.files import atomic_path
from retrieval.cache import cache_root

THUMB = 48  # images are shrunk to THUMB×THUMB before their pixels are counted


def _pixels(image: Image.Image) -> np.ndarray:
    """An image's pixels as (THUMB², 3) float32 RGB values in [0, 1]."""
    small = image.resize((THUMB, THUMB), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float32).reshape(-1, 3) / 255.0


class ColourWords:
    """A k-means codebook over pixel colours; an image's words are its histogram over the k bins."""

    def __init__(self, centroids: np.ndarray) -> None:
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self._index = faiss.IndexFlatL2(3)
        self._index.add(self.centroids)

    @property
    def size(self) -> int:
        return len(self.centroids)

    @classmethod
    def fit(cls, images: Sequence[Image.Image], k: int = 64, pixels_per_image: int = 256, seed: int = 0) -> "ColourWords":
        """Fit k colour centroids on a sample of pixels from `images`."""
        rng = np.random.default_rng(seed)
        samples = []
        for image in images:
            pixels = _pixels(image)
            samples.append(pixels[rng.choice(len(pixels), size=min(pixels_per_image, len(pixels)), replace=False)])
        data = np.concatenate(samples)
        k = min(k, len(np.unique(data, axis=0)))
        kmeans = faiss.Kmeans(3, k, niter=25, seed=seed, verbose=False, max_points_per_centroid=2048)
        kmeans.train(data)
        return cls(kmeans.centroids)

    def histograms(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, k) rows summing to 1: the share of each image's pixels nearest each centroid."""
        out = np.zeros((len(images), self.size), dtype=np.float32)
        for row, image in enumerate(images):
            _, bins = self._index.search(_pixels(image), 1)
            out[row] = np.bincount(bins[:, 0], minlength=self.size) / float(len(bins))
        return out


class ObjectWords:
    """The top-k ImageNet labels of EfficientNet-Lite0, weighted by their renormalised probability.

    Each image's top CACHED_LABELS labels are cached on disk under `cache_root()/objects`,
    keyed by a hash of its decoded pixels, so refitting or re-evaluating skips the network.
    """

    size = 1000
    CACHED_LABELS = 50

    def __init__(self, top_k: int = 5, batch_size: int = 32, cache: bool = True) -> None:
        if not 1 <= top_k <= self.CACHED_LABELS:
            raise ValueError(f"object words: top-k must be 1..{self.CACHED_LABELS}, got {top_k}")
        self.top_k = top_k
        self.batch_size = batch_size
        from retrieval.backbones.efficientnet import PREPROCESS_ID

        self.cache_dir = cache_root() / "objects" / PREPROCESS_ID if cache else None

    def _cache_path(self, image: Image.Image) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha1(f"{image.size}".encode() + image.tobytes()).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.npy"

    def _top_labels(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """Per image, a (2, CACHED_LABELS) array: label ids and their probabilities, best first."""
        import torch

        from retrieval.backbones.efficientnet import load_efficientnet_lite0, pooled_and_logits, preprocess

        paths = [self._cache_path(im) for im in images]
        found = [np.load(p) if p is not None and p.is_file() else None for p in paths]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            model, transform = load_efficientnet_lite0(), preprocess()
            for start in range(0, len(missing), self.batch_size):
                rows = missing[start : start + self.batch_size]
                _, logits = pooled_and_logits(model, torch.stack([transform(images[i]) for i in rows]))
                probs, labels = logits.softmax(-1).topk(self.CACHED_LABELS, dim=-1)
                for i, lab, prob in zip(rows, labels.numpy(), probs.numpy()):
                    found[i] = np.stack([lab.astype(np.float32), prob])
                    if paths[i] is not None:
                        with atomic_path(paths[i]) as tmp, tmp.open("wb") as f:
                            np.save(f, found[i])
        return found

    def weights(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, 1000) rows summing to 1 over each image's top-k labels."""
        out = np.zeros((len(images), self.size), dtype=np.float32)
        for row, top in enumerate(self._top_labels(images)):
            labels, probs = top[0, : self.top_k].astype(np.int64), top[1, : self.top_k]
            out[row, labels] = probs / probs.sum()
        return out


class VisualWords:
    """Colour words and object words side by side; each enabled block sums to its weight."""

    def __init__(self, colours: ColourWords | None, objects: ObjectWords | None, colour_weight: float = 0.5) -> None:
        if colours is None and objects is None:
            raise ValueError("at least one kind of visual word (colours or objects) is needed")
        self.colours = colours
        self.objects = objects
        self.colour_weight = colour_weight if (colours and objects) else 1.0

    @property
    def size(self) -> int:
        return (self.colours.size if self.colours else 0) + (self.objects.size if self.objects else 0)

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, size) visual-word weights of `images`."""
        blocks = []
        if self.colours:
            blocks.append(self.colour_weight * self.colours.histograms(images))
        if self.objects:
            blocks.append((1.0 - self.colour_weight if self.colours else 1.0) * self.objects.weights(images))
        return np.concatenate(blocks, axis=1)
