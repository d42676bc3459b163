"""The Tune search: cells of label fraction x init, MLflow parent/child runs, the table and plot,
registration of the best models, and resuming an interrupted search."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from echo import tracking
from conftest import REPO, stop_process_group


def _args(manifest: str, tracking_uri: str, tmp_path: Path, name: str, **kw) -> list[str]:
    opts = {"manifest": manifest, "backbone": "tiny3d", "epochs": "2", "batch-size": "8", "clip-len": "8",
            "num-samples": "2", "max-concurrent": "2", "cpus-per-trial": "0.5", "n-resamples": "200",
            "grace-period": "1", "tracking-uri": tracking_uri, "out": str(tmp_path / "out"),
            "storage": str(tmp_path / "tune-runs"), "name": name, **kw}
    return [x for k, v in opts.items() for x in (f"--{k}", v)]


def _children(tracking_uri: str, parent: str) -> list:
    c = tracking.client(tracking_uri)
    exp = c.get_experiment_by_name("echo-ssl-tune")
    return c.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def test_search_two_fractions_two_inits_table_plot_runs_and_registry(
        ray_cluster, synth_small, tracking_uri, pretrain_run, tmp_path, capsys):
    from echo.cli import main

    inits = f"random,runs:/{pretrain_run}"
    rc = main(["tune", *_args(synth_small, tracking_uri, tmp_path, "s2x2", fractions="0.5,1.0", inits=inits),
               "--register", "--model-name", "tune-test-model", "--optimizer", "adamw", "--cache-mb", "16"])
    assert rc == 0
    table = pd.read_csv(tmp_path / "out" / "label_efficiency.csv")
    assert len(table) == 4
    assert set(table["init"]) == {"random", f"runs:/{pretrain_run}"} and set(table["label_fraction"]) == {0.5, 1.0}
    for col in ("auroc", "ci_low", "ci_high", "n_train_studies", "hp_lr", "hp_dropout"):
        assert col in table.columns, col
    assert (table["ci_low"] <= table["auroc"]).all() and (table["auroc"] <= table["ci_high"]).all()
    half, full = (table[table["label_fraction"] == f]["n_train_studies"].iloc[0] for f in (0.5, 1.0))
    assert half < full
    with Image.open(tmp_path / "out" / "label_efficiency.png") as img:
        assert img.format == "PNG" and img.size[0] > 200
    assert "| init | label fraction |" in (tmp_path / "out" / "label_efficiency.md").read_text()

    parent = tracking.find_run(tracking_uri, "echo-ssl-tune", "echo.search_name", "s2x2")
    children = _children(tracking_uri, parent)
    assert len(children) == 8  # 2 fractions x 2 inits x 2 samples
    # Every fine-tuning option reaches the trials (recorded with each trial's run), searched ones sampled.
    for r in children:
        p = r.data.params
        assert (p["optimizer"], p["cache_mb"], p["backbone"], p["clip_len"]) == ("adamw", "16", "tiny3d", "8"), p
        assert p["init"] == r.data.tags["echo.init"] and float(p["lr"]) > 0
    cells = {(r.data.tags["echo.label_fraction"], r.data.tags["echo.init"]) for r in children}
    assert len(cells) == 4
    best = [r for r in children if r.data.tags.get("best") == "true"]
    assert len(best) == 4 and len({(r.data.tags["echo.label_fraction"], r.data.tags["echo.init"]) for r in best}) == 4
    assert all("test_auroc_ci_low" in r.data.metrics for r in best)
    assert all("test_auroc" not in r.data.metrics for r in children if r.data.tags.get("best") != "true")
    artifacts = {a.path for a in tracking.client(tracking_uri).list_artifacts(parent, "results")}
    assert {"results/label_efficiency.csv", "results/label_efficiency.png"} <= artifacts
    versions = tracking.client(tracking_uri).search_model_versions("name = 'tune-test-model'")
    assert len(versions) == 2  # the best model of each label fraction


def test_interrupted_search_resumes_without_repeating_finished_trials(
        ray_cluster, synth_small, tracking_uri, tmp_path):
    args = _args(synth_small, tracking_uri, tmp_path, "resumable", fractions="1.0", inits="random",
                 **{"num-samples": "3", "max-concurrent": "1", "epochs": "3", "scheduler": "fifo"})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "tune_search.py"), *args], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        finished: list = []
        while not finished:
            assert proc.poll() is None, "the search ended before it could be interrupted"
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(1)
            parent = tracking.find_run(tracking_uri, "echo-ssl-tune", "echo.search_name", "resumable")
            finished = [r for r in _children(tracking_uri, parent) if r.info.status == "FINISHED"] if parent else []
    finally:
        stop_process_group(proc)  # the interruption: the search and its local Ray die together
    client = tracking.client(tracking_uri)

    def epochs(run) -> list[tuple[int, int]]:
        return sorted((m.step, m.timestamp) for m in client.get_metric_history(run.info.run_id, "val_auroc"))

    before = {r.data.tags["echo.trial_id"]: epochs(r) for r in finished}
    assert len(before) < 3

    from echo.cli import main

    assert main(["tune", *args, "--resume"]) == 0
    children = _children(tracking_uri, parent)
    trial_ids = [r.data.tags["echo.trial_id"] for r in children]
    assert len(trial_ids) == len(set(trial_ids)) == 3
    after = {r.data.tags["echo.trial_id"]: r for r in children}
    for trial, logged in before.items():
        assert len(logged) == 3
        assert epochs(after[trial]) == logged, f"finished trial {trial} trained again"
    assert all(r.info.status == "FINISHED" for r in children)
    assert len(pd.read_csv(tmp_path / "out" / "label_efficiency.csv")) == 1
    assert main(["tune", *args, "--resume"]) == 0  # the state both sessions wrote passes the digest check


def test_tracking_uri_credentials_are_moved_to_the_environment(monkeypatch, caplog):
    """A ``user:password@`` in the tracking URI goes to MLflow's credential variables; the URI that
    configs and Ray storage keep has none. A database URI with a password is refused."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "someone-else")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "old")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://env-user:env%40pw@mlflow.example/")
    assert tracking.resolve_tracking_uri("https://al:p%3Ass@mlflow.example:5000/x") == "https://mlflow.example:5000/x"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("al", "p:ss")
    assert tracking.resolve_tracking_uri() == "https://mlflow.example/" == os.environ["MLFLOW_TRACKING_URI"]
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "env@pw"
    with pytest.raises(ValueError, match="carries credentials") as info:
        tracking.resolve_tracking_uri("postgresql://u:dbsecret@db.example/mlflow")
    assert "dbsecret" not in str(info.value)
    assert "pw" not in caplog.text and "p:ss" not in caplog.text


