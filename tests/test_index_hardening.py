"""The index under careless and hostile use: atomic creation, creation races, kill -9 at every
step of create/add/delete, files that are not regular, truncated files, and `seesay check`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import indexer.index as index_module
from conftest import ColourMeanEncoder, solid_image
from index_checks import assert_consistent
from indexer import Index
from retrieval.collection import Collection
from retrieval.datasets import Record
from retrieval.errors import IndexMismatchError, SeesayError

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def seesay(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.app", *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def records(folder: Path, tag: str, n: int) -> list[Record]:
    """n distinct solid images (distinct across tags too: the index deduplicates by content)."""
    base = sum(map(ord, tag)) % 97
    return [
        Record(f"{tag}{i}.png", solid_image(folder / f"{tag}{i}.png", (base + 30 * i, 255 - 20 * i, base)), [f"{tag} {i} red"])
        for i in range(n)
    ]


def no_index_left(directory: Path) -> None:
    assert not directory.exists(), sorted(p.name for p in directory.iterdir())
    assert not list(directory.parent.glob(f".{directory.name}.creating-*"))


# ----- atomic creation -----


def test_a_creation_that_fails_at_the_end_leaves_nothing(tmp_path, colour_encoder, monkeypatch):
    """Issue 11 #2: a failure between the database commit and index.json left a folder that was neither."""
    directory = tmp_path / "idx"

    def broken(*_args, **_kwargs):
        raise IsADirectoryError(21, "Is a directory", str(directory / "index.json.tmp"))

    monkeypatch.setattr(index_module, "_write_index_json", broken)
    with pytest.raises(SeesayError, match="cannot create an index in .*Is a directory"):
        Collection.create(directory, colour_encoder)
    no_index_left(directory)
    monkeypatch.undo()
    with Collection.create(directory, colour_encoder) as collection:
        assert collection.index.info().n_images == 0


def test_a_refused_creation_leaves_no_folder(tmp_path, colour_encoder):
    """Issue 16 #7: a bad factory string used to leave encoder/ behind."""
    directory = tmp_path / "nested" / "idx"
    with pytest.raises(SeesayError, match="factory"):
        Collection.create(directory, colour_encoder, factory="IVF-nonsense")
    no_index_left(directory)


def test_creating_over_something_else_is_refused_clearly(tmp_path, colour_encoder):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(SeesayError, match="not empty and holds no seesay index"):
        Collection.create(busy, colour_encoder)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    half = tmp_path / "half"  # what older versions left after a failed creation
    (half / "encoder").mkdir(parents=True)
    (half / "meta.sqlite").write_bytes(b"")
    with pytest.raises(SeesayError, match="half-made index"):
        Collection.create(half, colour_encoder)
    empty = tmp_path / "empty"
    empty.mkdir()
    Collection.create(empty, colour_encoder).close()
    assert Index.exists(empty)


def test_the_loser_of_a_creation_race_appends(tmp_path, colour_encoder, monkeypatch):
    """Issue 11 #6, deterministically: another writer finishes creating while this one is half-way."""
    directory, pictures = tmp_path / "idx", tmp_path / "pictures"
    mine, theirs = records(pictures, "a", 2), records(pictures, "b", 2)
    real_save = ColourMeanEncoder.save_weights
    raced = []

    def save_while_another_creates(self, folder):
        if not raced:
            raced.append(True)
            with Collection.open_or_create(directory, ColourMeanEncoder(8)) as other:
                other.add(theirs)
        real_save(self, folder)

    monkeypatch.setattr(ColourMeanEncoder, "save_weights", save_while_another_creates)
    with Collection.open_or_create(directory, colour_encoder) as collection:
        report = collection.add(mine)
    assert report.images_added == 2
    assert assert_consistent(directory)["image"] and len(assert_consistent(directory)["image"]) == 4
    assert not list(tmp_path.glob(".idx.creating-*"))


RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path[:0] = [sys.argv[1], str(Path(sys.argv[1]).parent)]
    import conftest
    from retrieval.collection import Collection
    from retrieval.datasets import Record
    directory, go, tag = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    paths = sorted(Path(sys.argv[5]).glob(f"{tag}*.png"))
    while not go.exists():
        time.sleep(0.005)
    with Collection.open_or_create(directory, conftest.ColourMeanEncoder(8)) as collection:
        report = collection.add([Record(p.name, p, [f"caption of {p.name}"]) for p in paths])
    assert report.images_added == len(paths), report.summary()
    """
)


def test_two_processes_creating_the_same_index(tmp_path):
    directory, pictures, go = tmp_path / "idx", tmp_path / "pictures", tmp_path / "go"
    records(pictures, "a", 3), records(pictures, "b", 3)
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, str(TESTS), str(directory), str(go), tag, str(pictures)],
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for tag in ("a", "b")
    ]
    go.touch()
    for racer in racers:
        assert racer.wait(120) == 0, racer.stderr.read()
    assert len(assert_consistent(directory)["image"]) == 6


# ----- kill -9 at every step of creating, adding and deleting -----

CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path[:0] = [sys.argv[1], str(Path(sys.argv[1]).parent)]
    import conftest
    from retrieval.collection import Collection
    from retrieval.datasets import Record

    crash_at, calls = int(sys.argv[4]), [0]
    def armed(real):
        def step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return step
    # Every rename and fsync is a step: files land, generations commit, folders move.
    os.replace, os.rename, os.fsync = armed(os.replace), armed(os.rename), armed(os.fsync)

    directory = Path(sys.argv[2])
    paths = sorted(Path(sys.argv[3]).glob("*.png"))
    with Collection.open_or_create(directory, conftest.ColourMeanEncoder(8)) as collection:
        print("created", calls[0])
        collection.add([Record(p.name, p, [f"caption of {p.name}"]) for p in paths[:3]], commit_every=2)
        collection.add([Record(p.name, p, [f"caption of {p.name}"]) for p in paths], commit_every=2)
        # The first picture, by content: a run killed after the delete's commit (in the merge it starts)
        # leaves it deleted, and the rerun's add brings it back under a new id.
        [first] = [item for item in collection.index.images_under() if item.source_id == paths[0].name]
        collection.index.delete([first.id])
    print("done", calls[0])
    """
)


def _crash_run(directory: Path, pictures: Path, crash_at: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CRASHER, str(TESTS), str(directory), str(pictures), str(crash_at)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )


def _steps(tmp_path: Path, pictures: Path) -> tuple[int, int]:
    """(steps until the index exists, steps of the whole run), from one run without a crash."""
    clean = _crash_run(tmp_path / "clean", pictures, 0)
    assert clean.returncode == 0, clean.stderr
    words = clean.stdout.split()
    return int(words[words.index("created") + 1]), int(words[words.index("done") + 1])


def _survives_crash_at(tmp_path: Path, pictures: Path, point: int) -> None:
    directory = tmp_path / f"crash-{point}"
    crashed = _crash_run(directory, pictures, point)
    assert crashed.returncode == -signal.SIGKILL, (point, crashed.stdout, crashed.stderr)
    if Index.exists(directory):  # killed mid-add or mid-delete: the last committed state, whole
        with Collection.open(directory, read_only=True) as collection:
            assert collection.verify(deep=True) == [], point
            assert len(collection.index.search("image", collection.encoder.encode_texts(["red"]), 10)[1]) == 1
    else:  # killed while creating: no index, and nothing half-made in its place
        assert not directory.exists() or not any(directory.iterdir()), (point, sorted(p.name for p in directory.iterdir()))
    again = _crash_run(directory, pictures, 0)  # the run repeated to the end: nothing lost, nothing twice
    assert again.returncode == 0, (point, again.stderr)
    sql = assert_consistent(directory)
    assert len(sql["image"]) == 5 and len(sql["caption"]) == 5
    assert not list(tmp_path.glob(f".crash-{point}.creating-*"))


@pytest.fixture
def pictures(tmp_path) -> Path:
    folder = tmp_path / "pictures"
    records(folder, "p", 6)
    return folder


