"""Evaluate an encoder on a captioned dataset: recall@k both ways, ranks, RSUM."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from retrieval.datasets import Record
from retrieval.embedding import encode_captions, encode_image_files
from retrieval.encoders.base import Encoder, as_float32_rows
from retrieval.errors import BadDataError
from retrieval.metrics import recall_at_k
from retrieval.progress import progress_bar


def evaluate(encoder: Encoder, records: Sequence[Record], batch_size: int = 64, progress: bool = False) -> dict[str, Any]:
    """Metrics of `encoder` on the captioned records; unreadable images are left out and listed."""
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
    result = cross_modal_recall(encoder, image_vecs, text_vecs, owner)
    if getattr(encoder, "querybank", None) is not None:
        # The same vectors without the bias coordinate: the scores before hubness correction.
        plain = recall_at_k(image_vecs[:, :-1], text_vecs[:, :-1], owner)
        result["without_hubness"] = {key: plain[key] for key in ("t2i", "i2t", "rsum")}
    result["encoder"] = encoder.spec
    result["problems"] = [str(error) for error in failed.values()]
    return result


def cross_modal_recall(encoder: Encoder, image_vecs: np.ndarray, text_vecs: np.ndarray, owner: np.ndarray) -> dict[str, Any]:
    """`recall_at_k` with each direction's queries in the form the encoder searches with (`Encoder.as_queries`)."""
    image_queries = encoder.as_queries(image_vecs, cross_modal=True)
    t2i = recall_at_k(image_vecs, encoder.as_queries(text_vecs, cross_modal=True), owner)
    if image_queries is image_vecs:
        return t2i  # plain inner products: one pass gives both directions
    i2t = recall_at_k(image_queries, text_vecs, owner)
    ks = [k for k in t2i["t2i"] if k.startswith("R@")]
    return {**t2i, "i2t": i2t["i2t"], "rsum": float(sum(t2i["t2i"][k] + i2t["i2t"][k] for k in ks))}
