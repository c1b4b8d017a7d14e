"""Bag-of-words baselines: tokenising, θ formulas, and retrieval on generated shapes."""
from __future__ import annotations

import numpy as np
import pytest

from retrieval.cooccurrence import fit_theta
from retrieval.datasets import load_dataset
from retrieval.demo_data import make_shape_set
from retrieval.encoders import load_encoder
from retrieval.encoders.bow import BowConfig, fit_bow
from retrieval.errors import EncoderError
from retrieval.text import Vocabulary, tokenize


def test_tokenize_stems_lowercases_and_drops_stop_words():
    assert tokenize("The Dogs are RUNNING in the snow!") == ["dog", "run", "snow"]
    assert tokenize("The dogs", stem=False, stop_words=False) == ["the", "dogs"]


def test_vocabulary_keeps_words_seen_min_count_times():
    vocab = Vocabulary.build([["dog", "run"], ["dog", "snow"], ["dog", "run"]], min_count=2)
    assert vocab.words == ["dog", "run"]
    assert vocab.presence([["run", "run", "cat"]]).tolist() == [[0.0, 1.0]]


def test_theta_ratio_and_pmi_match_hand_computation():
    a = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)  # visual words of 3 pairs
    b = np.array([[1, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=np.float32)  # caption words
    ratio = fit_theta(a, b, "ratio")
    # count(0,0)=2, count(v0)=2, count(w0)=2 → 2/4; count(1,1)=1, count(v1)=1, count(w1)=1 → 1/2
    assert ratio[0, 0] == pytest.approx(0.5) and ratio[1, 1] == pytest.approx(0.5)
    assert ratio[0, 2] == pytest.approx(1 / 3) and ratio[1, 0] == 0
    pmi = fit_theta(a, b, "pmi", alpha=0.0, positive=False)
    joint = np.array([[2, 0, 1], [0, 1, 0]], dtype=np.float64) / 4
    expected = np.log(joint[0, 0] / (joint[0].sum() * joint[:, 0].sum()))
    assert pmi[0, 0] == pytest.approx(expected, rel=1e-5)
    assert (fit_theta(a, b, "pmi", alpha=0.1) >= 0).all()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return load_dataset(make_shape_set(tmp_path_factory.mktemp("shapes"), copies=3))


@pytest.mark.parametrize("theta", ["pmi", "ratio"])
def test_colour_words_find_the_red_images(shapes, theta):
    encoder, problems = fit_bow(shapes.records, BowConfig(theta=theta, colours=16, objects=0))
    assert problems == []
    images = encoder.encode_images([r.image_path for r in shapes.records])
    query = encoder.encode_texts(["a red square"])[0]
    top = [shapes.records[i].image_name for i in np.argsort(-(images @ query))[:9]]
    assert all(name.startswith("red_") for name in top[:3]), top
    captions = encoder.encode_texts(["a blue circle", "a yellow triangle", "a green square"])
    blue = images[[i for i, r in enumerate(shapes.records) if r.image_name.startswith("blue_")][0]]
    assert int(np.argmax(captions @ blue)) == 0


def test_object_words_add_shape_and_model_round_trips(shapes, tmp_path):
    encoder, _ = fit_bow(shapes.records, BowConfig(colours=16, objects=5))
    assert encoder.dim == 16 + 1000
    saved = load_encoder(encoder.save(tmp_path / "model"))
    assert saved.kind == "bow-pmi" and saved.dim == encoder.dim
    paths = [r.image_path for r in shapes.records[:4]]
    np.testing.assert_allclose(saved.encode_images(paths), encoder.encode_images(paths), atol=1e-6)
    np.testing.assert_allclose(saved.encode_texts(["a red circle"]), encoder.encode_texts(["a red circle"]), atol=1e-6)


def test_bad_training_data_is_reported(tmp_path, shapes):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    records = list(shapes.records[:6])
    records[0] = type(records[0])("broken.png", broken, ["a red square"])
    _, problems = fit_bow(records, BowConfig(colours=4, objects=0, min_count=1))
    assert len(problems) == 1 and "broken.png" in problems[0]
    with pytest.raises(EncoderError, match="no usable training pairs"):
        fit_bow(records[:1], BowConfig(colours=4, objects=0))


def test_untrained_bow_spec_says_to_train_first():
    with pytest.raises(EncoderError, match="seesay train"):
        load_encoder("bow-pmi")


def test_object_words_are_cached_by_pixels(tmp_path, monkeypatch, shapes):
    from PIL import Image

    from retrieval.backbones import efficientnet
    from retrieval.visual_words import ObjectWords

    monkeypatch.setenv("SEESAY_CACHE", str(tmp_path))
    images = [Image.open(r.image_path).convert("RGB") for r in shapes.records[:3]]
    first = ObjectWords(top_k=5).weights(images)
    assert len(list((tmp_path / "objects").rglob("*.npy"))) == 3
    monkeypatch.setattr(efficientnet, "load_efficientnet_lite0", lambda: pytest.fail("cache missed"))
    np.testing.assert_allclose(ObjectWords(top_k=5).weights(images), first)
    np.testing.assert_allclose(first.sum(1), 1.0, rtol=1e-5)
    assert (ObjectWords(top_k=2).weights(images) > 0).sum(1).tolist() == [2, 2, 2]
