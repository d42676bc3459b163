"""Model registry against a real ``mlflow server`` (SQLite, artifacts proxied to moto S3).

Logging bundles into runs over HTTP, registering, the champion policy (moves only on a better
test AUROC on the same manifest), explicit promote and the recorded history, pulling from a
separate process with hash checks (a tampered file is refused), the embedded
``sqlite:///mlflow.db`` default, and a scan for credentials in everything MLflow stored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pytest
import torch

from echo import load_model
from echo.serve import pyfunc, registry
from echo.data import storage
from echo.serve.bundle import BundleIntegrityError, file_sha256, save_bundle
from echo.cli import main
from echo.model.networks import ASClassifier

MANIFEST_A = "a1" * 32
MANIFEST_B = "b2" * 32
# Distinctive fake keys for this (client) process, scanned for along with the server's.
CLIENT_KEYS = ("AKIAECHOCLIENTFAKE88", "echo-client-fake-secret-Zq81Lw0pPx3")


def make_bundle(folder: Path, test_auroc: float, manifest_sha256: str = MANIFEST_A, seed: int = 0,
                threshold: float = 0.5) -> str:
    """An untrained tiny3d classifier as a bundle (8-frame clips of 32x32)."""
    torch.manual_seed(seed)
    meta = {
        "clip_len": 8, "num_clips": 2, "stride": 1, "frame_size": 32, "threshold": threshold,
        "threshold_sens90": threshold / 2, "label_fraction": 0.05, "init": "random", "pretrain_run_id": None,
        "val_auroc": test_auroc - 0.01, "test_auroc": test_auroc, "test_auroc_ci_low": test_auroc - 0.05,
        "test_auroc_ci_high": min(1.0, test_auroc + 0.05), "n_train_studies": 12, "manifest_sha256": manifest_sha256,
    }
    return save_bundle(ASClassifier("tiny3d"), meta, str(folder))


def log_run(bundle_dir: str) -> str:
    """Log ``bundle_dir`` in a new run of the current tracking URI, as a fine-tuning job does."""
    mlflow.set_experiment("echo-ssl-registry-tests")
    with mlflow.start_run():
        mlflow.log_params({"lr": 1e-4, "label_fraction": 0.05, "backbone": "tiny3d"})
        return pyfunc.log_model_bundle(bundle_dir)


def cli_process(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``echo-ssl ARGS`` in a separate process."""
    return subprocess.run([sys.executable, "-m", "echo.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


@pytest.fixture
def server(mlflow_server, monkeypatch):
    """The shared MLflow server as this process's tracking URI (and its subprocesses')."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CLIENT_KEYS[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CLIENT_KEYS[1])
    mlflow.set_tracking_uri(mlflow_server.url)
    yield mlflow_server
    mlflow.set_tracking_uri(None)


def test_champion_moves_only_on_better_auroc_same_manifest(server, tmp_path, capsys):
    name = f"as-{uuid.uuid4().hex[:8]}"
    aurocs = [(0.70, MANIFEST_A), (0.65, MANIFEST_A), (0.80, MANIFEST_A), (0.95, MANIFEST_B)]
    uris = [log_run(make_bundle(tmp_path / f"b{i}", auc, sha, seed=i)) for i, (auc, sha) in enumerate(aurocs)]
    assert all(u.startswith("runs:/") and u.endswith("/model") for u in uris)

    champions = []
    for uri in uris:
        version = registry.register(uri.rsplit("/", 1)[0], name=name)  # runs:/<id> as a user types it
        champions.append(registry.resolve(f"models:/{name}@champion").version)
        assert version == registry.resolve(f"models:/{name}/{version}").version
    # v1 first; v2 worse stays out; v3 better takes it; v4 better but on another manifest stays out.
    assert champions == ["1", "1", "3", "3"]

    v4 = registry.version_info(name, 4)
    assert v4.tags["champion_decision"].startswith("kept: ") and "another manifest" in v4.tags["champion_decision"]
    v3 = registry.version_info(name, 3)
    assert v3.tags["test_auroc"] == "0.8" and v3.tags["manifest_sha256"] == MANIFEST_A
    assert v3.tags["test_auroc_with_ci"] == "0.800 (95% CI 0.750-0.850)"
    assert v3.tags["weights_sha256"] == file_sha256(tmp_path / "b2" / "weights.pt")
    for key in ("label_fraction", "init", "backbone", "clip_len", "normalization", "val_auroc", "n_train_studies",
                "code_version", "source_run_id", "threshold"):
        assert key in v3.tags, key
    assert "pretrain_run_id" not in v3.tags  # None is not written as a tag

    # Explicit promote of the worse version 2 (CLI, another process), then the history.
    assert main(["models", "promote", name, "2", "--reason", "clinical review"]) == 0
    assert "version 3 -> version 2" in capsys.readouterr().out
    assert registry.resolve(f"models:/{name}@champion").version == "2"

    moves = registry.history(name)
    assert [(m.version, m.previous_version) for m in moves] == [("1", None), ("3", "1"), ("2", "3")]
    assert moves[-1].reason == "clinical review" and "beats champion version 1" in moves[1].reason
    assert moves[0].moved_at < moves[1].moved_at < moves[2].moved_at
    v1, v3 = registry.version_info(name, 1), registry.version_info(name, 3)
    assert v1.tags["champion_until"] == v3.tags["champion_since"] == moves[1].moved_at
    assert v3.tags["champion_until"] == moves[2].moved_at

    assert [m.version for m in registry.history(name, alias="other")] == []

    with pytest.raises(registry.RegistryError, match="not found"):
        registry.promote(name, 99)


def test_register_refuses_a_run_without_a_model(server):
    mlflow.set_experiment("echo-ssl-registry-tests")
    with mlflow.start_run() as run:
        mlflow.log_param("lr", 1e-4)
    with pytest.raises(registry.RegistryError, match=f"run {run.info.run_id} has no model"):
        registry.register(f"runs:/{run.info.run_id}", name="as-none")
    with pytest.raises(registry.RegistryError, match="promote"):
        registry.register("models:/as-none/1", name="as-none")


def _s3_model_key(server, model_id: str, relpath: str) -> str:
    """The S3 key of a file of a logged model (``relpath`` from the model's root)."""
    keys = [u for u in storage.list_prefix(f"s3://{server.bucket}/mlflow") if u.endswith(f"{model_id}/artifacts/{relpath}")]
    assert len(keys) == 1, keys
    return keys[0]


def test_pull_from_another_process_verifies_and_refuses_tampering(server, tmp_path, capsys):
    name = f"as-{uuid.uuid4().hex[:8]}"
    bundle = make_bundle(tmp_path / "bundle", 0.83, seed=7)
    registry.register(log_run(bundle), name=name)

    out = tmp_path / "pulled"
    done = cli_process("models", "pull", f"models:/{name}@champion", "--out", str(out), env={"MLFLOW_TRACKING_URI": server.url})
    assert done.returncode == 0, done.stderr
    assert f"{name} version 1 (aliases: champion)" in done.stdout
    assert "test AUROC 0.830 (95% CI 0.780-0.880)" in done.stdout
    assert f"manifest sha256 {MANIFEST_A}" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["digests.json", "model.json", "registry.json", "weights.pt"]
    assert file_sha256(out / "weights.pt") == file_sha256(Path(bundle) / "weights.pt")
    assert server.url not in (out / "registry.json").read_text()

    # The pulled folder loads with no registry at all; altering it locally is refused.
    assert load_model(str(out)).meta.registry["version"] == "1"
    weights = bytearray((out / "weights.pt").read_bytes())
    weights[-100] ^= 0xFF
    (out / "weights.pt").write_bytes(bytes(weights))
    with pytest.raises(BundleIntegrityError, match="weights.pt was changed"):
        load_model(str(out))

    # Tampered in the artifact store: the weights alone, then weights and model.json together.
    ref = registry.resolve(f"models:/{name}@champion")
    weights_key = _s3_model_key(server, ref.model_id, "artifacts/bundle/weights.pt")
    storage.write_bytes(weights_key, bytes(weights))
    assert main(["models", "pull", f"models:/{name}/1", "--out", str(tmp_path / "again")]) == 1
    assert "does not match" in (err := capsys.readouterr().err) and "refusing" in err
    assert not (tmp_path / "again" / "weights.pt").exists()
    with pytest.raises(BundleIntegrityError):
        load_model(f"models:/{name}@champion")

    config_key = _s3_model_key(server, ref.model_id, "artifacts/bundle/model.json")
    forged = json.loads(storage.read_bytes(config_key))
    forged["weights_sha256"] = file_sha256(out / "weights.pt")
    storage.write_bytes(config_key, json.dumps(forged).encode())
    with pytest.raises(BundleIntegrityError, match="artifacts/bundle/model.json was changed"):
        registry.pull(f"models:/{name}@champion", str(tmp_path / "forged"))
    assert not (tmp_path / "forged" / "weights.pt").exists()


def _serve_load(uri: str, url: str) -> subprocess.CompletedProcess:
    """``mlflow.pyfunc.load_model(uri)`` in its own process: the loader ``mlflow models serve`` runs
    (entry file, shipped code, ``load_context``) without the HTTP server around it."""
    return subprocess.run([sys.executable, "-c", "import sys, mlflow; mlflow.pyfunc.load_model(sys.argv[1])", uri],
                          capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": url}, timeout=300)


def _changed(data: bytes, relpath: str) -> bytes:
    """``data`` with one byte changed: the threshold in model.json (0.5 -> 0.9), a letter of a
    code file's docstring (still valid Python), a byte in the middle of the weights."""
    if relpath.endswith("model.json"):
        assert data.count(b'"threshold": 0.5') == 1
        return data.replace(b'"threshold": 0.5', b'"threshold": 0.9')
    if relpath.endswith(".py"):
        i = data.index(b'"""') + 3
        return data[:i] + bytes([data[i] ^ 0x20]) + data[i + 1 :]
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


def test_a_changed_file_or_missing_digest_is_refused_by_pull_load_and_serve(server, tmp_path, capsys):
    """Issue 17 item 1: one byte of model.json, weights.pt or a shipped code file changed in the
    artifact store (moto S3), and the digest tags removed: each refused, naming the file."""
    name = f"as-{uuid.uuid4().hex[:8]}"
    registry.register(log_run(make_bundle(tmp_path / "bundle", 0.8, seed=5)), name=name)
    uri = f"models:/{name}@champion"
    ref = registry.resolve(uri)
    assert ref.tags["bundle_digest"] == mlflow.MlflowClient(server.url).get_run(ref.run_id).data.tags["echo.bundle_digest"]
    assert _serve_load(uri, server.url).returncode == 0  # untouched, it loads

    for relpath in ("artifacts/bundle/model.json", "artifacts/bundle/weights.pt", "code/echo/serve/predict.py"):
        key = _s3_model_key(server, ref.model_id, relpath)
        original = storage.read_bytes(key)
        storage.write_bytes(key, _changed(original, relpath))
        try:
            assert main(["models", "pull", uri, "--out", str(tmp_path / "pulled")]) == 1
            assert f"{relpath} was changed" in capsys.readouterr().err
            assert not (tmp_path / "pulled" / "weights.pt").exists()
            with pytest.raises(BundleIntegrityError, match=f"{relpath} was changed"):
                load_model(uri)
            served = _serve_load(uri, server.url)
            assert served.returncode != 0 and f"{relpath} was changed" in served.stderr, served.stderr[-2000:]
        finally:
            storage.write_bytes(key, original)

    client = mlflow.MlflowClient(server.url)
    client.delete_model_version_tag(name, ref.version, "bundle_digest")
    client.delete_tag(ref.run_id, "echo.bundle_digest")
    assert main(["models", "pull", uri, "--out", str(tmp_path / "pulled")]) == 1
    assert "no bundle digest is recorded" in capsys.readouterr().err
    with pytest.raises(BundleIntegrityError, match="no bundle digest is recorded"):
        load_model(f"runs:/{ref.run_id}/model")
    served = _serve_load(uri, server.url)
    assert served.returncode != 0 and "no bundle digest is recorded" in served.stderr, served.stderr[-2000:]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("video_uri,patient_id,study_id,split,label\nv.mp4,P1,S1,test,1\nw.mp4,P2,S2,test,0\n")
    for command in (["predict", "--model", uri, str(tmp_path / "v.mp4")],
                    ["evaluate", "--model", uri, "--manifest", str(manifest), "--out", str(tmp_path / "eval")]):
        assert main(command) == 1, command
        assert "no bundle digest is recorded" in capsys.readouterr().err, command
    # Only with the explicit flag, and said so.
    assert main(["models", "pull", uri, "--out", str(tmp_path / "pulled"), "--allow-unverified"]) == 0
    assert "bundle digest: none recorded (UNVERIFIED)" in capsys.readouterr().out
    assert load_model(uri, allow_unverified=True).meta.threshold == 0.5


def test_embedded_sqlite_default_in_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(None)  # also clears MLFLOW_TRACKING_URI
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = log_run(make_bundle(tmp_path / "bundle", 0.75))  # MLflow's own default store
    version = registry.register(uri)  # echo's default: the same sqlite:///mlflow.db here
    assert (tmp_path / "mlflow.db").is_file()
    assert list((tmp_path / "mlruns").rglob("weights.pt"))
    assert version == registry.resolve(f"models:/{registry.DEFAULT_NAME}@champion").version == "1"
    model = load_model(f"models:/{registry.DEFAULT_NAME}@champion")
    assert model.meta.registry["version"] == "1" and model.meta.test_auroc == 0.75


def test_no_credentials_in_params_tags_artifacts_or_logs(server, tmp_path):
    name = f"as-{uuid.uuid4().hex[:8]}"
    bundle = make_bundle(tmp_path / "bundle", 0.9, seed=3)
    registry.register(log_run(bundle), name=name)
    registry.promote(name, 1, alias="reviewed")
    _, meta = registry.pull(f"models:/{name}@reviewed", str(tmp_path / "pulled"))
    secrets = [*server.fake_keys, *CLIENT_KEYS]

    client = mlflow.MlflowClient(server.url)
    texts = [json.dumps(meta.to_json()), json.dumps(meta.registry), registry.format_summary(meta), server.log.read_text(errors="replace")]
    texts += [p.read_text() for p in (tmp_path / "pulled").glob("*.json")]
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
    for rm in client.search_registered_models():
        texts.append(json.dumps(rm.tags))
        for mv in client.search_model_versions(f"name = '{rm.name}'"):
            texts.append(json.dumps(mv.tags))
    blobs = [server.db.read_bytes()]
    objects = storage.list_prefix(f"s3://{server.bucket}/")
    assert any(o.endswith("/bundle/weights.pt") for o in objects) and any(o.endswith("/MLmodel") for o in objects)
    blobs += [storage.read_bytes(o) for o in objects]
    for secret in secrets:
        assert not any(secret in t for t in texts), secret
        assert not any(secret.encode() in b for b in blobs), secret
