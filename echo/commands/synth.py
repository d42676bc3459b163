"""``echo-ssl synth``: write a synthetic PLAX echo data set (H.264 videos + ``manifest.csv``)."""

from __future__ import annotations

import argparse
import sys

from echo.ingest.synth import VIEW_JITTER, SynthConfig, synthesize

__all__ = ["add_arguments", "run"]

_REQUIRED = ("out", "patients", "seed")  # flags or --config keys


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers (train,val,test), got {text!r}") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three fractions (train,val,test), got {len(parts)} in {text!r}")
    return parts  # type: ignore[return-value]


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SynthConfig(out="", patients=1, seed=0)
    p.add_argument("--out", help="output folder or s3://bucket/prefix for videos/ and manifest.csv (required)")
    p.add_argument("--patients", type=int, help="labelled patients, split into train/val/test (required)")
    p.add_argument("--seed", type=int, help="seed of every random choice; same seed, same bytes (required)")
    p.add_argument("--prevalence", type=float, default=d.prevalence,
                   help=f"share of severe-AS patients (default: {d.prevalence})")
    p.add_argument("--splits", type=_fractions, default=d.splits,
                   help="train,val,test fractions of the labelled patients (default: %s)"
                   % ",".join(f"{x:g}" for x in d.splits))
    p.add_argument("--unlabeled-patients", type=int, default=d.unlabeled_patients,
                   help=f"extra patients in split 'unlabeled' with no label (default: {d.unlabeled_patients})")
    p.add_argument("--size", type=int, default=d.size, help=f"frame height and width in pixels, even (default: {d.size})")
    p.add_argument("--fps", type=float, default=d.fps, help=f"frames per second (default: {d.fps:g})")
    p.add_argument("--min-frames", type=int, default=d.min_frames, help=f"shortest video (default: {d.min_frames})")
    p.add_argument("--max-frames", type=int, default=d.max_frames, help=f"longest video (default: {d.max_frames})")
    p.add_argument("--difficulty", type=float, default=d.difficulty,
                   help=f"how subtle the valve signal is: > 1 harder, < 1 easier (default: {d.difficulty:g})")
    p.add_argument("--view-jitter", choices=VIEW_JITTER, default=d.view_jitter,
                   help="how much the videos of one study differ in acquisition settings: 'independent' draws "
                   "every video's afresh, 'moderate' and 'small' jitter the study's settings per video "
                   f"(docs/synth-frames.md; default: {d.view_jitter})")
    p.add_argument("--workers", type=int, default=d.workers, help=f"rendering processes (default: {d.workers})")


def run(args: argparse.Namespace) -> int:
    missing = [f"--{name}" for name in _REQUIRED if getattr(args, name) is None]
    if missing:
        print(f"error: synth needs {', '.join(missing)} (as flags or --config keys)", file=sys.stderr)
        return 2
    try:
        uri = synthesize(
            args.out, args.patients, args.seed, prevalence=args.prevalence, splits=args.splits,
            unlabeled_patients=args.unlabeled_patients, size=args.size, fps=args.fps, min_frames=args.min_frames,
            max_frames=args.max_frames, difficulty=args.difficulty, view_jitter=args.view_jitter,
            workers=args.workers,
        )
    except (ValueError, OSError) as e:  # bad settings, or storage that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(uri)
    return 0
