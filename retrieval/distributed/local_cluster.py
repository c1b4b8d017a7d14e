"""A Ray cluster of a head and worker nodes on 127.0.0.1, started and stopped by whoever needs one:
`seesay index --engine ray` without `--address` (one node), the tests and the benchmarks.

It starts where a loaded machine makes `ray.init()` fail (a raylet that misses a fixed
start-up wait aborts), and where it still cannot start it says what timed out and how long
it waited. Import it before Ray.

Importing this module sets the environment every node and driver of such a cluster needs,
before Ray itself is imported (some of it is read at import time):
- token authentication off: recent Ray turns it on for a new cluster, and all nodes must agree;
- RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps 127.0.0.1 as given, where Ray would otherwise swap in
  the machine's network address, which nodes bound to loopback do not answer;
- Ray's out-of-memory killer off: it counts the whole machine's memory, so on a shared machine
  it kills the job's workers for other people's processes;
- the head's GCS server gets 300 s, not 30, to publish its port.
Each node also gets its agents' ports recorded before it starts (`_node_args`). And Ray's
Python side gives a new node a fixed 30 s to register, which a machine busy with other work
(the tests run at low priority beside it) can miss: `_patient` stretches that wait.
"""
from __future__ import annotations

import os
import signal
import socket
import time
import types
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

from retrieval.errors import SeesayError

RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_memory_monitor_refresh_ms": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_gcs_server_port_wait_time_s": "300",
}
os.environ.update(RAY_ENV)

NODE_MEMORY = 96 * 1024 * 1024  # object store per node by default: the tests move kilobytes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_args(cpus: int, session_dir: str, object_store: int | None = NODE_MEMORY) -> dict:
    """Arguments of a new node whose agents' ports are chosen and recorded in `session_dir` before it starts.

    A raylet waits a fixed 15 s for its agents to record their ports, and aborts when a
    loaded machine starts them more slowly; recorded beforehand (the agents then bind the
    same ports), there is nothing to wait for.
    """
    import ray
    from ray._raylet import (
        DASHBOARD_AGENT_LISTEN_PORT_NAME,
        METRICS_AGENT_PORT_NAME,
        METRICS_EXPORT_PORT_NAME,
        RUNTIME_ENV_AGENT_PORT_NAME,
        persist_port,
    )

    node_id = ray.NodeID.from_random().hex()
    ports = {
        "metrics_agent_port": METRICS_AGENT_PORT_NAME,
        "metrics_export_port": METRICS_EXPORT_PORT_NAME,
        "dashboard_agent_listen_port": DASHBOARD_AGENT_LISTEN_PORT_NAME,
        "runtime_env_agent_port": RUNTIME_ENV_AGENT_PORT_NAME,
    }
    chosen = {argument: _free_port() for argument in ports}
    os.makedirs(session_dir, exist_ok=True)
    for argument, name in ports.items():
        persist_port(session_dir, node_id, name, chosen[argument])
    # Ray takes a new node's id from this variable only (it ignores a `node_id` argument and draws one).
    node_env = {"RAY_OVERRIDE_NODE_ID_FOR_TESTING": node_id}
    return {"node_ip_address": "127.0.0.1", "num_cpus": cpus, "object_store_memory": object_store, "env_vars": node_env, **chosen}


STARTUP_PATIENCE = 10  # Ray's fixed 30 s for a node to register becomes 300 s


@contextmanager
def _patient() -> Iterator[None]:
    """While the block runs, Ray's node start-up waits measure time at 1/STARTUP_PATIENCE of its pace.

    `ray._private.node` hard-codes how long it waits for a new node's raylet to register; it
    reads the clock through its module's `time`, which is swapped here for a slowed copy.
    """
    import ray._private.node as node_module

    real = node_module.time
    slowed = types.SimpleNamespace(**{name: getattr(real, name) for name in dir(real) if not name.startswith("__")})
    slowed.monotonic = lambda: real.monotonic() / STARTUP_PATIENCE
    node_module.time = slowed
    try:
        yield
    finally:
        node_module.time = real


@contextmanager
def _starting(what: str) -> Iterator[None]:
    """Turn a failure to start `what` into one SeesayError naming it, Ray's reason, the time waited and what to do."""
    started = time.monotonic()
    try:
        yield
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        raise SeesayError(
            f"a local Ray did not start: its {what} failed after {time.monotonic() - started:.0f} s ({reason}); "
            "a busy machine can start Ray too slowly: try again when it is quieter, or start Ray yourself "
            "(`ray start --head`) and pass --address auto"
        ) from exc


def new_session() -> str:
    """A fresh session name; every daemon of the cluster started under it names it on its command line."""
    return f"session_seesay_{os.getpid()}_{time.time_ns()}"


class LocalCluster:
    """A head (`head_cpus`) and worker nodes (`cpus` each) on 127.0.0.1, `object_store` bytes of object
    store each (None: Ray's default share of memory); `address` is what `--address` takes."""

    def __init__(
        self, workers: int = 2, cpus: int = 2, object_store: int | None = NODE_MEMORY, head_cpus: int = 1, session: str | None = None,
    ) -> None:
        from ray.cluster_utils import Cluster

        import ray._common.utils

        self.cpus, self.object_store = cpus, object_store
        session = session or new_session()
        head_dir = os.path.join(ray._common.utils.get_default_ray_temp_dir(), session)
        with _starting("head node"), _patient():
            self._cluster = Cluster(
                initialize_head=True,
                head_node_args={**_node_args(head_cpus, head_dir, object_store), "include_dashboard": False, "session_name": session},
            )
        self.workers = []
        try:
            for _ in range(workers):
                self.add_worker()
        except BaseException:
            self.shutdown()
            raise

    @property
    def address(self) -> str:
        return self._cluster.address

    @property
    def session_dir(self) -> str:
        """This cluster's session folder, which every one of its daemons names on its command line."""
        return self._cluster.head_node.get_session_dir_path()

    def add_worker(self):
        with _starting("worker node"), _patient():
            node = self._cluster.add_node(**_node_args(self.cpus, self.session_dir, self.object_store))
        self.workers.append(node)
        return node

    def kill_worker(self, node) -> None:
        """Take a worker node away at once, as a machine that dies."""
        self._cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)

    def shutdown(self) -> None:
        self._cluster.shutdown()


def processes_with(text: str) -> list[int]:
    """Ids of the processes whose command line contains `text` (Ray names its workers' processes `ray::...`);
    none where there is no /proc to read (macOS)."""
    found: list[int] = []
    if not Path("/proc").is_dir():
        return found
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in line:
                found.append(int(entry.name))
    return found


@contextmanager
def local_cluster(
    workers: int = 2, cpus: int = 2, object_store: int | None = NODE_MEMORY, head_cpus: int = 1,
) -> Iterator[LocalCluster]:
    """A LocalCluster for the block; afterwards, or after it failed to start, none of its processes is left running."""
    session = new_session()
    try:
        cluster = LocalCluster(workers, cpus, object_store, head_cpus, session)
        try:
            yield cluster
        finally:
            cluster.shutdown()
    finally:
        _stop_processes(session)


def _stop_processes(session: str, grace_s: float = 20) -> None:
    """Wait `grace_s` for the processes of `session` to end, then kill those left."""
    deadline = time.monotonic() + grace_s
    while processes_with(session) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in processes_with(session):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
