"""``echo-ssl ingest SRC --out URI``: DICOM cines and video files -> de-identified MP4 clips and a manifest."""

from __future__ import annotations

import argparse
import os
import sys

from echo.ingest.frames import DEFAULT_MAX_PIXELS
from echo.data.ids import ID_KEY_ENV
from echo.ingest.pipeline import LABEL_KEYS, IngestError, IngestOptions, ingest, parse_size, parse_splits
from echo.ingest.table import LAYOUTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", nargs="?", help="folder or s3:// prefix of DICOM files and/or videos (AVI, MP4, MOV, MKV; any names, nested folders)")
    p.add_argument("--out", help="folder or s3:// prefix for the clips (videos/<hash>.mp4) and, by default, manifest.csv")
    p.add_argument("--manifest-out", help="where to write the manifest CSV (default: OUT/manifest.csv)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="worker processes (default: CPUs, at most 8)")
    p.add_argument("--size", default="112", help="clip size N or HxW in pixels, even (default 112 = 112x112)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse a file whose header declares more frames x rows x columns (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--skip-burned-in", action="store_true",
                   help="skip DICOM files whose Burned In Annotation is YES (by default they are masked like every file)")
    p.add_argument("--labels", help="DICOM: optional CSV of labels, joined by --label-key")
    p.add_argument("--label-key", choices=LABEL_KEYS, default="accession", help="DICOM: labels CSV column naming the study (default accession)")
    p.add_argument("--label-column", help="column holding 1 (severe AS), 0 or empty: in the --labels CSV (default label) or the table (default none)")
    p.add_argument("--layout", choices=sorted(LAYOUTS), help="videos with a public data set's table: echonet-dynamic (FileList.csv + Videos/) "
                   "or echonet-lvh (MeasurementsList.csv + Batch*/)")
    p.add_argument("--table", help="videos: CSV (local or s3://) with one row per video; with --video-column and optional columns below")
    p.add_argument("--video-column", help="table column naming each video file (relative path or name, extension optional)")
    p.add_argument("--patient-column", help="table column with the patient ID (absent: each video is its own patient)")
    p.add_argument("--study-column", help="table column with the study ID (absent: each video is its own study)")
    p.add_argument("--split-column", help="table column with train/val/test (absent: seeded patient-level split of labelled videos)")
    p.add_argument("--as-unlabeled", action="store_true", help="put every clip in split unlabeled (a pretraining corpus)")
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
            max_pixels=args.max_pixels,
            skip_burned_in=args.skip_burned_in,
            layout=args.layout,
            table=args.table,
            video_column=args.video_column,
            patient_column=args.patient_column,
            study_column=args.study_column,
            split_column=args.split_column,
            as_unlabeled=args.as_unlabeled,
        )
        summary = ingest(opts)
    except IngestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0 if summary.rows else 1