def test_search_keeps_tracking_credentials_out_of_storage(ray_cluster, mlflow_server, synth_small, tmp_path,
                                                          monkeypatch):
    """Issue 17, item 8: a search logging to a server through a URI with a password leaves the
    password in no file of its storage (``params.json``, ``tuner.pkl``, experiment state,
    checkpoints), of its output, or of the MLflow server's store."""
    from echo.cli import main

    password = "PW-echo17-Zq8xK"
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "unset")  # restored after the test; the search overwrites them
    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")  # as outside the tests: params.json and .pkl too
    uri = mlflow_server.url.replace("http://", f"http://echo-user:{password}@")
    args = _args(synth_small, uri, tmp_path, "with-credentials", fractions="1.0", inits="random",
                 **{"num-samples": "1", "max-concurrent": "1", "epochs": "1", "scheduler": "fifo"})
    assert main(["tune", *args]) == 0
    written = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert {"tuner.pkl", "params.json", "params.pkl"} <= {f.name for f in written}
    assert [str(f) for f in written if password.encode() in f.read_bytes()] == []
    assert password.encode() not in mlflow_server.db.read_bytes()
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == password  # where MLflow reads it from instead


def test_resume_refuses_state_files_changed_since_the_search_wrote_them(ray_cluster, synth_small, tracking_uri,
                                                                          tmp_path):
    """Issue 17, item 11: ``--resume`` unpickles the cell's Tune state from the runs storage only when
    every state file matches a SHA-256 the search recorded in its MLflow parent run: a changed byte
    in ``tuner.pkl`` or in the trial states, or a file the search never wrote, stops the resume
    naming the file; the untouched folder resumes, and so does the folder that resume left."""
    from echo.cli import main
    from echo.train.tune_state import TuneStateError

    args = _args(synth_small, tracking_uri, tmp_path, "guarded", fractions="1.0", inits="random",
                 **{"num-samples": "1", "max-concurrent": "1", "epochs": "1", "scheduler": "fifo"})
    assert main(["tune", *args]) == 0
    cell = tmp_path / "tune-runs" / "guarded" / "f1-random-s0"
    tuner_pkl = cell / "tuner.pkl"
    (state,) = cell.glob("experiment_state-*.json")
    parent = tracking.find_run(tracking_uri, "echo-ssl-tune", "echo.search_name", "guarded")
    tags = tracking.client(tracking_uri).get_run(parent).data.tags
    assert sum(k.startswith("echo.tune_sha256.f1-random-s0.") for k in tags) >= 3  # tuner.pkl, trial and searcher state

    def flip_a_byte(path: Path, at: int) -> bytes:
        original = path.read_bytes()
        path.write_bytes(original[:at] + bytes([original[at] ^ 1]) + original[at + 1:])
        return original

    for path, at in ((tuner_pkl, 100), (state, len(state.read_bytes()) // 2)):
        original = flip_a_byte(path, at)
        with pytest.raises(TuneStateError, match=f"{path.name} changed since the search wrote it"):
            main(["tune", *args, "--resume"])
        path.write_bytes(original)
    planted = cell / "experiment_state-2099-01-01_00-00-00.json"  # the newest: the one Tune would load
    planted.write_bytes(state.read_bytes())
    with pytest.raises(TuneStateError, match=f"{planted.name} was not written by this search"):
        main(["tune", *args, "--resume"])
    planted.unlink()
    assert main(["tune", *args, "--resume"]) == 0
    # The resumed session's own state files (a new session name) were recorded too.
    assert len(list(cell.glob("experiment_state-*.json"))) == 2
    assert main(["tune", *args, "--resume"]) == 0
