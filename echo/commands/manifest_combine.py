"""``echo-ssl manifest combine A B ... --out C``: one manifest of several (a pretraining corpus)."""

from __future__ import annotations

import argparse
import sys

from echo.data import storage
from echo.data.manifest import ManifestError, combine_manifests, format_summary, load_manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("uris", nargs="+", metavar="MANIFEST", help="manifests to combine (CSV or Parquet, local or s3://)")
    p.add_argument("--out", required=True, help="where to write the combined manifest CSV (local or s3://)")


def run(args: argparse.Namespace) -> int:
    try:
        table = combine_manifests(args.uris, args.out)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    storage.write_bytes(args.out, table.to_csv(index=False).encode())
    print(format_summary(load_manifest(args.out)))
    return 0
