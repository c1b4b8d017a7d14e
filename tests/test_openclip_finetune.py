"""Fine-tuning open_clip models: a tiny random ViT on coloured-shape images made with Pillow."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from retrieval.datasets import Dataset, Record
from retrieval.encoders.openclip import file_sha256
from retrieval.encoders.registry import load_encoder
from retrieval.evaluation import evaluate
from retrieval.training.openclip_finetune import FinetuneConfig, finetune_openclip
from retrieval.training.openclip_towers import ImageTower, TextTower
from retrieval.training.trainer import TrainingError

from openclip_tiny import register_tiny, tiny_checkpoint

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
           "purple": (140, 40, 160)}
SHAPES = ("circle", "square", "triangle")


def shape_images(root: Path, per_combo: int, seed: int) -> Dataset:
    """Each colour × shape `per_combo` times, at random places and sizes, with three captions each."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for colour in COLOURS:
        for shape in SHAPES:
            for k in range(per_combo):
                img = Image.new("RGB", (64, 64), (245, 245, 245))
                draw = ImageDraw.Draw(img)
                s = rng.randint(28, 44)
                x, y = rng.randint(4, 60 - s), rng.randint(4, 60 - s)
                if shape == "circle":
                    draw.ellipse((x, y, x + s, y + s), fill=COLOURS[colour])
                elif shape == "square":
                    draw.rectangle((x, y, x + s, y + s), fill=COLOURS[colour])
                else:
                    draw.polygon([(x + s // 2, y), (x + s, y + s), (x, y + s)], fill=COLOURS[colour])
                path = root / f"{colour}-{shape}-{k}.png"
                img.save(path)
                records.append(Record(path.name, path, [f"a {colour} {shape}", f"{colour} {shape}",
                                                        f"a {shape} coloured {colour}"]))
    return Dataset(records)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model's ops are microseconds: on a busy machine, more threads only wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(spec of a random tiny open_clip checkpoint, its file, train split, dev split, feature cache)."""
    root = tmp_path_factory.mktemp("openclip_finetune")
    arch, _ = register_tiny(root)
    ckpt = tiny_checkpoint(arch, root / "tiny.pt")
    train, dev = shape_images(root / "train", 3, seed=0), shape_images(root / "dev", 1, seed=1)
    return f"openclip:{arch}@{ckpt}", ckpt, train, dev, root / "cache"


QUICK = dict(batch_size=9, lr=1e-3, warmup_epochs=0.5, patience=None)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_cut_towers_give_the_whole_models_vectors(tiny):
    spec, *_ = tiny
    enc = load_encoder(spec)
    model = enc.model
    pixels = torch.rand(3, 3, 32, 32)
    tokens = enc.tokenizer(["a red circle", "a much longer caption about a purple triangle", "x"])
    with torch.no_grad():
        image, text = model.encode_image(pixels), model.encode_text(tokens)
        for top in (-1, 0, 1, 2):
            tower = ImageTower(model, top, locked=False)
            assert torch.allclose(tower.top(tower.bottom(pixels)), image, atol=1e-5)
            tower = TextTower(model, top)
            rows = tower.bottom(tokens)
            padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
            assert torch.allclose(tower.top(padded, torch.tensor([len(r) for r in rows])), text, atol=1e-5)
        locked = ImageTower(model, 2, locked=True)
        assert torch.allclose(locked.top(locked.bottom(pixels)), image, atol=1e-5)
    with pytest.raises(TrainingError, match="has 2 blocks"):
        ImageTower(model, 3, locked=False)


def test_full_finetuning_lowers_loss_raises_dev_recall_resumes_and_reloads(tiny, tmp_path):
    spec, ckpt, train, dev, cache = tiny
    out = tmp_path / "model"
    config = FinetuneConfig(epochs=2, image_top=-1, text_top=-1, **QUICK)
    finetune_openclip(spec, train, dev, out, config, cache_dir=cache)
    assert [e["epoch"] for e in _log(out)] == [1, 2]
    finetune_openclip(spec, train, dev, out, FinetuneConfig(**{**config.__dict__, "epochs": 6}), resume=True,
                      cache_dir=cache)
    log = _log(out)
    assert [e["epoch"] for e in log] == [1, 2, 3, 4, 5, 6]  # epochs 1-2 were not trained again
    assert log[-1]["loss"] < 0.6 * log[0]["loss"], [e["loss"] for e in log]
    manifest = json.loads((out / "encoder.json").read_text())
    recorded = manifest["config"]["train"]
    before = recorded["val_before"]
    assert recorded["val_i2t_R@1"] > before["i2t_R@1"] and recorded["val_t2i_R@1"] > before["t2i_R@1"]
    assert recorded["val_rsum"] > before["rsum"] + 100, (before, recorded)
    assert manifest["config"]["base"] == {"spec": spec, "sha256": file_sha256(ckpt)}
    assert (out / "learning_curve.png").stat().st_size > 1000
    # The saved model is an encoder like any other: it gives the dev recall the trainer measured...
    enc = load_encoder(out)
    metrics = evaluate(enc, dev.records)
    assert metrics.i2t["R@1"] == pytest.approx(recorded["val_i2t_R@1"])
    assert metrics.t2i["R@1"] == pytest.approx(recorded["val_t2i_R@1"])
    # ...and reloads to identical vectors.
    paths = [r.image_path for r in dev.records[:5]]
    again = load_encoder(out)
    assert np.array_equal(enc.encode_images(paths), again.encode_images(paths))
    assert np.array_equal(enc.encode_texts(["a red circle"]), again.encode_texts(["a red circle"]))


@pytest.mark.parametrize("mode", ["lit", "top"])
def test_frozen_parts_stay_as_they_were(tiny, tmp_path, mode):
    spec, ckpt, train, dev, cache = tiny
    settings = dict(lock_image=True, text_top=1) if mode == "lit" else dict(image_top=1, text_top=0)
    out = finetune_openclip(spec, train, dev, tmp_path / "m", FinetuneConfig(epochs=1, **QUICK, **settings),
                            cache_dir=cache)
    base = torch.load(ckpt, weights_only=True)
    tuned = torch.load(out / "open_clip.pt", weights_only=True)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert "token_embedding.weight" not in changed and "visual.conv1.weight" not in changed
    assert "transformer.resblocks.0.attn.in_proj_weight" not in changed  # below the cut, both modes
    if mode == "lit":  # the image tower, projection included, is frozen
        assert not any(k.startswith("visual.") for k in changed)
        assert {"transformer.resblocks.1.attn.in_proj_weight", "text_projection"} <= changed
    else:
        assert {"visual.transformer.resblocks.1.attn.in_proj_weight", "visual.proj", "text_projection"} <= changed
        assert "visual.transformer.resblocks.0.attn.in_proj_weight" not in changed
        assert "transformer.resblocks.1.attn.in_proj_weight" not in changed


def test_bad_images_are_skipped_and_other_settings_or_encoders_refused(tiny, tmp_path):
    spec, _, train, dev, cache = tiny
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    records = train.records[:18] + [Record("gone.png", tmp_path / "gone.png", ["a ghost"]), Record("broken.png", broken, ["junk"])]
    out = tmp_path / "m"
    config = FinetuneConfig(epochs=1, image_top=1, text_top=1, **QUICK)
    finetune_openclip(spec, Dataset(records), None, out, config, cache_dir=cache)
    skipped = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])["skipped"]
    assert [s.split(":")[0] for s in skipped] == ["gone.png", "broken.png"]
    with pytest.raises(TrainingError, match="image_top"):
        finetune_openclip(spec, Dataset(records), None, out, FinetuneConfig(**{**config.__dict__, "epochs": 2, "image_top": 2}),
                          resume=True, cache_dir=cache)
    with pytest.raises(TrainingError, match="fine-tunes openclip"):
        finetune_openclip("test-colour:8", train, None, tmp_path / "x", config, cache_dir=cache)


def test_a_non_finite_loss_stops_and_keeps_the_last_good_epoch(tiny, tmp_path, monkeypatch):
    from retrieval.training import losses

    spec, _, train, dev, cache = tiny
    out = tmp_path / "m"
    config = FinetuneConfig(epochs=1, image_top=1, text_top=1, **QUICK)
    finetune_openclip(spec, train, dev, out, config, cache_dir=cache)
    good = (out / "open_clip.pt").read_bytes()
    monkeypatch.setattr(losses, "infonce", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainingError, match="nan.*last good checkpoint"):
        finetune_openclip(spec, train, dev, out, FinetuneConfig(**{**config.__dict__, "epochs": 3}), resume=True,
                          cache_dir=cache)
    assert (out / "open_clip.pt").read_bytes() == good
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 0


def test_train_index_and_eval_from_the_cli(tiny, tmp_path, monkeypatch):
    from cli.app import app

    spec, ckpt, train, dev, _ = tiny
    monkeypatch.setenv("SEESAY_CACHE", str(tmp_path / "cache"))
    root = ckpt.parent  # the images lie in root/train and root/dev
    rows = ["image,caption"]
    for split, ds in (("train", train), ("dev", dev)):
        names = [str(r.image_path.relative_to(root)) for r in ds.records]
        rows += [f"{name},{c}" for name, r in zip(names, ds.records) for c in r.captions]
        (tmp_path / f"{split}.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    common = ["--data", str(tmp_path / "pairs.csv"), "--images", str(root), "--json"]
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--encoder", spec, *common, "--split-file", str(tmp_path / "train.txt"),
                                 "--val-split-file", str(tmp_path / "dev.txt"), "--out", str(tmp_path / "model"),
                                 "--epochs", "1", "--batch-size", "9", "--image-top", "1", "--text-top", "1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", "--encoder", str(tmp_path / "model"), *common, "--split-file", str(tmp_path / "dev.txt")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_images"] == len(dev.records)
    result = runner.invoke(app, ["index", "--encoder", str(tmp_path / "model"), *common, "--index", str(tmp_path / "index")])
    assert result.exit_code == 0, result.output


DDP_RUN = """
import sys
from pathlib import Path

import open_clip
import torch

from retrieval.datasets import Dataset
from retrieval.training.openclip_finetune import FinetuneConfig, finetune_openclip
from test_openclip_finetune import shape_images

torch.set_num_threads(1)
root, out, batch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
open_clip.add_model_config(root / "seesay-tiny.json")
train = Dataset(shape_images(root / "train", 3, seed=0).records[:40])
config = FinetuneConfig(epochs=2, batch_size=batch, lr=1e-3, warmup_epochs=0.5, patience=None, image_top=1, text_top=1, flip=False)
finetune_openclip(f"openclip:seesay-tiny@{root / 'tiny.pt'}", train, None, out, config, cache_dir=root / "cache")
"""


@pytest.mark.slow
def test_two_processes_under_torchrun_train_as_one_with_their_global_batch(tiny, tmp_path):
    import os
    import subprocess
    import sys

    _, ckpt, *_ = tiny
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "run.py").write_text(DDP_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests")])}
    one = [sys.executable, str(tmp_path / "run.py"), str(ckpt.parent), str(tmp_path / "one"), "10"]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(tmp_path / "run.py"),
           str(ckpt.parent), str(tmp_path / "two"), "5"]
    for command in (one, two):
        subprocess.run(command, check=True, env=env, cwd=repo, capture_output=True, timeout=600)
    losses = [[e["loss"] for e in _log(tmp_path / name)] for name in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)  # the same updates: 4 batches of 10 an epoch either way
