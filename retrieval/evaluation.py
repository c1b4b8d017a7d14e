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
    result = recall_at_k(image_vecs, text_vecs, owner)
    result["encoder"] = encoder.spec
    result["problems"] = [str(error) for error in failed.values()]
    return result
