"""`seesay bench quality|encode|index|query|storage|startup`: the benchmarks in benchmarks/, as commands.

Each prints a table (or with --json one JSON object on stdout) and writes NAME.json and
NAME.png into --out (default ./seesay-bench/). Progress is logged (the benchmarks' loggers) to stderr.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from benchmarks.report import DEFAULT_OUT, save
from cli.common import err, out, print_json, recall_table

bench_app = typer.Typer(help="Benchmarks: retrieval quality, encoding, index and query speed.", no_args_is_help=True)

QuickOpt = typer.Option(False, "--quick", help="Small sizes: about a minute on 2 CPU cores.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object instead of tables.")
OutOpt = typer.Option(DEFAULT_OUT, "--out", help="Folder for NAME.json and NAME.png.")


def _finish(result: dict[str, Any], name: str, out_dir: Path, as_json: bool, plot, table: Table) -> None:
    path = save(result, out_dir, name)
    try:
        plot(result, out_dir)
    except Exception as exc:  # a plot must never lose the measured figures
        err.print(f"[yellow]plot not written: {exc}[/yellow]")
    if as_json:
        print_json(result)
        return
    out.print(table)
    err.print(f"[dim]wrote {path} and {path.with_suffix('.png')}[/dim]")


@bench_app.command("quality")
def quality_cmd(
    quick: bool = QuickOpt,
    as_json: bool = JsonOpt,
    out_dir: Path = OutOpt,
    encoder: List[str] = typer.Option([], "--encoder", help="Another encoder spec or model directory (repeatable)."),
    skip: List[str] = typer.Option([], "--skip", help="Leave out a built-in encoder: bow-pmi, bow-ratio, zeroshot, default (repeatable)."),
    bow_pmi: Optional[Path] = typer.Option(None, "--bow-pmi", help="Saved bow-pmi model directory (else fitted on the training split)."),
    bow_ratio: Optional[Path] = typer.Option(None, "--bow-ratio", help="Saved bow-ratio model directory (else fitted on the training split)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Captions file (default Flickr8k captions.csv)."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Images to score (default Flickr8k dev)."),
    train_split_file: Optional[Path] = typer.Option(
        None, "--train-split-file",
        help="Images the bag-of-words baselines are fitted on (default Flickr8k train).",
    ),
    n: Optional[int] = typer.Option(None, "--n", help="Score only the first N images of the split."),
    n_train: Optional[int] = typer.Option(None, "--n-train", help="Fit the baselines on the first N training images."),
) -> None:
    """Recall@1/5/10 both ways, median rank and RSUM of every available encoder, one table."""
    from benchmarks import quality

    kwargs: dict[str, Any] = {}
    if data is not None:
        kwargs["data"] = data
    if split_file is not None:
        kwargs["split_file"] = split_file
    if train_split_file is not None:
        kwargs["train_split_file"] = train_split_file
    models = {k: v for k, v in (("bow-pmi", bow_pmi), ("bow-ratio", bow_ratio)) if v is not None}
    result = quality.run(encoders=encoder, bow_models=models, quick=quick, n_images=n, n_train=n_train,
                         skip=tuple(skip), **kwargs)
    from retrieval.metrics import RecallResult

    scores = {name: RecallResult.from_dict(r) for name, r in result["encoders"].items()}
    table = recall_table(scores, f"{result['n_images']} images ({Path(result['split_file']).name if result['split_file'] else 'all'})")
    _finish(result, quality.NAME, out_dir, as_json, quality.plot, table)
    for name, reason in result["skipped"].items():
        if not as_json:
            err.print(f"[yellow]skipped {name}: {reason}[/yellow]")


@bench_app.command("encode")
def encode_cmd(
    quick: bool = QuickOpt,
    as_json: bool = JsonOpt,
    out_dir: Path = OutOpt,
    encoder: List[str] = typer.Option(
        [], "--encoder",
        help="Encoder spec (repeatable; default: default, else towers with untrained heads). `openclip-random:ViT-B-32` is open_clip with random weights.",
    ),
    n: Optional[int] = typer.Option(None, "--n", help="Images to encode (default 384, --quick 64)."),
    captions: Optional[int] = typer.Option(None, "--captions", help="Captions to encode (default 2000, --quick 128)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per model batch (256 suits a GPU)."),
    data: Optional[Path] = typer.Option(
        None, "--data",
        help="A folder laid out as Flickr8k (captions.csv, images/, splits/dev.txt); default ../shared/data/flickr8k.",
    ),
) -> None:
    """Images/s and captions/s through the real pipeline vs the bare model forward (on the GPU when there is one)."""
    from benchmarks import encode

    result = encode.run(encoders=tuple(encoder) or encode.DEFAULT_ENCODERS, quick=quick, n_images=n,
                        n_captions=captions, batch_size=batch_size,
                        **({"data": data} if data is not None else {}))
    table = Table(title="encoding throughput (items/s)")
    for column in ("encoder", "device", "engine img/s", "loader img/s", "bare img/s", "decode-only img/s",
                   "pipeline eff.", "loader eff.", "captions/s", "user CPU ms/img", "sys/user"):
        table.add_column(column, justify="left" if column == "encoder" else "right")
    fmt = lambda v, f="{:.1f}": "—" if v is None else f.format(v)  # noqa: E731
    for name, r in result["encoders"].items():
        table.add_row(name, r["device"], fmt(r["engine_images_per_s"]), fmt(r["loader_images_per_s"]),
                      fmt(r["bare_images_per_s"]), fmt(r.get("decode_only_images_per_s")),
                      fmt(r["pipeline_efficiency"], "{:.2f}"), fmt(r["loader_efficiency"], "{:.2f}"), fmt(r["captions_per_s"]),
                      fmt(r["engine_user_cpu_ms_per_image"]), fmt(r["engine_sys_per_user"], "{:.2f}"))
    _finish(result, encode.NAME, out_dir, as_json, encode.plot, table)


@bench_app.command("index")
def index_cmd(
    quick: bool = QuickOpt,
    as_json: bool = JsonOpt,
    out_dir: Path = OutOpt,
    large: bool = typer.Option(False, "--large", help="1M vectors instead of 100k."),
    n: Optional[int] = typer.Option(None, "--n", help="Number of vectors (overrides --quick/--large)."),
    dim: int = typer.Option(512, "--dim", help="Vector dimension."),
    data: str = typer.Option("uniform", "--data", help="uniform (on the sphere) or clustered (around 1,024 centres)."),
    index: List[str] = typer.Option(["ivfpq", "ivfsq", "hnsw"], "--index", help="Approximate index to add: ivfpq, ivfsq, hnsw (repeatable)."),
    refine: List[int] = typer.Option([1, 4, 16], "--refine", help="IVF-PQ and IVF-SQ8 re-ranking factors k_factor_rf to sweep (repeatable)."),
) -> None:
    """Flat (vs its roofline), IVF-PQ and HNSW: build time, memory, latency, QPS, recall@10."""
    from benchmarks import index_speed

    if data not in index_speed.DATA_KINDS:
        raise typer.BadParameter(f"use one of {', '.join(index_speed.DATA_KINDS)}", param_hint="--data")
    unknown = sorted(set(index) - set(index_speed.APPROXIMATE))
    if unknown:
        raise typer.BadParameter(f"unknown index {unknown[0]!r}; use {', '.join(index_speed.APPROXIMATE)}", param_hint="--index")
    result = index_speed.run(n=n, d=dim, quick=quick, large=large, data=data, indexes=tuple(index),
                                 refine=tuple(refine))
    table = Table(title=f"{result['n']:,} × {result['d']} ({result['data']}), k={result['k']}")
    for column in ("index", "build s", "RSS Δ MB", "index MB", "p50 ms", "p99 ms", "QPS", "recall@10", "params"):
        table.add_column(column, justify="left" if column in ("index", "params") else "right")
    for name, r in result["indexes"].items():
        lat = r.get("latency_seesay") or r.get("latency")
        table.add_row(name, f"{r['build_s']:.2f}", f"{r['rss_delta_bytes'] / 2**20:.0f}", f"{r['index_bytes'] / 2**20:.0f}",
                      f"{lat['p50_ms']:.2f}", f"{lat['p99_ms']:.2f}", f"{r['qps']:.0f}", f"{r['recall_at_10']:.3f}",
                      " ".join(f"{a}={b}" for a, b in r["chosen"].items()) if "chosen" in r else "exact")
    roof = Table(title=f"flat search vs roofline (read {result['roofline']['read_gb_per_s']:.1f} GB/s, sgemm {result['roofline']['sgemm_gflops']:.0f} GFLOP/s)")
    for column in ("batch", "bound ms", "FAISS", "seesay", "path", "× FAISS", "seesay, own bytes", "numpy"):
        roof.add_column(column, justify="right")
    for row in result["flat_roofline"]:
        roof.add_row(str(row["batch"]), f"{row['bound_s'] * 1e3:.1f}", f"{row['faiss_fraction']:.2f}",
                     f"{row['seesay_fraction']:.2f}", row["seesay_method"], f"{row['seesay_over_faiss']:.2f}",
                     f"{row['seesay_fraction_own_bytes']:.2f}",
                     "—" if row["numpy_fraction"] is None else f"{row['numpy_fraction']:.2f}")
    _finish(result, index_speed.NAME, out_dir, as_json, index_speed.plot, table)
    if not as_json:
        out.print(roof)
        out.print(f"flat_bandwidth_fraction: seesay {result['flat_bandwidth_fraction']:.2f} "
                  f"({result['flat_bandwidth_fraction_own_bytes']:.2f} charged with the bytes its path reads), "
                  f"FAISS {result['flat_bandwidth_fraction_faiss']:.2f}; seesay's speed over FAISS's at worst "
                  f"{result['flat_min_speed_over_faiss']:.2f}×")
        if "ann_index" in result:
            out.print(f"best approximate index: {result['ann_index']} {result['ann_params']}: recall@10 "
                      f"{result['ann_recall_at_10']:.3f} at {result['ann_speedup']:.1f}× flat's QPS")


@bench_app.command("query")
def query_cmd(
    quick: bool = QuickOpt,
    as_json: bool = JsonOpt,
    out_dir: Path = OutOpt,
    n: Optional[int] = typer.Option(None, "--n", help="Images in the synthetic index (default 100k, --quick 10k)."),
    encoder: List[str] = typer.Option(
        [], "--encoder",
        help="Encoder spec to encode queries with (repeatable: the first that loads; default: default, zeroshot).",
    ),
    queries: Optional[int] = typer.Option(None, "--queries", help="Queries to time (default 300, --quick 50)."),
    k: int = typer.Option(10, "--k", help="Results per query."),
    factory: List[str] = typer.Option(
        [], "--factory",
        help="FAISS factory string of the index (repeatable; the first is the headline; default: IVF1024,Flat then Flat).",
    ),
    data: str = typer.Option("clustered", "--data", help="Synthetic vectors: clustered (around 1,024 centres) or uniform."),
) -> None:
    """End-to-end text → image query latency (encode, search, SQL fetch) in a warm process."""
    from benchmarks import query

    if data not in ("clustered", "uniform"):
        raise typer.BadParameter(f"unknown data {data!r}: use clustered or uniform", param_hint="--data")
    result = query.run(n=n, quick=quick, encoders=tuple(encoder) or query.DEFAULT_ENCODERS, queries=queries, k=k,
                       factories=tuple(factory) or query.DEFAULT_FACTORIES, data=data)
    table = Table(title=f"text → image, {result['n_items']:,} images, {result['encoder']} (ms per query)")
    for column in ("index", "stage", "p50 ms", "p99 ms", "mean ms", f"recall@{result['k']}"):
        table.add_column(column, justify="left" if column in ("index", "stage") else "right")
    for name, run in result["factories"].items():
        for stage, r in (("end to end", run["end_to_end"]), *run["stages"].items()):
            recall = f"{run['recall_at_k']:.3f}" if stage == "end to end" else ""
            table.add_row(name, stage, f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['mean_ms']:.2f}", recall)
    _finish(result, query.NAME, out_dir, as_json, query.plot, table)


@bench_app.command("storage")
def storage_cmd(
    quick: bool = QuickOpt,
    as_json: bool = JsonOpt,
    out_dir: Path = OutOpt,
    n: Optional[int] = typer.Option(None, "--n", help="Vectors to add (default 1M, --quick 40k)."),
    commit: int = typer.Option(8192, "--commit", help="Vectors per commit."),
    dim: int = typer.Option(512, "--dim", help="Dimension of the random vectors."),
    queries: int = typer.Option(1000, "--queries", help="Queries compared, segmented against merged (0 skips it, and its memory)."),
    pg_rows: Optional[int] = typer.Option(None, "--pg-rows", help="Rows added into PostgreSQL (default 100k, --quick 20k; 0 skips)."),
    work_dir: Optional[Path] = typer.Option(None, "--dir", help="Folder for the temporary index (default the system's temporary folder)."),
    hashes: str = typer.Option("content", "--hashes", help="Rows' hashes: sha256 digests as real adds store (content), or numbers in order (sequential)."),
) -> None:
    """Storage: bytes written and add rate as the index grows, segmented = merged search, PostgreSQL rows/s."""
    from benchmarks import storage

    if hashes not in storage.HASHES:
        raise typer.BadParameter(f"use {' or '.join(storage.HASHES)}", param_hint="--hashes")
    result = storage.run(n=n, quick=quick, commit=commit, dim=dim, queries=queries, pg_rows=pg_rows,
                         directory=work_dir, hashes=hashes)
    add, search, pg = result["add"], result["search"], result["postgresql"]
    table = Table(title=f"storage: {result['n']:,} vectors of dim {dim}, {commit:,} per commit, {hashes} hashes")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row("bytes written / vectors' bytes", f"{add['written_over_vectors']:.2f}", "≤ 3")
    table.add_row(f"add rate, last {result['rate_window']:,} / first", f"{add['last_over_first']:.2f}", "≥ 0.7")
    table.add_row("the same per CPU second of the adding thread", f"{add['cpu_last_over_first']:.2f}", "")
    table.add_row("add rate first / last (items/s)", f"{add['first_rate_items_s']:,.0f} / {add['last_rate_items_s']:,.0f}", "")
    table.add_row("segments after the adds", str(add["segments"]), "")
    table.add_row("background merges still running after the last add (s)", f"{add['final_merges_s']:.1f}", "")
    if "skipped" not in search:
        table.add_row(f"identical top-{search['k']} rows, segmented vs merged", f"{search['identical_rows']} / {search['queries']}", "all")
        table.add_row("search s, segmented / merged", f"{search['segmented_s']:.2f} / {search['merged_s']:.2f}", "")
    if "skipped" in pg:
        table.add_row("PostgreSQL add (rows/s)", f"skipped: {pg['skipped']}", "≥ 20,000")
    else:
        table.add_row(f"PostgreSQL add (rows/s), {dim}-d vectors / 4-d", f"{pg['rows_per_s']:,.0f} / {pg['rows_only_per_s']:,.0f}", "≥ 20,000")
        if pg.get("rows_per_cpu_s") and pg.get("rows_only_per_cpu_s"):
            table.add_row("the same per CPU second (seesay + the server)", f"{pg['rows_per_cpu_s']:,.0f} / {pg['rows_only_per_cpu_s']:,.0f}", "")
    _finish(result, storage.NAME, out_dir, as_json, storage.plot, table)


@bench_app.command("startup")
def startup_cmd(
    as_json: bool = JsonOpt,
    out_dir: Path = OutOpt,
    index: Optional[Path] = typer.Option(None, "--index", help="An existing index (default: a small one built with --encoder first)."),
    encoder: str = typer.Option("default", "--encoder", help="Encoder of the built index."),
    runs: int = typer.Option(5, "--runs", min=1, help="Fresh processes timed for each figure."),
    queries: int = typer.Option(1000, "--queries", min=0, help="Queries in the file answered in one process (0 skips it)."),
) -> None:
    """Start-up: wall and CPU time of `seesay search --index DIR "text"` in fresh processes, and of a file of queries."""
    from benchmarks import startup

    result = startup.run(index, encoder, runs, queries)
    table = Table(title="start-up: fresh processes (seconds; CPU = user + sys)")
    for column in ("what", "wall s", "CPU s", "runs (wall)"):
        table.add_column(column, justify="left" if column == "what" else "right")
    first = result["first_search"]
    table.add_row("first search (warm-up)", f"{first['wall_s']:.2f}", f"{first['cpu_s']:.2f}", "")
    for label, key in (("search \"text\", median", "search"), ("import cli.app, median", "import_cli")):
        r = result[key]
        table.add_row(label, f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}", " ".join(f"{w:.2f}" for w in r["runs_wall_s"]))
    if "queries_file" in result:
        q = result["queries_file"]
        table.add_row(f"--queries, {q['queries']} queries", f"{q['wall_s']:.2f}", f"{q['cpu_s']:.2f}", "")
    _finish(result, startup.NAME, out_dir, as_json, startup.plot, table)
    if not as_json:
        err.print(f"[dim]load average {result['load_average_before']} → {result['load_average_after']} on {result['cores']} cores[/dim]")
