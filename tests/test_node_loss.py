"""Surviving the loss of a node: a 2-worker pretraining on a three-node Ray cluster on 127.0.0.1.

Nodes are separate process groups (``raycluster.LocalRayCluster``): a head with no CPUs (the
driver and the Train controller live there, as on a real cluster) and two 1-CPU worker nodes.
Both Train workers (0.5 CPU each) land on one worker node; once the run's first checkpoint is in
the moto S3 bucket, the test SIGKILLs every process of that node at once (a machine lost, no
goodbye). The run must restart its worker group on the other node, resume from the S3
checkpoint, complete, and log every epoch to MLflow exactly once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid

from conftest import REPO
from raycluster import (LocalRayCluster, RayNode, checkpoint_keys, pretrain_run, registered_checkpoints, synth_to_s3,
                       tail)

EPOCHS = 6

# A killed raylet refuses the GCS's health checks at once; the GCS declares its node dead after
# `threshold` failed checks `period` apart: about 3 s instead of about 15 s. The per-check timeout
# stays at its default, so a raylet that is merely slow on this busy machine is not declared dead.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def _kill_node_of_train_workers(cluster: LocalRayCluster, nodes: list[RayNode]) -> tuple[RayNode, set[int]]:
    """SIGKILL, all at once, every process of the worker node that runs the Train workers: its
    process group (raylet, agents) and the workers themselves (Ray workers leave the node's
    process group). Returns the node and the killed workers' PIDs."""
    by_node = cluster.actor_nodes("RayTrainWorker")
    doomed = next((n for n in nodes if n.node_id in by_node), None)
    assert doomed is not None, f"no Train worker on {[n.name for n in nodes]}: {by_node}"
    os.killpg(doomed.proc.pid, signal.SIGKILL)
    for pid in by_node[doomed.node_id]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    doomed.proc.wait(timeout=30)
    cluster.nodes.remove(doomed)
    return doomed, by_node[doomed.node_id]


def test_pretraining_survives_losing_the_node_of_its_workers(s3_server, s3_bucket, tmp_path):
    # ~65 videos: epochs long enough (~1 s each on an idle machine, more under load) that the run
    # is still going when the test has seen the first checkpoint and killed the node.
    manifest = synth_to_s3(f"s3://{s3_bucket}/data", patients=16, unlabeled=16)
    storage = f"s3://{s3_bucket}/ckpt"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_name = f"nodeloss-{uuid.uuid4().hex[:6]}"

    cluster = LocalRayCluster(tmp_path, env=FAST_NODE_DEATH)
    driver = None
    try:
        started = time.monotonic()
        cluster.start_head(num_cpus=0)
        workers = [cluster.add_node("node-a", num_cpus=1), cluster.add_node("node-b", num_cpus=1)]
        cluster.wait_for_nodes(3)
        print(f"3 Ray nodes up in {time.monotonic() - started:.1f} s")

        driver_log = tmp_path / "driver.log"
        with open(driver_log, "wb") as out:
            driver = subprocess.Popen(
                [sys.executable, "jobs/pretrain.py",
                 "--config", "configs/local-pretrain.yaml", "--ray-address", cluster.gcs_address,
                 "--manifest", manifest, "--epochs", str(EPOCHS), "--batch-size", "2",
                 "--workers", "2", "--cpus-per-worker", "0.5", "--loader-workers", "0", "--probe-every", "0",
                 "--max-failures", "2", "--storage", storage, "--tracking-uri", tracking_uri, "--run-name", run_name],
                cwd=REPO, env=cluster.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 240
        while not registered_checkpoints(storage, run_name):
            assert driver.poll() is None, f"driver ended before the first checkpoint\n{tail(driver_log)}"
            assert time.monotonic() < deadline, f"no checkpoint in S3 after 240 s\n{tail(driver_log)}"
            time.sleep(0.2)
        lost_at = time.monotonic()
        doomed, killed = _kill_node_of_train_workers(cluster, workers)
        survivor = next(n for n in workers if n is not doomed)
        assert driver.poll() is None, "the run finished before the node was lost: make epochs longer"
        print(f"killed {doomed.name} {lost_at - started:.1f} s in, after the first checkpoint")

        # Nodes that run new Train workers after the loss (the GCS lists the killed ones as alive
        # for a few seconds, until it declares their node dead).
        hosts: set[str] = set()
        deadline = time.monotonic() + 300
        while driver.poll() is None:
            assert time.monotonic() < deadline, f"run not finished 300 s after the node loss\n{tail(driver_log)}"
            hosts |= {node for node, pids in cluster.actor_nodes("RayTrainWorker").items() if pids - killed}
            time.sleep(0.5)
        assert driver.returncode == 0, tail(driver_log, 8000)
        print(f"run finished {time.monotonic() - lost_at:.1f} s after the node loss")
        assert hosts == {survivor.node_id}
        output = driver_log.read_text(errors="replace")

        # The worker group was restarted on the surviving node and resumed from S3.
        assert "resuming at epoch" in output, tail(driver_log, 8000)
        assert f"pretrain epoch {EPOCHS}/{EPOCHS}" in output
        assert survivor.proc.poll() is None
        assert len(cluster.alive_nodes()) == 2

        run, steps = pretrain_run(tracking_uri, run_name)
        assert run.info.status == "FINISHED"
        assert steps == list(range(1, EPOCHS + 1))  # every epoch once, none repeated after the resume
        assert checkpoint_keys(storage, run_name)
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
        cluster.stop()
