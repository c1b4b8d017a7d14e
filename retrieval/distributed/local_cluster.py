"""A Ray cluster of a head and worker nodes on 127.0.0.1, started and stopped by the tests and benchmarks that need one.

It starts where a loaded machine makes `ray.init()` fail (a raylet that misses a fixed
start-up wait aborts). Import it before Ray.

Importing this module sets the environment every node and driver of such a cluster needs,
before Ray itself is imported (some of it is read at import time):
- token authentication off: recent Ray turns it on for a new cluster, and all nodes must agree;
- RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps 127.0.0.1 as given, where Ray would otherwise swap in
  the machine's network address, which nodes bound to loopback do not answer;
- Ray's out-of-memory killer off: it counts the whole machine's memory, so on a shared machine
  it kills the job's workers for other people's processes.
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

RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_memory_monitor_refresh_ms": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
os.environ.update(RAY_ENV)

NODE_MEMORY = 96 * 1024 * 1024  # object store per node by default: the tests move kilobytes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_args(cpus: int, session_dir: str, object_store: int = NODE_MEMORY) -> dict:
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
    return {"node_ip_address": "127.0.0.1", "num_cpus": cpus, "object_store_memory": object_store, "node_id": node_id, **chosen}


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


class LocalCluster:
    """A head (1 CPU) and worker nodes (`cpus` each, `object_store` bytes of object store each) on 127.0.0.1;
    `address` is what `--address` takes."""

    def __init__(self, workers: int = 2, cpus: int = 2, object_store: int = NODE_MEMORY) -> None:
        from ray.cluster_utils import Cluster

        import ray._common.utils

        self.cpus, self.object_store = cpus, object_store
        session = f"session_seesay_tests_{os.getpid()}_{time.time_ns()}"
        head_dir = os.path.join(ray._common.utils.get_default_ray_temp_dir(), session)
        with _patient():
            self._cluster = Cluster(
                initialize_head=True,
                head_node_args={**_node_args(1, head_dir), "include_dashboard": False, "session_name": session},
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
        with _patient():
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
    """Ids of the processes whose command line contains `text` (Ray names its workers' processes `ray::...`)."""
    found = []
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
def local_cluster(workers: int = 2, cpus: int = 2, object_store: int = NODE_MEMORY) -> Iterator[LocalCluster]:
    """A LocalCluster for the block; afterwards none of its processes is left running."""
    cluster = LocalCluster(workers, cpus, object_store)
    session = cluster.session_dir
    try:
        yield cluster
    finally:
        cluster.shutdown()
        deadline = time.monotonic() + 20
        while processes_with(session) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in processes_with(session):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
