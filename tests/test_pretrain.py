"""Pretraining on Ray Train: 2 DDP workers over gloo, checkpoints, MLflow, and worker loss."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from echo import tracking
from echo.train.pretrain import PretrainConfig, run_pretrain
from echo.train.launch import RayOptions
from conftest import REPO
from raycluster import registered_checkpoints


def _config(manifest: str, tmp_path: Path, **kw) -> PretrainConfig:
    base = dict(manifest=manifest, method="echoclr", backbone="tiny3d", epochs=4, batch_size=8, clip_len=4, lr=1e-3,
                loader_workers=1, probe_every=2, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", seed=3)
    base.update(kw)
    return PretrainConfig(**base)


def _history(cfg: PretrainConfig, run_id: str, key: str) -> list:
    return tracking.client(cfg.tracking_uri).get_metric_history(run_id, key)


def test_two_worker_pretraining_learns_and_records(ray_cluster, synth_small, tmp_path):
    cfg = _config(synth_small, tmp_path, run_name="two-workers")
    run_id = run_pretrain(cfg, RayOptions(workers=2, cpus_per_worker=0.5, storage=str(tmp_path / "runs")))

    losses = [m.value for m in sorted(_history(cfg, run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == cfg.epochs
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    run = tracking.client(cfg.tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "echoclr" and run.data.params["workers"] == "2"
    assert run.data.params["seed"] == "3"
    for key in ("contrastive_top1", "frame_order_top1", "clips_per_s", "data_wait_fraction", "lr", "skipped_videos"):
        assert key in run.data.metrics, key
    assert "probe_val_auroc" in run.data.metrics
    # Checkpoints written by rank 0 under the run's storage folder, holding the resume state.
    ckpts = sorted(p for p in (tmp_path / "runs" / "two-workers").glob("checkpoint_*") if p.is_dir())
    assert ckpts and all((c / "state.pt").exists() for c in ckpts)
    # The encoder is logged as a state dict that loads with weights_only=True.
    local = tracking.client(cfg.tracking_uri).download_artifacts(run_id, "encoder", str(tmp_path / "enc"))
    import torch

    state = torch.load(Path(local) / "encoder.pt", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())


def _train_worker_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors]


def test_killed_worker_resumes_from_checkpoint_and_logs_each_epoch_once(ray_cluster, synth_small, tmp_path):
    cfg = _config(synth_small, tmp_path, epochs=6, run_name="killed-worker")
    storage = tmp_path / "runs"
    result: dict = {}

    def fit() -> None:
        try:
            result["run_id"] = run_pretrain(cfg, RayOptions(workers=2, cpus_per_worker=0.5, storage=str(storage),
                                                            max_failures=2))
        except BaseException as e:  # surfaced by the assertion below
            result["error"] = e

    thread = threading.Thread(target=fit)
    thread.start()
    deadline = time.monotonic() + 240
    while not registered_checkpoints(str(storage), "killed-worker"):
        assert thread.is_alive(), f"run ended before its first checkpoint: {result}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    pids = _train_worker_pids()
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")

    run_id = result["run_id"]
    steps = [m.step for m in _history(cfg, run_id, "loss")]
    assert sorted(steps) == list(range(1, cfg.epochs + 1)), f"epochs logged: {sorted(steps)}"
    resumed = _history(cfg, run_id, "resumed_at_epoch")
    assert resumed and resumed[0].value >= 1, "the restarted group did not resume from a checkpoint"
    assert tracking.client(cfg.tracking_uri).get_run(run_id).info.status == "FINISHED"


def test_bad_manifest_stops_before_ray_starts(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("video_uri,patient_id,study_id,split,label\nv.mp4,P1,S1,training,1\n")
    from echo.data.manifest import ManifestError

    with pytest.raises(ManifestError, match="row 1.*split"):
        run_pretrain(_config(str(bad), tmp_path), RayOptions(workers=1))


def test_pretraining_reports_its_gates_and_decoded_cache(pretrain_run, tracking_uri):
    """The shared in-process run (conftest): gates on the validation patients at the probe
    epoch, and the whole corpus in the decoded-frame cache."""
    metrics = tracking.client(tracking_uri).get_run(pretrain_run).data.metrics
    assert 0 < metrics["gate_retrieval_chance"] < 1 and 0 <= metrics["gate_retrieval_top1"] <= 1
    assert metrics["gate_order_chance"] == pytest.approx(1 / 24) and 0 <= metrics["gate_order_top1"] <= 1
    assert metrics["gate_valve_probe_r2"] <= 1  # the synthetic manifest has valve_severity
    assert metrics["decoded_cache_fraction"] == 1.0 and metrics["decoded_cache_mb"] > 0


def test_every_skipped_video_is_named_exactly_once(ray_cluster, synth_small, tmp_path):
    """Four bad objects (empty, truncated, text, missing) in studies with good videos, so they
    are also skipped as other rows' pair partners, on two DDP workers whose shards change every
    epoch: in the output of ``echo-ssl pretrain`` (a process of its own on the session's Ray,
    whose workers' lines it prints) each is named once over the job, by rank 0 for all ranks,
    and an epoch's count is of distinct videos."""
    import pandas as pd

    table = pd.read_csv(synth_small, dtype=str, keep_default_na=False)
    base = Path(synth_small).parent
    table["video_uri"] = [str(base / v) for v in table["video_uri"]]
    good = Path(table["video_uri"].iloc[0]).read_bytes()
    bad = {"empty.mp4": b"", "truncated.mp4": good[: len(good) // 3], "text.mp4": b"not a video\n" * 50,
           "missing.mp4": None}
    rows = []
    for i, (name, data) in enumerate(bad.items()):
        path = tmp_path / "bad" / name
        path.parent.mkdir(exist_ok=True)
        if data is not None:
            path.write_bytes(data)
        row = table[table["split"] == "unlabeled"].iloc[i].copy()  # a study that has good videos too
        row["video_uri"] = str(path)
        rows.append(row)
    manifest = tmp_path / "manifest.csv"
    pd.concat([table, pd.DataFrame(rows)], ignore_index=True).to_csv(manifest, index=False)
    flags = {"manifest": str(manifest), "method": "mi-simclr", "backbone": "tiny3d", "epochs": "3", "batch-size": "4",
             "clip-len": "4", "lr": "1e-3", "loader-workers": "0", "probe-every": "0", "max-skipped-fraction": "0.5",
             "splits": "unlabeled", "tracking-uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "workers": "2",
             "cpus-per-worker": "0.5", "storage": str(tmp_path / "runs"), "data-root": f"{base},{tmp_path}",
             "ray-address": ray_cluster.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, "-m", "echo.cli", "pretrain", *(x for k, v in flags.items() for x in (f"--{k}", v))],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    # Without colours and Ray's "(RayTrainWorker pid=...) " prefix: the lines as the loop wrote them.
    lines = [re.sub(r"^\(\S+ pid=\d+[^)]*\) ", "", re.sub(r"\x1b\[[0-9;]*m", "", line))
             for line in (done.stdout + done.stderr).splitlines()]
    named = [line.split()[1].rstrip(":") for line in lines if line.startswith("skipped /")]
    assert sorted(named) == sorted(str(tmp_path / "bad" / n) for n in bad), "\n".join(lines[-80:])
    counts = [int(line.split("skipped ")[1].split()[0]) for line in lines if line.startswith("pretrain epoch")]
    assert len(counts) == 3 and max(counts) <= len(bad)
    assert not [line for line in lines if "skipping /" in line]  # the loaders do not name them again
