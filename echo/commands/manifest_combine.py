"""``echo-ssl manifest combine A B ... --out C``: one manifest of several (a pretraining corpus)."""

from __future__ import annotations

import argparse
import sys

from echo.commands._options import add_data_arguments
from echo.data import storage
from echo.data.manifest import ManifestError, combine_manifests, format_summary, load_manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("uris", nargs="+", metavar="MANIFEST", help="manifests to combine (CSV or Parquet, local or s3://)")
    p.add_argument("--out", required=True, help="where to write the combined manifest CSV (local or s3://); put it "
                   "above the manifests' folders and every video_uri stays relative and inside its default data root")
    add_data_arguments(p, size_cap=False)


def run(args: argparse.Namespace) -> int:
    try:
        table = combine_manifests(args.uris, args.out, args.data_root)
        storage.write_bytes(args.out, table.to_csv(index=False).encode())
        # Read back as a job will: videos outside the combined manifest's folder need --data-root.
        print(format_summary(load_manifest(args.out, data_roots=args.data_root)))
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
