"""`seesay index --engine ray` on a real Ray cluster of a head and two worker nodes on 127.0.0.1.

The cluster is started once for the module and stopped at its end (no process of it is
left). The encoder is a small bag-of-words model (colour words only), so the tests are
about the plumbing: same ids, vectors and results as the single-process path, a worker
node or an actor killed mid-job, a driver killed mid-job and the rerun that resumes it.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval.distributed.local_cluster import RAY_ENV, _starting, local_cluster, processes_with  # sets Ray's environment first
from retrieval.collection import Collection
from retrieval.demo_data import COLOURS, SHAPES, make_shape_set
from retrieval.distributed.jobfolder import JobFolder
from retrieval.errors import SeesayError

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 900


def write_images(folder: Path, n: int, corrupt: int = 0) -> Path:
    """`n` shape images (`make_shape_set`), two captions each, plus `corrupt` files that are not images; returns the captions CSV."""
    path = make_shape_set(folder, count=n)
    for i in range(corrupt):
        (folder / "images" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image at all")
    with path.open("a", newline="") as f:
        csv.writer(f).writerows((f"broken{i}.png", f"a broken picture {i}") for i in range(corrupt))
    return path


def seesay(*args, ray_env: bool = True, extra_path: str | None = None, **popen) -> subprocess.Popen:
    """`seesay ARGS` in a process of its own; `ray_env`: with the environment the test cluster's nodes have;
    `extra_path`: a folder put on PYTHONPATH after the repository."""
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), extra_path]))}
    if not ray_env:
        env = {name: value for name, value in env.items() if name not in RAY_ENV}
    return subprocess.Popen([sys.executable, "-m", "cli.app", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finished(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=JOB_TIMEOUT_S)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out)


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(workers=2, cpus=2) as started:
        yield started


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("shapes"), 96)


@pytest.fixture(scope="module")
def model(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "bow"
    trained = subprocess.run([sys.executable, "-m", "cli.app", "train", "--encoder", "bow-pmi", "--data", data, "--out", out,
                              "--colours", "12", "--objects", "0"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr
    return out


@pytest.fixture(scope="module")
def single(data, model, tmp_path_factory) -> Path:
    """The same data indexed by the single-process path."""
    index = tmp_path_factory.mktemp("single") / "index"
    run = subprocess.run([sys.executable, "-m", "cli.app", "index", "--encoder", model, "--data", data, "--index", index, "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return index


def contents(index_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{kind: (ids ascending, their vectors)} of an index."""
    with Collection.open(index_dir, read_only=True) as collection:
        out = {}
        for kind in ("image", "caption"):
            ids, vectors = collection.index.all_vectors(kind)
            order = np.argsort(ids)
            out[kind] = (np.asarray(ids)[order], np.asarray(vectors)[order])
        assert collection.verify(deep=True) == []
        return out


def top10(index_dir: Path, queries: list[str], images: np.ndarray) -> list[list[int]]:
    """Top-10 ids of text → image for `queries`, then of image → caption for the stored `images` vectors."""
    with Collection.open(index_dir, read_only=True) as collection:
        found = collection.index.search("image", collection.encoder.encode_texts(queries), 10)[1].tolist()
        return found + collection.index.search("caption", images, 10)[1].tolist()


def wait_for_shards(index_dir: Path, process: subprocess.Popen) -> None:
    """Until the job's first shard is written (the job is under way); the job must still be running then."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not list((index_dir / ".jobs").glob("*/shards/*.parquet")):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no shard was written in time"
        time.sleep(0.2)


def test_ray_and_single_process_indexing_agree(cluster, data, model, single, tmp_path):
    index = tmp_path / "ray"
    report = finished(seesay("index", "--engine", "ray", "--address", cluster.address, "--encoder", model,
                             "--data", data, "--index", index, "--json"))
    assert (report["images_added"], report["captions_added"], report["embedded"], report["reused"]) == (96, 192, 288, 0)
    assert not (index / ".jobs").exists() or not any((index / ".jobs").iterdir())  # the job folder goes after its commit
    ours, theirs = contents(index), contents(single)
    for kind in ("image", "caption"):
        assert ours[kind][0].tolist() == theirs[kind][0].tolist()
        np.testing.assert_allclose(ours[kind][1], theirs[kind][1], atol=1e-5)
    queries = [f"a {c} {s}" for c in COLOURS for s in SHAPES] + [f"the {s} is {c} and small" for c in COLOURS for s in SHAPES]
    probes = theirs["image"][1][:76]  # 24 + 76 = 100 fixed queries
    assert top10(index, queries, probes) == top10(single, queries, probes)

    again = finished(seesay("index", "--engine", "ray", "--address", cluster.address, "--encoder", model,
                            "--data", data, "--index", index, "--json"))
    assert (again["images_added"], again["embedded"], again["images_skipped_existing"]) == (0, 0, 96)


AGENT_DELAY_S = 20  # a raylet waits a fixed 15 s for its agents to start, and aborts


def slow_agents(folder: Path) -> str:
    """A folder for PYTHONPATH whose sitecustomize holds back the start of Ray's agents (Python processes
    the raylet starts) by AGENT_DELAY_S: how they start on a machine busy with other work."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import sys, time\n"
        "if sys.argv and sys.argv[0].endswith(('dashboard/agent.py', 'runtime_env/agent/main.py')):\n"
        f"    time.sleep({AGENT_DELAY_S})\n"
    )
    return str(folder)


