"""Text queries of a saved `towers` model without torch: what `seesay search "text"` runs.

A text query needs the text tower, the trained text top layers and the text head, and neither
the image backbones nor the query bank (a cross-modal query row is [v, −1] whatever the
bank holds; `querybank.as_queries`). Here they run in numpy (`backbones.numpy_text`), giving
the vectors `TowersEncoder.encode_texts` + `as_queries` gives, to within float32 rounding
(1e-6 per coordinate with MiniLM, 3e-6 with MPNet).

The trained text parts live in heads.pt, a torch pickle. They are converted once per model
into a safetensors file in the cache (`text-heads/SHA256.safetensors`, keyed by heads.pt's
verified sha256), so later queries read them without torch; the first query after training
or installing a model pays for torch once.
"""
from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from retrieval.backbones import numpy_text as nt
from retrieval.backbones.text_models import resolve_text_model
from retrieval.cache import cache_dir
from retrieval.encoders.base import read_manifest, verify_weights
from retrieval.encoders.towers_config import DEFAULT_CONFIG, VERSION, WEIGHTS
from retrieval.errors import EncoderError

# The parts of heads.pt a text query uses: the unfrozen top layers, the text head, MPNet's bias-table copy.
TEXT_PARTS = ("text_top.", "text_head.", "text_bias.")
BATCH = 256
log = logging.getLogger(__name__)


def text_weights(directory: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """The trained text parts of `directory`/heads.pt as float32 arrays, converted into the cache on first use."""
    from safetensors.numpy import load_file, save

    from indexer.files import write_atomic

    verify_weights(directory, manifest, only=[WEIGHTS])
    record = (manifest.get("files") or {}).get(WEIGHTS) or {}
    sha = record.get("sha256") or hashlib.sha256((directory / WEIGHTS).read_bytes()).hexdigest()
    cached = cache_dir("text-heads", f"{sha}.safetensors")
    if cached.is_file():
        return load_file(str(cached))
    from retrieval.encoders.towers import text_state

    log.debug("converting the text heads of %s for torch-free queries, once: %s", directory, cached)
    state = text_state(directory / WEIGHTS)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, save(state))
    except OSError as exc:  # a read-only cache: this query still runs, the next converts again
        log.debug("cannot cache the text heads in %s: %s", cached, exc)
    return state


def head(x: np.ndarray, w: nt.Weights, kind: str) -> np.ndarray:
    """The text head: linear, or linear plus a 2-layer GELU MLP (`towers.Head` in eval mode)."""
    out = nt.linear(x, w, "text_head.proj")
    if kind == "mlp":
        out = out + nt.linear(nt.gelu(nt.linear(x, w, "text_head.mlp.0")), w, "text_head.mlp.3")
    return out


class TowersTextQueries:
    """A saved towers model's text side: captions → query rows, as the full encoder makes them."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.cfg = {**DEFAULT_CONFIG, **manifest.get("config", {})}
        self.tower = nt.load(resolve_text_model(self.cfg["text_model"]))
        self.weights = text_weights(Path(directory), manifest)
        n_top = int(self.cfg["text_top"])
        self.top = [{k[len(p):]: v for k, v in self.weights.items() if k.startswith(p)}
                    for p in (f"text_top.{i}." for i in range(n_top))]
        self.frozen_top = [self.tower.layer_weights(i) for i in range(self.tower.n_layers - n_top, self.tower.n_layers)]
        self.bias_table = self.weights.get("text_bias.weight")
        self.zeroshot = float(self.cfg["zeroshot_weight"] or 0.0)
        self.hubness = bool(self.cfg["hubness_tau"])
        self.digest: Optional[str] = manifest.get("digest")
        width = self.tower.config["hidden_size"] if self.zeroshot else 0
        self.dim = int(self.cfg["embed_dim"]) + width + (1 if self.hubness else 0)

    def encode_text_queries(self, texts: Sequence[str], cross_modal: bool) -> np.ndarray:
        """Captions → (n, dim) rows to search with (with hubness correction: [v, −1] cross-modal, [v, 0] not)."""
        from threadpoolctl import threadpool_limits

        texts = [str(t) for t in texts]
        # One BLAS thread: a query's matrices are small, and BLAS worker threads spin while they wait,
        # which on a busy machine cost 5× the CPU time (loading MiniLM and 17 queries: 7.2 s CPU with threads, 1.3 s with one).
        with threadpool_limits(limits=1, user_api="blas"):
            vectors = np.concatenate([self._vectors(texts[s : s + BATCH]) for s in range(0, len(texts), BATCH)])
        if self.hubness:
            marks = np.full((len(vectors), 1), -1.0 if cross_modal else 0.0, dtype=np.float32)
            vectors = np.hstack([vectors, marks])
        return vectors.astype(np.float32, copy=False)

    def _vectors(self, texts: list[str]) -> np.ndarray:
        """Unit rows of one batch (mixed with the tower's own embeddings when zero-shot is on)."""
        kind = self.cfg["head"]
        if self.top:
            hidden, mask = self.tower.hidden_below(texts, len(self.top))
            pooled = nt.l2_normalize(nt.mean_pool(self.tower.run_layers(self.top, hidden, mask, self.bias_table), mask))
            v = nt.l2_normalize(head(pooled, self.weights, kind))
            if not self.zeroshot:
                return v
            plain = nt.mean_pool(self.tower.run_layers(self.frozen_top, hidden, mask), mask)
            return self._mix(v, plain)
        emb = self.tower.sentence_embeddings(texts)
        v = nt.l2_normalize(head(emb, self.weights, kind))
        return v if not self.zeroshot else self._mix(v, emb)

    def _mix(self, towers: np.ndarray, zeroshot: np.ndarray) -> np.ndarray:
        """[√(1−w)·towers, √w·zeroshot] of unit rows, as `TowersEncoder._mix`."""
        w = self.zeroshot
        return np.concatenate([towers * np.float32(math.sqrt(1 - w)), nt.l2_normalize(zeroshot) * np.float32(math.sqrt(w))], axis=1)


def load_text_queries(directory: Path) -> Optional[TowersTextQueries]:
    """The torch-free text side of the saved towers model in `directory`, or None where its text model needs torch."""
    manifest = read_manifest(directory)
    if manifest.get("version", 1) > VERSION:
        raise EncoderError(f"{directory}: saved with towers format version {manifest['version']}, this seesay reads up to {VERSION}")
    text_model = {**DEFAULT_CONFIG, **manifest.get("config", {})}["text_model"]
    if not nt.supports(resolve_text_model(text_model)):
        return None
    return TowersTextQueries(Path(directory), manifest)
