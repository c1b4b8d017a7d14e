"""Frozen-tower features computed once and cached on disk.

Image features are one EfficientNet-Lite backbone's maps below its top `depth` blocks (fp16),
for the plain and the horizontally flipped view, with images decoded at `decoded` px and
resized to the backbone's own size as the encoder does; text features are the token states below the top
`depth` transformer layers (fp16, ragged: one row per token, with offsets). Cache files
are keyed by the tower, the depth and every input's path + size + mtime (images) or the
caption texts, so a changed file or model is recomputed, never silently reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from indexer.files import atomic_path
from retrieval import runtime
from retrieval.cache import cache_dir as seesay_cache
from retrieval.image_batches import bad_images, image_batches
from retrieval.backbones import efficientnet as effnet
from retrieval.backbones import sentence

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where features are cached unless a run names another folder: `features` under seesay's cache root."""
    return seesay_cache("features")


def cache_key(parts: object) -> str:
    """A short digest of JSON-able `parts`: the name of a cache file made from them."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_id(path: Path) -> list:
    """A file's identity for a cache key: resolved path, size, mtime (None, None when missing)."""
    try:
        st = os.stat(path)
        return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(path), None, None]


def save(obj: object, path: Path) -> None:
    """torch.save `obj` to `path` atomically (a cache file is whole or absent)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def image_features(
    paths: Sequence[Path], depth: int, flip: bool = False, cache_dir: Path | None = None,
    batch_size: int = 16, device: torch.device | None = None,
    backbone: str = "lite0", decoded: int | None = None,
) -> tuple[torch.Tensor, dict[int, str]]:
    """(N, C, H, W) fp16 maps of `backbone` below its top `depth` blocks (of the mirrored images with `flip`)
    and {index: reason} of bad images. Images are decoded at `decoded` px (default: the backbone's own size)."""
    cache_dir = Path(cache_dir or default_cache_dir())
    decoded = decoded or effnet.native_size(backbone)
    key = cache_key([effnet.preprocess_id(backbone, decoded), depth, flip, [file_id(Path(p)) for p in paths]])
    path = cache_dir / f"img-{backbone}-d{depth}{'-flip' if flip else ''}-{key}.pt"
    if path.is_file():
        data = torch.load(path, weights_only=True)
        return data["feats"], {int(k): v for k, v in data["bad"].items()}
    device = device or torch.device("cpu")
    runtime.keep_freed_memory()
    model = effnet.load_backbone(backbone, str(device))
    size = effnet.native_size(backbone)
    feats = None
    bad: dict[int, str] = {}
    t0 = time.time()
    with torch.no_grad():
        for start, x, reasons in image_batches(list(paths), batch_size, effnet.preprocess(decoded), runtime.loader_workers(device)):
            x = effnet.resize_to(x.to(device), size)
            f = effnet.features_below(model, torch.flip(x, dims=[3]) if flip else x, depth).half().cpu()
            if feats is None:
                feats = torch.zeros((len(paths), *f.shape[1:]), dtype=torch.float16)
            feats[start : start + len(x)] = f
            bad.update((i, str(err)) for i, err in bad_images(paths, start, reasons).items())
            done = start + len(x)
            if done % (batch_size * 32) == 0 or done == len(paths):
                log.info(f"  {backbone} features {done}/{len(paths)} ({done / (time.time() - t0):.1f} img/s)")
    if feats is None:
        feats = torch.zeros((0, 1), dtype=torch.float16)
    save({"feats": feats, "bad": {str(k): v for k, v in bad.items()}}, path)
    return feats, bad


def text_features(
    texts: Sequence[str], text_model: str, depth: int, cache_dir: Path | None = None,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Token states below the top `depth` layers: {"hidden": (T, D) fp16, "offsets": (N+1,)}.

    With depth 0 the sentence embeddings are cached instead: {"pooled": (N, D) float32}.
    """
    cache_dir = Path(cache_dir or default_cache_dir())
    model_path = sentence.resolve_text_model(text_model)
    weights = [file_id(p) for p in sorted(Path(model_path).glob("*.safetensors"))] + [file_id(Path(model_path) / "config.json")]
    key = cache_key([model_path, weights, depth, hashlib.sha1("\n".join(texts).encode()).hexdigest()])
    path = cache_dir / f"txt-d{depth}-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    st = sentence.load_sentence_model(model_path)
    t0 = time.time()
    if depth == 0:
        out = {"pooled": sentence.sentence_embeddings(st, list(texts), batch_size)}
    else:
        # Sort by length so padding is small, then scatter back into caption order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        rows: list[torch.Tensor | None] = [None] * len(texts)
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            h, mask = sentence.hidden_below(st, [texts[i] for i in idx], depth)
            for j, i in enumerate(idx):
                rows[i] = h[j, : int(mask[j].sum())].half()
            if (s // batch_size) % 20 == 0:
                log.info(f"  text features {s + len(idx)}/{len(texts)} ({(s + len(idx)) / (time.time() - t0):.0f} captions/s)")
        lengths = torch.tensor([len(r) for r in rows])
        offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lengths, 0)
        out = {"hidden": torch.cat(rows) if rows else torch.zeros(0, 1, dtype=torch.float16), "offsets": offsets}
    save(out, path)
    return out


def pad_tokens(hidden: torch.Tensor, offsets: torch.Tensor, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather captions `idx` from the ragged cache into a padded (B, L, D) float batch and its mask."""
    lengths = [int(offsets[i + 1] - offsets[i]) for i in idx]
    out = torch.zeros(len(idx), max(lengths), hidden.shape[1], dtype=torch.float32)
    mask = torch.zeros(len(idx), max(lengths), dtype=torch.long)
    for j, (i, n) in enumerate(zip(idx, lengths)):
        out[j, :n] = hidden[offsets[i] : offsets[i] + n].float()
        mask[j, :n] = 1
    return out, mask
