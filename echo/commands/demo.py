"""``echo-ssl demo`` (``make demo``): the whole system on synthetic data, local Ray, local MLflow."""

from __future__ import annotations

import argparse

from echo.commands._options import add_config_arguments, config_from_args
from echo.demo import DemoConfig, run_demo


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, DemoConfig)


def run(args: argparse.Namespace) -> int:
    return run_demo(config_from_args(DemoConfig, args))
