"""``echo-ssl models promote NAME VERSION [--alias champion]``: move an alias by hand (recorded)."""

from __future__ import annotations

import argparse
import sys

from echo.serve.registry import CHAMPION, RegistryError, promote


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="registered model name")
    p.add_argument("version", help="version to point the alias at")
    p.add_argument("--alias", default=CHAMPION, help=f"alias to move (default: {CHAMPION})")
    p.add_argument("--reason", default="explicit promote", help="why, recorded in the alias history")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")


def run(args: argparse.Namespace) -> int:
    try:
        previous = promote(args.name, args.version, alias=args.alias, tracking_uri=args.tracking_uri, reason=args.reason)
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.name}@{args.alias}: version {previous or '(none)'} -> version {args.version}")
    return 0
