"""Export an index's embeddings with their metadata as one Parquet file (`seesay export`).

One row per item: id, kind, source_id, path (a caption's: its image's file), text,
image_id, split, added_at and the stored vector as a fixed-size list of float32, so
pandas, DuckDB, Spark or clip-retrieval-style tools read it directly. The file's
metadata names the encoder, dimension and metric. Written in chunks to a temporary
name and renamed into place (`indexer.files.atomic_path`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from indexer import Index
from indexer.files import atomic_path

CHUNK = 8192
KINDS = ("image", "caption")


def _schema(dim: int, index: Index):
    import pyarrow as pa

    built = index.built_by
    meta = {"encoder": built.identity, "encoder_kind": built.kind, "dim": dim, "metric": "inner product"}
    return pa.schema(
        [
            ("id", pa.int64()),
            ("kind", pa.string()),
            ("source_id", pa.string()),
            ("path", pa.string()),
            ("text", pa.string()),
            ("image_id", pa.int64()),
            ("split", pa.string()),
            ("added_at", pa.timestamp("us", tz="UTC")),
            ("embedding", pa.list_(pa.float32(), dim)),
        ],
        metadata={"seesay": json.dumps(meta)},
    )


def export_parquet(index: Index, out: str | Path, kinds: Sequence[str] = KINDS) -> int:
    """Write the items of `kinds` with their vectors to `out`; returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = index.built_by.dim
    schema = _schema(dim, index)
    rows = 0
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for kind in kinds:
            ids, vectors = index.all_vectors(kind)
            for start in range(0, len(ids), CHUNK):
                items = index.items(ids[start : start + CHUNK])
                image_ids = sorted({i.image_item_id for i in items if i.image_item_id is not None})
                paths = {image.id: image.path for image in index.items(image_ids)}
                block = vectors[start : start + CHUNK]
                columns = {
                    "id": [i.id for i in items],
                    "kind": [i.kind for i in items],
                    "source_id": [i.source_id for i in items],
                    "path": [i.path if i.kind == "image" else paths.get(i.image_item_id) for i in items],
                    "text": [i.text for i in items],
                    "image_id": [i.image_item_id for i in items],
                    "split": [i.split for i in items],
                    "added_at": [i.added_at for i in items],
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1), pa.float32()), dim),
                }
                writer.write_table(pa.table(columns, schema=schema))
                rows += len(items)
    return rows
