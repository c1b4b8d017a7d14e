"""A text tower rebuilt for one-query CPU inference (backbones.query_layers): the same outputs as the layers it replaces."""
from __future__ import annotations

import copy

import pytest
import torch

from retrieval.backbones import query_layers, sentence

pytestmark = pytest.mark.skipif(not query_layers.available(), reason="this torch has no oneDNN linear ops")


@pytest.mark.parametrize("shape", [(1, 96), (12, 96), (2, 7, 96), (300, 96)])
def test_a_packed_linear_gives_the_linear_products(shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(*shape)
    want = linear(x).detach()
    exact = query_layers.PackedLinear(linear, torch.float32)(x)
    assert exact.shape == want.shape and exact.dtype == torch.float32
    assert torch.allclose(exact, want, atol=1e-5)
    halved = query_layers.PackedLinear(linear, torch.bfloat16)(x)  # bfloat16 weights, float32 in and out
    assert halved.dtype == torch.float32
    assert not torch.equal(halved, want)
    assert (halved - want).abs().max() < 0.02 * want.abs().max()


def test_every_linear_of_a_copy_is_packed_and_its_output_kept():
    torch.manual_seed(0)
    block = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.LayerNorm(64))
    ).eval()
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        want = block(x)
    packed = copy.deepcopy(block)
    assert query_layers.for_queries(packed, torch.float32) == 2  # nested ones too
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    assert sum(isinstance(m, torch.nn.Linear) for m in block.modules()) == 2, "the original was changed"
    with torch.no_grad():
        assert torch.allclose(packed(x), want, atol=1e-5)


def tiny_layers(arch: str) -> tuple[torch.nn.ModuleList, torch.nn.Embedding | None, object]:
    """Two randomly initialised transformers layers of `arch` (and MPNet's relative-position table), in eval mode."""
    from transformers import BertConfig, MPNetConfig
    from transformers.models.bert.modeling_bert import BertLayer
    from transformers.models.mpnet.modeling_mpnet import MPNetLayer

    torch.manual_seed(0)
    shape = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, hidden_act="gelu")
    if arch == "bert":
        config = BertConfig(**shape)
        return torch.nn.ModuleList(BertLayer(config) for _ in range(2)).eval(), None, config
    config = MPNetConfig(**shape)
    table = torch.nn.Embedding(config.relative_attention_num_buckets, config.num_attention_heads)
    return torch.nn.ModuleList(MPNetLayer(config) for _ in range(2)).eval(), table, config


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
def test_fused_layers_give_the_transformers_layers_outputs(arch):
    layers, table, config = tiny_layers(arch)
    hidden = torch.randn(3, 11, 64)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0  # padding: a shorter caption in the batch
    mask[2, 2:] = 0
    with torch.no_grad():
        want = sentence.run_layers(layers, hidden, mask, table)
        fused = copy.deepcopy(layers)
        assert query_layers.for_queries(fused, torch.float32, config) == 2
        assert all(isinstance(layer, query_layers.FusedLayer) for layer in fused)
        got = sentence.run_layers(fused, hidden, mask, table)
        real = mask.bool()
        assert torch.allclose(got[real], want[real], atol=1e-5), (got[real] - want[real]).abs().max()
        halved = copy.deepcopy(layers)
        query_layers.for_queries(halved, torch.bfloat16, config)
        rows = sentence.run_layers(halved, hidden, mask, table)[real]
        assert torch.nn.functional.cosine_similarity(rows, want[real], dim=-1).min() > 0.999


def test_layers_of_another_kind_keep_their_forward_and_get_packed_linears():
    layers, table, config = tiny_layers("bert")
    config.hidden_act = "gelu_new"  # a tanh GELU: not what FusedLayer computes
    rebuilt = copy.deepcopy(layers)
    assert query_layers.for_queries(rebuilt, torch.float32, config) == 12  # 6 linears in each of 2 layers
    assert not any(isinstance(layer, query_layers.FusedLayer) for layer in rebuilt)
