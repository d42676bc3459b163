"""``echo-ssl evaluate``: metrics with 95% CIs, plots and predictions for a model on a split."""

from __future__ import annotations

import argparse
import sys

from echo.commands._options import add_data_arguments
from echo.data.manifest import ManifestError
from echo.evaluation.evaluate import evaluate_model
from echo.explain.saliency import METHODS
from echo.serve.bundle import ALLOW_UNVERIFIED_HELP, BundleError
from echo.serve.registry import RegistryError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a pulled folder")
    p.add_argument("--manifest", required=True, help="manifest URI (local or s3://)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to evaluate (default: test)")
    p.add_argument("--out", default="./eval-out", help="folder for predictions and plots (default: ./eval-out)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlflow.db here)")
    p.add_argument("--experiment", default="echo-ssl-evaluate", help="MLflow experiment")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the saliency sample")
    p.add_argument("--n-resamples", type=int, default=2000, help="bootstrap resamples for the 95%% CIs")
    p.add_argument("--workers", type=int, default=1, help="decoding processes")
    p.add_argument("--saliency", type=int, default=0, metavar="N", help="saliency GIFs for N sampled studies (0: none)")
    p.add_argument("--saliency-method", default="gradcam", choices=METHODS, help="saliency method")
    p.add_argument("--allow-unverified", action="store_true", help=ALLOW_UNVERIFIED_HELP)
    add_data_arguments(p)


def run(args: argparse.Namespace) -> int:
    try:
        evaluate_model(args.model, args.manifest, args.split, args.out, args.tracking_uri, args.experiment,
                       args.seed, args.n_resamples, args.workers, args.saliency, args.saliency_method,
                       args.allow_unverified, args.data_root, args.max_object_mb)
    except (RegistryError, BundleError, ManifestError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
