"""The pyfunc flavour under a real ``mlflow models serve`` (model pulled through the MLflow
server from moto S3): the same probabilities as ``echo-ssl predict`` and ``echo.load_model``,
and only URIs under the allowed prefixes are opened."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import free_port, open_loopback, stop_process_group, wait_for_http, wait_for_port

import echo
from echo.serve import registry
from echo.data import storage
from echo.serve.bundle import save_bundle
from echo.model.networks import ASClassifier
from echo.serve.pyfunc import ALLOWED_PREFIXES_ENV, URINotAllowedError, allowed_prefixes, check_allowed, log_model_bundle
from echo.data.video import encode_mp4


def test_default_policy_allows_only_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ALLOWED_PREFIXES_ENV, raising=False)
    prefixes = allowed_prefixes()
    (tmp_path / "sub").mkdir()
    for ok in ("a.mp4", "sub/b.mp4", str(tmp_path / "sub" / "c.mp4")):
        check_allowed(ok, prefixes)
    (tmp_path / "etc-link").symlink_to("/etc")
    for bad in ("/etc/hostname", "../a.mp4", "sub/../../a.mp4", "etc-link/hostname", "s3://bucket/a.mp4",
                "file:///etc/hostname", "http://127.0.0.1:1/a.mp4"):
        with pytest.raises(URINotAllowedError):
            check_allowed(bad, prefixes)


def test_configured_prefixes(tmp_path):
    prefixes = allowed_prefixes(f" {tmp_path / 'data'} , s3://bucket/allowed")
    for ok in (str(tmp_path / "data" / "a.mp4"), "s3://bucket/allowed/a.mp4", "s3://bucket/allowed/x/b.mp4"):
        check_allowed(ok, prefixes)
    for bad in ("s3://bucket/allowedness/a.mp4", "s3://bucket/allowed/../secret.mp4", "s3://other/allowed/a.mp4",
                str(tmp_path / "other.mp4"), str(tmp_path / "data" / ".." / "other.mp4")):
        with pytest.raises(URINotAllowedError):
            check_allowed(bad, prefixes)
    with pytest.raises(ValueError, match="only local folders and s3://"):
        allowed_prefixes("https://example.org/videos")


def _post(url: str, uris: list[str]) -> tuple[int, dict]:
    body = json.dumps({"dataframe_split": {"columns": ["video_uri"], "data": [[u] for u in uris]}}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with open_loopback(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_serve_matches_predict(mlflow_server, s3_bucket, tmp_path, monkeypatch):
    name = f"as-serve-{uuid.uuid4().hex[:8]}"
    torch.manual_seed(5)
    bundle = save_bundle(
        ASClassifier("tiny3d"),
        {"clip_len": 8, "num_clips": 3, "stride": 2, "frame_size": 32, "threshold": 0.5, "test_auroc": 0.7,
         "manifest_sha256": "c" * 64},
        str(tmp_path / "bundle"),
    )
    mlflow.set_tracking_uri(mlflow_server.url)
    try:
        mlflow.set_experiment("echo-ssl-serving-tests")
        with mlflow.start_run():
            registry.register(log_model_bundle(bundle), name=name)
    finally:
        mlflow.set_tracking_uri(None)
    model_uri = f"models:/{name}@champion"

    serve_dir = tmp_path / "serve"
    serve_dir.mkdir()
    rng = np.random.default_rng(0)
    local = []
    for i, (n, size) in enumerate([(20, 32), (6, 32), (16, 64)]):
        (serve_dir / f"v{i}.mp4").write_bytes(encode_mp4(rng.integers(0, 256, (n, size, size), dtype=np.uint8), fps=25))
        local.append(str(serve_dir / f"v{i}.mp4"))
    s3_ok, s3_private = f"s3://{s3_bucket}/allowed/v.mp4", f"s3://{s3_bucket}/private/v.mp4"
    for uri in (s3_ok, s3_private):
        storage.write_bytes(uri, Path(local[0]).read_bytes())
    uris = [*local, "v1.mp4", s3_ok]  # a path relative to the server's working folder, too

    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        ALLOWED_PREFIXES_ENV: f"{serve_dir},s3://{s3_bucket}/allowed/",
        # mlflow models serve runs `uvicorn` by name: the venv's bin folder must be on PATH.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            cwd=serve_dir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        cli = subprocess.run(  # echo-ssl predict from another process while the server starts
            [sys.executable, "-m", "echo.cli", "predict", "--model", model_uri, *uris, "--format", "json"],
            capture_output=True, text=True, cwd=serve_dir, env=env, timeout=300,
        )
        assert cli.returncode == 0, cli.stderr
        expected = [r["probability"] for r in json.loads(cli.stdout)["videos"]]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        monkeypatch.chdir(serve_dir)
        api = echo.load_model(model_uri).predict_videos(uris)
        np.testing.assert_allclose(api["probability"], expected, atol=1e-6)

        url = f"http://127.0.0.1:{port}"
        wait_for_port(port, timeout=180, proc=serve)
        wait_for_http(f"{url}/ping", serve, log)
        status, answer = _post(url, uris)
        assert status == 200, answer
        served = answer["predictions"]
        assert [r["video_uri"] for r in served] == uris
        np.testing.assert_allclose([r["probability"] for r in served], expected, atol=1e-5)
        assert [r["prediction"] for r in served] == api["prediction"].tolist()
        assert [r["call"] for r in served] == api["call"].tolist()

        for bad, why in (("/etc/hostname", "outside the allowed local folders"), (s3_private, "not under an allowed"),
                         (str(tmp_path / "bundle" / "weights.pt"), "outside the allowed local folders")):
            status, answer = _post(url, [local[0], bad])
            assert status == 400 and why in answer["message"], answer
        body = json.dumps({"dataframe_split": {"columns": ["path"], "data": [[local[0]]]}}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            open_loopback(request, timeout=60)
        assert refused.value.code == 400
    finally:
        stop_process_group(serve)
