"""``echo-ssl tune`` (and ``python tune_search.py``): the hyperparameter search per label fraction.

Its flags: every fine-tuning setting the trials share (``--manifest``, ``--epochs``,
``--optimizer``, ...) and the search's own (``--fractions``, ``--num-samples``, ...).
"""

from __future__ import annotations

import argparse

from echo.commands._options import add_config_arguments, config_from_args
from echo.train.tune import TuneConfig, run_search


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, TuneConfig)
    p.add_argument("--resume", action="store_true", help="continue the search named by --name")
    p.add_argument("--ray-address", default=None, help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")


def run(args: argparse.Namespace) -> int:
    run_search(config_from_args(TuneConfig, args), resume=args.resume, ray_address=args.ray_address)
    return 0
