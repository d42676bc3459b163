"""``echo-ssl finetune``: fine-tune a severe-AS classifier on Ray Train."""

from __future__ import annotations

import argparse

from echo.commands._options import add_config_arguments, add_ray_arguments, config_from_args, ray_options_from_args
from echo.commands.pretrain import HELP as PRETRAIN_HELP
from echo.train.finetune import FinetuneConfig, run_finetune

HELP = {
    **PRETRAIN_HELP,
    "init": "random, kinetics, a state-dict file (local or s3://), or runs:/<pretraining run id>",
    "label_fraction": "fraction of training patients with labels used (nested, stratified subsets)",
    "subset_seed": "seed of the label subset",
    "batch_size": "clips per worker per step",
    "weight_decay": "weight decay",
    "dropout": "dropout before the classifier",
    "label_smoothing": "label smoothing of the BCE targets",
    "class_weights": "weight positives by the class balance",
    "freeze_epochs": "epochs of linear probing (frozen backbone) before full fine-tuning",
    "patience": "epochs without validation improvement before stopping",
    "steps_per_epoch": "batches per epoch drawn with replacement from the labelled videos (0: one pass over them)",
    "cache_decoded_mb": "decode the training videos once into memory, up to this many MiB (0: off)",
    "monitor": "validation metric for early stopping: auroc or loss",
    "val_clips": "clips per video in the per-epoch validation",
    "eval_clips": "clips per video in the final evaluation",
    "n_resamples": "bootstrap resamples for the 95% CIs",
    "evaluate_test": "evaluate the best weights on the test split at the end",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, FinetuneConfig, HELP)
    add_ray_arguments(p, workers=1)


def run(args: argparse.Namespace) -> int:
    run_finetune(config_from_args(FinetuneConfig, args), ray_options_from_args(args), resume=args.resume,
                 ray_address=args.ray_address)
    return 0
