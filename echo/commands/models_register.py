"""``echo-ssl models register URI``: register a fine-tuning run's model as a new version."""

from __future__ import annotations

import argparse
import sys

from echo.serve.bundle import BundleError
from echo.serve.registry import CHAMPION, DEFAULT_NAME, RegistryError, register, version_info


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri", help="runs:/RUN_ID (the run's model), runs:/RUN_ID/model or models:/<model id>")
    p.add_argument("--name", default=DEFAULT_NAME, help=f"registered model name (default: {DEFAULT_NAME})")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")


def run(args: argparse.Namespace) -> int:
    try:
        version = register(args.uri, name=args.name, tracking_uri=args.tracking_uri)
    except (RegistryError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ref = version_info(args.name, version, args.tracking_uri)
    print(f"registered {args.name} version {version} from {args.uri}")
    print(f"  test AUROC {ref.tags.get('test_auroc_with_ci', 'not recorded')}, manifest sha256 {ref.tags.get('manifest_sha256')}")
    print(f"  {CHAMPION}: {ref.tags.get('champion_decision')}")
    return 0
