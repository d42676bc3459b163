"""``echo-ssl models history NAME``: every recorded alias move (what was champion when)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import pandas as pd

from echo.serve.registry import RegistryError, history


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="registered model name")
    p.add_argument("--alias", default=None, help="only this alias's moves")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")


def run(args: argparse.Namespace) -> int:
    try:
        moves = history(args.name, alias=args.alias, tracking_uri=args.tracking_uri)
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rows = [dataclasses.asdict(m) for m in moves]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif rows:
        print(pd.DataFrame(rows).drop(columns=["run_id"]).to_string(index=False))
    else:
        print(f"no alias moves recorded for {args.name}")
    return 0
