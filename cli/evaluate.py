"""`seesay eval`: recall@k of an encoder on a captioned dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import (
    DEFAULT_ENCODER,
    AllowOutsideOpt,
    DataOpt,
    ImagesOpt,
    JsonOpt,
    SplitFileOpt,
    SplitOpt,
    out,
    print_json,
    read_data,
    recall_table,
    report_problems,
)
from retrieval.encoders import load_encoder
from retrieval.evaluation import evaluate
from retrieval.metrics import RecallResult


def eval_command(
    encoder: str = typer.Option(DEFAULT_ENCODER, "--encoder", help="Encoder spec or saved model directory."),
    data: Path = DataOpt,
    images: Optional[Path] = ImagesOpt,
    allow_outside_images: bool = AllowOutsideOpt,
    split: Optional[str] = SplitOpt,
    split_file: Optional[Path] = SplitFileOpt,
    batch_size: int = typer.Option(64, help="Images per encoding batch."),
    as_json: bool = JsonOpt,
) -> None:
    """Recall@1/5/10 both ways, median and mean rank, RSUM (recall in percent); with and without hubness correction when the encoder has it."""
    dataset = read_data(data, images, split, split_file, quiet=as_json, allow_outside_images=allow_outside_images)
    result = evaluate(load_encoder(encoder), dataset.records, batch_size, progress=not as_json)
    if as_json:
        print_json(result.to_dict())
        return
    report_problems(result.problems, "skipped images")
    rows: dict[str, RecallResult] = {encoder: result}
    if result.without_hubness is not None:  # the same vectors scored without the bias coordinate
        rows = {f"{encoder} (hubness-corrected)": result, f"{encoder} (without)": result.without_hubness}
    out.print(recall_table(rows, f"{data.name}: {result.n_images} images, {result.n_captions} captions"))
