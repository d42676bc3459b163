"""Flags generated from a job's config dataclass, so the CLI, YAML files and jobs share one list.

Each dataclass field ``batch_size`` becomes ``--batch-size``; booleans get ``--x/--no-x``;
list fields take comma-separated values. ``RayOptions`` adds the cluster flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from echo.train.launch import RayOptions

__all__ = ["add_config_arguments", "config_from_args", "add_ray_arguments", "ray_options_from_args"]

_INTERNAL = {"mlflow_run_id"}


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args and typing.get_origin(hint) is not list else hint


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, helps: dict[str, str],
                         positional: tuple[str, ...] = ()) -> None:
    """One flag per field of dataclass ``cls`` (defaults shown); ``helps`` documents them."""
    for f in dataclasses.fields(cls):
        if f.name in _INTERNAL:
            continue
        kind = _field_type(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        text = helps.get(f.name, "").replace("%", "%%")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                                default=default, help=f"{text} (comma-separated; default: {','.join(default)})")
        else:
            parser.add_argument(flag, type=kind, default=default, required=required and f.name not in positional,
                                help=f"{text} (default: {default})" if not required else text)


def config_from_args(cls: type, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in _INTERNAL}
    return cls(**values)


def add_ray_arguments(parser: argparse.ArgumentParser, workers: int = 1) -> None:
    d = RayOptions()
    g = parser.add_argument_group("Ray")
    g.add_argument("--workers", type=int, default=workers, help=f"Ray Train workers (DDP ranks) (default: {workers})")
    g.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker, help="CPUs per worker (fractions allowed)")
    g.add_argument("--gpus-per-worker", type=float, default=d.gpus_per_worker, help="GPUs per worker (0: CPU with gloo)")
    g.add_argument("--storage", default=d.storage, help="checkpoint location: a local folder or s3://bucket/prefix")
    g.add_argument("--max-failures", type=int, default=d.max_failures, help="worker-group restarts allowed")
    g.add_argument("--collective-timeout-s", type=int, default=d.collective_timeout_s,
                   help="seconds a collective may block before the group is failed and restarted")
    g.add_argument("--resume", action="store_true", help="continue the run named by --run-name from its latest checkpoint")
    g.add_argument("--ray-address", default=None, help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")


def ray_options_from_args(args: argparse.Namespace) -> RayOptions:
    return RayOptions(workers=args.workers, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                      storage=args.storage, max_failures=args.max_failures,
                      collective_timeout_s=args.collective_timeout_s)
