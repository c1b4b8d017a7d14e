"""`seesay index` and `seesay info`: build or extend an index, describe one."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.common import (
    DEFAULT_ENCODER,
    AllowOutsideOpt,
    DataOpt,
    ImagesOpt,
    JsonOpt,
    SplitFileOpt,
    SplitOpt,
    err,
    out,
    print_json,
    read_data,
    report_problems,
)
from indexer import Index
from indexer.sizing import choose_factory, parse_memory
from retrieval.collection import Collection
from retrieval.encoders import load_encoder
from retrieval.errors import SeesayError
from retrieval.sources import Source, record_source
from retrieval.sync import images_at

IndexOpt = typer.Option(..., "--index", help="Index directory.")


def index(
    data: Path = DataOpt,
    index_dir: Path = IndexOpt,
    encoder: str = typer.Option(DEFAULT_ENCODER, "--encoder", help="Encoder spec or saved model directory."),
    images: Optional[Path] = ImagesOpt,
    allow_outside_images: bool = AllowOutsideOpt,
    split: Optional[str] = SplitOpt,
    split_file: Optional[Path] = SplitFileOpt,
    factory: Optional[str] = typer.Option(
        None, help="FAISS factory string for a new index (default Flat): Flat, IVF1024,PQ32, HNSW32, ..., or auto (from the data's size and --memory)."
    ),
    memory: str = typer.Option("4G", "--memory", help="Memory budget of the vectors' index for --factory auto (e.g. 4G, 512M)."),
    db_url: Optional[str] = typer.Option(None, help="SQLAlchemy URL for the metadata (default: SQLite file in the index)."),
    batch_size: int = typer.Option(64, help="Images per encoding batch."),
    engine: str = typer.Option("local", "--engine", help="local: embed in this process; ray: on a Ray cluster (pip install 'seesay[ray]')."),
    address: Optional[str] = typer.Option(
        None, "--address", help="--engine ray: the cluster to join (auto, or HOST:PORT of its head); default: a Ray started on this machine for the run."
    ),
    job_dir: Optional[str] = typer.Option(
        None, "--job-dir",
        help="--engine ray: folder or URI (s3://...) for the job's plan and shards, reachable by every node (default: DIR/.jobs).",
    ),
    actors: int = typer.Option(2, "--actors", min=1, help="--engine ray: most encoder actors (one per GPU or worker)."),
    as_json: bool = JsonOpt,
) -> None:
    """Embed a captioned image set into an index (created if new, extended if not)."""
    if engine not in ("local", "ray"):
        raise typer.BadParameter(f"expected local or ray, got {engine!r}", param_hint="--engine")
    if engine == "local" and (address or job_dir):
        raise typer.BadParameter("--address and --job-dir apply to --engine ray", param_hint="--engine")
    dataset = read_data(data, images, split, split_file, quiet=as_json, allow_outside_images=allow_outside_images)
    loaded = load_encoder(encoder)
    if factory == "auto":
        n = max(len(dataset.records), sum(len(record.captions) for record in dataset.records))
        factory = choose_factory(n, loaded.dim, parse_memory(memory))
        if not as_json:
            out.print(f"factory for {n:,} vectors within {memory}: {factory}")
    collection = Collection.open_or_create(index_dir, loaded, factory=factory, db_url=db_url)
    if engine == "ray":
        from retrieval.distributed.job import index_with_ray

        report = index_with_ray(
            collection, dataset.records, address=address, jobs_dir=job_dir, actors=actors, batch_size=batch_size,
            progress=not as_json,
        )
    else:
        report = collection.add(dataset.records, batch_size=batch_size, progress=not as_json)
    record_source(index_dir, Source.given(data, images, split, split_file, allow_outside_images))
    problems = dataset.problems + report.problems
    shortfall = collection.index.training_shortfall()
    if shortfall:
        waiting = ", ".join(f"{need} more {kind}s" for kind, need in shortfall.items())
        err.print(
            f"[yellow]note: FAISS {collection.index.info().factory} cannot be trained until it has {waiting}; "
            "until then those searches scan every vector (exact)[/yellow]",
            soft_wrap=True,
        )
    if as_json:
        print_json({**vars(report), "problems": problems, "index": str(index_dir)})
        return
    report_problems(report.problems, "skipped items")
    out.print(report.summary())


def info(index_dir: Path = IndexOpt, as_json: bool = JsonOpt) -> None:
    """Describe an index: encoder, dimension, counts, files; exit 1 when its files disagree."""
    with Collection.open(index_dir, read_only=True) as collection:
        details = collection.index.info().to_dict()
        problems = collection.verify(deep=False)
    if as_json:
        print_json({**details, "problems": problems})
    else:
        table = Table(title=f"index {index_dir}", show_header=False)
        for key, value in details.items():
            table.add_row(key, str(value))
        out.print(table)
    _exit_on(problems, index_dir, "seesay check --index")


def check(index_dir: Path = IndexOpt, as_json: bool = JsonOpt) -> None:
    """Verify an index: encoder weights against their digests, file sizes, FAISS counts against SQL; exit 1 on any mismatch."""
    with Collection.open(index_dir, read_only=True) as collection:
        problems = collection.verify(deep=True)
    if as_json:
        print_json({"index": str(index_dir), "ok": not problems, "problems": problems})
    elif not problems:
        out.print(f"{index_dir}: ok (encoder weights, files, FAISS and SQL agree)")
    _exit_on(problems, index_dir, None)


def _exit_on(problems: list[str], index_dir: Path, hint: str | None) -> None:
    if not problems:
        return
    for problem in problems:
        typer.echo(f"problem: {problem}", err=True)
    if hint:
        typer.echo(f"{index_dir} is damaged; `{hint} {index_dir}` checks it in full", err=True)
    raise typer.Exit(1)


def delete(
    ids: Optional[list[int]] = typer.Argument(None, help="Item ids to delete (an image takes its captions along)."),
    index_dir: Path = IndexOpt,
    paths: list[Path] = typer.Option([], "--path", help="Delete the images indexed from this file, or from anywhere under this folder (repeatable)."),
    as_json: bool = JsonOpt,
) -> None:
    """Delete items from an index by id, or images by file or folder."""
    if not ids and not paths:
        raise typer.BadParameter("give item ids, or --path FILE_OR_FOLDER")
    collection = Collection.open(index_dir)
    chosen = list(ids or [])
    if paths:
        found = images_at(collection, paths)
        if not found:
            raise SeesayError(f"index {index_dir} holds no image from {', '.join(map(str, paths))}; nothing deleted")
        chosen += found
    removed = collection.index.delete(sorted(set(chosen)))
    if as_json:
        print_json({"deleted": removed, "index": str(index_dir)})
    else:
        out.print(f"deleted {removed} items from {index_dir}")


def compact(index_dir: Path = IndexOpt, as_json: bool = JsonOpt) -> None:
    """Merge each kind's segments into one and drop deleted items' vectors (readers keep working).

    Every add and delete already merges by a size-tiered policy; this merges everything,
    and migrates an index of an older format.
    """
    with Index.open(index_dir) as opened:
        merged = opened.compact(everything=True)
        details = opened.info()
    summary = {"merged": merged, "segments": details.segments, "index": str(index_dir)}
    if as_json:
        print_json(summary)
    else:
        segments = ", ".join(f"{n} {kind}" for kind, n in details.segments.items())
        out.print(f"merged {merged} segments of {index_dir}; now {segments} segment(s)")
