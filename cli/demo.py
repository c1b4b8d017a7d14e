"""`seesay demo`: the whole loop on a generated set of coloured shapes, offline, in a minute."""
from __future__ import annotations

from pathlib import Path

import typer

from cli.common import DEFAULT_ENCODER, err, out, recall_table
from cli.search import hits_table
from retrieval.collection import Collection
from retrieval.datasets import load_dataset
from retrieval.demo_data import make_shape_set
from retrieval.encoders import load_encoder
from retrieval.encoders.bow import BowConfig, fit_bow
from retrieval.engine import QueryEngine
from retrieval.evaluation import evaluate


def demo(
    workdir: Path = typer.Option(Path("seesay-demo"), "--dir", help="Where to write the demo's images, model and index."),
) -> None:
    """Train bow-pmi on generated shapes, index a fresh set, search both ways, print recall@k."""
    train = load_dataset(make_shape_set(workdir / "train", copies=3, seed=1))
    test = load_dataset(make_shape_set(workdir / "test", copies=2, seed=2))
    err.print(f"generated {len(train.records)} training and {len(test.records)} test images under {workdir}")
    bow, _ = fit_bow(train.records, BowConfig(colours=16), progress=True)
    bow.save(workdir / "bow-pmi")
    with Collection.open_or_create(workdir / "index", bow) as collection:
        out.print(collection.add(test.records, progress=True).summary())
    served = Collection.open(workdir / "index", read_only=True)
    engine = QueryEngine(served.index, served.encoder)
    out.print(hits_table("“a red square” → images", engine.search_texts(["a red square"], "image", 3)[0]))
    probe = test.records[len(test.records) // 2].image_path
    out.print(hits_table(f"{probe.name} → captions", engine.search_images([probe], "caption", 3)[0]))
    results = {"bow-pmi": evaluate(bow, test.records)}
    results[DEFAULT_ENCODER] = evaluate(load_encoder(DEFAULT_ENCODER), test.records, progress=True)
    out.print(recall_table(results, f"test set: {len(test.records)} images, {results[DEFAULT_ENCODER].n_captions} captions"))
