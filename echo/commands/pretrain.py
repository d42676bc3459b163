"""``echo-ssl pretrain``: self-supervised pretraining on Ray Train."""

from __future__ import annotations

import argparse

from echo.commands._options import add_config_arguments, add_ray_arguments, config_from_args, ray_options_from_args
from echo.data.dataset import SSL_METHODS
from echo.train.pretrain import PretrainConfig, run_pretrain

HELP = {
    "manifest": "manifest URI (CSV/Parquet, local or s3://)",
    "method": f"one of {', '.join(SSL_METHODS)}",
    "backbone": "r3d_18, r2plus1d_18, mc3_18 or tiny3d",
    "backbone_init": "random, kinetics, or a state-dict file (local or s3://)",
    "splits": "manifest splits to pretrain on",
    "batch_size": "clips pairs per worker per step",
    "clip_len": "frames per clip",
    "stride": "frame sampling stride",
    "lr": "peak learning rate",
    "optimizer": "adam, adamw or sgd",
    "schedule": "constant or cosine (after warm-up)",
    "grad_clip": "max gradient norm (0: off)",
    "temperature": "NT-Xent temperature",
    "order_weight": "weight of the frame-order loss (echoclr)",
    "seed": "seed of every random choice (recorded with the run)",
    "loader_workers": "decoding processes per worker",
    "sample_timeout_s": "seconds before a hung decode is abandoned and its video skipped",
    "max_skipped_fraction": "stop when more than this fraction of an epoch's videos cannot be decoded",
    "cache_mb": "in-memory cache of compressed videos per decoding process (MiB)",
    "cache_decoded_mb": "decode the videos once into memory, up to this many MiB per training worker (each loader "
                        "process gets a copy: use --loader-workers 0 with it); videos past the budget are streamed "
                        "(0: off)",
    "checkpoint_every": "epochs between checkpoints",
    "probe_every": "epochs between linear-probe AUROCs on val (0: never)",
    "amp": "bf16 autocast and channels_last_3d on CUDA",
    "tracking_uri": "MLflow tracking URI (default: sqlite:///mlflow.db in the working folder)",
    "experiment": "MLflow experiment",
    "run_name": "run name (also the Ray run folder); give it with --resume",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, PretrainConfig, HELP)
    add_ray_arguments(p, workers=1)


def run(args: argparse.Namespace) -> int:
    run_pretrain(config_from_args(PretrainConfig, args), ray_options_from_args(args), resume=args.resume,
                 ray_address=args.ray_address)
    return 0
