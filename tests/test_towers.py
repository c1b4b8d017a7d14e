"""The towers, zeroshot and default encoders: shapes, normalisation, saving, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from retrieval.encoders.registry import load_encoder
from retrieval.errors import BadImageError, EncoderError


def _images(tmp_path, n=3):
    paths = []
    for colour in ["red", "green", "blue", "white", "black"][:n]:
        p = tmp_path / f"{colour}.jpg"
        Image.new("RGB", (64, 48), colour).save(p)
        paths.append(p)
    return paths


def _unit_rows(x, n, d):
    assert x.shape == (n, d) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_zeroshot_shapes_and_normalisation(tmp_path, zeroshot_encoder):
    enc = zeroshot_encoder
    assert enc.dim == 384 and enc.kind == "zeroshot"
    paths = _images(tmp_path)
    _unit_rows(enc.encode_images(paths), 3, 384)
    _unit_rows(enc.encode_texts(["a dog on the grass", "two people"]), 2, 384)
    saved = load_encoder(enc.save(tmp_path / "zs"))
    assert np.allclose(saved.encode_texts(["a cat"]), enc.encode_texts(["a cat"]), atol=1e-6)


def test_towers_must_be_trained_first():
    with pytest.raises(EncoderError, match="trained first"):
        load_encoder("towers")


def test_towers_paths_and_pil_images_agree_and_save_round_trip(tmp_path, towers_encoder):
    enc = towers_encoder
    paths = _images(tmp_path, 5)
    from_paths = enc.encode_images(paths, batch_size=2)
    from_pil = enc.encode_images([Image.open(p) for p in paths], batch_size=2)
    _unit_rows(from_paths, 5, 16)
    assert np.allclose(from_paths, from_pil, atol=1e-5)
    texts = ["a red ball", "a long sentence about a dog running through the park"]
    loaded = load_encoder(enc.save(tmp_path / "m"))
    assert np.allclose(loaded.encode_texts(texts), enc.encode_texts(texts), atol=1e-5)
    assert np.allclose(loaded.encode_images(paths[:2]), from_paths[:2], atol=1e-5)


def test_bad_image_names_the_file(tmp_path, towers_encoder):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    with pytest.raises(BadImageError, match="bad.jpg"):
        towers_encoder.encode_images(_images(tmp_path, 1) + [bad])


def test_engine_path_skips_a_bad_file_and_matches_the_encoder(tmp_path, towers_encoder):
    from retrieval.embedding import encode_image_files

    enc = towers_encoder
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    good = _images(tmp_path, 4)
    vectors, kept, failed = encode_image_files(enc, good[:2] + [bad] + good[2:], batch_size=2)
    assert kept == [0, 1, 3, 4] and list(failed) == [2] and "bad.jpg" in str(failed[2])
    _unit_rows(vectors, 4, 16)
    assert np.allclose(vectors, enc.encode_images(good, batch_size=3), atol=1e-5)


def test_a_bad_file_whose_name_holds_a_colon_keeps_its_reason(tmp_path, towers_encoder):
    from retrieval.embedding import encode_image_files

    odd = tmp_path / "photo: night.jpg"
    _, kept, failed = encode_image_files(towers_encoder, _images(tmp_path, 2) + [odd], batch_size=2)
    assert kept == [0, 1] and failed[2].path == odd and failed[2].reason == "no such file"


def test_unknown_text_model_is_a_clear_error(tmp_path):
    from retrieval.encoders.towers import TowersEncoder

    with pytest.raises(EncoderError, match="sentence-transformers"):
        TowersEncoder({"text_model": str(tmp_path / "nope")})


@pytest.mark.parametrize("alias", ["default", "fast"])
def test_shipped_default_and_fast_load_and_encode(tmp_path, alias):
    """Each shipped model loads from its folder with its query bank: unit rows plus the bias as a last
    coordinate, and a cross-modal score is the plain score minus the gallery item's bias."""
    from retrieval.encoders.registry import ALIASES, SHIPPED_MODELS

    folder = SHIPPED_MODELS / ALIASES[alias].folder
    enc = load_encoder(alias)
    manifest = json.loads((folder / "encoder.json").read_text())
    assert enc.spec == alias and enc.dim == manifest["dim"] and enc.querybank is not None
    paths = _images(tmp_path, 2)
    imgs, txt = enc.encode_images(paths), enc.encode_texts(["a dog runs on the grass"])
    _unit_rows(imgs[:, :-1], 2, enc.dim - 1)
    _unit_rows(txt[:, :-1], 1, enc.dim - 1)
    assert np.abs(imgs[:, -1]).max() < 1.0  # the bias, shifted to stay near 0
    cross = enc.as_queries(txt, cross_modal=True) @ imgs.T
    np.testing.assert_allclose(cross, txt[:, :-1] @ imgs[:, :-1].T - imgs[:, -1][None, :], atol=1e-5)
    # Only the trained parts ship (heads, and the bank's vectors in fp16), never the pretrained towers.
    assert sorted(p.name for p in folder.iterdir()) == ["encoder.json", "heads.pt", "querybank.pt"]
    bank_vectors = (len(enc.querybank.images) + len(enc.querybank.texts)) * enc.querybank.dim
    assert (folder / "querybank.pt").stat().st_size < 2 * bank_vectors + 100_000
    assert (folder / "heads.pt").stat().st_size < 70_000_000  # MPNet alone is 438 MB, Lite2 37 MB


def test_image_preprocessing_scales_pixels_as_efficientnet_lite_expects():
    """Lite weights were trained on (pixel - 127) / 128: white → ~1, black → ~-1, mid-grey → ~0."""
    import torch

    from retrieval.backbones.efficientnet import channels_last, load_efficientnet_lite0, pooled_and_logits, preprocess

    tf = preprocess()
    for colour, expected in (((255, 255, 255), 128 / 128), ((0, 0, 0), -127 / 128), ((127, 127, 127), 0.0)):
        x = tf(Image.new("RGB", (300, 200), colour))
        assert x.shape == (3, 224, 224)
        assert torch.allclose(x, torch.full_like(x, expected), atol=1e-5), colour
    # The channels-last model gives the default layout's outputs.
    model = load_efficientnet_lite0()
    batch = torch.stack([tf(Image.new("RGB", (64, 64), c)) for c in ("red", "navy")])
    pooled, logits = pooled_and_logits(model, batch)
    with torch.no_grad():
        plain = model.extract_features(batch.contiguous()).mean(dim=(2, 3))
    assert channels_last(batch).is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(pooled, plain, atol=1e-4) and logits.shape == (2, 1000)


@pytest.mark.parametrize("which", ["efficientnet", "open_clip"])
def test_uint8_worker_output_finished_on_the_device_equals_the_full_transform(which):
    import torch

    from retrieval.image_batches import split_at_tensor

    if which == "open_clip":
        import open_clip

        transform = open_clip.image_transform(224, is_train=False)
    else:
        from retrieval.backbones.efficientnet import preprocess

        transform = preprocess()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (180, 250, 3), dtype=np.uint8))
    cpu_part, finish = split_at_tensor(transform)
    pixels = cpu_part(image)
    assert pixels.dtype == torch.uint8 and finish is not None
    assert torch.allclose(finish(pixels[None])[0], transform(image), atol=1e-6)


def test_a_transform_of_another_shape_is_not_split():
    from torchvision import transforms

    from retrieval.image_batches import split_at_tensor

    odd = transforms.Compose([transforms.ToTensor(), transforms.Lambda(lambda x: x * 2)])
    assert split_at_tensor(odd) == (odd, None)
