"""Command configuration: ``--config FILE.yaml`` (local or ``s3://``) under command-line flags.

Precedence, lowest first: the command's defaults, the YAML file, the flags given. Keys may
be written with dashes or underscores (``batch-size`` or ``batch_size``); an unknown key is
an error naming the key and the file.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from echo import storage

__all__ = ["ConfigError", "load_config", "apply_config"]


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and key."""


def load_config(uri: str) -> dict[str, Any]:
    """The mapping in the YAML file at ``uri``, keys normalised to underscores."""
    try:
        data = yaml.safe_load(storage.read_bytes(uri)) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {uri}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {uri} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {uri} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def apply_config(parser: argparse.ArgumentParser, values: dict[str, Any], uri: str) -> None:
    """Make ``values`` the parser's defaults, so flags given on the command line still win."""
    known = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"config file {uri}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}"
        )
    converted = {}
    for key, value in values.items():
        action = known[key]
        if isinstance(value, list) and action.nargs not in ("*", "+"):
            value = ",".join(str(v) for v in value)
        if action.type is not None and isinstance(value, str):
            try:
                value = action.type(value)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"config file {uri}: key {key!r}: {e}") from None
        converted[key] = value
    parser.set_defaults(**converted)
