"""``echo-ssl pretrain``: self-supervised pretraining on Ray Train."""

from __future__ import annotations

import argparse

from echo.commands._options import add_config_arguments, add_ray_arguments, config_from_args, ray_options_from_args
from echo.train.pretrain import PretrainConfig, run_pretrain


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, PretrainConfig)
    add_ray_arguments(p, workers=1)


def run(args: argparse.Namespace) -> int:
    run_pretrain(config_from_args(PretrainConfig, args), ray_options_from_args(args), resume=args.resume,
                 ray_address=args.ray_address)
    return 0
