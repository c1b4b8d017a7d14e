"""`seesay train`: fit a bag-of-words baseline or train a neural encoder, save it as a model directory."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import AllowOutsideOpt, DataOpt, ImagesOpt, JsonOpt, SplitFileOpt, SplitOpt, err, print_json, read_data, report_problems
from retrieval.encoders.bow import KIND_TO_THETA, BowConfig, fit_bow


def train(
    encoder: str = typer.Option(..., "--encoder", help="bow-pmi | bow-ratio | towers | towers:TEXT_MODEL_DIR"),
    data: Path = DataOpt,
    images: Optional[Path] = ImagesOpt,
    allow_outside_images: bool = AllowOutsideOpt,
    split: Optional[str] = SplitOpt,
    split_file: Optional[Path] = SplitFileOpt,
    out: Path = typer.Option(..., "--out", help="Directory to save the trained model in."),
    colours: int = typer.Option(BowConfig.colours, help="bow: number of k-means colour words (0: none)."),
    objects: int = typer.Option(BowConfig.objects, help="bow: top-k ImageNet labels as object words (0: none)."),
    colour_weight: float = typer.Option(BowConfig.colour_weight, help="bow: share of colour words in an image's visual words."),
    min_count: int = typer.Option(BowConfig.min_count, help="bow: minimum count of a caption word to enter the vocabulary."),
    alpha: float = typer.Option(BowConfig.alpha, help="bow-pmi: add-alpha smoothing of co-occurrence counts."),
    val_split: Optional[str] = typer.Option(None, "--val-split", help="towers: validation split name (Karpathy JSON)."),
    val_split_file: Optional[Path] = typer.Option(None, "--val-split-file", help="towers: file listing the validation images."),
    epochs: int = typer.Option(15, help="towers: maximum epochs."),
    batch_size: int = typer.Option(256, help="towers: pairs per batch (one caption per image)."),
    lr: float = typer.Option(1e-3, help="towers: peak learning rate of the heads."),
    loss: str = typer.Option("infonce", help="towers: infonce (symmetric, learnable temperature) or vse (max-violation hinge)."),
    head: str = typer.Option("linear", help="towers: projection head, linear or mlp."),
    embed_dim: int = typer.Option(1024, help="towers: dimension of the shared space."),
    image_top: int = typer.Option(4, help="towers: unfreeze the top N blocks of the image tower (at most 4 reuse the cached features below them)."),
    text_top: int = typer.Option(1, help="towers: unfreeze the top N layers of the text tower (0: heads only)."),
    flip: bool = typer.Option(True, help="towers: also train on mirrored images (doubles the one-off feature caching)."),
    patience: int = typer.Option(4, help="towers: stop after this many epochs without a validation gain."),
    resume: bool = typer.Option(False, help="towers: continue from --out's last checkpoint."),
    seed: int = typer.Option(0, help="Random seed."),
    as_json: bool = JsonOpt,
) -> None:
    """Fit an encoder on training pairs and save it to --out."""
    dataset = read_data(data, images, split, split_file, quiet=as_json, allow_outside_images=allow_outside_images)
    if encoder.partition(":")[0] == "towers":
        from retrieval.training import train_encoder

        val = None
        if val_split or val_split_file:
            val = read_data(data, images, val_split, val_split_file, quiet=as_json, allow_outside_images=allow_outside_images)
        path = train_encoder(
            encoder, dataset, val, out, epochs=epochs, batch_size=batch_size, lr=lr, loss=loss, resume=resume, seed=seed,
            head=head, embed_dim=embed_dim, image_top=image_top, text_top=text_top, flip=flip, patience=patience,
            log=(lambda _m: None) if as_json else (lambda m: err.print(m, markup=False, highlight=False)),
        )
        if as_json:
            print_json({"encoder": encoder, "out": str(path)})
        return
    if encoder not in KIND_TO_THETA:
        raise typer.BadParameter(
            f"unknown trainable encoder {encoder!r}; choose from {', '.join(KIND_TO_THETA)}, towers", param_hint="--encoder"
        )
    config = BowConfig(
        theta=KIND_TO_THETA[encoder], colours=colours, objects=objects, colour_weight=colour_weight, min_count=min_count, alpha=alpha
    )
    model, problems = fit_bow(dataset.records, config, progress=not as_json)
    model.save(out)
    report_problems(problems, "skipped training images")
    summary = {
        "encoder": model.spec,
        "out": str(out),
        "dim": model.dim,
        "vocabulary": len(model.vocabulary),
        "images": len(dataset.records) - len(problems),
        "skipped": len(problems),
    }
    if as_json:
        print_json(summary)
    else:
        err.print(f"saved {encoder} model to {out} (dim {model.dim}, {len(model.vocabulary)} caption words)")
