"""The seesay CLI end to end: train → index → search → eval → info, on real files, plus its errors."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from helpers import FLICKR8K, needs_flickr8k
from retrieval.demo_data import COLOURS, SIZES, make_shape_set

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def run(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def seesay(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess (for exit codes and error lines)."""
    return subprocess.run(
        [sys.executable, "-m", "cli.app", *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shape_set(tmp_path_factory.mktemp("shapes"), copies=2)


@pytest.fixture(scope="module")
def model(shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "bow"
    summary = json.loads(run("train", "--encoder", "bow-pmi", "--data", shapes, "--out", out, "--colours", 12, "--objects", 0, "--json"))
    assert summary["dim"] == 12 and summary["skipped"] == 0
    return out


def test_train_index_search_eval_info(shapes, model, tmp_path):
    index = tmp_path / "index"
    added = json.loads(run("index", "--encoder", model, "--data", shapes, "--index", index, "--json"))
    assert (added["images_added"], added["captions_added"]) == (24, 48)
    again = json.loads(run("index", "--encoder", model, "--data", shapes, "--index", index, "--json"))
    assert (again["images_added"], again["images_skipped_existing"]) == (0, 24)

    hits = json.loads(run("search", "--index", index, "a red square", "-k", "3", "--json"))["hits"]
    assert [h["kind"] for h in hits] == ["image"] * 3 and Path(hits[0]["path"]).name.startswith("red_")
    assert hits[0]["captions"] and hits[0]["score"] >= hits[-1]["score"]
    probe = shapes.parent / "images" / "blue_circle_0.png"
    captions = json.loads(run("search", "--index", index, "--image", probe, "-k", "2", "--json"))["hits"]
    assert "blue" in captions[0]["text"]
    table = run("search", "--index", index, "a green triangle")
    assert "green_" in table

    metrics = json.loads(run("eval", "--encoder", model, "--data", shapes, "--json"))
    assert metrics["n_images"] == 24 and metrics["n_captions"] == 48
    assert metrics["t2i"]["R@10"] > 10 * 10 / 24 and set(metrics["i2t"]) >= {"R@1", "R@5", "R@10"}
    info = json.loads(run("info", "--index", index, "--json"))
    assert info["n_images"] == 24 and info["dim"] == 12

    gone = json.loads(run("delete", hits[0]["id"], "--index", index, "--json"))
    assert gone["deleted"] == 1 + len(hits[0]["captions"])
    after = json.loads(run("search", "--index", index, "a red square", "-k", "24", "--json"))["hits"]
    assert hits[0]["id"] not in [h["id"] for h in after] and len(after) == 23
    assert seesay("delete", 99999, "--index", index).returncode == 1


@needs_flickr8k
def test_flickr8k_sample_indexes_and_finds_its_own_caption(tmp_path):
    names = (FLICKR8K / "splits" / "dev.txt").read_text().split()[:20]
    (tmp_path / "sample.txt").write_text("\n".join(names))
    args = ("--data", FLICKR8K / "captions.csv", "--split-file", tmp_path / "sample.txt")
    run("train", "--encoder", "bow-ratio", *args, "--out", tmp_path / "m", "--colours", 16, "--objects", 0, "--min-count", 1)
    added = json.loads(run("index", "--encoder", tmp_path / "m", *args, "--index", tmp_path / "i", "--json"))
    assert (added["images_added"], added["captions_added"]) == (20, 100)
    hits = json.loads(run("search", "--index", tmp_path / "i", "--image", FLICKR8K / "images" / names[0], "-k", "5", "--json"))["hits"]
    assert len(hits) == 5 and all(h["kind"] == "caption" for h in hits)


def test_bad_items_are_skipped_counted_and_named(shapes, model, tmp_path):
    data = tmp_path / "mixed.csv"
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = shapes.read_text().splitlines()
    images = shapes.parent / "images"
    data.write_text(
        "image,caption\n"
        + "\n".join(f"{images / r.split(',')[0]},{r.split(',', 1)[1]}" for r in rows[1:5])
        + f"\n{tmp_path / 'corrupt.png'},a broken file\n{tmp_path / 'missing.png'},nowhere\n{images / 'red_square_0.png'},   \n"
    )
    # absolute paths outside the data file's folder are refused unless asked for
    refused = json.loads(run("index", "--encoder", model, "--data", data, "--index", tmp_path / "i", "--json"))
    assert refused["images_added"] == 0 and all("--allow-outside-images" in p for p in refused["problems"][:5])
    report = json.loads(
        run("index", "--encoder", model, "--data", data, "--index", tmp_path / "i", "--json", "--allow-outside-images")
    )
    assert report["images_added"] == 2
    problems = "\n".join(report["problems"])
    assert "corrupt.png" in problems and "missing.png" in problems and "empty caption" in problems


def test_errors_exit_non_zero_with_one_clear_line(shapes, model, tmp_path):
    missing = seesay("search", "--index", tmp_path / "nowhere", "a dog")
    assert missing.returncode != 0 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr
    untrained = seesay("eval", "--encoder", "bow-pmi", "--data", shapes)
    assert untrained.returncode == 1 and "seesay train" in untrained.stderr
    no_data = seesay("index", "--encoder", model, "--data", tmp_path / "none.csv", "--index", tmp_path / "i")
    assert no_data.returncode == 1 and "none.csv" in no_data.stderr and "Traceback" not in no_data.stderr
    both = seesay("search", "--index", tmp_path, "x", "--image", shapes)
    assert both.returncode == 2 and "either" in both.stderr and "Traceback" not in both.stderr


def test_search_params_tune_an_approximate_index_and_are_checked(shapes, model, tmp_path):
    index = tmp_path / "ivf"
    run("index", "--encoder", model, "--data", shapes, "--index", index, "--factory", "IVF4,Flat")
    exact = tmp_path / "flat"
    run("index", "--encoder", model, "--data", shapes, "--index", exact)
    query = ("search", "a red square", "-k", "24", "--json")
    probed = json.loads(run(*query, "--index", index, "--search-param", "nprobe=4"))["hits"]
    truth = json.loads(run(*query, "--index", exact))["hits"]
    score = lambda hits: [round(h["score"], 5) for h in hits]  # noqa: E731 - copies tie, so compare scores
    assert score(probed) == score(truth)  # every list probed: exact
    one_list = json.loads(run(*query, "--index", index, "--search-param", "nprobe=1"))["hits"]
    assert len(one_list) < 24  # one of the 4 lists probed: the parameter took effect
    wrong = seesay(*query, "--index", index, "--search-param", "efSearch=64")
    assert wrong.returncode == 1 and "efSearch" in wrong.stderr and "nprobe" in wrong.stderr
    malformed = seesay(*query, "--index", index, "--search-param", "nprobe")
    assert malformed.returncode == 2 and "NAME=POSITIVE_INTEGER" in malformed.stderr


def test_index_refuses_another_model_of_the_same_kind(shapes, model, tmp_path):
    other = tmp_path / "other"
    run("train", "--encoder", "bow-pmi", "--data", shapes, "--out", other, "--colours", 6, "--objects", 0)
    run("index", "--encoder", model, "--data", shapes, "--index", tmp_path / "i")
    clash = seesay("index", "--encoder", other, "--data", shapes, "--index", tmp_path / "i")
    assert clash.returncode == 1 and "was built with encoder" in clash.stderr
    info = json.loads(run("info", "--index", tmp_path / "i", "--json"))
    assert info["n_images"] == 24  # nothing stored was lost


def test_train_towers_from_the_cli_then_eval_it(shapes, tmp_path):
    names = [line.split(",")[0] for line in shapes.read_text().splitlines()[1::2]]
    (tmp_path / "val.txt").write_text("\n".join(names[::4]))
    out = tmp_path / "towers"
    args = ("train", "--encoder", "towers", "--data", shapes, "--val-split-file", tmp_path / "val.txt", "--out", out)
    trained = runner.invoke(app, [str(a) for a in (*args, "--epochs", 2, "--batch-size", 8, "--embed-dim", 32, "--no-flip", "--json")])
    assert trained.exit_code == 0, (trained.stderr, repr(trained.exception))
    summary = json.loads(trained.stdout)  # stdout holds the JSON alone; the trainer's progress is logged on stderr
    assert "caching frozen-tower features" in trained.stderr and "epoch=2" in trained.stderr, trained.stderr
    assert Path(summary["out"]) == out and (out / "encoder.json").is_file()
    metrics = json.loads(run("eval", "--encoder", out, "--data", shapes, "--json"))
    assert metrics["n_images"] == 24 and 0 <= metrics["t2i"]["R@1"] <= 100
    wrong = seesay("train", "--encoder", "zeroshot", "--data", shapes, "--out", tmp_path / "x")  # not trainable
    assert wrong.returncode != 0 and "openclip" in wrong.stderr


def test_demo_runs_the_whole_loop(tmp_path):
    output = run("demo", "--dir", tmp_path / "demo")
    assert "a red square" in output and "default" in output and "bow-pmi" in output
    assert "medr: median rank" in output  # the rank column says what it is
    assert (tmp_path / "demo" / "index" / "meta.sqlite").is_file()


def test_shape_set_captions_each_describe_one_image(tmp_path):
    rows = make_shape_set(tmp_path, copies=3).read_text().splitlines()[1:]
    captions = [row.split(",", 1)[1] for row in rows]
    assert len(rows) == 4 * 3 * 3 * 2 and len(set(captions)) == len(captions)
    with pytest.raises(ValueError, match="copies"):
        make_shape_set(tmp_path / "more", copies=4)


def test_a_shape_set_of_any_count_goes_through_every_colour_shape_and_size(tmp_path):
    from PIL import Image

    rows = list(csv.reader(make_shape_set(tmp_path, fmt="jpg", size=40, count=40).open()))[1:]
    names = sorted({name for name, _ in rows})
    assert len(rows) == 2 * 40 and len(names) == 40 and all(name.endswith(".jpg") for name in names)
    assert {Image.open(tmp_path / "images" / name).size for name in names} == {(40, 40)}
    extents = {size for size in SIZES for _, caption in rows if size in caption}
    assert extents == {"small", "medium"} and {c for c in COLOURS for _, caption in rows if c in caption} == set(COLOURS)


def test_index_with_factory_auto_and_compact(shapes, model, tmp_path):
    index = tmp_path / "auto"
    run("index", "--encoder", model, "--data", shapes, "--index", index, "--factory", "auto", "--memory", "64M", "--json")
    assert json.loads(run("info", "--index", index, "--json"))["factory"] == "Flat"  # 48 vectors: exact
    merged = json.loads(run("compact", "--index", index, "--json"))
    assert merged["segments"] == {"image": 1, "caption": 1}
    bad = seesay("index", "--encoder", model, "--data", shapes, "--index", tmp_path / "other", "--factory", "auto", "--memory", "lots")
    assert bad.returncode == 1 and "cannot read memory budget 'lots'" in bad.stderr and not (tmp_path / "other").exists()
