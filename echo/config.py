"""Command configuration: ``--config FILE.yaml`` (local or ``s3://``) under command-line flags.

Precedence, lowest first: the command's defaults, the YAML file, the flags given. Keys may
be written with dashes or underscores (``batch-size`` or ``batch_size``); an unknown key is
an error naming the key and the file.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from echo.data import storage

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
        converted[key] = _convert(known[key], key, value, uri)
        if value is not None:
            known[key].required = False  # supplied by the file
    parser.set_defaults(**converted)


_SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)


def _convert(action: argparse.Action, key: str, value: Any, uri: str) -> Any:
    """``value`` from YAML checked and converted as argparse would a flag's text: the option's type
    (applied to the text of numbers too, so ``2.5`` for an integer option is refused), its choices,
    and a YAML boolean for a switch. ``None`` is kept (the option's "not given")."""
    if value is None:
        return None
    if isinstance(action, _SWITCHES):
        if not isinstance(value, bool):
            raise ConfigError(f"config file {uri}: key {key!r}: expected true or false, got {value!r}")
        return value
    many = action.nargs in ("*", "+")
    if isinstance(value, list) and not many:
        value = ",".join(str(v) for v in value)
    items = value if isinstance(value, list) else [value]
    if action.type is not None:
        try:
            items = [action.type(v if isinstance(v, str) else str(v)) for v in items]
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"config file {uri}: key {key!r}: {e}") from None
    if action.choices is not None:
        for v in items:
            if v not in action.choices:
                raise ConfigError(
                    f"config file {uri}: key {key!r}: {v!r} is not one of {', '.join(map(str, action.choices))}"
                )
    return items if isinstance(value, list) else items[0]
