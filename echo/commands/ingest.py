"""``echo-ssl ingest SRC --out URI``: DICOM cines -> de-identified MP4 clips and a manifest."""

from __future__ import annotations

import argparse
import os
import sys

from echo.ingest.pipeline import ID_KEY_ENV, LABEL_KEYS, IngestError, IngestOptions, ingest, parse_size, parse_splits


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", nargs="?", help="folder or s3:// prefix of DICOM files (any names, nested folders)")
    p.add_argument("--out", help="folder or s3:// prefix for the clips (videos/<hash>.mp4) and, by default, manifest.csv")
    p.add_argument("--manifest-out", help="where to write the manifest CSV (default: OUT/manifest.csv)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="worker processes (default: CPUs, at most 8)")
    p.add_argument("--size", default="112", help="clip size N or HxW in pixels, even (default 112 = 112x112)")
    p.add_argument("--labels", help="optional CSV of labels, joined by --label-key")
    p.add_argument("--label-key", choices=LABEL_KEYS, default="accession", help="CSV column naming the study (default accession)")
    p.add_argument("--label-column", default="label", help="CSV column holding 1 (severe AS), 0 or empty (default label)")
    p.add_argument("--splits", default="0.7,0.1,0.2", help="train,val,test fractions for labelled patients (default 0.7,0.1,0.2)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the patient-level split (default 0)")
    p.add_argument(
        "--id-key-file",
        help=f"file (local or s3://) holding the secret key for ID hashes; default: ${ID_KEY_ENV}",
    )


def run(args: argparse.Namespace) -> int:
    try:
        if not args.src or not args.out:
            raise IngestError("need SRC and --out (on the command line or in the config)")
        opts = IngestOptions(
            src=args.src,
            out=args.out,
            manifest_out=args.manifest_out,
            workers=args.workers,
            size=parse_size(args.size),
            labels=args.labels,
            label_key=args.label_key,
            label_column=args.label_column,
            splits=parse_splits(args.splits),
            split_seed=args.split_seed,
            id_key_file=args.id_key_file,
        )
        summary = ingest(opts)
    except IngestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0 if summary.rows else 1
