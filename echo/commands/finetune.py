"""``echo-ssl finetune``: fine-tune a severe-AS classifier on Ray Train."""

from __future__ import annotations

import argparse

from echo.commands._options import add_training_arguments, run_training
from echo.train.finetune import FinetuneConfig, run_finetune


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_training_arguments(p, FinetuneConfig)


def run(args: argparse.Namespace) -> int:
    return run_training(run_finetune, FinetuneConfig, args)
