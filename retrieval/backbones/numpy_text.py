"""A sentence-transformers text tower evaluated in numpy: the query path without torch.

A text query needs only the text tower, yet importing torch and transformers costs seconds
of CPU before the first vector (benchmarks/RESULTS.md, start-up). This module reads the same
files (`model.safetensors` through safetensors' numpy loader, `tokenizer.json` through the
tokenizers library) and runs the same float32 forward pass as transformers' BertModel and
MPNetModel in eval mode; its vectors equal the torch path's to within 1e-6 per coordinate with
MiniLM and 3e-6 with MPNet (float32 sums in another order; tests/test_text_queries.py). `supports(folder)` says whether a model qualifies: model type
bert or mpnet with exact GELU, mean pooling, optional Normalize. Callers use the torch path
for anything else.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

Weights = Mapping[str, np.ndarray]

# Per architecture: the attention's query, key, value and output projections and its LayerNorm.
ATTENTION = {
    "bert": ("attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "attention.output.LayerNorm"),
    "mpnet": ("attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o", "attention.LayerNorm"),
}
POOLING_MODULES = ["sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling"]
NORMALIZE_MODULE = "sentence_transformers.models.Normalize"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def supports(folder: str | Path) -> bool:
    """Whether the sentence-transformers model in `folder` is one this module evaluates exactly."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    modules = [m.get("type") for m in json.loads((folder / "modules.json").read_text())] if (folder / "modules.json").is_file() else []
    pooling = _read_json(folder / "1_Pooling" / "config.json")
    mean_only = pooling.get("pooling_mode_mean_tokens") and not any(
        v for k, v in pooling.items() if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens")
    return (
        config.get("model_type") in ATTENTION
        and config.get("hidden_act") == "gelu"
        and config.get("position_embedding_type", "absolute") == "absolute"
        and modules[:2] == POOLING_MODULES and modules[2:] in ([], [NORMALIZE_MODULE])
        and bool(mean_only)
        and (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    )


def linear(x: np.ndarray, w: Weights, name: str) -> np.ndarray:
    """x @ W.T + b over the last axis, as one 2-D matrix product: numpy runs a stacked (B, L, H) @ (H, O)
    as B separate products (measured: 64 captions of 20 tokens through 768 → 3072, 204 ms stacked, 73 ms as one)."""
    weight = w[f"{name}.weight"]
    return (x.reshape(-1, x.shape[-1]) @ weight.T).reshape(*x.shape[:-1], weight.shape[0]) + w[f"{name}.bias"]


def layer_norm(x: np.ndarray, w: Weights, name: str, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = np.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + np.float32(eps)) * w[f"{name}.weight"] + w[f"{name}.bias"]


def gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU that BERT and MPNet use."""
    from scipy.special import erf

    return np.float32(0.5) * x * (np.float32(1.0) + erf(x / np.float32(math.sqrt(2.0))))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def additive_mask(mask: np.ndarray) -> np.ndarray:
    """(B, L) 0/1 attention mask → (B, 1, 1, L): 0 where attended, the float32 minimum where padded."""
    return (np.float32(1.0) - mask[:, None, None, :].astype(np.float32)) * np.finfo(np.float32).min


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.float32)[..., None]
    return (hidden * m).sum(1) / np.maximum(m.sum(1), np.float32(1e-9))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """As torch.nn.functional.normalize: rows over max(‖x‖, 1e-12)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))


