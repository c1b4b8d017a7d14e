"""`python -m benchmarks.ray_speedup`: what a second core gains a Ray embedding job, beside the most two processes can.

On the same generated images and the same bag-of-words encoder (colour words over every
pixel: decoding and nearest-colour search, all CPU), every library held to one thread per
process, each round measures, for one core and then for two (every other round in the
other order, so that a change of the machine's load falls on both sides):
- `bare`: the encoding alone, split over one process per core, started together (a
  barrier); wall time from the first start to the last end. ceiling = 1-core ÷ 2-core
  time: what the cores allow right now.
- `ray`: `seesay index --engine ray` (two encoder actors) on a fresh local Ray (a head and a
  worker node, `retrieval.distributed.local_cluster`) started on every core, then with
  every one of its processes (driver, GCS, raylets, workers; later workers inherit their
  raylet's affinity) held to those cores (`worker_cores`: what a task saw), into a fresh
  index; `start` is starting and joining the cluster, `total` the indexing (plan, embed,
  commit). speedup = 1-core ÷ 2-core time.
On a machine whose cores are busy with other work both figures sink together; speedup ÷
ceiling is the part of the attainable gain Ray keeps after its own overhead, and ray ÷ bare
on the same cores is that overhead. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import machine
from retrieval.collection import Collection
from retrieval.datasets import load_dataset
from retrieval.demo_data import make_shape_set

ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
OBJECT_STORE_BYTES = 256 * 1024 * 1024
LOGICAL_CPUS = 4  # two actors, decode and write tasks all schedulable; the cores are what the affinity allows
ACTORS = 2


def train_encoder(data: Path, out: Path) -> Path:
    from retrieval.encoders.bow import BowConfig, fit_bow

    encoder, _ = fit_bow(load_dataset(data).records, BowConfig(colours=64, objects=0))
    encoder.save(out)
    return out


def _encode_part(model: Path, paths: list[str], cores: set[int], barrier, results) -> None:
    from threadpoolctl import threadpool_limits

    from retrieval.embedding import encode_image_files
    from retrieval.encoders.registry import load_encoder

    os.sched_setaffinity(0, cores)
    with threadpool_limits(1):
        encoder = load_encoder(model)
        barrier.wait()
        started = time.perf_counter()
        encode_image_files(encoder, paths, batch_size=64, workers=1)
        results.put((started, time.perf_counter()))


def bare_wall(model: Path, paths: list[str], cores: list[int]) -> float:
    """Wall time of encoding `paths` split over one process per core, started together."""
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(len(cores)), context.Queue()
    workers = [context.Process(target=_encode_part, args=(model, paths[p :: len(cores)], {core}, barrier, results))
               for p, core in enumerate(cores)]
    for worker in workers:
        worker.start()
    spans = [results.get(timeout=3600) for _ in workers]
    for worker in workers:
        worker.join()
    return max(end for _, end in spans) - min(start for start, _ in spans)


def ray_run(model: Path, data: Path, index: Path, cores: list[int]) -> dict:
    """Index `data` with a fresh local Ray held to `cores`, in a process of its own: its report's seconds."""
    env = {**os.environ, **ONE_THREAD}
    args = [sys.executable, "-m", "benchmarks.ray_speedup", "--ray-job", json.dumps([str(model), str(data), str(index), cores])]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"the Ray run on cores {cores} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def hold_to(cores: set[int]) -> None:
    """Hold this process and every process it started (Ray's daemons and workers) to `cores`;
    workers the raylet starts later inherit its affinity."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    todo = [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            os.sched_setaffinity(pid, cores)
        except ProcessLookupError:
            continue
        todo += children.get(pid, [])


def _ray_job(model: str, data: str, index: str, cores: list[int]) -> None:
    """The body of `ray_run`, in its own process: start Ray, hold it to `cores`, index, stop Ray, print the figures."""
    from retrieval.distributed.local_cluster import local_cluster  # before Ray: it sets Ray's environment

    import ray

    from retrieval.distributed.job import index_with_ray
    from retrieval.encoders.registry import load_encoder

    started = time.perf_counter()
    # A head and one worker node, started on every core the patient way (`ray.init()` aborts on a busy machine).
    with local_cluster(workers=1, cpus=LOGICAL_CPUS, object_store=OBJECT_STORE_BYTES) as cluster:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        start_s = time.perf_counter() - started
        try:
            hold_to(set(cores))
            worker_cores = sorted(ray.get(ray.remote(lambda: sorted(os.sched_getaffinity(0))).remote()))
            records = load_dataset(Path(data)).records
            with Collection.open_or_create(Path(index), load_encoder(Path(model))) as collection:
                report = index_with_ray(collection, records, actors=ACTORS, batch_size=32)
        finally:
            ray.shutdown()
    assert report.images_added == len(records) and not report.problems, report.summary()
    figures = {"start": start_s, **report.seconds}
    print(json.dumps({**{k: round(v, 2) for k, v in figures.items()}, "worker_cores": worker_cores}))


def measure_round(model: Path, data: Path, paths: list[str], root: Path, cores: list[int], order: list[int]) -> dict:
    """One round: for 1 core and for 2 (in `order`), the bare encoding then the Ray job, back to back."""
    out: dict = {}
    for n in order:
        bare = bare_wall(model, paths, cores[:n])
        job = ray_run(model, data, root / f"index-{len(list(root.glob('index-*')))}", cores[:n])
        out[n] = {"bare_s": round(bare, 2), "ray_s": job, "load_1min": round(os.getloadavg()[0], 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=384, help="image side in pixels")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, alternately 1 core first and 2 cores first")
    parser.add_argument("--ray-job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ray_job:
        _ray_job(*json.loads(args.ray_job))
        return
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        raise SystemExit("this benchmark needs two cores")
    os.environ.update(ONE_THREAD)
    with tempfile.TemporaryDirectory(prefix="seesay-ray-bench-") as tmp:
        root = Path(tmp)
        data = make_shape_set(root / "data", fmt="jpg", size=args.size, count=args.images)
        model = train_encoder(data, root / "model")
        paths = [str(record.image_path) for record in load_dataset(data).records]
        load_before = os.getloadavg()
        rounds = [measure_round(model, data, paths, root, cores, [1, 2] if r % 2 == 0 else [2, 1]) for r in range(args.rounds)]
        load_after = os.getloadavg()
    ceilings = [r[1]["bare_s"] / r[2]["bare_s"] for r in rounds]
    totals = [r[1]["ray_s"]["total"] / r[2]["ray_s"]["total"] for r in rounds]
    embeds = [r[1]["ray_s"]["embed"] / r[2]["ray_s"]["embed"] for r in rounds]
    print(json.dumps({
        "images": args.images, "size": args.size, "actors": ACTORS, "machine": machine(),
        "load_average_before": [round(x, 2) for x in load_before], "load_average_after": [round(x, 2) for x in load_after],
        "rounds": rounds,
        "ceiling": [round(x, 2) for x in ceilings],
        "ray_speedup_total": [round(x, 2) for x in totals],
        "ray_speedup_embed": [round(x, 2) for x in embeds],
        "ray_over_bare_1_core": [round(r[1]["ray_s"]["total"] / r[1]["bare_s"], 2) for r in rounds],
        "ray_over_bare_2_cores": [round(r[2]["ray_s"]["total"] / r[2]["bare_s"], 2) for r in rounds],
    }, indent=2))

if __name__ == "__main__":
    main()
