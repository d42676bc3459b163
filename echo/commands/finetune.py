"""``echo-ssl finetune``: fine-tune a severe-AS classifier on Ray Train."""

from __future__ import annotations

import argparse

from echo.commands._options import add_config_arguments, add_ray_arguments, config_from_args, ray_options_from_args
from echo.train.finetune import FinetuneConfig, run_finetune


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, FinetuneConfig)
    add_ray_arguments(p, workers=1)


def run(args: argparse.Namespace) -> int:
    run_finetune(config_from_args(FinetuneConfig, args), ray_options_from_args(args), resume=args.resume,
                 ray_address=args.ray_address)
    return 0
