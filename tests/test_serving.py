"""The pyfunc flavour under a real ``mlflow models serve`` (model pulled through the MLflow
server from moto S3): the same probabilities as ``echo-ssl predict``, ``echo.load_model`` and
``echo-ssl evaluate`` (videos of another size than the model's included), only URIs under the
allowed prefixes are opened, and hostile files get a per-row error while the server keeps
answering."""

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
import pandas as pd
import pytest
import torch
from PIL import Image
from conftest import free_port, open_loopback, stop_process_group, wait_for_http, wait_for_port

import echo
from echo.serve import registry
from echo.data import storage
from echo.serve.bundle import save_bundle
from echo.model.networks import ASClassifier
from echo.serve.pyfunc import ALLOWED_PREFIXES_ENV, URINotAllowedError, allowed_prefixes, check_allowed, log_model_bundle
from echo.data.video import encode_mp4
from echo.evaluation.evaluate import evaluate_model


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
    for i, (n, size) in enumerate([(20, 32), (6, 32), (16, 64), (10, 48)]):
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
        "ECHO_SSL_SERVE_DECODE_MB": "256",
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
        np.testing.assert_allclose([r["probability"] for r in served], expected, rtol=0, atol=1e-6)
        assert [r["prediction"] for r in served] == api["prediction"].tolist()
        assert [r["call"] for r in served] == api["call"].tolist()
        assert [r["error"] for r in served] == [""] * len(uris)

        # echo-ssl evaluate scores the same videos (32, 48 and 64 px for a 32 px model) to the same numbers.
        manifest = tmp_path / "manifest.csv"
        pd.DataFrame({"video_uri": local, "patient_id": ["P0", "P1", "P2", "P3"], "study_id": ["S0", "S1", "S2", "S3"],
                      "split": "test", "label": [1, 0, 1, 0]}).to_csv(manifest, index=False)
        evaluate_model(model_uri, str(manifest), "test", str(tmp_path / "eval"), mlflow_server.url, n_resamples=20,
                       workers=0)
        evaluated = pd.read_csv(tmp_path / "eval" / "test_video_predictions.csv")
        assert evaluated["video_uri"].tolist() == local
        np.testing.assert_allclose(evaluated["probability"], [r["probability"] for r in served[:4]], rtol=0, atol=1e-6)

        # Hostile files cost their row, not the server: a GIF named .mp4 (a container outside the
        # allow-list), 4096x4096 frames in 9 KB (past the decoding child's 256 MB), not a video.
        gif = [Image.fromarray(np.full((32, 32), 40 * i, np.uint8)) for i in range(4)]
        gif[0].save(serve_dir / "gif.mp4", format="GIF", save_all=True, append_images=gif[1:])
        huge = np.zeros((8, 4096, 4096), np.uint8)
        huge[:, ::64] = 200
        (serve_dir / "huge.mp4").write_bytes(encode_mp4(huge, fps=25))
        (serve_dir / "notes.mp4").write_bytes(b"patient notes, not a video\n" * 40)
        bad = [str(serve_dir / n) for n in ("gif.mp4", "huge.mp4", "notes.mp4")]
        status, answer = _post(url, [local[0], *bad, local[1]])
        assert status == 200, answer
        rows = answer["predictions"]
        assert [r["error"] for r in (rows[0], rows[4])] == ["", ""]
        np.testing.assert_allclose([rows[0]["probability"], rows[4]["probability"]], [expected[0], expected[1]],
                                   rtol=0, atol=1e-6)
        # Which allocation fails first under the child's limit varies between runs (as in
        # test_sandbox): a MemoryError, reported as the limit, or decord's filter graph failing.
        whys = (("container 'gif' is not allowed",), ("256 MB of memory allowed", "decoding frames failed"), ("",))
        for row, uri, why in zip(rows[1:4], bad, whys):
            assert row["call"] == "error" and row["prediction"] == -1 and row["probability"] is None, row
            assert row["error"].startswith(f"cannot decode {uri}: ") and any(w in row["error"] for w in why), row
        status, answer = _post(url, [local[2]])  # and it keeps answering
        assert status == 200 and answer["predictions"][0]["probability"] == pytest.approx(expected[2], abs=1e-6)

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