def test_without_an_address_a_local_ray_starts_on_a_busy_machine_and_stops_after_the_job(data, model, single, tmp_path):
    """What a user on a busy laptop runs: no cluster, no Ray settings, and agents slow to start, where plain
    `ray.init()` aborts."""
    index = tmp_path / "ray"
    process = seesay("index", "--engine", "ray", "--encoder", model, "--data", data, "--index", index, "--json",
                     ray_env=False, extra_path=slow_agents(tmp_path / "slow"))
    report = finished(process)
    assert (report["images_added"], report["captions_added"], report["embedded"]) == (96, 192, 288)
    ours, theirs = contents(index), contents(single)
    assert all(ours[kind][0].tolist() == theirs[kind][0].tolist() for kind in ours)
    assert processes_with(f"session_seesay_{process.pid}_") == []  # its Ray went with it


def test_a_node_that_does_not_start_is_one_error_saying_which_what_ray_said_and_how_long_it_waited():
    with pytest.raises(SeesayError) as raised:
        with _starting("head node"):
            raise Exception("The current node timed out during startup. This could happen because ...\n(more lines)")
    message = str(raised.value)
    assert message.startswith("a local Ray did not start: its head node failed after 0 s (The current node timed out during startup.")
    assert "\n" not in message and "--address auto" in message


@pytest.mark.parametrize("victim", ["worker node", "actor"])
def test_a_worker_node_or_an_actor_killed_mid_job_changes_nothing(victim, cluster, data, model, single, tmp_path):
    index = tmp_path / "ray"
    process = seesay("index", "--engine", "ray", "--address", cluster.address, "--encoder", model, "--data", data,
                     "--index", index, "--json")
    try:
        wait_for_shards(index, process)
        if victim == "worker node":
            cluster.kill_worker(cluster.workers[0])
        else:
            actors = processes_with("EmbedActor")
            assert actors, "no encoder actor is running"
            os.kill(actors[0], signal.SIGKILL)
        report = finished(process)
    finally:
        process.kill()
        if victim == "worker node":
            cluster.add_worker()  # back to two workers for the next test
    assert report["images_added"] == 96 and report["captions_added"] == 192
    ours, theirs = contents(index), contents(single)
    assert all(ours[kind][0].tolist() == theirs[kind][0].tolist() for kind in ours)


def test_a_rerun_after_the_driver_died_embeds_only_the_missing_rows(cluster, model, tmp_path):
    data = write_images(tmp_path / "data", 96, corrupt=1)
    index = tmp_path / "ray"
    args = ("index", "--engine", "ray", "--address", cluster.address, "--encoder", model, "--data", data, "--index", index, "--json")
    process = seesay(*args, start_new_session=True)
    try:
        wait_for_shards(index, process)
        os.killpg(process.pid, signal.SIGKILL)  # the driver dies mid-job: nothing is committed
        process.wait(timeout=60)
    finally:
        process.kill()
    with Collection.open(index, read_only=True) as collection:
        assert collection.index.info().n_images == 0
        dim = collection.encoder.dim
    (job,) = (index / ".jobs").iterdir()
    written = JobFolder(str(job)).done_ids(dim)  # what the dead driver's workers had written (a late write may add more)
    report = finished(seesay(*args))
    assert report["reused"] >= len(written) > 0 and report["embedded"] + report["reused"] == 96 + 1 + 193
    assert (report["images_added"], report["captions_added"]) == (96, 192)
    assert [p for p in report["problems"] if "broken0.png" in p and "bad image" in p]
    ids = contents(index)
    assert [len(ids["image"][0]), len(ids["caption"][0])] == [96, 192]  # no id stored twice
    assert len(set(ids["image"][0].tolist())) == 96 and len(set(ids["caption"][0].tolist())) == 192
