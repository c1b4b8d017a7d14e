"""Each `seesay bench` command runs in a tiny mode and emits JSON with its required keys."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from cli.app import app
from helpers import needs_flickr8k



def _invoke(args: list[str], out: Path, *options: str) -> Result:
    """`seesay [OPTIONS] bench ARGS --json --out OUT`, which must succeed."""
    result = CliRunner().invoke(app, [*options, "bench", *args, "--json", "--out", str(out)])
    assert result.exit_code == 0, (result.stdout, result.stderr, repr(result.exception))
    return result


def _run(args: list[str], out: Path) -> dict:
    return _payload(_invoke(args, out), args, out)


def _payload(result: Result, args: list[str], out: Path) -> dict:
    """A bench command's JSON (stdout holds it alone), checked against the files it wrote into `out`."""
    payload = json.loads(result.stdout)
    name = args[0]
    assert (out / f"{name}.json").is_file() and (out / f"{name}.png").stat().st_size > 0
    assert json.loads((out / f"{name}.json").read_text())["benchmark"] == name
    return payload


def test_bench_index_tiny(tmp_path: Path) -> None:
    """Flat and one approximate index (HNSW, the quickest to sweep); test_bench_quick_runs covers all three."""
    r = _run(["index", "--quick", "--n", "2000", "--dim", "32", "--index", "hnsw"], tmp_path)
    assert r["n"] == 2000 and r["d"] == 32
    for key in ("flat_bandwidth_fraction", "flat_bandwidth_fraction_own_bytes", "flat_bandwidth_fraction_faiss", "ann_recall_at_10", "ann_speedup", "roofline"):
        assert key in r
    assert {row["batch"] for row in r["flat_roofline"]} >= {1, 16, 256, 4096}
    assert set(r["indexes"]) == {"flat", "hnsw"}
    for name, info in r["indexes"].items():
        for key in ("build_s", "rss_delta_bytes", "index_bytes", "qps", "recall_at_10"):
            assert key in info, (name, key)
    assert r["indexes"]["flat"]["latency_seesay"]["p99_ms"] >= r["indexes"]["flat"]["latency_seesay"]["p50_ms"]
    assert 0.0 <= r["ann_recall_at_10"] <= 1.0


def test_bench_query_tiny(tmp_path: Path) -> None:
    args = ["query", "--n", "500", "--queries", "10", "--encoder", "test-colour:8", "--factory", "IVF16,Flat", "--factory", "Flat"]
    result = _invoke(args, tmp_path, "--quiet")
    assert result.stderr == ""  # --quiet: no progress lines
    r = _payload(result, args, tmp_path)
    assert r["n_items"] == 500 and r["encoder"] == "test-colour:8" and r["factory"] == "IVF16,Flat"
    assert 0 < r["query_p50_ms"] <= r["query_p99_ms"]
    assert set(r["stages"]) == {"encode_text", "search", "fetch_sql"}
    assert set(r["factories"]) == {"IVF16,Flat", "Flat"}
    assert r["factories"]["Flat"]["recall_at_k"] == 1.0  # exact search against itself
    assert 0 < r["recall_at_k"] <= 1.0


@pytest.mark.slow  # ~80 s: loads both towers and times each stage; CI runs it with the slow cases
def test_bench_encode_neural_on_a_folder_of_its_own(tmp_path: Path) -> None:
    from PIL import Image

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "splits").mkdir()
    names = []
    for colour in ("red", "green", "blue", "white", "black"):
        names.append(f"{colour}.jpg")
        Image.new("RGB", (80, 60), colour).save(data / "images" / names[-1])
    (data / "splits" / "dev.txt").write_text("\n".join(names) + "\n")
    (data / "captions.csv").write_text("image,caption\n" + "".join(f"{n},a {n[:-4]} square\n" for n in names))
    r = _run(["encode", "--data", str(data), "--n", "7", "--captions", "5", "--batch-size", "2",
              "--encoder", "towers-untrained"], tmp_path / "out")
    enc = r["encoders"]["towers-untrained"]
    assert enc["n_images"] == 7 and enc["n_distinct_images"] == 5  # cycled past the 5 it has
    assert enc["device"].startswith("cuda" if torch_cuda() else "cpu")
    assert enc["decode_workers"] >= 1 and enc["decode_only_images_per_s"] > 0
    assert enc["bare_images_per_s"] > 0 and enc["pipeline_efficiency"] > 0 and enc["captions_per_s"] > 0


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@needs_flickr8k
def test_bench_encode_tiny(tmp_path: Path) -> None:
    r = _run(["encode", "--n", "6", "--captions", "10", "--batch-size", "4", "--encoder", "test-colour:8"], tmp_path)
    enc = r["encoders"]["test-colour:8"]
    for key in ("engine_images_per_s", "loader_images_per_s", "bare_images_per_s", "pipeline_efficiency", "captions_per_s"):
        assert key in enc
    assert enc["engine_images_per_s"] > 0 and enc["captions_per_s"] > 0


@needs_flickr8k
def test_bench_quality_tiny(tmp_path: Path) -> None:
    r = _run(["quality", "--quick", "--n", "12", "--n-train", "30", "--skip", "zeroshot", "--skip", "default",
              "--encoder", "test-colour:8", "--encoder", "no-such-encoder"], tmp_path)
    assert set(r["encoders"]) == {"bow-pmi", "bow-ratio", "test-colour:8"}
    assert "no-such-encoder" in r["skipped"]
    for result in r["encoders"].values():
        for way in ("t2i", "i2t"):
            assert {"R@1", "R@5", "R@10", "median_rank", "mean_rank"} <= set(result[way])
        assert "rsum" in result and result["n_images"] == 12