def test_kill_9_during_creation_add_and_delete(tmp_path, pictures):
    """First, middle and last step of creating; a commit of the adds; the delete's commit."""
    created, done = _steps(tmp_path, pictures)
    assert 2 < created < done
    for point in sorted({1, created // 2, created, (created + done) // 2, done}):
        _survives_crash_at(tmp_path, pictures, point)


@pytest.mark.slow
def test_kill_9_at_every_step_of_create_add_and_delete(tmp_path, pictures):
    _, done = _steps(tmp_path, pictures)
    for point in range(1, done + 1):
        _survives_crash_at(tmp_path, pictures, point)


# ----- files that are not regular -----


INDEXER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    sys.path[:0] = [sys.argv[1], str(Path(sys.argv[1]).parent)]
    import conftest
    from retrieval.collection import Collection
    from retrieval.datasets import load_dataset
    dataset = load_dataset(Path(sys.argv[2]), images_root=Path(sys.argv[3]))
    with Collection.open_or_create(Path(sys.argv[4]), conftest.ColourMeanEncoder(8)) as collection:
        report = collection.add(dataset.records)
    print(json.dumps({"images_added": report.images_added, "problems": report.problems}))
    """
)


def test_fifos_and_devices_in_a_captions_file_are_skipped_not_read(tmp_path):
    """Issue 11 #3: a FIFO, or a symlink to /dev/zero, hung `seesay index` forever."""
    images = tmp_path / "images"
    solid_image(images / "good.png", (250, 0, 0))
    os.mkfifo(images / "pipe.png")
    (images / "zero.png").symlink_to("/dev/zero")
    (images / "folder.png").mkdir()
    data = tmp_path / "caps.csv"
    data.write_text("image,caption\ngood.png,red\npipe.png,a pipe\nzero.png,zeros\nfolder.png,a folder\n")
    result = subprocess.run(
        [sys.executable, "-c", INDEXER, str(TESTS), str(data), str(images), str(tmp_path / "idx")],
        capture_output=True, text=True, cwd=ROOT, timeout=60,  # it used to block here for ever
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images_added"] == 1
    problems = "\n".join(report["problems"])
    for name, kind in (("pipe.png", "a FIFO"), ("zero.png", "a character device"), ("folder.png", "a folder")):
        assert name in problems and kind in problems, problems


# ----- damaged files: one line, a non-zero exit, and `seesay check` -----


def bow_encoder(root: Path, seed: int):
    """A real, saved-and-reloadable encoder kind (the CLI runs in a subprocess that knows no test encoder)."""
    from retrieval.demo_data import make_shape_set
    from retrieval.encoders.bow import BowConfig, fit_bow
    from retrieval.datasets import load_dataset

    encoder, _ = fit_bow(load_dataset(make_shape_set(root, copies=1, seed=seed)).records, BowConfig(colours=8, objects=0))
    return encoder


@pytest.fixture
def small_index(tmp_path) -> Path:
    directory = tmp_path / "idx"
    with Collection.create(directory, bow_encoder(tmp_path / "shapes", 0)) as collection:
        collection.add(records(tmp_path / "pictures", "s", 3))
    return directory


def _current(directory: Path, suffix: str) -> Path:
    """The committed image segment's file ending in `suffix` (one segment: one add)."""
    with Index.open(directory, read_only=True) as index:
        # "images.sS" + suffix itself, not images.sS.ids.npy or images.sS.hashes.npy
        [name] = [name for name in index.info().files if name.startswith("images.s") and name.endswith(suffix) and name.count(".") == 1 + suffix.count(".")]
    return directory / name


def test_a_sound_index_checks_ok(small_index):
    result = seesay("check", "--index", small_index)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
    assert seesay("info", "--index", small_index).returncode == 0


def test_a_truncated_vectors_file_is_one_line_everywhere(small_index):
    faiss_file = _current(small_index, ".npy")  # a Flat index keeps no FAISS file: its vectors are the index
    faiss_file.write_bytes(faiss_file.read_bytes()[:40])
    search = seesay("search", "--index", small_index, "red")
    assert search.returncode == 1 and "Traceback" not in search.stderr
    assert search.stderr.strip().count("\n") == 0 and faiss_file.name in search.stderr and "truncated" in search.stderr
    check = seesay("check", "--index", small_index)
    assert check.returncode == 1 and faiss_file.name in check.stderr and "Traceback" not in check.stderr


def test_info_exits_non_zero_on_a_corrupt_index(small_index):
    vectors = _current(small_index, ".npy")
    vectors.write_bytes(vectors.read_bytes()[:100])
    info = seesay("info", "--index", small_index)
    assert info.returncode == 1 and vectors.name in info.stderr and "Traceback" not in info.stderr
    ids = _current(small_index, ".ids.npy")
    ids.unlink()
    assert seesay("info", "--index", small_index).returncode == 1


def test_check_finds_sql_and_faiss_disagreeing(small_index):
    import sqlite3

    with sqlite3.connect(small_index / "meta.sqlite") as db:
        db.execute("UPDATE manifest SET n_images = n_images + 1")
    check = seesay("check", "--index", small_index, "--json")
    assert check.returncode == 1
    problems = json.loads(check.stdout)["problems"]
    assert any("the manifest counts 4" in p for p in problems), problems


def test_a_swapped_encoder_folder_is_caught_by_search_and_check(small_index, tmp_path):
    """Issue 11 #4: an index whose encoder folder was altered answered with garbage and exit 0."""
    other = bow_encoder(tmp_path / "other-shapes", 7)  # same kind and dimension, other weights
    swapped = other.save(tmp_path / "other")
    encoder_dir = small_index / "encoder"
    for path in encoder_dir.iterdir():
        path.unlink()
    for path in swapped.iterdir():
        (encoder_dir / path.name).write_bytes(path.read_bytes())
    with Collection.open(small_index, read_only=True) as collection, pytest.raises(IndexMismatchError, match="not the encoder"):
        _ = collection.encoder
    search = seesay("search", "--index", small_index, "red")
    assert search.returncode == 1 and "not the encoder this index was built with" in search.stderr
    check = seesay("check", "--index", small_index)
    assert check.returncode == 1 and "not the encoder" in check.stderr


def test_tampered_encoder_weights_are_caught_by_search_and_check(small_index):
    theta = small_index / "encoder" / "theta.npy"
    data = bytearray(theta.read_bytes())
    data[-1] ^= 1
    theta.write_bytes(bytes(data))
    for command in ("search", "check"):
        args = ("--index", small_index, "red") if command == "search" else ("--index", small_index)
        result = seesay(command, *args)
        assert result.returncode == 1 and "theta.npy does not match the sha256" in result.stderr, result.stderr


def test_k_is_capped_with_a_clear_message(small_index):
    for k in ("20000", "1000000000", "1e9"):
        result = seesay("search", "--index", small_index, "red", "-k", k)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (k, result.stderr)
        assert "-k" in result.stderr
    assert seesay("search", "--index", small_index, "red", "-k", "10000").returncode == 0
