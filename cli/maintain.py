"""`seesay update`, `seesay prune` and `seesay export`: keep an index in step with its files, and take its data out."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import AllowOutsideOpt, ImagesOpt, JsonOpt, SplitFileOpt, SplitOpt, err, out, print_json, report_problems
from cli.index import IndexOpt
from indexer import Index
from retrieval.collection import Collection
from retrieval.errors import SeesayError
from retrieval.sources import Source, read_sources, record_source
from retrieval.sync import missing_images, sync


def update(
    index_dir: Path = IndexOpt,
    data: Optional[Path] = typer.Option(None, "--data", help="Sync only this dataset (default: every dataset the index was built from)."),
    images: Optional[Path] = ImagesOpt,
    allow_outside_images: bool = AllowOutsideOpt,
    split: Optional[str] = SplitOpt,
    split_file: Optional[Path] = SplitFileOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Sync an index with its datasets as they are now: new files added, deleted ones removed, moved ones re-pointed.

    Images are matched by content, so a moved or renamed file keeps its item and captions.
    """
    given = Source.given(data, images, split, split_file, allow_outside_images) if data is not None else None
    sources = [given] if given is not None else read_sources(index_dir)
    if not sources:
        raise SeesayError(f"index {index_dir} records no dataset to read again (it predates `seesay update`): give --data")
    records, problems = [], []
    for source in sources:
        dataset = source.load()
        records += dataset.records
        problems += dataset.problems
    with Collection.open(index_dir) as collection:
        report = sync(collection, records, [source.folder for source in sources], progress=not as_json)
    for source in sources:
        record_source(index_dir, source)
    problems += report.added.problems
    if as_json:
        print_json({**report.to_dict(), "problems": problems, "index": str(index_dir)})
        return
    report_problems(problems, "skipped items")
    out.print(report.summary())


def prune(
    index_dir: Path = IndexOpt,
    folder: Optional[Path] = typer.Option(None, "--under", help="Only images indexed from under this folder."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would go; delete nothing."),
    as_json: bool = JsonOpt,
) -> None:
    """Delete the images (and their captions) whose files are gone."""
    with Collection.open(index_dir) as collection:
        gone = missing_images(collection, None if folder is None else str(folder.absolute()))
        paths = [item.path for item in collection.index.items(gone)]
        removed = 0 if dry_run or not gone else collection.index.delete(gone)
    if as_json:
        print_json({"missing": paths, "deleted": removed, "index": str(index_dir)})
        return
    for path in paths:
        err.print(f"missing: {path}")
    verb = "would delete" if dry_run else "deleted"
    out.print(f"{len(paths)} indexed images are missing; {verb} {removed if not dry_run else len(paths)} images and their captions")


def export(
    index_dir: Path = IndexOpt,
    out_file: Path = typer.Option(..., "--out", help="Parquet file to write."),
    kind: Optional[str] = typer.Option(None, "--kind", help="image | caption (default: both)."),
    as_json: bool = JsonOpt,
) -> None:
    """Export embeddings and metadata (id, kind, path, text, split, added_at, embedding) as Parquet."""
    from retrieval.export import KINDS, export_parquet

    if kind is not None and kind not in KINDS:
        raise typer.BadParameter(f"expected one of {', '.join(KINDS)}, got {kind!r}", param_hint="--kind")
    with Index.open(index_dir, read_only=True) as index:
        rows = export_parquet(index, out_file, [kind] if kind else KINDS)
    if as_json:
        print_json({"rows": rows, "out": str(out_file)})
    else:
        out.print(f"wrote {rows} rows to {out_file}")
