"""open_clip encoders on a tiny randomly initialised architecture (no network needed)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.encoders.openclip import OpenClipEncoder
from retrieval.encoders.registry import load_encoder
from retrieval.errors import EncoderError

from openclip_tiny import TINY, register_tiny, tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_archs(tmp_path_factory):
    return register_tiny(tmp_path_factory.mktemp("open_clip_configs"))


def test_tiny_model_from_checkpoint_encodes_and_round_trips(tiny_archs, tmp_path):
    arch, _ = tiny_archs
    ckpt = tiny_checkpoint(arch, tmp_path / "tiny.pt")
    enc = load_encoder(f"openclip:{arch}@{ckpt}")
    assert enc.dim == 32 and enc.spec == f"openclip:{arch}@{ckpt}"
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    img = enc.encode_images(images)
    txt = enc.encode_texts(["a red square", "a blue square", "nothing"])
    assert img.shape == (2, 32) and txt.shape == (3, 32)
    assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    saved = enc.save(tmp_path / "saved")
    assert (saved / "open_clip.pt").is_file()
    again = load_encoder(saved)
    assert np.allclose(again.encode_texts(["a red square"]), txt[:1], atol=1e-5)
    assert np.allclose(again.encode_images(images), img, atol=1e-5)


def test_a_recorded_architecture_open_clip_does_not_know_is_registered_from_seesays_cache(tiny_archs, tmp_path, monkeypatch):
    import open_clip

    monkeypatch.setenv("SEESAY_CACHE", str(tmp_path / "cache"))
    arch, _ = tiny_archs
    ckpt = str(tiny_checkpoint(arch, tmp_path / "tiny.pt"))
    want = load_encoder(f"openclip:{arch}@{ckpt}").encode_texts(["a red square"])
    # What a saved model of a custom architecture records: its name and its config.
    enc = OpenClipEncoder("seesay-unregistered", checkpoint=ckpt, model_cfg=TINY)
    assert np.allclose(enc.encode_texts(["a red square"]), want, atol=1e-5)
    saved = enc.save(tmp_path / "saved")
    assert np.allclose(load_encoder(saved).encode_texts(["a red square"]), want, atol=1e-5)
    assert open_clip.get_model_config("seesay-unregistered") is None  # nothing registered under the user's name
    files = list((tmp_path / "cache" / "openclip" / "model_configs").iterdir())
    assert len(files) == 1 and json.loads(files[0].read_text()) == TINY


def test_checkpoint_of_another_architecture_names_both(tiny_archs, tmp_path):
    arch, other = tiny_archs
    ckpt = tiny_checkpoint(other, tmp_path / "other.pt")
    with pytest.raises(EncoderError, match=f"{ckpt}.*{arch}"):
        load_encoder(f"openclip:{arch}@{ckpt}")


def test_missing_checkpoint_and_bad_specs(tmp_path):
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoder(f"openclip:ViT-B-32@{tmp_path / 'none.pt'}")
    with pytest.raises(EncoderError, match="ARCH/PRETRAINED"):
        load_encoder("openclip:ViT-B-32")
    with pytest.raises(EncoderError, match="unknown open_clip architecture"):
        load_encoder("openclip:NoSuchNet/openai")
    with pytest.raises(EncoderError, match="no pretrained weights"):
        load_encoder("openclip:ViT-B-32/no-such-tag")


def test_download_failure_suggests_a_local_checkpoint(monkeypatch):
    import open_clip

    from retrieval.encoders import openclip as module

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(module, "reachable", lambda host, timeout=3.0: True)  # the host answers, the download fails
    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(EncoderError, match=r"no network access.*openclip:ViT-B-32@PATH"):
        load_encoder("openclip:ViT-B-32/openai")


def test_uncached_weights_offline_fail_at_once_without_trying_to_download(monkeypatch):
    import open_clip

    from retrieval.encoders import openclip as module

    host, cached = module.weights_source("ViT-B-32", "laion2b_s34b_b79k")
    if cached or module.reachable(host):
        pytest.skip(f"the weights are cached or {host} answers here")
    monkeypatch.setattr(open_clip, "create_model_and_transforms", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(EncoderError, match=rf"not in the local cache and {host} cannot be reached.*openclip:ViT-B-32@PATH"):
        load_encoder("openclip:ViT-B-32/laion2b_s34b_b79k")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_bfloat16_encoding_agrees_with_the_cpu(tiny_archs, tmp_path):
    arch, _ = tiny_archs
    ckpt = str(tiny_checkpoint(arch, tmp_path / "tiny.pt"))
    cpu = OpenClipEncoder(arch, checkpoint=ckpt, device=torch.device("cpu"))
    gpu = OpenClipEncoder(arch, checkpoint=ckpt, device=torch.device("cuda"))
    paths = []
    for i, colour in enumerate(("red", "green", "blue", "white", "black", "orange")):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (48, 40), colour).save(paths[-1])
    texts = ["a red square", "a green field", "nothing at all"]
    for a, b in ((cpu.encode_images(paths, 4), gpu.encode_images(paths, 4)), (cpu.encode_texts(texts), gpu.encode_texts(texts))):
        assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1, atol=1e-3)
        assert (a * b).sum(axis=1).min() > 0.99  # bfloat16 rounding only
