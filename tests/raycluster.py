"""Real Ray clusters of separate processes on 127.0.0.1 for the job-submission and node-loss tests.

``LocalRayCluster`` starts a head (``ray start --head --block``, own session and process group,
own temp dir, every port chosen here, dashboard on 127.0.0.1) and worker nodes, from this virtual
environment so that a job's ``python`` is the project's; the helpers read what a run left in
storage and MLflow. Shared by ``test_jobs.py`` and ``test_node_loss.py``.
"""


from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from conftest import REPO, free_port, open_loopback, stop_process_group, wait_for_port

__all__ = ["LocalRayCluster", "RayNode", "ray_env", "tail", "synth_to_s3", "checkpoint_keys", "registered_checkpoints",
           "pretrain_run"]

BIN = Path(sys.executable).parent
MARKER = "ECHO_SSL_TEST_RAY_CLUSTER"
RAY = BIN / "ray"


class RayNode:
    """One node's process group (``ray start --head --block`` or ``WORKER_NODE``) and its log."""

    def __init__(self, name: str, proc: subprocess.Popen, log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log

    @property
    def node_id(self) -> str | None:
        """The Ray node ID a worker node printed when it joined (``None`` before, and for the head)."""
        match = re.search(r"worker node ([0-9a-f]{56}) joined", self.log.read_text(errors="replace"))
        return match.group(1) if match else None

    def stop(self) -> None:
        stop_process_group(self.proc, timeout=30)


# A worker node joining the head, as `ray start --address ... --block` does. That command refuses
# to run with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and without it Ray rewrites 127.0.0.1 to the
# machine's interface address; so the node is built the way ray.cluster_utils.Cluster builds its
# worker nodes (RayParams + Node), in a process of its own, on loopback.
WORKER_NODE = """
import sys, threading
import ray._private.node
from ray._private.parameter import RayParams

gcs_address, temp_dir, num_cpus, store_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
params = RayParams(gcs_address=gcs_address, node_ip_address="127.0.0.1", num_cpus=num_cpus, temp_dir=temp_dir,
                   object_store_memory=store_bytes, node_manager_port=0,
                   min_worker_port=0, max_worker_port=0, dashboard_agent_listen_port=None)
node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
print("worker node", node.node_id, "joined", gcs_address, flush=True)
threading.Event().wait()
"""

OBJECT_STORE_BYTES = 150 * 2**20


class LocalRayCluster:
    """A Ray cluster of separate node processes on 127.0.0.1, for tests.

    ``start_head`` then ``add_node`` for each extra node; ``stop`` stops every node this object
    started, and nothing else.
    """

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        # Short, because Ray's socket paths must stay under 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        # Every process of this cluster inherits the marker, Ray workers included (they leave the
        # node's process group), so that `stop` finds exactly what this cluster started.
        self.marker = f"{MARKER}={uuid.uuid4().hex}"
        self.extra_env = {**(env or {}), MARKER: self.marker.split("=", 1)[1]}
        self.env = ray_env(self.extra_env)
        self.nodes: list[RayNode] = []
        self.gcs_port = 0
        self.dashboard_url = ""

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def _start(self, name: str, argv: list[str]) -> RayNode:
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        node = RayNode(name, proc, log)
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: int, timeout: float = 120) -> RayNode:
        self.gcs_port, dashboard_port = free_port(), free_port()
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        # Ray processes that look up "their" cluster (Train's placement-group cleaner) find this
        # one even when other Ray clusters run on the machine.
        self.env = ray_env({**self.extra_env, "RAY_ADDRESS": self.gcs_address})
        head = self._start("head", [
            str(RAY), "start", "--head", "--block", "--disable-usage-stats", f"--temp-dir={self.temp_dir}",
            f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--num-cpus={num_cpus}", f"--object-store-memory={OBJECT_STORE_BYTES}",
        ])
        try:
            wait_for_port(dashboard_port, timeout=timeout, proc=head.proc)
            self.wait_for_nodes(1, timeout=timeout)
        except Exception as e:
            raise RuntimeError(f"Ray head did not start: {e}\n{tail(head.log)}") from e
        return head

    def add_node(self, name: str, num_cpus: int) -> RayNode:
        # A temp dir per node: nodes starting at the same time in one folder race for socket names.
        temp_dir = self.temp_dir / name
        temp_dir.mkdir()
        return self._start(name, [sys.executable, "-c", WORKER_NODE, self.gcs_address, str(temp_dir),
                                  str(num_cpus), str(OBJECT_STORE_BYTES)])

    def alive_nodes(self) -> list[dict]:
        """The dashboard's list of alive nodes (state API over HTTP: no Ray client in this process)."""
        with open_loopback(f"{self.dashboard_url}/api/v0/nodes?limit=100&detail=1", timeout=10) as r:
            rows = json.load(r)["data"]["result"]["result"]
        return [n for n in rows if n["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                nodes = self.alive_nodes()
                if len(nodes) >= count:
                    return nodes
            except OSError:
                pass
            for node in self.nodes:
                if node.proc.poll() is not None:
                    raise RuntimeError(f"Ray node {node.name} exited with {node.proc.returncode}\n{tail(node.log)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} Ray nodes alive after {timeout} s")
            time.sleep(0.5)

    def actor_nodes(self, class_name: str) -> dict[str, set[int]]:
        """Node ID -> PIDs of the alive actors of ``class_name`` (state API over HTTP)."""
        from ray.util.state import list_actors

        out: dict[str, set[int]] = {}
        for actor in list_actors(address=self.dashboard_url,
                                 filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")]):
            out.setdefault(actor.node_id, set()).add(actor.pid)
        return out

    def processes(self) -> set[int]:
        """PIDs of every live process this cluster started (they carry its marker)."""
        needle = self.marker.encode() + b"\0"
        out = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if needle in (entry / "environ").read_bytes():
                        out.add(int(entry.name))
                except OSError:
                    pass
        return out

    def stop(self, grace_s: float = 15) -> None:
        """Stop every node's process group, then whatever this cluster started that outlived its
        raylet (Ray workers exit on their own when it goes; SIGKILL after ``grace_s``)."""
        for node in reversed(self.nodes):
            node.stop()
        self.nodes.clear()
        deadline = time.monotonic() + grace_s
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def ray_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of Ray processes started by a test: this venv first on PATH (the jobs'
    ``python``), loopback only, no token auth on the throwaway cluster, quick Train health checks,
    and the S3 endpoint and test keys already in ``os.environ`` (conftest, ``s3_server``)."""
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
        # A stopped test node goes at once instead of draining for 30 s.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        PYTHONUNBUFFERED="1",
    )
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra or {})
    return env


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def synth_to_s3(prefix: str, patients: int, unlabeled: int = 0, seed: int = 0) -> str:
    """A small synthetic data set (64 x 64 videos of 16-24 frames; ``patients`` labelled and
    ``unlabeled`` more) under the ``s3://`` ``prefix``; returns its manifest's URI."""
    from echo.ingest.synth import synthesize

    return synthesize(prefix, patients=patients, unlabeled_patients=unlabeled, seed=seed, size=64,
                      min_frames=16, max_frames=24)


def checkpoint_keys(storage: str, run_name: str) -> list[str]:
    """The checkpoint state files under ``storage/run_name``, in the order Ray wrote them."""
    from echo.data import storage as st

    return [u for u in st.list_prefix(f"{storage}/{run_name}") if "/checkpoint_" in u and u.endswith("/state.pt")]


def registered_checkpoints(storage: str, run_name: str) -> list[str]:
    """Checkpoints Ray Train has registered for the run (its checkpoint-manager snapshot).

    A checkpoint can be in storage before it is registered; a crash in between resumes from
    the one before, so tests that kill a worker "after a checkpoint" wait for this list.
    """
    import json

    from echo.data import storage as st

    uri = f"{storage}/{run_name}/checkpoint_manager_snapshot.json"
    try:
        snapshot = json.loads(st.read_bytes(uri))
    except (FileNotFoundError, ValueError):
        return []
    return [c["checkpoint_dir_name"] for c in snapshot.get("checkpoint_results", [])]


def pretrain_run(tracking_uri: str, run_name: str, experiment: str = "echo-ssl-pretrain"):
    """The MLflow run tagged ``echo.run_name = run_name`` and the steps at which ``loss`` was logged."""
    from echo import tracking

    run_id = tracking.find_run(tracking_uri, experiment, "echo.run_name", run_name)
    assert run_id is not None, f"no MLflow run named {run_name} in {tracking_uri}"
    client = tracking.client(tracking_uri)
    return client.get_run(run_id), sorted(m.step for m in client.get_metric_history(run_id, "loss"))
