"""``echo-ssl pretrain``: self-supervised pretraining on Ray Train."""

from __future__ import annotations

import argparse

from echo.commands._options import add_training_arguments, run_training
from echo.train.pretrain import PretrainConfig, run_pretrain


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_training_arguments(p, PretrainConfig)


def run(args: argparse.Namespace) -> int:
    return run_training(run_pretrain, PretrainConfig, args)
