"""The main job on the embedded default: the whole system on a laptop-sized machine.

synthetic data (local folder) -> EchoCLR pretraining on Ray Train (2 DDP workers, gloo)
-> Tune search, random vs pretrained init, at a few label fractions -> test AUROC with 95%
CIs, the label-efficiency table and plot -> the best models registered in the local MLflow
store, ``champion`` pulled back through the registry -> predictions and saliency GIFs for
three test videos. Everything runs on a local Ray on 127.0.0.1 and ``sqlite:///mlflow.db``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from echo import tracking
from echo.data import storage
from echo.data.manifest import format_summary, load_manifest
from echo.explain.attribution import explain_videos, region_boxes
from echo.ingest.synth import synthesize
from echo.serve.predict import load_model
from echo.serve.registry import DEFAULT_NAME, pull
from echo.serve.registry import format_summary as registry_summary
from echo.train.launch import RayOptions, connect
from echo.train.pretrain import PretrainConfig, run_pretrain
from echo.train.settings import setting
from echo.train.tune import TuneConfig, run_search, trial_base

__all__ = ["DemoConfig", "run_demo"]

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Sizes chosen so the demo finishes in minutes on 2 CPU cores."""

    data: str = setting("./demo-data", "folder for the synthetic data set (reused when it exists)")
    out: str = setting("./demo-out", "folder for results, runs, the pulled champion and saliency GIFs")
    patients: int = setting(120, "labelled patients to synthesize")
    unlabeled_patients: int = setting(60, "unlabeled patients to synthesize (pretraining only)")
    size: int = setting(64, "frame size in pixels")
    prevalence: float = setting(0.3, "share of patients with severe AS")
    seed: int = setting(0, "seed of every random choice")
    pretrain_epochs: int = setting(6, "EchoCLR pretraining epochs")
    pretrain_workers: int = setting(2, "Ray Train workers for pretraining")
    finetune_epochs: int = setting(5, "fine-tuning epochs per trial")
    fractions: list[str] = setting(help="label fractions to search", factory=lambda: ["0.25", "1.0"])
    trials: int = setting(3, "Tune trials per (fraction, init)")
    model_name: str = setting(DEFAULT_NAME, "registered model name")
    tracking_uri: str | None = setting(None, "MLflow tracking URI (default: sqlite:///mlflow.db here)")


def _step(n: int, text: str) -> float:
    print(f"\n== [{n}/6] {text}", flush=True)
    return time.monotonic()


def _done(start: float) -> None:
    print(f"   ({time.monotonic() - start:.0f} s)", flush=True)


def run_demo(cfg: DemoConfig) -> int:
    """Run every stage; print where the results are. Returns 0."""
    began = time.monotonic()
    uri = tracking.resolve_tracking_uri(cfg.tracking_uri)
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    t = _step(1, f"synthetic PLAX echo data in {cfg.data}")
    manifest_uri = storage.join(cfg.data, "manifest.csv")
    if storage.exists(manifest_uri):
        print(f"   reusing {manifest_uri}")
    else:
        synthesize(cfg.data, patients=cfg.patients, seed=cfg.seed, prevalence=cfg.prevalence,
                   splits=(0.6, 0.2, 0.2), unlabeled_patients=cfg.unlabeled_patients, size=cfg.size,
                   min_frames=24, max_frames=40, workers=2)
    manifest = load_manifest(manifest_uri)
    print("   " + format_summary(manifest).replace("\n", "\n   "))
    _done(t)

    connect(num_cpus=os.cpu_count() or 2)
    try:
        t = _step(2, f"EchoCLR pretraining on Ray Train ({cfg.pretrain_workers} DDP workers, gloo, tiny3d)")
        pre = PretrainConfig(manifest=manifest_uri, method="echoclr", backbone="tiny3d", epochs=cfg.pretrain_epochs,
                             batch_size=16, clip_len=4, lr=1e-3, loader_workers=1, probe_every=3, seed=cfg.seed,
                             tracking_uri=uri)
        pretrain_run = run_pretrain(pre, RayOptions(workers=cfg.pretrain_workers, cpus_per_worker=0.5,
                                                    storage=str(out / "runs")))
        _done(t)

        t = _step(3, f"Tune search at label fractions {', '.join(cfg.fractions)}: random vs pretrained init")
        base = trial_base(manifest=manifest_uri, backbone="tiny3d", epochs=cfg.finetune_epochs, batch_size=16,
                          clip_len=8, patience=3, n_resamples=1000, seed=cfg.seed, tracking_uri=uri)
        search = TuneConfig(base=base, fractions=cfg.fractions, inits=["random", f"runs:/{pretrain_run}"],
                            num_samples=cfg.trials, max_concurrent=2, cpus_per_trial=1.0, grace_period=2,
                            out=str(out / "results"), storage=str(out / "runs"), register=True,
                            model_name=cfg.model_name, space='{"lr": {"loguniform": [3e-4, 3e-3]}}')
        run_search(search)
        _done(t)
    finally:
        ray.shutdown()

    t = _step(4, f"pull models:/{cfg.model_name}@champion back through the registry")
    champion = str(out / "champion")
    _, meta = pull(f"models:/{cfg.model_name}@champion", champion, uri)
    print("   " + registry_summary(meta).replace("\n", "\n   "))
    _done(t)

    t = _step(5, "predict three test videos with the pulled champion")
    model = load_model(champion)
    test = manifest.split("test")
    picks = test.groupby("label").head(2).head(3)
    predictions = model.predict_videos(picks["video_uri"].tolist())
    predictions.insert(1, "label", picks["label"].to_numpy())
    predictions.to_csv(out / "predictions.csv", index=False)
    for row in predictions.itertuples(index=False):
        print(f"   {Path(row.video_uri).name}: p(severe AS) = {row.probability:.3f} -> {row.call} "
              f"(label {'severe' if row.label == 1 else 'not severe'})")
    _done(t)

    t = _step(6, "saliency GIFs for those videos (SmoothGrad)")
    table = explain_videos(model, picks["video_uri"].tolist(), str(out / "saliency"), "smoothgrad",
                           region_boxes(picks, "valve"))
    print(f"   saliency energy on the aortic valve: {table['region_share'].mean():.2f} "
          f"(a uniform map would put {table['area_share'].mean():.2f} there)")
    _done(t)

    print(f"\nDone in {(time.monotonic() - began) / 60:.1f} min. Look at:")
    print(f"  table:     {out / 'results' / 'label_efficiency.md'}")
    print(f"  plot:      {out / 'results' / 'label_efficiency.png'}")
    print(f"  champion:  {champion} (predictions: {out / 'predictions.csv'})")
    print(f"  saliency:  {out / 'saliency'}/*.gif")
    db = uri
    print(f"  MLflow UI: .venv/bin/mlflow ui --backend-store-uri {db} --host 127.0.0.1 --port 5000")
    return 0
