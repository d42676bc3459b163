"""Flags generated from a job's config dataclass, so the CLI, YAML files and jobs share one list.

Each dataclass field ``batch_size`` becomes ``--batch-size``, its help text taken from the
field's metadata (``echo.train.settings.setting``); booleans get ``--x/--no-x``; list fields
take comma-separated values. A field declared with ``flatten`` (a nested config, e.g. the
fine-tuning settings of a Tune search) contributes its own fields as flags of the same level.
``RayOptions`` adds the cluster flags the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Iterator

from echo.train.launch import RayOptions
from echo.train.settings import Flatten, TrainConfig, help_of

__all__ = ["add_config_arguments", "config_from_args", "add_ray_arguments", "ray_options_from_args",
           "add_training_arguments", "run_training",
           "add_data_arguments"]


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args and typing.get_origin(hint) is not list else hint


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _flags(cls: type, defaults: typing.Mapping[str, Any] | None = None,
           omit: tuple[str, ...] = ()) -> Iterator[tuple[type, dataclasses.Field, Any, bool]]:
    """``(owner class, field, default, required)`` of every flag of ``cls``, nested configs flattened."""
    for f in dataclasses.fields(cls):
        if f.name in omit:
            continue
        flatten: Flatten | None = f.metadata.get("flatten")
        if flatten is not None:
            yield from _flags(_field_type(cls, f), flatten.defaults, flatten.omit)
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        if defaults and f.name in defaults:
            yield cls, f, defaults[f.name], False
        else:
            yield cls, f, _default(f), required


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = (),
                         group: argparse._ActionsContainer | None = None) -> None:
    """One flag per field of dataclass ``cls`` (defaults shown), documented by the fields' help."""
    target = group or parser
    for owner, f, default, required in _flags(cls):
        kind = _field_type(owner, f)
        text = help_of(f).replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif typing.get_origin(kind) is list:
            target.add_argument(flag, type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                                default=default, help=f"{text} (comma-separated; default: {','.join(default)})")
        else:
            target.add_argument(flag, type=kind, default=default, required=required and f.name not in positional,
                                help=text if required else f"{text} (default: {default})")


def config_from_args(cls: type, args: argparse.Namespace):
    """An instance of ``cls`` from the parsed flags (nested configs built from their own flags)."""
    values = {}
    for f in dataclasses.fields(cls):
        flatten: Flatten | None = f.metadata.get("flatten")
        if flatten is not None:
            inner = _field_type(cls, f)
            values[f.name] = inner(**{g.name: getattr(args, g.name) for g in dataclasses.fields(inner)
                                      if g.name not in flatten.omit})
        else:
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def add_data_arguments(parser: argparse.ArgumentParser, size_cap: bool = True) -> None:
    """``--data-root`` (and, with ``size_cap``, ``--max-object-mb``) for a command that loads a
    manifest outside a job config, documented as ``TrainConfig``'s fields are."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    parser.add_argument("--data-root", action="extend", default=[], metavar="DIR|s3://bucket/prefix",
                        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                        help=help_of(fields["data_root"]) + " (repeatable, or comma-separated)")
    if not size_cap:
        return
    parser.add_argument("--max-object-mb", type=int, default=fields["max_object_mb"].default,
                        help=f"{help_of(fields['max_object_mb'])} (default: {fields['max_object_mb'].default})")


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``RayOptions`` flags, plus ``--resume`` and ``--ray-address``."""
    g = parser.add_argument_group("Ray")
    add_config_arguments(parser, RayOptions, group=g)
    g.add_argument("--resume", action="store_true", help="continue the run named by --run-name from its latest checkpoint")
    g.add_argument("--ray-address", default=None, help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")


def ray_options_from_args(args: argparse.Namespace) -> RayOptions:
    return config_from_args(RayOptions, args)


def add_training_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """A Ray Train job's flags: its config dataclass ``cls`` and the Ray options."""
    add_config_arguments(parser, cls)
    add_ray_arguments(parser)


def run_training(job: Callable[..., str], cls: type, args: argparse.Namespace) -> int:
    """Run ``job(config, ray_options, resume=, ray_address=)`` (``run_pretrain``, ``run_finetune``) from the flags."""
    job(config_from_args(cls, args), ray_options_from_args(args), resume=args.resume, ray_address=args.ray_address)
    return 0
