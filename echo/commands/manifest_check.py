"""``echo-ssl manifest check URI``: validate a manifest and print a summary."""

from __future__ import annotations

import argparse
import sys

from echo.commands._options import add_data_arguments
from echo.data.manifest import ManifestError, format_summary, load_manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri", help="manifest (CSV or Parquet), local path or s3://bucket/key")
    p.add_argument(
        "--check-objects",
        action="store_true",
        help="also open every video in storage: warn about missing, unreadable or oversized ones, long GOPs, "
        "edit lists",
    )
    add_data_arguments(p)


def run(args: argparse.Namespace) -> int:
    try:
        manifest = load_manifest(args.uri, check_objects=args.check_objects, data_roots=args.data_root,
                                 max_object_mb=args.max_object_mb)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(manifest))
    return 0
