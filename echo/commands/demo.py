"""``echo-ssl demo`` (``make demo``): the whole system on synthetic data, local Ray, local MLflow."""

from __future__ import annotations

import argparse

from echo.commands._options import add_config_arguments, config_from_args
from echo.demo import DemoConfig, run_demo

HELP = {
    "data": "folder for the synthetic data set (reused when it exists)",
    "out": "folder for results, runs, the pulled champion and saliency GIFs",
    "patients": "labelled patients to synthesize",
    "unlabeled_patients": "unlabeled patients to synthesize (pretraining only)",
    "size": "frame size in pixels",
    "prevalence": "share of patients with severe AS",
    "seed": "seed of every random choice",
    "pretrain_epochs": "EchoCLR pretraining epochs",
    "pretrain_workers": "Ray Train workers for pretraining",
    "finetune_epochs": "fine-tuning epochs per trial",
    "fractions": "label fractions to search",
    "trials": "Tune trials per (fraction, init)",
    "model_name": "registered model name",
    "tracking_uri": "MLflow tracking URI (default: sqlite:///mlflow.db here)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, DemoConfig, HELP)


def run(args: argparse.Namespace) -> int:
    return run_demo(config_from_args(DemoConfig, args))
