"""The contrastive trainer: losses, batching, a short real training run, resume, failures."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from retrieval.datasets import Dataset, Record
from retrieval.encoders.registry import load_encoder
from retrieval.errors import EncoderError
from retrieval.training import losses
from retrieval.training.schedule import warmup_cosine

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
           "purple": (140, 40, 160)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10)}


def make_shapes(root: Path, n: int = 30) -> Dataset:
    """`n` images of a coloured shape on a plain background, each with 3 captions."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    combos = [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
    for i in range(n):
        colour, shape, bg = combos[(i * 7) % len(combos)]
        img = Image.new("RGB", (96, 96), BACKGROUNDS[bg])
        d = ImageDraw.Draw(img)
        box = (20, 20, 76, 76)
        if shape == "circle":
            d.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            d.rectangle(box, fill=COLOURS[colour])
        else:
            d.polygon([(48, 16), (80, 78), (16, 78)], fill=COLOURS[colour])
        path = root / f"img{i:02d}.png"
        img.save(path)
        caps = [f"a {colour} {shape} on a {bg} background", f"{colour} {shape}", f"a picture of a {shape} that is {colour}"]
        records.append(Record(path.name, path, caps, "train"))
    return Dataset(records)


# ----------------------------------------------------------------------------- losses


def test_infonce_hand_made_value_and_symmetry():
    img = torch.eye(2)
    txt = torch.eye(2)
    scale = torch.tensor(math.log(2.0))  # logits 2 on the diagonal, 0 off it
    value = losses.infonce(img, txt, scale)
    assert value.item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-5)
    a = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    assert losses.infonce(a, b, scale).item() == pytest.approx(losses.infonce(b, a, scale).item(), rel=1e-6)


def test_temperature_gets_a_gradient_and_is_clamped():
    img = torch.eye(3)
    scale = torch.nn.Parameter(torch.tensor(1.0))
    losses.infonce(img, img, scale).backward()
    assert scale.grad is not None and scale.grad.item() < 0  # sharper is better for matched pairs
    with torch.no_grad():
        scale.fill_(10.0)
    losses.clamp_logit_scale(scale)
    assert scale.item() == pytest.approx(math.log(100.0))


def test_vse_max_violation():
    img = torch.eye(3)
    assert losses.vse_max_violation(img, img, margin=0.2).item() == 0.0
    swapped = img[[1, 0, 2]]
    assert losses.vse_max_violation(img, swapped, margin=0.2).item() > 0.0


def test_gather_is_identity_in_one_process():
    x = torch.randn(4, 3)
    gathered, offset = losses.gather_with_grad(x)
    assert gathered is x and offset == 0


def test_warmup_cosine():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(99, 100, 10) < 0.01


# ----------------------------------------------------------------------------- batching


def test_one_caption_per_image_per_batch():
    from retrieval.training.data import epoch_batches

    counts = np.array([5, 5, 3, 1] * 10)
    batches = epoch_batches(40, counts, 16, seed=0, epoch=0, n_views=2)
    seen = np.concatenate([b[0] for b in batches])
    assert sorted(seen.tolist()) == list(range(40))  # every image once per epoch
    for images, caption, view in batches:
        assert len(set(images.tolist())) == len(images)  # so no caption of one image is another's negative
        assert (caption < counts[images]).all() and (caption >= 0).all()
        assert set(view.tolist()) <= {0, 1}
    again = epoch_batches(40, counts, 16, seed=0, epoch=0, n_views=2)
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(batches, again))
    other = epoch_batches(40, counts, 16, seed=0, epoch=1, n_views=2)
    assert not (np.concatenate([b[0] for b in other]) == seen).all()  # reshuffled every epoch


# ----------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes(root / "images", 24), root / "cache"


def _recall(enc, ds):
    from retrieval.metrics import recall_at_k

    caps = [c for r in ds.records for c in r.captions]
    t2i = np.repeat(np.arange(len(ds.records)), [len(r.captions) for r in ds.records])
    return recall_at_k(enc.encode_images([r.image_path for r in ds.records]), enc.encode_texts(caps), t2i)


