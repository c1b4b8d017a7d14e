"""oneDNN-packed linear layers (backbones.packed_linear): the same products as nn.Linear, in place of it."""
from __future__ import annotations

import copy

import pytest
import torch

from retrieval.backbones import packed_linear

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="this torch has no oneDNN linear ops")


@pytest.mark.parametrize("shape", [(1, 96), (12, 96), (2, 7, 96), (300, 96)])
def test_a_packed_linear_gives_the_linear_products(shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(*shape)
    want = linear(x).detach()
    exact = packed_linear.PackedLinear(linear, torch.float32)(x)
    assert exact.shape == want.shape and exact.dtype == torch.float32
    assert torch.allclose(exact, want, atol=1e-5)
    halved = packed_linear.PackedLinear(linear, torch.bfloat16)(x)  # bfloat16 weights, float32 in and out
    assert halved.dtype == torch.float32
    assert not torch.equal(halved, want)
    assert (halved - want).abs().max() < 0.02 * want.abs().max()


def test_pack_linears_swaps_every_linear_of_a_copy_and_keeps_its_output():
    torch.manual_seed(0)
    block = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.LayerNorm(64))
    ).eval()
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        want = block(x)
    packed = copy.deepcopy(block)
    assert packed_linear.pack_linears(packed, torch.float32) == 2  # nested ones too
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    assert sum(isinstance(m, torch.nn.Linear) for m in block.modules()) == 2, "the original was changed"
    with torch.no_grad():
        assert torch.allclose(packed(x), want, atol=1e-5)
