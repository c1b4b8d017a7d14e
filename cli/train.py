"""`seesay train`: fit a bag-of-words baseline or train a neural encoder, save it as a model directory."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import DataOpt, ImagesOpt, JsonOpt, SplitFileOpt, SplitOpt, err, print_json, read_data, report_problems
from retrieval.encoders.bow import KIND_TO_THETA, BowConfig, fit_bow


def train(
    encoder: str = typer.Option(..., "--encoder", help="bow-pmi | bow-ratio"),
    data: Path = DataOpt,
    images: Optional[Path] = ImagesOpt,
    split: Optional[str] = SplitOpt,
    split_file: Optional[Path] = SplitFileOpt,
    out: Path = typer.Option(..., "--out", help="Directory to save the trained model in."),
    colours: int = typer.Option(BowConfig.colours, help="bow: number of k-means colour words (0: none)."),
    objects: int = typer.Option(BowConfig.objects, help="bow: top-k ImageNet labels as object words (0: none)."),
    colour_weight: float = typer.Option(BowConfig.colour_weight, help="bow: share of colour words in an image's visual words."),
    min_count: int = typer.Option(BowConfig.min_count, help="bow: minimum count of a caption word to enter the vocabulary."),
    alpha: float = typer.Option(BowConfig.alpha, help="bow-pmi: add-alpha smoothing of co-occurrence counts."),
    as_json: bool = JsonOpt,
) -> None:
    """Fit an encoder on training pairs and save it to --out."""
    dataset = read_data(data, images, split, split_file)
    if encoder not in KIND_TO_THETA:
        raise typer.BadParameter(f"unknown trainable encoder {encoder!r}; choose from {', '.join(KIND_TO_THETA)}", param_hint="--encoder")
    config = BowConfig(
        theta=KIND_TO_THETA[encoder], colours=colours, objects=objects, colour_weight=colour_weight, min_count=min_count, alpha=alpha
    )
    model, problems = fit_bow(dataset.records, config, progress=not as_json)
    model.save(out)
    report_problems(problems, "skipped training images")
    summary = {"encoder": model.spec, "out": str(out), "dim": model.dim, "vocabulary": len(model.vocabulary), "images": len(dataset.records) - len(problems), "skipped": len(problems)}
    if as_json:
        print_json(summary)
    else:
        err.print(f"saved {encoder} model to {out} (dim {model.dim}, {len(model.vocabulary)} caption words)")
