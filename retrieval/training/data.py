"""Training pairs: a split's captioned images that decoded, and each epoch's batches of them.

Both trainers batch the same way: every image once per epoch with one randomly chosen caption,
so a batch never holds two captions of one image (they would be each other's negatives).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from retrieval.datasets import Dataset, Record
from retrieval.training.config import TrainingError


def epoch_batches(n_images: int, caption_counts: np.ndarray, batch_size: int, seed: int, epoch: int,
                  n_views: int = 1) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Shuffled batches of (image indices, caption index within image, view) for one epoch.

    Every image appears once per epoch with one randomly chosen caption, so a batch never
    holds two captions of the same image. The same (seed, epoch) gives the same batches.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n_images)
    caption = (rng.random(n_images) * caption_counts[order]).astype(np.int64)
    view = rng.integers(0, n_views, n_images)
    out = []
    for s in range(0, n_images, batch_size):
        if n_images - s < 2:
            break
        out.append((order[s : s + batch_size], caption[s : s + batch_size], view[s : s + batch_size]))
    return out


def captioned(ds: Dataset, max_captions: int | None = None) -> tuple[list[Record], list[str]]:
    """The records with captions (at most `max_captions` each, the first ones) and a problem line per one without."""
    records = [dataclasses.replace(r, captions=r.captions[:max_captions]) for r in ds.records if r.captions]
    return records, [f"{r.image_name}: no captions" for r in ds.records if not r.captions]


class PairSplit:
    """A split's images that decoded, their captions in one list, and where each image's captions start.

    Subclasses hold the inputs of the trained parts (cached features) and call `_keep` once
    they know which images could not be read.
    """

    records: list[Record]
    problems: list[str]
    n_views: int = 1

    def _keep(self, records: list[Record], bad: dict[int, str], name: str) -> list[int]:
        """Keep the readable `records`, listing the others in `problems`; the kept indices."""
        self.problems += [f"{records[i].image_name}: skipped, {reason}" for i, reason in sorted(bad.items())]
        keep = [i for i in range(len(records)) if i not in bad]
        if not keep:
            raise TrainingError(f"{name}: no readable images ({len(bad)} bad)")
        self.records = [records[i] for i in keep]
        self.captions = [c for r in self.records for c in r.captions]
        self.caption_start = np.cumsum([0] + [len(r.captions) for r in self.records])
        self.text_to_image = np.repeat(np.arange(len(self.records)), [len(r.captions) for r in self.records])
        return keep

    def batches(self, batch_size: int, seed: int, epoch: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """`epoch_batches` of this split."""
        return epoch_batches(len(self.records), np.diff(self.caption_start), batch_size, seed, epoch, self.n_views)

    def caption_ids(self, images: np.ndarray, caption: np.ndarray) -> list[int]:
        """Indices into `captions` of caption number `caption[j]` of image `images[j]`."""
        return (self.caption_start[images] + caption).tolist()
