"""A text tower's layers rebuilt for one query on the CPU: oneDNN-packed linears and fused attention.

A text query is a dozen tokens. Each `nn.Linear` of the tower is then a thin (12 × 768) by
(768 × 3072)-sized product, which torch's plain `addmm` runs at about a quarter of the CPU's
rate; oneDNN's linear with the weight reordered once into its blocked layout (the op torch's
own compiler uses for CPU linears) runs it about 1.5× faster. What remains of a layer is some
thirty small ops, each paying its own dispatch: `FusedLayer` runs a BERT or MPNet layer as
one query-key-value product, one `scaled_dot_product_attention`, and the output products.
Measured on 2 cores: MPNet's 13 query layers 22.6 → 14.9 ms in their linears alone, and
31.6 → 25.4 ms for 12 whole layers (benchmarks/RESULTS.md).

Weights may be held in bfloat16 (`dtype`); a `PackedLinear` returns its input's dtype, so a
float32 model can run bfloat16 products alone, or a bfloat16 copy run bfloat16 throughout.
Inference only: nothing here takes a gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from retrieval.backbones.numpy_text import ATTENTION

# Rows a query's linears see: the blocked layout is chosen for about this many, and works for any.
TOKENS_HINT = 16


def available() -> bool:
    """Whether this torch has oneDNN's linear ops (CPU builds with mkldnn have had them since 2.0)."""
    ops = torch.ops.mkldnn
    try:
        return torch.backends.mkldnn.is_available() and bool(ops._linear_pointwise and ops._reorder_linear_weight)
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(torch.nn.Module):
    """An inference-only `nn.Linear` whose weight lives in oneDNN's blocked layout, in `dtype`."""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype, rows_hint: int = TOKENS_HINT) -> None:
        super().__init__()
        weight = linear.weight.detach().to(dtype)
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.packed.dtype)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def joined(linears: list[torch.nn.Linear]) -> torch.nn.Linear:
    """One linear whose outputs are those of `linears` (same input) side by side."""
    out = torch.nn.Linear(linears[0].in_features, sum(m.out_features for m in linears))
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight for m in linears]))
        out.bias.copy_(torch.cat([m.bias for m in linears]))
    return out


class FusedLayer(torch.nn.Module):
    """A transformers BertLayer or MPNetLayer (eval mode, exact GELU) with packed linears and fused attention.

    Called as the layer it replaces: `(hidden, attention_mask=additive mask, position_bias=MPNet's
    bias or None)`; returns the new hidden states.
    """

    def __init__(self, layer: torch.nn.Module, arch: str, heads: int, dtype: torch.dtype) -> None:
        super().__init__()
        q, k, v, o, norm = (layer.get_submodule(name) for name in ATTENTION[arch])
        self.heads = heads
        self.qkv = PackedLinear(joined([q, k, v]), dtype)
        self.o = PackedLinear(o, dtype)
        self.attention_norm = norm
        self.inner = PackedLinear(layer.get_submodule("intermediate.dense"), dtype)
        self.outer = PackedLinear(layer.get_submodule("output.dense"), dtype)
        self.output_norm = layer.get_submodule("output.LayerNorm")

    def forward(self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, length, width = hidden.shape
        q, k, v = self.qkv(hidden).view(b, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        bias = attention_mask
        if position_bias is not None:
            bias = position_bias if bias is None else position_bias + bias
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, length, width)
        attended = self.attention_norm(self.o(context) + hidden)
        return self.output_norm(self.outer(F.gelu(self.inner(attended))) + attended)


def fusable(config) -> bool:
    """Whether a transformers config describes layers `FusedLayer` reproduces (BERT or MPNet, exact GELU, absolute positions)."""
    return (getattr(config, "model_type", None) in ATTENTION and getattr(config, "hidden_act", None) == "gelu"
            and getattr(config, "position_embedding_type", "absolute") == "absolute")


def for_queries(module: torch.nn.Module, dtype: torch.dtype, config=None) -> int:
    """Rebuild `module` (a copy: it changes in place) for one-query CPU inference; returns the layers and linears rebuilt.

    Every transformer layer in a `torch.nn.ModuleList` of BertLayer/MPNetLayer becomes a
    `FusedLayer` when `config` (the transformers config) allows it; every other CPU `nn.Linear`
    becomes a `PackedLinear`. Without oneDNN nothing changes and 0 is returned.
    """
    if not available():
        return 0
    fuse = config is not None and fusable(config)
    count = 0
    for name, child in list(module.named_children()):
        if fuse and type(child).__name__ in ("BertLayer", "MPNetLayer"):
            setattr(module, name, FusedLayer(child, config.model_type, int(config.num_attention_heads), dtype))
            count += 1
        elif isinstance(child, torch.nn.Linear) and child.weight.device.type == "cpu":
            setattr(module, name, PackedLinear(child, dtype))
            count += 1
        else:
            count += for_queries(child, dtype, config)
    return count