def relative_position_buckets(length: int, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """MPNet's bucketed relative positions (L, L), as MPNetEncoder.relative_position_bucket computes them."""
    pos = np.arange(length)
    n = -(pos[None, :] - pos[:, None])
    half = num_buckets // 2
    ret = (n < 0).astype(np.int64) * half
    n = np.abs(n)
    max_exact = half // 2
    scaled = np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
    large = np.minimum(max_exact + (scaled * np.float32(half - max_exact)).astype(np.int64), half - 1)
    return ret + np.where(n < max_exact, n, large)


def position_bias(table: Optional[np.ndarray], length: int) -> Optional[np.ndarray]:
    """(1, heads, L, L) additive attention bias from MPNet's relative-position table, or None (BERT)."""
    if table is None:
        return None
    return table[relative_position_buckets(length, num_buckets=table.shape[0])].transpose(2, 0, 1)[None]


class NumpyTextTower:
    """The transformer of a sentence-transformers folder: tokenize, embed, run layers, pool."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.config = _read_json(folder / "config.json")
        self.arch = self.config["model_type"]
        self.heads = int(self.config["num_attention_heads"])
        self.eps = float(self.config.get("layer_norm_eps", 1e-12))
        self.normalize = NORMALIZE_MODULE in [m.get("type") for m in json.loads((folder / "modules.json").read_text())]
        max_length = _read_json(folder / "sentence_bert_config.json").get("max_seq_length") or 512
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(int(max_length))
        self.pad_id = int(self.config.get("pad_token_id", 0))
        pad = self.tokenizer.id_to_token(self.pad_id)
        self.tokenizer.enable_padding(pad_id=self.pad_id, pad_token=pad)
        self.weights = {k: v.astype(np.float32, copy=False) for k, v in load_file(str(folder / "model.safetensors")).items()}
        self.n_layers = int(self.config["num_hidden_layers"])
        self.bias_table = self.weights.get("encoder.relative_attention_bias.weight")

    def layer_weights(self, i: int) -> dict[str, np.ndarray]:
        """Layer i's weights, named as inside the layer (`attention.…`, `intermediate.dense.…`)."""
        prefix = f"encoder.layer.{i}."
        return {k[len(prefix):]: v for k, v in self.weights.items() if k.startswith(prefix)}

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, attention mask), both (B, L), padded to the longest text."""
        encoded = self.tokenizer.encode_batch(list(texts))
        return (np.array([e.ids for e in encoded], dtype=np.int64),
                np.array([e.attention_mask for e in encoded], dtype=np.int64))

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token embeddings + positions (+ token type 0 for BERT), LayerNorm'd: the input of layer 0."""
        w = self.weights
        if self.arch == "mpnet":  # positions count real tokens from padding_idx + 1, as create_position_ids_from_input_ids
            real = (ids != self.pad_id).astype(np.int64)
            positions = np.cumsum(real, axis=1) * real + self.pad_id
            h = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][positions]
        else:
            h = (w["embeddings.word_embeddings.weight"][ids]
                 + w["embeddings.token_type_embeddings.weight"][0]
                 + w["embeddings.position_embeddings.weight"][: ids.shape[1]][None])
        return layer_norm(h, w, "embeddings.LayerNorm", self.eps)

    def run_layer(self, w: Weights, h: np.ndarray, mask: np.ndarray, bias: Optional[np.ndarray]) -> np.ndarray:
        """One transformer layer (weights `w` named as inside it) over token states (B, L, H)."""
        q_name, k_name, v_name, o_name, ln_name = ATTENTION[self.arch]
        b, length, hidden = h.shape
        d = hidden // self.heads

        def split(x: np.ndarray) -> np.ndarray:
            return x.reshape(b, length, self.heads, d).transpose(0, 2, 1, 3)

        q, k, v = (split(linear(h, w, name)) for name in (q_name, k_name, v_name))
        scores = (q @ k.transpose(0, 1, 3, 2)) / np.float32(math.sqrt(d))
        if bias is not None:
            scores = scores + bias
        context = softmax(scores + additive_mask(mask)) @ v
        attended = layer_norm(linear(context.transpose(0, 2, 1, 3).reshape(b, length, hidden), w, o_name) + h, w, ln_name, self.eps)
        inner = gelu(linear(attended, w, "intermediate.dense"))
        return layer_norm(linear(inner, w, "output.dense") + attended, w, "output.LayerNorm", self.eps)

    def run_layers(self, layers: list[Weights], h: np.ndarray, mask: np.ndarray, table: Optional[np.ndarray] = None) -> np.ndarray:
        """Run `layers` (weights named as inside a layer) over token states; MPNet's take the bias of `table`."""
        bias = position_bias(self.bias_table if table is None else table, h.shape[1])
        for w in layers:
            h = self.run_layer(w, h, mask, bias)
        return h

    def hidden_below(self, texts: list[str], n_top: int) -> tuple[np.ndarray, np.ndarray]:
        """Token states after all but the top `n_top` layers, and the attention mask."""
        ids, mask = self.tokenize(texts)
        layers = [self.layer_weights(i) for i in range(self.n_layers - n_top)]
        return self.run_layers(layers, self.embed(ids), mask), mask

    def sentence_embeddings(self, texts: list[str]) -> np.ndarray:
        """The model's own sentence embeddings: every layer, mean pooling, and Normalize when it has one."""
        hidden, mask = self.hidden_below(texts, 0)
        pooled = mean_pool(hidden, mask)
        return l2_normalize(pooled) if self.normalize else pooled


@lru_cache(maxsize=2)
def load(folder: str) -> NumpyTextTower:
    """The tower in `folder`, loaded once per process."""
    return NumpyTextTower(folder)
