"""The ``echo-ssl`` command: one sub-command per job, each in ``echo.commands``.

Every leaf command takes ``--config FILE.yaml`` plus flags; a flag overrides the file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from echo import __version__
from echo.config import ConfigError, apply_config, load_config

__all__ = ["main", "build_parser", "COMMANDS"]

# (command words, module in echo.commands, one-line help)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("demo",), "demo", "the whole system on synthetic data: pretrain, Tune, registry, predict, saliency"),
    (("synth",), "synth", "write a synthetic PLAX echo data set (videos + manifest)"),
    (("manifest", "check"), "manifest_check", "validate a manifest and print a summary"),
    (("manifest", "combine"), "manifest_combine", "combine manifests into one (e.g. a public data set and your own for pretraining)"),
    (("models", "register"), "models_register", "register a fine-tuning run's model (champion moves only on a better test AUROC)"),
    (("models", "pull"), "models_pull", "download a registered model's weights and config, verify the SHA-256"),
    (("models", "promote"), "models_promote", "point an alias (default champion) at a version; the move is recorded"),
    (("models", "history"), "models_history", "list the recorded alias moves of a registered model"),
    (("predict",), "predict", "probabilities of severe AS per video and per study, CSV or JSON"),
    (("ingest",), "ingest", "DICOM cines or video files (AVI, MP4, MOV, MKV) -> de-identified, sector-masked MP4 clips and a manifest"),
    (("pretrain",), "pretrain", "self-supervised pretraining (SimCLR, MI-SimCLR, EchoCLR) on Ray Train"),
    (("finetune",), "finetune", "fine-tune a severe-AS classifier on Ray Train"),
    (("evaluate",), "evaluate", "evaluate a model on a split: AUROC with 95% CIs, plots, predictions"),
    (("saliency",), "saliency", "saliency GIFs and PNG strips for videos, and the region-energy measure"),
    (("tune",), "tune", "hyperparameter search per label fraction and init with Ray Tune"),
]


def _leaf_words(argv: Sequence[str]) -> tuple[str, ...] | None:
    """The words of the leaf command ``argv`` starts with, or None."""
    return max((words for words, _, _ in COMMANDS if tuple(argv[: len(words)]) == words), key=len, default=None)


def build_parser(
    only: tuple[str, ...] | None = None,
) -> tuple[argparse.ArgumentParser, dict[tuple[str, ...], argparse.ArgumentParser]]:
    """The top-level parser and each leaf command's parser, keyed by its words.

    With ``only``, just that leaf gets its options (its module is imported; the others are
    listed with their help), so ``echo-ssl --help`` or ``echo-ssl synth`` does not import
    torch and Ray for commands it will not run; ``only=()`` builds no leaf's options.
    """
    parser = argparse.ArgumentParser(
        prog="echo-ssl",
        description="Self-supervised echocardiogram learning and severe aortic stenosis detection.",
    )
    parser.add_argument("--version", action="version", version=f"echo-ssl {__version__}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {(): top}
    leaves: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for words, module_name, help_text in COMMANDS:
        for depth in range(1, len(words)):
            prefix = words[:depth]
            if prefix not in groups:
                group_parser = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{prefix[-1]} commands")
                groups[prefix] = group_parser.add_subparsers(
                    dest=f"command_{depth}", metavar="COMMAND", required=True
                )
        leaf = groups[words[:-1]].add_parser(words[-1], help=help_text.replace("%", "%%"), description=help_text)
        if only is not None and words != only:
            continue
        leaf.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (local or s3://); flags override it")
        module = importlib.import_module(f"echo.commands.{module_name}")
        module.add_arguments(leaf)
        leaf.set_defaults(_run=module.run)
        leaves[words] = leaf
    return parser, leaves


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    argv = list(sys.argv[1:] if argv is None else argv)
    words = _leaf_words(argv)
    parser, leaves = build_parser(only=words or ())
    config = _config_path(argv)
    if config and words:
        # The file is applied before parsing, so it can also supply options that are required.
        try:
            apply_config(leaves[words], load_config(config), config)
        except ConfigError as e:
            parser.exit(2, f"echo-ssl: error: {e}\n")
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
