"""Writers in other processes: serialised by the manifest lock, never seen half-done by a reader."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import solid_image
from index_checks import assert_consistent
from indexer import Index
from retrieval.collection import Collection
from retrieval.datasets import Record

WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path[:0] = [sys.argv[1], str(Path(sys.argv[1]).parent)]  # tests, then the repository
    import conftest  # registers the test encoder
    from retrieval.collection import Collection
    from retrieval.datasets import Record

    directory, tag, count = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    paths = sorted(Path(sys.argv[5]).glob(f"{tag}-*.png"))
    with Collection.open(directory) as collection:
        report = collection.add([Record(p.name, p, [f"caption of {p.name}"]) for p in paths], commit_every=1)
    assert (report.images_added, report.captions_added) == (count, count), report.summary()
    """
)


def test_concurrent_writers_and_a_reader(tmp_path: Path, colour_encoder, db_url) -> None:
    directory, pictures = tmp_path / "idx", tmp_path / "pictures"
    per_writer = 6
    for tag, base in (("a", 0), ("b", 128)):
        for i in range(per_writer):
            solid_image(pictures / f"{tag}-{i:02d}.png", (base + i, 255 - base - 5 * i, 3 * i))
    seed = solid_image(tmp_path / "seed.png", (255, 0, 0))
    with Collection.create(directory, colour_encoder, db_url=db_url) as collection:
        collection.add([Record("seed", seed, ["red"])])

    tests_dir = str(Path(__file__).parent)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, tests_dir, str(directory), tag, str(per_writer), str(pictures)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("a", "b")
    ]
    seen = [1]
    query = colour_encoder.encode_texts(["red"])
    with Index.open(directory, read_only=True) as reader:
        while any(writer.poll() is None for writer in writers):
            reader.refresh()
            _, ids = reader.search("image", query, 100)
            found = [int(i) for i in ids[0] if i >= 0]
            assert len(reader.items(found)) == len(found)  # every id FAISS returns is in SQL
            assert len(found) >= seen[-1]
            seen.append(len(found))
        for writer in writers:
            assert writer.wait() == 0, writer.stderr.read()
        reader.refresh()
        assert (reader.search("image", query, 100)[1] >= 0).sum() == 1 + 2 * per_writer
    sql = assert_consistent(directory)
    assert (len(sql["image"]), len(sql["caption"])) == (1 + 2 * per_writer, 1 + 2 * per_writer)
