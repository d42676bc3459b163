"""``echo-ssl saliency``: where a model looks, as GIFs and PNG strips, and how much on the valve."""

from __future__ import annotations

import argparse
import sys

from echo.data.manifest import load_manifest
from echo.explain.attribution import explain_videos, region_boxes, sample_studies
from echo.explain.saliency import METHODS
from echo.serve.bundle import ALLOW_UNVERIFIED_HELP
from echo.serve.predict import load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a pulled folder")
    p.add_argument("videos", nargs="*", help="videos (local paths or s3:// URIs)")
    p.add_argument("--manifest", help="take videos from this manifest instead (one per study)")
    p.add_argument("--split", default="test", help="manifest split (default: test)")
    p.add_argument("--limit", type=int, default=20, help="studies sampled from the manifest (default: 20)")
    p.add_argument("--region-columns", default=None, metavar="PREFIX",
                   help="measure saliency energy inside the boxes PREFIX_x0..PREFIX_y1 of the manifest (e.g. valve)")
    p.add_argument("--method", default="gradcam", choices=METHODS, help="saliency method (default: gradcam)")
    p.add_argument("--out", default="./saliency-out", help="output folder (local or s3://)")
    p.add_argument("--seed", type=int, default=0, help="seed of the study sample")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ and runs:/ URIs")
    p.add_argument("--allow-unverified", action="store_true", help=ALLOW_UNVERIFIED_HELP)


def run(args: argparse.Namespace) -> int:
    if bool(args.videos) == bool(args.manifest):
        print("error: give either videos or --manifest", file=sys.stderr)
        return 2
    model = load_model(args.model, tracking_uri=args.tracking_uri, allow_unverified=args.allow_unverified)
    boxes = None
    if args.manifest:
        rows = sample_studies(load_manifest(args.manifest).split(args.split), args.limit, args.seed)
        uris = rows["video_uri"].tolist()
        if args.region_columns:
            boxes = region_boxes(rows, args.region_columns)
    else:
        uris = args.videos
        if args.region_columns:
            print("error: --region-columns needs --manifest", file=sys.stderr)
            return 2
    table = explain_videos(model, uris, args.out, args.method, boxes)
    for rec in table.itertuples(index=False):
        print(f"{rec.video_uri}: p={rec.probability:.3f}  {rec.gif}  {rec.strip}")
    if boxes is not None:
        print(f"saliency energy inside {args.region_columns} boxes: {table['region_share'].mean():.3f} "
              f"(uniform-map baseline {table['area_share'].mean():.3f}), n={len(table)} videos")
    return 0
