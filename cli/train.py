"""`seesay train`: fit a bag-of-words baseline or train a neural encoder, save it as a model directory."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import AllowOutsideOpt, DataOpt, ImagesOpt, JsonOpt, SplitFileOpt, SplitOpt, err, print_json, read_data, report_problems
from retrieval.datasets import Dataset
from retrieval.encoders.bow import KIND_TO_THETA, BowConfig, fit_bow
from retrieval.training.config import FinetuneConfig, TrainConfig


TOWERS = TrainConfig()  # the shipped recipe: every towers option's default
OPENCLIP = FinetuneConfig()


def train(
    encoder: str = typer.Option(..., "--encoder", help="bow-pmi | bow-ratio | towers[:mpnet|:DIR] | openclip:ARCH@PATH | openclip:ARCH/TAG | openclip DIR"),
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
    epochs: int = typer.Option(TOWERS.epochs, help="towers: maximum epochs."),
    batch_size: int = typer.Option(TOWERS.batch_size, help="towers: pairs per batch (one caption per image)."),
    lr: Optional[float] = typer.Option(
        None, help=f"Peak learning rate (default: towers {TOWERS.lr:g} for the heads, openclip {OPENCLIP.lr:g} for the projections)."),
    loss: str = typer.Option(TOWERS.loss, help="towers: infonce (symmetric, learnable temperature) or vse (max-violation hinge)."),
    head: str = typer.Option(TOWERS.head, help="towers: projection head, linear or mlp."),
    embed_dim: int = typer.Option(TOWERS.embed_dim, help="towers: dimension of the shared space."),
    image_top: int = typer.Option(
        TOWERS.image_top, help="towers, openclip: unfreeze the top N image blocks (towers: at most 4 reuse cached features; openclip: -1 all)."),
    text_top: int = typer.Option(TOWERS.text_top, help="towers, openclip: unfreeze the top N text layers (0: heads only; openclip: -1 all)."),
    flip: bool = typer.Option(bool(TOWERS.flip), help="towers: also train on mirrored images (doubles the one-off feature caching)."),
    flip_maps: bool = typer.Option(
        TOWERS.flip == "maps", help="towers: mirror the cached feature maps instead of encoding mirrored images (no extra caching)."),
    image_backbones: str = typer.Option(
        TOWERS.image_backbones, help="towers: EfficientNet-Lite backbones, comma-separated (lite0, lite1, lite2), features concatenated."),
    max_captions: Optional[int] = typer.Option(TOWERS.max_captions, help="towers: train on at most this many captions per image (the first ones)."),
    hubness_tau: Optional[float] = typer.Option(TOWERS.hubness_tau, help="towers: attach querybank hubness correction with this temperature (0: none)."),
    patience: int = typer.Option(TOWERS.patience, help="towers: stop after this many epochs without a validation gain."),
    resume: bool = typer.Option(False, help="towers: continue from --out's last checkpoint."),
    lock_image: bool = typer.Option(OPENCLIP.lock_image, help="openclip: freeze the whole image tower, train the text side only (LiT)."),
    layer_decay: float = typer.Option(OPENCLIP.layer_decay, help="openclip: the k-th unfrozen block from the top trains at lr × this^k."),
    seed: int = typer.Option(TOWERS.seed, help="Random seed."),
    as_json: bool = JsonOpt,
) -> None:
    """Fit an encoder on training pairs and save it to --out."""
    dataset = read_data(data, images, split, split_file, quiet=as_json, allow_outside_images=allow_outside_images)
    val = None
    if val_split or val_split_file:
        val = read_data(data, images, val_split, val_split_file, quiet=as_json, allow_outside_images=allow_outside_images)
    shared = dict(epochs=epochs, batch_size=batch_size, loss=loss, seed=seed, image_top=image_top, text_top=text_top,
                  patience=patience, **({} if lr is None else {"lr": lr}))
    if encoder.partition(":")[0] == "openclip" or (Path(encoder) / "encoder.json").is_file():
        from retrieval.training.openclip_finetune import finetune_openclip

        config = FinetuneConfig(**shared, flip=flip, lock_image=lock_image, layer_decay=layer_decay)
        _saved(encoder, finetune_openclip(encoder, dataset, val, out, config, resume=resume), as_json)
    elif encoder.partition(":")[0] == "towers":
        from retrieval.training import train_encoder

        config = TrainConfig(**shared, head=head, embed_dim=embed_dim, flip="maps" if flip and flip_maps else flip,
                             image_backbones=image_backbones, max_captions=max_captions, hubness_tau=hubness_tau)
        _saved(encoder, train_encoder(encoder, dataset, val, out, config, resume=resume), as_json)
    elif encoder in KIND_TO_THETA:
        bow = BowConfig(theta=KIND_TO_THETA[encoder], colours=colours, objects=objects, colour_weight=colour_weight,
                        min_count=min_count, alpha=alpha)
        _fit_bow(encoder, dataset, bow, out, as_json)
    else:
        raise typer.BadParameter(
            f"unknown trainable encoder {encoder!r}; choose from {', '.join(KIND_TO_THETA)}, towers, openclip:…", param_hint="--encoder"
        )


def _saved(encoder: str, path: Path, as_json: bool) -> None:
    if as_json:
        print_json({"encoder": encoder, "out": str(path)})


def _fit_bow(encoder: str, dataset: Dataset, config: BowConfig, out: Path, as_json: bool) -> None:
    """Fit a bag-of-words baseline, save it, report what it holds."""
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
