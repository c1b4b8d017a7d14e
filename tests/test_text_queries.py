"""Text queries without torch: the numpy text path gives the full encoder's query rows, and a
text search from the command line loads neither torch nor the image side."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import FLICKR8K
from retrieval.backbones import numpy_text
from retrieval.encoders.registry import load_encoder, load_text_queries

ROOT = Path(__file__).resolve().parents[1]
# Captions a tokenizer can get wrong: empty, accents and case, punctuation, a long one (truncated).
ODD = ["", "a", "UPPER case, accents: café naïve Ünïcödé — and “quotes”!", "dog " * 300]


def real_captions(n: int = 40) -> list[str]:
    """The first `n` captions of Flickr8k dev images (synthetic ones where the data set is absent)."""
    if not (FLICKR8K / "captions.csv").is_file():
        return [f"a {c} dog runs across the {p} number {i}" for i, (c, p) in
                enumerate(zip(["brown", "black", "white", "spotted"] * 10, ["grass", "snow", "beach", "road"] * 10))][:n]
    dev = set((FLICKR8K / "splits" / "dev.txt").read_text().split())
    with (FLICKR8K / "captions.csv").open(newline="") as f:
        return [row["caption"] for row in csv.DictReader(f) if row["image"] in dev][:n]


def assert_same_queries(model_dir: Path, encoder, atol: float = 1e-6) -> None:
    """The light path's query rows equal the full encoder's, both directions (hubness marks), to within `atol`."""
    light = load_text_queries(model_dir)
    assert light is not None and light.dim == encoder.dim and light.digest == encoder.digest
    for texts, cross_modal in ((real_captions(), True), (ODD, False)):  # apart: the long one pads only its own batch
        want = encoder.as_queries(encoder.encode_texts(texts), cross_modal)  # float32, as stored captions
        got = light.encode_text_queries(texts, cross_modal)
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.abs(got - want).max() < atol, np.abs(got - want).max()


# The shipped models: `fast` (MiniLM) in the default suite; `default` (MPNet, zero-shot coordinates) with the slow
# cases, as a fresh SEESAY_CACHE makes it assemble and verify MPNet's 400 MB from its wheels first (minutes on 2 cores).
# Zero-shot mixing is also checked below on MiniLM in the default suite, MPNet with random heads in the slow cases.
SHIPPED = ["fast", pytest.param("default", marks=pytest.mark.slow)]


@pytest.mark.parametrize("alias", SHIPPED)
def test_the_shipped_model_answers_text_queries_identically_without_torch(tmp_path, monkeypatch, alias):
    from retrieval.encoders.registry import ALIASES, SHIPPED_MODELS

    folder = SHIPPED_MODELS / ALIASES[alias].folder
    monkeypatch.setenv("SEESAY_CACHE", str(tmp_path / "cache"))
    assert_same_queries(folder, load_encoder(folder))
    assert list((tmp_path / "cache" / "text-heads").glob("*.safetensors")), "the text heads were not cached"


@pytest.mark.parametrize("cfg", [
    {"head": "mlp", "embed_dim": 32, "zeroshot_weight": 0.3},  # no unfrozen layer: the model's own embeddings
    {"head": "linear", "embed_dim": 32, "text_top": 2, "zeroshot_weight": 0.3},  # two unfrozen layers, mixed
])
def test_trained_towers_of_other_shapes_answer_identically(tmp_path, monkeypatch, cfg):
    import torch

    from retrieval.encoders.towers import TowersEncoder

    monkeypatch.setenv("SEESAY_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    encoder = TowersEncoder(cfg, device=torch.device("cpu"))
    with torch.no_grad():  # heads away from their initialisation, as after training
        for p in encoder.heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    saved = encoder.save(tmp_path / "model")
    assert_same_queries(saved, load_encoder(saved))


def test_bfloat16_queries_stay_close_to_float32_and_the_setting_is_honoured(tmp_path, monkeypatch):
    """A query runs a copy of the text side with packed linears, in bfloat16 where the CPU multiplies it natively."""
    import torch

    from retrieval.encoders.towers import TowersEncoder
    from retrieval.errors import SeesayError

    torch.manual_seed(0)
    encoder = TowersEncoder({"embed_dim": 32, "text_top": 1, "zeroshot_weight": 0.3}, device=torch.device("cpu"))
    texts = real_captions(8)
    exact = encoder.as_queries(encoder.encode_texts(texts), True)
    monkeypatch.setenv("SEESAY_QUERY_PRECISION", "float32")
    assert np.abs(encoder.encode_text_queries(texts, True) - exact).max() < 1e-5  # float32 products, packed
    monkeypatch.setenv("SEESAY_QUERY_PRECISION", "bfloat16")
    rows = encoder.encode_text_queries(texts, True)
    assert rows.dtype == np.float32 and rows.shape == exact.shape
    assert np.abs(rows - exact).max() > 1e-4, "the bfloat16 linears were not used"
    assert (rows * exact).sum(axis=1).min() > 0.999
    assert np.array_equal(encoder.as_queries(encoder.encode_texts(texts), True), exact)  # stored vectors: still float32
    with torch.no_grad():  # more training after queries were made: queries follow the new weights
        encoder.heads.text_head.proj.weight.mul_(-1)
    assert np.abs(encoder.encode_text_queries(texts, True) - encoder.as_queries(encoder.encode_texts(texts), True)).max() < 0.01
    monkeypatch.setenv("SEESAY_QUERY_PRECISION", "half")
    with pytest.raises(SeesayError, match="SEESAY_QUERY_PRECISION"):
        encoder.encode_text_queries(texts, True)


@pytest.mark.slow
def test_the_mpnet_text_tower_answers_identically(tmp_path, monkeypatch):
    """MPNet's relative-position bias and its padding-aware positions, against transformers."""
    import torch

    from retrieval.backbones import sentence
    from retrieval.encoders.towers import TowersEncoder

    try:
        sentence.resolve_text_model(sentence.MPNET)
    except Exception as exc:  # noqa: BLE001 - not installed here: say which package is missing
        pytest.skip(str(exc))
    monkeypatch.setenv("SEESAY_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    encoder = TowersEncoder({"text_model": "mpnet", "text_top": 1, "embed_dim": 32}, device=torch.device("cpu"))
    saved = encoder.save(tmp_path / "model")
    # Twelve 768-wide float32 layers summed in another order than torch's: 1.5e-6 measured on 32-d unit rows.
    assert_same_queries(saved, load_encoder(saved), atol=3e-6)


def test_a_model_the_numpy_path_cannot_run_exactly_is_left_to_the_encoder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "distilbert", "hidden_act": "gelu"}))
    assert not numpy_text.supports(folder)


