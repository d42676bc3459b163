"""Job submission to a real Ray head: ``ray job submit --working-dir . -- python jobs/pretrain.py``.

The head is a separate ``ray start --head --block`` process (own session and process group, own
temp dir, every port chosen here, dashboard on 127.0.0.1), started from this virtual
environment so that the job's ``python`` is the project's. Its processes inherit the moto
server's ``AWS_ENDPOINT_URL`` and test keys. The test stops only what it started: the node's
process group, then any process still carrying the cluster's marker variable.

The cluster and the helpers come from ``raycluster.py`` (shared with ``test_node_loss.py``).
"""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest

from conftest import REPO
from raycluster import RAY, LocalRayCluster, checkpoint_keys, pretrain_run, ray_env, synth_to_s3


@pytest.fixture
def ray_head(tmp_path, s3_server):
    """A 2-CPU Ray head of its own (separate processes), stopped by process group afterwards."""
    cluster = LocalRayCluster(tmp_path)
    try:
        started = time.monotonic()
        cluster.start_head(num_cpus=2)
        print(f"ray head up in {time.monotonic() - started:.1f} s")
        yield cluster
    finally:
        cluster.stop()


def test_pretrain_job_submitted_with_ray_job_submit(ray_head, s3_bucket, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    manifest = synth_to_s3(f"s3://{s3_bucket}/data", patients=8)
    storage = f"s3://{s3_bucket}/ckpt"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_name = f"job-{uuid.uuid4().hex[:6]}"
    submission_id = f"echo-test-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    submit = subprocess.run(
        [str(RAY), "job", "submit", f"--address={ray_head.dashboard_url}", f"--submission-id={submission_id}",
         "--working-dir", ".", "--",
         "python", "jobs/pretrain.py", "--config", "configs/local-pretrain.yaml",
         "--manifest", manifest, "--epochs", "2", "--batch-size", "2",
         "--workers", "2", "--cpus-per-worker", "0.5", "--loader-workers", "0", "--probe-every", "0",
         "--storage", storage, "--tracking-uri", tracking_uri, "--run-name", run_name],
        cwd=REPO, env=ray_env(), capture_output=True, text=True, timeout=420,
    )
    elapsed = time.monotonic() - started
    output = submit.stdout + submit.stderr
    assert submit.returncode == 0, output[-6000:]
    print(f"job submitted and finished in {elapsed:.1f} s")

    client = JobSubmissionClient(ray_head.dashboard_url)
    assert client.get_job_status(submission_id) == JobStatus.SUCCEEDED
    logs = client.get_job_logs(submission_id)
    assert "pretrain epoch 2/2" in logs
    assert "pretraining finished; MLflow run" in logs

    checkpoints = checkpoint_keys(storage, run_name)
    assert len(checkpoints) == 2, checkpoints  # one per epoch, num_to_keep=2

    run, steps = pretrain_run(tracking_uri, run_name)
    assert run.info.status == "FINISHED"
    assert steps == [1, 2]
    assert run.data.params["storage"] == storage
    assert run.data.params["workers"] == "2"
    # configs/local-pretrain.yaml supplied these; the flags above won over its epochs: 3
    assert (run.data.params["backbone"], run.data.params["lr"]) == ("tiny3d", "0.001")
