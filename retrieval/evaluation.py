"""Evaluate an encoder on a captioned dataset: recall@k both ways, ranks, RSUM.

Two steps that benchmarks reuse: `embed` encodes the captioned images that decode and all their
captions; `score` turns those vectors into recall the way the encoder searches (hubness-corrected
queries when it carries a query bank, and then also the plain scores).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from retrieval.datasets import Record
from retrieval.embedding import encode_captions, encode_image_files
from retrieval.encoders.base import Encoder, as_float32_rows
from retrieval.errors import BadDataError
from retrieval.metrics import RecallResult, recall_at_k
from retrieval.progress import progress_bar


@dataclasses.dataclass(frozen=True)
class Evaluation(RecallResult):
    """`evaluate`'s result: recall as the encoder searches, the plain recall too when that differs, the encoder, what was skipped."""

    without_hubness: RecallResult | None = None  # the same vectors without the bias coordinate
    encoder: str = ""
    problems: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: `seesay eval --json`."""
        out = RecallResult.to_dict(self)
        for key in ("without_hubness", "encoder", "problems"):
            del out[key]
        if self.without_hubness is not None:
            out["without_hubness"] = {"t2i": self.without_hubness.t2i, "i2t": self.without_hubness.i2t,
                                      "rsum": self.without_hubness.rsum}
        out.update(encoder=self.encoder, problems=list(self.problems))
        return out


@dataclasses.dataclass(frozen=True)
class Embedded:
    """A captioned set encoded: the images that decoded, all their captions, each caption's image, what failed."""

    image_vecs: np.ndarray
    text_vecs: np.ndarray
    owner: np.ndarray
    problems: list[str]


def evaluate(encoder: Encoder, records: Sequence[Record], batch_size: int = 64, progress: bool = False) -> Evaluation:
    """Metrics of `encoder` on the captioned records; unreadable images are left out and listed."""
    return score(encoder, embed(encoder, records, batch_size, progress))


def embed(encoder: Encoder, records: Sequence[Record], batch_size: int = 64, progress: bool = False) -> Embedded:
    """Encode the captioned records' images (those that decode) and all their captions."""
    captioned = [r for r in records if r.captions]
    if not captioned:
        raise BadDataError("nothing to evaluate: no image with a caption")
    with progress_bar(len(captioned), "encoding images", progress) as advance:
        image_vecs, kept, failed = encode_image_files(encoder, [r.image_path for r in captioned], batch_size, advance=advance)
    image_vecs = as_float32_rows(image_vecs, encoder.dim)
    if not kept:
        raise BadDataError("nothing to evaluate: no image could be read")
    kept_records = [captioned[i] for i in kept]
    texts = [c for r in kept_records for c in r.captions]
    owner = np.repeat(np.arange(len(kept_records)), [len(r.captions) for r in kept_records])
    with progress_bar(len(texts), "encoding captions", progress) as advance:
        text_vecs = as_float32_rows(encode_captions(encoder, texts, advance=advance), encoder.dim)
    return Embedded(image_vecs, text_vecs, owner, [str(error) for error in failed.values()])


def score(encoder: Encoder, embedded: Embedded) -> Evaluation:
    """Recall@k of `embedded` as `encoder` searches; with a query bank, also the plain scores (`without_hubness`)."""
    result = cross_modal_recall(encoder, embedded.image_vecs, embedded.text_vecs, embedded.owner)
    plain = None
    if getattr(encoder, "querybank", None) is not None:
        plain = recall_at_k(embedded.image_vecs[:, :-1], embedded.text_vecs[:, :-1], embedded.owner)
    return Evaluation(**dataclasses.asdict(result), without_hubness=plain, encoder=encoder.spec,
                      problems=embedded.problems)


def cross_modal_recall(encoder: Encoder, image_vecs: np.ndarray, text_vecs: np.ndarray, owner: np.ndarray,
                       ks: Sequence[int] = (1, 5, 10)) -> RecallResult:
    """`recall_at_k` with each direction's queries in the form the encoder searches with (`Encoder.as_queries`)."""
    image_queries = encoder.as_queries(image_vecs, cross_modal=True)
    t2i = recall_at_k(image_vecs, encoder.as_queries(text_vecs, cross_modal=True), owner, ks)
    if image_queries is image_vecs:
        return t2i  # plain inner products: one pass gives both directions
    i2t = recall_at_k(image_queries, text_vecs, owner, ks)
    return dataclasses.replace(t2i, i2t=i2t.i2t, rsum=float(sum(t2i.t2i[f"R@{k}"] + i2t.i2t[f"R@{k}"] for k in ks)))