def test_training_improves_recall_and_resumes(shapes, tmp_path):
    from retrieval.training.trainer import train_encoder

    ds, cache = shapes
    out = tmp_path / "model"
    # Heads only, no query bank (TrainConfig's defaults, the shipped recipe, also train tower blocks and add one).
    kw = dict(batch_size=10, lr=5e-3, embed_dim=64, image_top=0, text_top=0, flip=False, hubness_tau=None, cache_dir=cache,
              warmup_epochs=0.0)
    train_encoder("towers", ds, ds, out, epochs=1, **kw)
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 1
    train_encoder("towers", ds, ds, out, epochs=3, resume=True, **kw)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2, 3]  # epoch 1 was not trained again
    assert (out / "learning_curve.png").stat().st_size > 1000
    enc = load_encoder(out)
    after = _recall(enc, ds)
    chance = 100.0 / len(ds.records)
    assert after.t2i["R@1"] > 5 * chance and after.i2t["R@1"] > 5 * chance, (after.t2i, after.i2t)
    assert json.loads((out / "encoder.json").read_text())["spec"] == "towers"
    vecs = enc.encode_texts(["a red circle"])
    assert vecs.shape == (1, 64) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)


def test_unreadable_images_are_skipped_and_reported(shapes, tmp_path, caplog):
    from retrieval.training.trainer import train_encoder

    ds, cache = shapes
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    records = ds.records[:12] + [Record("gone.jpg", tmp_path / "gone.jpg", ["a ghost"]), Record("broken.jpg", broken, ["junk"])]
    with caplog.at_level(logging.INFO, logger="retrieval.training"):
        out = train_encoder("towers", Dataset(records), None, tmp_path / "m", epochs=1, batch_size=8, embed_dim=32,
                            image_top=0, text_top=0, flip=False, hubness_tau=None, cache_dir=cache)
    first = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert any("gone.jpg" in p for p in first["skipped"]) and any("broken.jpg" in p for p in first["skipped"])
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("retrieval.training")]
    assert any("gone.jpg" in m for m in messages) and any(m.startswith("epoch=1") for m in messages), messages  # logged too
    assert load_encoder(out).dim == 32


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shapes, tmp_path, monkeypatch):
    from retrieval.training import losses, trainer

    ds, cache = shapes
    out = tmp_path / "m"
    kw = dict(batch_size=10, embed_dim=32, image_top=0, text_top=0, flip=False, cache_dir=cache)
    trainer.train_encoder("towers", ds, ds, out, epochs=1, **kw)
    good = (out / "heads.pt").read_bytes()
    monkeypatch.setattr(losses, "infonce", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(trainer.TrainingError, match="nan.*last good checkpoint"):
        trainer.train_encoder("towers", ds, ds, out, epochs=3, resume=True, **kw)
    assert (out / "heads.pt").read_bytes() == good
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 0


def test_checkpoint_of_another_architecture_is_refused(shapes, tmp_path):
    from retrieval.training.trainer import TrainingError, train_encoder

    ds, cache = shapes
    out = tmp_path / "m"
    kw = dict(batch_size=10, image_top=0, text_top=0, flip=False, cache_dir=cache)
    train_encoder("towers", ds, None, out, epochs=1, embed_dim=32, **kw)
    with pytest.raises(TrainingError, match="embed_dim"):
        train_encoder("towers", ds, None, out, epochs=2, embed_dim=48, resume=True, **kw)
    # A weights file that does not fit the manifest's dimension.
    manifest = json.loads((out / "encoder.json").read_text())
    manifest["config"]["embed_dim"] = 48
    manifest["dim"] = 48
    (out / "encoder.json").write_text(json.dumps(manifest))
    with pytest.raises(EncoderError, match="does not fit"):
        load_encoder(out)


def test_only_towers_can_be_trained(tmp_path):
    from retrieval.training.trainer import TrainingError, train_encoder

    with pytest.raises(TrainingError, match="towers"):
        train_encoder("bow-pmi", Dataset([]), None, tmp_path, epochs=1)


def test_two_backbones_mirrored_maps_and_a_query_bank(shapes, tmp_path):
    """Lite0 + Lite2 features concatenated, mirrored cached maps, 2 captions per image, a bank attached after training."""
    from retrieval.evaluation import evaluate
    from retrieval.training.trainer import train_encoder

    ds, cache = shapes
    out = train_encoder("towers", ds, ds, tmp_path / "m", epochs=2, batch_size=10, embed_dim=32, image_top=0, text_top=0,
                        image_backbones="lite0,lite2",
                        flip="maps", max_captions=2, hubness_tau=0.1, cache_dir=cache)
    enc = load_encoder(out)
    assert enc.cfg["image_backbones"] == ["lite0", "lite2"] and enc.cfg["image_in"] == 2560
    assert enc.dim == 33 and enc.querybank.images.shape == (24, 32) and enc.querybank.texts.shape == (48, 32)
    train = json.loads((out / "encoder.json").read_text())["config"]["train"]
    assert "hub_val_i2t_R@1" in train and train["flip"] == "maps"
    result = evaluate(enc, ds.records)
    assert result.without_hubness.i2t["R@1"] == pytest.approx(train["val_i2t_R@1"], abs=5)
    assert result.i2t["R@1"] == pytest.approx(train["hub_val_i2t_R@1"], abs=5)  # cached fp16 features vs pixels


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("alias", ["fast", "default"])
def test_train_config_is_the_shipped_recipe(alias):
    """TrainConfig's defaults reproduce the `fast` model (towers-flickr8k), DEFAULT_RECIPE the `default` one:
    architecture and training settings; the bank's temperature for `fast` (`default`'s was re-set after training)."""
    from retrieval.encoders.registry import ALIASES, SHIPPED_MODELS
    from retrieval.training.config import DEFAULT_RECIPE, TrainConfig

    shipped = json.loads((SHIPPED_MODELS / ALIASES[alias].folder / "encoder.json").read_text())["config"]
    config = TrainConfig() if alias == "fast" else DEFAULT_RECIPE
    model = {**config.model_config(), **({"hubness_tau": config.hubness_tau} if alias == "fast" else {})}
    assert model == {k: shipped.get(k, ["lite0"] if k == "image_backbones" else None) for k in model}
    recorded = {k: v for k, v in shipped["train"].items() if hasattr(config, k)}
    assert len(recorded) >= 12 and recorded == {k: getattr(config, k) for k in recorded}


def test_the_cli_options_default_to_the_configs():
    """`seesay train`'s option defaults are read from TrainConfig / FinetuneConfig, never retyped."""
    import inspect

    from cli.train import train
    from retrieval.training.config import FinetuneConfig, TrainConfig

    towers, openclip = TrainConfig(), FinetuneConfig()
    options = {name: p.default.default for name, p in inspect.signature(train).parameters.items()}
    checked = [name for name in options if hasattr(towers, name) and name != "lr"]
    assert len(checked) == 13
    for name in checked:
        assert options[name] == getattr(towers, name), name
        if hasattr(openclip, name):
            assert options[name] == getattr(openclip, name), f"{name}: the two trainers' defaults differ"
    assert options["lr"] is None  # each trainer's own: towers 1e-3, openclip 1e-5
    assert options["layer_decay"] == openclip.layer_decay and options["lock_image"] == openclip.lock_image
    assert options["flip_maps"] == (towers.flip == "maps")


def test_bad_settings_are_refused_before_any_work(tmp_path):
    from retrieval.training.config import TrainConfig, TrainingError
    from retrieval.training.trainer import train_encoder

    with pytest.raises(TrainingError, match="loss"):
        train_encoder("towers", Dataset([]), None, tmp_path, loss="triplet")
    with pytest.raises(TrainingError, match="flip"):
        train_encoder("towers", Dataset([]), None, tmp_path, TrainConfig(flip="sideways"))
    with pytest.raises(TypeError, match="embed"):
        train_encoder("towers", Dataset([]), None, tmp_path, embed=64)  # not a setting


DDP_RUN = """
import pickle
import sys
from pathlib import Path

import torch

from retrieval.training.trainer import train_encoder

torch.set_num_threads(1)
root, out, batch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
pairs = pickle.loads((root / "pairs.pkl").read_bytes())  # made once: rewriting the images would race between ranks
train_encoder("towers", pairs, None, out, epochs=2, batch_size=batch, lr=5e-3, embed_dim=32,
              image_top=0, text_top=0, flip=False, hubness_tau=None, warmup_epochs=0.5, cache_dir=root / "cache")
"""


@pytest.mark.slow
def test_two_processes_under_torchrun_train_the_towers_as_one(tmp_path):
    """gloo on the CPU: two ranks with 5 pairs each take the same steps as one process with 10 (DDP sums their parts)."""
    import os
    import pickle
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "run.py").write_text(DDP_RUN)
    (tmp_path / "pairs.pkl").write_bytes(pickle.dumps(make_shapes(tmp_path / "images", 20)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    one = [sys.executable, str(tmp_path / "run.py"), str(tmp_path), str(tmp_path / "one"), "10"]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(tmp_path / "run.py"),
           str(tmp_path), str(tmp_path / "two"), "5"]
    for command in (one, two):  # the first caches the features the two ranks then read
        subprocess.run(command, check=True, env=env, cwd=repo, capture_output=True, timeout=900)
    logs = [[json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()] for name in ("one", "two")]
    assert [e["loss"] for e in logs[0]] == pytest.approx([e["loss"] for e in logs[1]], rel=1e-4)
    assert logs[0][-1]["temperature"] == pytest.approx(logs[1][-1]["temperature"], rel=1e-4)
