"""Bag-of-words baselines: caption words against visual words through a co-occurrence θ.

The score is F(image, caption) = aᵀ θ b with a the image's visual words (colour
histogram and/or object-label weights, each block summing to 1) and b the 0/1
presence of vocabulary words in the caption. θ is projected onto the image side:
an image is encoded as a, a caption as θ b, so F is an inner product and one FAISS
index serves both directions. Scaling (documented in `BowConfig`): image vectors
are left as distributions (`image_norm="l1"`, the default) or L2-normalised (`"l2"`); caption
vectors θ b are L2-normalised (`text_norm="l2"`), averaged over the caption's
words (`"mean"`) or left as sums (`"none"`). Both choices only rescale whole rows,
so they change rankings across items, never the words that match.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from retrieval.cooccurrence import fit_theta
from retrieval.datasets import Record
from retrieval.encoders.base import Encoder
from retrieval.errors import BadImageError, EncoderError
from retrieval.images import ImageInput, batched, decode_many, load_rgb
from retrieval.progress import track
from retrieval.text import Vocabulary, tokenize
from retrieval.visual_words import ColourWords, ObjectWords, VisualWords

KIND_TO_THETA = {"bow-pmi": "pmi", "bow-ratio": "ratio"}


@dataclass
class BowConfig:
    """Settings of a bag-of-words encoder (all JSON-serialisable)."""

    theta: str = "pmi"
    alpha: float = 0.001
    positive: bool = True
    colours: int = 64  # k-means colour words; 0 turns colour words off
    objects: int = 20  # top-k ImageNet labels as object words; 0 turns them off
    colour_weight: float = 0.5
    stem: bool = True
    stop_words: bool = True
    min_count: int = 2
    image_norm: str = "l1"
    text_norm: str = "l2"


def visual_words(config: BowConfig, colours: ColourWords | None) -> VisualWords:
    """The visual-word extractor that `config` asks for, around a fitted colour codebook."""
    objects = ObjectWords(config.objects) if config.objects else None
    return VisualWords(colours if config.colours else None, objects, config.colour_weight)


def _normalise(rows: np.ndarray, how: str, counts: np.ndarray | None = None) -> np.ndarray:
    if how == "l2":
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    if how == "l1":
        return rows / np.maximum(np.abs(rows).sum(1, keepdims=True), 1e-12)
    if how == "mean" and counts is not None:
        return rows / np.maximum(counts, 1.0)[:, None]
    if how == "none":
        return rows
    raise EncoderError(f"unknown normalisation {how!r}")


class BowEncoder(Encoder):
    """Bag-of-words captions × visual words, scored by a fitted co-occurrence θ."""

    kind = "bow-pmi"

    def __init__(self, config: BowConfig, vocabulary: Vocabulary, theta: np.ndarray, colours: ColourWords | None) -> None:
        self.settings = config
        self.kind = "bow-pmi" if config.theta == "pmi" else "bow-ratio"
        self.vocabulary = vocabulary
        self.visual_words = visual_words(config, colours)
        self.theta = np.ascontiguousarray(theta, dtype=np.float32)
        if self.theta.shape != (self.visual_words.size, len(vocabulary)):
            raise EncoderError(
                f"θ has shape {self.theta.shape}, expected ({self.visual_words.size}, {len(vocabulary)}) "
                "for these visual words and vocabulary"
            )

    @property
    def dim(self) -> int:
        return self.theta.shape[0]

    def caption_words(self, texts: Sequence[str]) -> np.ndarray:
        """(n, |V|) 0/1 presence of vocabulary words."""
        s = self.settings
        return self.vocabulary.presence([tokenize(t, s.stem, s.stop_words) for t in texts])

    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        rows = [np.zeros((0, self.dim), dtype=np.float32)]
        for batch in track(batched(images, batch_size), len(images), "encoding images", progress):
            words = self.visual_words([load_rgb(im) for im in batch])
            rows.append(_normalise(words, self.settings.image_norm).astype(np.float32))
        return np.concatenate(rows)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        rows = [np.zeros((0, self.dim), dtype=np.float32)]
        for batch in track(batched(texts, batch_size), len(texts), "encoding captions", progress):
            words = self.caption_words(batch)
            projected = words @ self.theta.T
            rows.append(_normalise(projected, self.settings.text_norm, words.sum(1)).astype(np.float32))
        return np.concatenate(rows)

    def config(self) -> dict[str, Any]:
        return asdict(self.settings)

    def save_weights(self, directory: Path) -> None:
        np.save(directory / "theta.npy", self.theta)
        (directory / "vocabulary.json").write_text(json.dumps(self.vocabulary.words))
        if self.visual_words.colours:
            np.save(directory / "colour_centroids.npy", self.visual_words.colours.centroids)

    @classmethod
    def from_saved(cls, directory: Path, config: dict[str, Any]) -> "BowEncoder":
        try:
            settings = BowConfig(**config)
            vocabulary = Vocabulary(json.loads((directory / "vocabulary.json").read_text()))
            theta = np.load(directory / "theta.npy")
            colours = ColourWords(np.load(directory / "colour_centroids.npy")) if settings.colours else None
        except (OSError, ValueError, TypeError) as exc:
            raise EncoderError(f"{directory}: cannot load bag-of-words encoder: {exc}") from exc
        return cls(settings, vocabulary, theta, colours)


def fit_bow(records: Sequence[Record], config: BowConfig, progress: bool = False) -> tuple[BowEncoder, list[str]]:
    """Fit vocabulary, colour codebook and θ on training pairs; return the encoder and skipped items."""
    problems: list[str] = []
    images: list[Image.Image] = []
    captions: list[list[str]] = []
    for record, decoded in zip(records, decode_many([r.image_path for r in records])):
        if isinstance(decoded, BadImageError):
            problems.append(str(decoded))
        elif record.captions:
            decoded.thumbnail((320, 320))
            images.append(decoded)
            captions.append(record.captions)
    if not images:
        raise EncoderError("no usable training pairs: every image was missing or unreadable, or had no caption")
    tokens = [[tokenize(c, config.stem, config.stop_words) for c in caps] for caps in captions]
    vocabulary = Vocabulary.build((t for caps in tokens for t in caps), config.min_count)
    if not len(vocabulary):
        raise EncoderError(f"no caption word occurs {config.min_count}+ times; lower --min-count or add data")
    colours = ColourWords.fit(images, config.colours) if config.colours else None
    extract = visual_words(config, colours)
    image_words = np.concatenate(
        [extract(batch) for batch in track(batched(images, 64), len(images), "visual words", progress)]
    )
    owner = np.repeat(np.arange(len(images)), [len(caps) for caps in tokens])
    caption_words = vocabulary.presence([t for caps in tokens for t in caps])
    theta = fit_theta(image_words[owner], caption_words, config.theta, config.alpha, config.positive)
    return BowEncoder(config, vocabulary, theta, colours), problems

