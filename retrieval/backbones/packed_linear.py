"""Linear layers with their weights prepacked for oneDNN: what a one-query CPU forward spends its time in.

A text query is a dozen tokens, so each `nn.Linear` of the text tower is a (12 × 768) by
(768 × 3072)-sized product, and torch's plain bfloat16 `addmm` reaches only about a quarter
of the CPU's bfloat16 rate on such thin inputs. oneDNN's linear with the weight reordered
once into its blocked layout (the op torch's own compiler uses for CPU linears) runs the
same products about 1.5× faster: 13 MPNet layers' linears, 22.6 → 14.9 ms on 2 cores
(benchmarks/RESULTS.md). The outputs are the same products, rounded in the same dtype.
"""
from __future__ import annotations

import torch

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
    """An inference-only `nn.Linear` whose weight lives in oneDNN's blocked layout."""

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


def pack_linears(module: torch.nn.Module, dtype: torch.dtype, rows_hint: int = TOKENS_HINT) -> int:
    """Replace every CPU `nn.Linear` inside `module` by a `PackedLinear`, in place; returns how many.

    For inference copies only (the packed weights take no gradient). Without oneDNN nothing
    changes, and 0 is returned.
    """
    if not available():
        return 0
    swaps = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
             if isinstance(child, torch.nn.Linear) and child.weight.device.type == "cpu"]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child, dtype, rows_hint))
    return len(swaps)

