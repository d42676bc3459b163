"""``echo-ssl models pull URI --out DIR``: download a model's bundle, verify it, say what it is."""

from __future__ import annotations

import argparse
import sys

from echo.serve.bundle import ALLOW_UNVERIFIED_HELP, BundleError
from echo.serve.registry import RegistryError, format_summary, pull


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model")
    p.add_argument("--out", required=True, help="local folder for model.json, weights.pt, digests.json and registry.json")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--allow-unverified", action="store_true", help=ALLOW_UNVERIFIED_HELP)


def run(args: argparse.Namespace) -> int:
    try:
        out, meta = pull(args.uri, args.out, tracking_uri=args.tracking_uri, allow_unverified=args.allow_unverified)
    except (RegistryError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"pulled {args.uri} -> {out}")
    print(format_summary(meta))
    return 0