@pytest.mark.parametrize("alias", SHIPPED)
def test_a_text_search_loads_no_torch_and_finds_what_the_encoder_finds(tmp_path, alias):
    """`seesay search "text"` on an index of a shipped model: torch only once, to cache the text heads."""
    from PIL import Image

    for name, colour in [("red", (220, 20, 20)), ("green", (20, 200, 20)), ("blue", (20, 20, 220))]:
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"a plain {name} square")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "SEESAY_CACHE": str(tmp_path / "cache")}
    made = subprocess.run([sys.executable, "-m", "cli.app", "index", "--data", tmp_path, "--index", tmp_path / "i", "--encoder", alias, "--json"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert made.returncode == 0, made.stderr
    heavy = ("torch", "torchvision", "transformers", "sentence_transformers")
    probe = ("import json, sys\nfrom cli.app import main\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})), file=sys.stderr)")
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", probe, "search", "--index", tmp_path / "i", "a red square", "-k", "3", "--json"],
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert done.returncode == 0, done.stderr
        runs.append((json.loads(done.stdout), json.loads(done.stderr.strip().splitlines()[-1])))
    (first, _), (second, loaded) = runs
    assert loaded == [], f"a text search imported {loaded[:5]}"
    assert first == second
    full = subprocess.run([sys.executable, "-c", "from retrieval.collection import Collection\nfrom retrieval.engine import QueryEngine\n"
                           f"c = Collection.open({str(tmp_path / 'i')!r}, read_only=True)\n"
                           "hits = QueryEngine(c.index, c.encoder).search_texts(['a red square'], 'image', 3)[0]\n"
                           "print([[h.item.id, h.score] for h in hits])"],
                          capture_output=True, text=True, cwd=ROOT, env={**env, "SEESAY_QUERY_PRECISION": "float32"}, timeout=600)
    assert full.returncode == 0, full.stderr  # float32: the numpy path's precision (bfloat16 queries: test_bfloat16_…)
    want = json.loads(full.stdout)
    assert [h["id"] for h in second["hits"]] == [i for i, _ in want]
    np.testing.assert_allclose([h["score"] for h in second["hits"]], [s for _, s in want], atol=1e-5)