@pytest.mark.slow
def test_bench_quick_runs(tmp_path: Path) -> None:
    """The documented --quick runs, end to end (minutes on 2 cores)."""
    r = _run(["index", "--quick"], tmp_path)
    assert r["n"] == 20000 and set(r["indexes"]) == {"flat", "ivfpq", "ivfsq", "hnsw"}
    for name, info in r["indexes"].items():
        assert 0.0 <= info["recall_at_10"] <= 1.0 and info["qps"] > 0, name
    r = _run(["query", "--quick"], tmp_path)
    assert r["n_items"] == 10000


def test_bench_index_rejects_bad_options(tmp_path: Path) -> None:
    runner = CliRunner()
    for args in (["--data", "gaussian"], ["--index", "lsh"]):
        result = runner.invoke(app, ["bench", "index", "--n", "100", "--out", str(tmp_path), *args])
        assert result.exit_code == 2
        assert "--data" in result.output or "--index" in result.output


def test_bench_storage_rejects_unknown_hashes(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "storage", "--n", "100", "--hashes", "random", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--hashes" in result.output
    assert not list(tmp_path.iterdir())


def test_bench_query_rejects_unknown_data(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "query", "--n", "100", "--data", "gaussian", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "--data" in result.output and "clustered or uniform" in result.output
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_bench_storage_tiny(tmp_path: Path) -> None:
    args = ["storage", "--n", "6000", "--commit", "1000", "--dim", "32", "--queries", "50", "--pg-rows", "2000", "--dir", str(tmp_path)]
    result = _invoke(args, tmp_path)
    assert "adding 6,000 vectors of dim 32" in result.stderr  # progress is logged on stderr, beside the JSON
    r = _payload(result, args, tmp_path)
    add, search = r["add"], r["search"]
    assert r["n"] == 6000 and len(add["per_commit_seconds"]) == 6 and add["segments"] == 6
    assert add["vector_bytes"] == 6000 * 32 * 4 and add["bytes_written"] >= add["vector_bytes"]
    assert add["written_over_vectors"] == add["bytes_written"] / add["vector_bytes"] and add["last_over_first"] > 0 < add["cpu_last_over_first"]
    assert search["identical"] and search["identical_rows"] == 50
    pg = r["postgresql"]
    assert ("rows_per_s" in pg and pg["rows_only_per_s"] > 0) or "skipped" in pg
    assert not list(tmp_path.glob("seesay-storage-*"))  # the temporary index is gone


@pytest.mark.slow  # two fresh processes import FAISS: over a minute on a loaded machine
def test_bench_ondisk_tiny(tmp_path: Path) -> None:
    from benchmarks import ondisk

    r = ondisk.run(n=3000, dim=32, factory="IVF16,SQ8", first=1024, commit=500, queries=30, truth=30, nprobe=4, directory=tmp_path)
    assert r["identical_ids"] and r["recall_at_10"]["ram"] == r["recall_at_10"]["mmap"] > 0.3
    assert r["ondisk_identical_ids"] and r["recall_at_10"]["ondisk"] == r["recall_at_10"]["ram"] and r["merge_ondisk_parts"] > 1
    assert r["part_bytes"] > 3000 * 32  # one part holds every SQ8 code
    for mode in ("ram", "mmap", "ondisk"):
        assert set(r[mode]["searched"]) == {"VmRSS", "RssAnon", "RssFile"} and r[mode]["searched"]["VmRSS"] > 0
    assert not list(tmp_path.glob("seesay-ondisk-*"))


_MERGE_ONDISK = """
import json, sys
from pathlib import Path
import faiss, numpy as np
from benchmarks.ondisk import build_ondisk, stdout_to_stderr
folder = Path(sys.argv[1])
x = np.random.default_rng(0).standard_normal((2000, 16)).astype("float32")
trained = faiss.index_factory(16, "IVF8,SQ8", faiss.METRIC_INNER_PRODUCT)
trained.train(x)
for s in range(2):
    part = faiss.clone_index(trained)
    part.add_with_ids(x[s * 1000 : (s + 1) * 1000], np.arange(s * 1000, (s + 1) * 1000))
    faiss.write_index(part, str(folder / f"p{s}.faiss"))
print("before", flush=True)
merged = build_ondisk([folder / "p0.faiss", folder / "p1.faiss"], folder / "merged")
with stdout_to_stderr():
    read = faiss.read_index(str(merged), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
print(json.dumps({"ntotal": read.ntotal}))
"""


def test_merge_ondisk_keeps_faiss_lines_off_stdout(tmp_path: Path) -> None:
    """FAISS prints a line to stdout when it builds or reads OnDiskInvertedLists: it goes to stderr instead,
    and what Python printed before and after stays on stdout, in order."""
    done = subprocess.run([sys.executable, "-c", _MERGE_ONDISK, str(tmp_path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, check=False)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first == "before" and json.loads(second) == {"ntotal": 2000}
    assert "resizing" in done.stderr and "ondisk filename" in done.stderr  # FAISS's own lines, diverted


def test_query_encode_compares_a_query_with_a_stored_caption() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.query_encode", "--encoder", "fast", "--queries", "3", "--json"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result["ms"]) == {"stored caption (encode_texts)", "query (encode_text_queries)"}
    assert all(ms["min"] > 0 for ms in result["ms"].values())
    assert result["min_cosine"] > 0.999
    assert sum(result["threads_chosen"].values()) == 8  # 3 timed + 5 warm-up queries
