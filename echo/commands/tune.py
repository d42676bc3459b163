"""``echo-ssl tune`` (and ``python tune_search.py``): the hyperparameter search per label fraction."""

from __future__ import annotations

import argparse

from echo.commands._options import add_config_arguments, config_from_args
from echo.commands.finetune import HELP as FINETUNE_HELP
from echo.train.tune import TuneConfig, run_search

HELP = {
    **FINETUNE_HELP,
    "fractions": "label fractions to search",
    "inits": "initialisations: random, kinetics, a weights file, runs:/<pretraining run id>",
    "subset_seeds": "seeds of the label subsets (several show the spread that subset choice causes)",
    "num_samples": "trials per (fraction, init, subset seed)",
    "max_concurrent": "trials running at once",
    "cpus_per_trial": "CPUs per trial (fractions allowed)",
    "gpus_per_trial": "GPUs per trial (fractions allowed)",
    "search_alg": "search algorithm: random",
    "scheduler": "asha (early stopping on validation AUROC) or fifo",
    "grace_period": "epochs before ASHA may stop a trial",
    "space": "search space overrides, JSON/YAML: {lr: {loguniform: [1e-5, 1e-3]}, dropout: {choice: [0, 0.25]}}",
    "out": "folder for the table (CSV, Markdown) and the label-efficiency plot",
    "storage": "Tune experiment storage: a local folder or s3://bucket/prefix",
    "name": "search name (storage folder and MLflow parent run); give it with --resume",
    "register": "register the best model per label fraction in the MLflow registry",
    "model_name": "registered model name",
    "experiment": "MLflow experiment",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, TuneConfig, HELP)
    p.add_argument("--resume", action="store_true", help="continue the search named by --name")
    p.add_argument("--ray-address", default=None, help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")


def run(args: argparse.Namespace) -> int:
    run_search(config_from_args(TuneConfig, args), resume=args.resume, ray_address=args.ray_address)
    return 0
