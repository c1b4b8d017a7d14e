"""Pieces every command shares: dataset options, output helpers, the default encoder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from retrieval.datasets import Dataset, load_dataset, summarize_problems

if TYPE_CHECKING:
    from retrieval.metrics import RecallResult

DEFAULT_ENCODER = "default"

out = Console()
err = Console(stderr=True)

DataOpt = typer.Option(..., "--data", help="Captions file (CSV, Karpathy/COCO JSON, JSONL) or a folder of images with .txt sidecars.")
ImagesOpt = typer.Option(None, "--images", help="Root folder for relative image paths in the data file.")
SplitOpt = typer.Option(None, "--split", help="Split name (Karpathy JSON `split` field).")
SplitFileOpt = typer.Option(None, "--split-file", help="Text file listing the image names to use, one a line.")
AllowOutsideOpt = typer.Option(
    False, "--allow-outside-images",
    help="Read image paths in the data file that lead outside the images folder (absolute, or through ..).",
)
JsonOpt = typer.Option(False, "--json", help="Print one JSON object instead of tables.")
SearchParamOpt = typer.Option(
    [], "--search-param",
    help="FAISS search parameter of an approximate index as NAME=VALUE, repeatable: nprobe (IVF, default 16) "
         "or efSearch (HNSW, default 128). Higher: better recall, slower queries.",
)


def parse_search_params(values: list[str]) -> dict[str, int]:
    """["nprobe=64", ...] → {"nprobe": 64, ...}, or a BadParameter naming the malformed one."""
    params: dict[str, int] = {}
    for value in values:
        name, sep, number = value.partition("=")
        if not sep or not name.strip() or not number.strip().isdigit() or int(number) < 1:
            raise typer.BadParameter(f"expected NAME=POSITIVE_INTEGER (e.g. nprobe=64), got {value!r}",
                                     param_hint="--search-param")
        params[name.strip()] = int(number)
    return params


def read_data(
    data: Path,
    images: Optional[Path],
    split: Optional[str],
    split_file: Optional[Path],
    quiet: bool = False,
    allow_outside_images: bool = False,
) -> Dataset:
    """Load a dataset and report its skipped rows on stderr."""
    dataset = load_dataset(
        data, images_root=images, split=split, split_file=split_file, allow_outside_images=allow_outside_images
    )
    if dataset.problems and not quiet:
        err.print(f"[yellow]{summarize_problems(dataset.problems)}[/yellow]")
    return dataset


def print_json(payload: Any) -> None:
    """One JSON object on stdout."""
    typer.echo(json.dumps(payload, indent=2, default=str))


def recall_table(results: dict[str, RecallResult], title: str = "recall@k (%)") -> Table:
    """A table of `seesay eval`-shaped results, one row per encoder."""
    table = Table(title=title, caption="medr: median rank of the right answer, text→image/image→text (1 is best)")
    table.add_column("encoder", min_width=8, no_wrap=True)
    for column in ("t2i R@1", "t2i R@5", "t2i R@10", "i2t R@1", "i2t R@5", "i2t R@10", "RSUM", "medr"):
        table.add_column(column, justify="right")
    for name, r in results.items():
        t2i, i2t = r.t2i, r.i2t
        table.add_row(
            name,
            *(f"{d[k]:.1f}" for d in (t2i, i2t) for k in ("R@1", "R@5", "R@10")),
            f"{r.rsum:.1f}",
            f"{t2i['median_rank']:g}/{i2t['median_rank']:g}",
        )
    return table


def report_problems(problems: list[str], what: str) -> None:
    """Say on stderr how many items were skipped and which."""
    if problems:
        err.print(f"[yellow]{what}: {summarize_problems(problems)}[/yellow]")
