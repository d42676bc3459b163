"""``echo-ssl predict --model URI VIDEO...``: probabilities of severe AS and the call, CSV or JSON.

``VIDEO`` is a local path or ``s3://`` URI of an MP4; an argument ending in ``.csv``,
``.parquet`` or ``.pq`` (or ``--manifest``) is a manifest, whose rows (optionally one
``--split``) are scored and grouped by study (hashed, never the study ID). The model is a
``models:/...`` or ``runs:/...`` URI, or a folder from ``echo-ssl models pull``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from typing import Any

import pandas as pd

from echo.commands._options import add_data_arguments
from echo.data import storage
from echo.serve.bundle import ALLOW_UNVERIFIED_HELP, BundleError
from echo.data.manifest import SPLITS, ManifestError
from echo.serve.registry import RegistryError
from echo.data.video import VideoDecodeError

_MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("videos", nargs="*", metavar="VIDEO", help="MP4 videos (local or s3://), or manifests (.csv/.parquet)")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a pulled folder")
    p.add_argument("--manifest", action="append", default=[], help="a manifest whose videos to score (repeatable)")
    p.add_argument("--split", choices=SPLITS, default=None, help="only this split of the manifests")
    p.add_argument("--format", choices=("csv", "json"), default="csv", help="output format (default: csv)")
    p.add_argument("--out", default=None, help="output file, local or s3:// (default: standard output)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--allow-unverified", action="store_true", help=ALLOW_UNVERIFIED_HELP)
    add_data_arguments(p, size_cap=False)


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for row in df.to_dict(orient="records")
    ]


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: scoring needs torch, which `echo-ssl predict --help` does without.
    from echo.serve.predict import load_model, study_table

    manifests = list(args.manifest) + [v for v in args.videos if v.lower().endswith(_MANIFEST_SUFFIXES)]
    videos = [v for v in args.videos if not v.lower().endswith(_MANIFEST_SUFFIXES)]
    if not manifests and not videos:
        print("error: give at least one VIDEO or --manifest", file=sys.stderr)
        return 2
    try:
        model = load_model(args.model, tracking_uri=args.tracking_uri, device=args.device,
                           allow_unverified=args.allow_unverified)
        parts = [model.predict_videos(videos)] if videos else []
        parts += [model.predict_manifest(m, split=args.split, data_roots=args.data_root) for m in manifests]
    except (RegistryError, BundleError, ManifestError, FileNotFoundError, VideoDecodeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    table = pd.concat(parts, ignore_index=True)
    info = model.info()
    reg = info.get("registry") or {}
    print(f"model {reg.get('name') or args.model} version {reg.get('version') or '-'}: threshold "
          f"{model.threshold:.4f}, {len(table)} video(s)", file=sys.stderr)
    if args.format == "csv":
        buf = io.StringIO()
        table.to_csv(buf, index=False)
        text = buf.getvalue()
    else:
        doc: dict[str, Any] = {"model": info, "threshold": model.threshold, "videos": _records(table)}
        if "study" in table.columns:
            doc["studies"] = _records(study_table(table.dropna(subset=["study"])))
        text = json.dumps(doc, indent=2) + "\n"
    if args.out:
        storage.write_bytes(args.out, text.encode())
    else:
        sys.stdout.write(text)
    return 0
