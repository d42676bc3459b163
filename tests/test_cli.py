"""The ``echo-ssl`` command: help for every command, and ``--config FILE.yaml`` under flags
(local and s3://, unknown keys, YAML lists as comma lists)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from echo.data import storage
from echo.cli import COMMANDS, build_parser, main
from echo.commands._options import config_from_args
from echo.config import ConfigError, apply_config, load_config
from echo.data.video import encode_mp4, probe
from echo.demo import DemoConfig
from echo.train.finetune import FinetuneConfig
from echo.train.launch import RayOptions
from echo.train.pretrain import PretrainConfig
from echo.train.tune import TuneConfig, trial_base

GROUPS = sorted({words[0] for words, _, _ in COMMANDS if len(words) > 1})


def test_console_script_help_lists_every_command() -> None:
    script = Path(sys.executable).with_name("echo-ssl")
    assert script.exists(), f"console script not installed next to {sys.executable}"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    listed = done.stdout
    for words, _, help_text in COMMANDS:
        assert f"    {words[0]} " in listed or f"    {words[0]}\n" in listed, words
        if len(words) == 1:
            assert " ".join(help_text.split()[:4]) in " ".join(listed.split()), words


@pytest.mark.parametrize("argv", [["--help"], ["synth", "--help"], ["models", "pull", "--help"], ["predict", "--help"]])
def test_help_and_light_commands_do_not_import_torch_or_ray(argv: list[str]) -> None:
    code = (
        "import sys\nfrom echo.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "usage: echo-ssl" in done.stdout


def _help(argv: list[str]) -> str:
    parser, _ = build_parser()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        parser.parse_args(argv)
    assert info.value.code == 0, argv
    return out.getvalue()


@pytest.mark.parametrize("group", GROUPS)
def test_group_help_lists_its_commands(group: str) -> None:
    text = _help([group, "--help"])
    for words, _, _ in COMMANDS:
        if words[0] == group:
            assert f"    {words[1]} " in text or f"    {words[1]}\n" in text, words


@pytest.mark.parametrize("words", [w for w, _, _ in COMMANDS], ids=[" ".join(w) for w, _, _ in COMMANDS])
def test_every_command_has_help(words: tuple[str, ...]) -> None:
    text = _help([*words, "--help"])
    assert text.startswith(f"usage: echo-ssl {' '.join(words)}")
    assert "--config FILE.yaml" in text


def _synth_config(out: str) -> str:
    return (f"out: {out}\npatients: 4\nseed: 3\nsize: 32\nmin-frames: 10\nmax_frames: 10\n"
            "unlabeled_patients: 0\nsplits: [0.5, 0.25, 0.25]\nprevalence: 0.5\nworkers: 1\n")


def test_config_from_s3_sets_values_and_flags_override(s3_bucket: str, tmp_path: Path, capsys) -> None:
    cfg = f"s3://{s3_bucket}/configs/synth.yaml"
    storage.write_bytes(cfg, _synth_config(str(tmp_path / "ds")).encode())
    assert main(["synth", "--config", cfg, "--patients", "2", "--max-frames", "12", "--min-frames", "12"]) == 0
    manifest = capsys.readouterr().out.strip()
    assert manifest == str(tmp_path / "ds" / "manifest.csv")
    t = pd.read_csv(manifest)
    assert t["patient_id"].nunique() == 2  # the flag won over the file's 4
    assert (t["n_frames"] == 12).all()  # flags again
    assert set(t["split"]) <= {"train", "val", "test"}  # unlabeled_patients: 0 from the file
    info = probe(storage.read_bytes(str(tmp_path / "ds" / t["video_uri"][0])), "first video")
    assert (info.height, info.width) == (32, 32)  # size: 32 from the file


def test_config_sets_a_switch(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "ds"
    storage.write_bytes(str(folder / "v1.mp4"), encode_mp4(np.zeros((8, 16, 16), np.uint8), fps=30))
    (folder / "manifest.csv").write_text(
        "video_uri,patient_id,study_id,split,label\nv1.mp4,p1,s1,train,1\nv2.mp4,p2,s2,train,0\n")
    cfg = tmp_path / "check.yaml"
    cfg.write_text("check-objects: true\n")
    assert main(["manifest", "check", str(folder / "manifest.csv")]) == 0
    assert "warning" not in capsys.readouterr().out
    assert main(["manifest", "check", "--config", str(cfg), str(folder / "manifest.csv")]) == 0
    assert "warning: row 2, column 'video_uri': video not found" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text,words",
    [
        ("patients: 2\nbatch_size: 8\n", ["unknown key(s) batch_size", "valid keys:"]),
        ("patients: many\n", ["key 'patients'", "many"]),
        ("patients: 2.5\n", ["key 'patients'", "2.5"]),  # refused as --patients 2.5 would be
        ("splits: [0.5, 0.5]\n", ["key 'splits'", "three fractions"]),
        ("- just\n- a list\n", ["must hold a mapping"]),
        ("patients: [1, 2\n", ["not valid YAML"]),
    ],
    ids=["unknown key", "bad value", "float for int", "bad list", "not a mapping", "bad yaml"],
)
def test_bad_config_exits_2_naming_the_key_and_file(tmp_path: Path, capsys, text: str, words: list[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as info:
        main(["synth", "--config", str(cfg), "--out", str(tmp_path / "ds"), "--seed", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert str(cfg) in err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "ds").exists()


def test_missing_config_file_exits_2(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["manifest", "check", "--config", str(tmp_path / "none.yaml"), "m.csv"])
    assert info.value.code == 2
    assert f"config file not found: {tmp_path / 'none.yaml'}" in capsys.readouterr().err


def _parse_with_config(words: tuple[str, ...], cfg: str, flags: list[str]):
    """What ``main`` does before running a command: the leaf's defaults from the file, then flags."""
    parser, leaves = build_parser()
    apply_config(leaves[words], load_config(cfg), cfg)
    return parser.parse_args([*words, *flags])


def test_yaml_lists_become_comma_lists(tmp_path: Path) -> None:
    cfg = tmp_path / "tune.yaml"
    cfg.write_text("fractions: [0.01, 0.1, 1.0]\ninits: [random, simclr]\nsubset-seeds: 0,1\n")
    args = _parse_with_config(("tune",), str(cfg), ["--manifest", "m.csv"])
    assert args.fractions == ["0.01", "0.1", "1.0"]
    assert args.inits == ["random", "simclr"]
    assert args.subset_seeds == ["0", "1"]
    args = _parse_with_config(("tune",), str(cfg), ["--manifest", "m.csv", "--fractions", "0.5,0.25"])
    assert args.fractions == ["0.5", "0.25"] and args.inits == ["random", "simclr"]


def test_apply_config_rejects_unknown_keys_by_name() -> None:
    _, leaves = build_parser()
    with pytest.raises(ConfigError, match=r"cfg\.yaml: unknown key\(s\) colour, help"):
        apply_config(leaves[("synth",)], {"seed": 1, "colour": "red", "help": True}, "cfg.yaml")


def test_apply_config_checks_choices_and_switches() -> None:
    _, leaves = build_parser()
    predict, check = leaves[("predict",)], leaves[("manifest", "check")]
    with pytest.raises(ConfigError, match=r"cfg\.yaml: key 'format': 'xml' is not one of csv, json"):
        apply_config(predict, {"format": "xml"}, "cfg.yaml")
    with pytest.raises(ConfigError, match=r"key 'check_objects': expected true or false"):
        apply_config(check, {"check_objects": "sometimes"}, "cfg.yaml")
    apply_config(predict, {"format": "json", "videos": ["a.mp4", "b.mp4"]}, "cfg.yaml")
    assert predict.get_default("format") == "json" and predict.get_default("videos") == ["a.mp4", "b.mp4"]


def _config_fields(cls: type) -> list[tuple[str, dataclasses.Field]]:
    """``(class name, field)`` of a config dataclass, nested (flattened) configs included."""
    out = []
    for f in dataclasses.fields(cls):
        out.append((cls.__name__, f))
        if "flatten" in f.metadata:
            out += _config_fields(typing.get_type_hints(cls)[f.name])
    return out


@pytest.mark.parametrize("cls", [PretrainConfig, FinetuneConfig, TuneConfig, DemoConfig, RayOptions],
                         ids=lambda c: c.__name__)
def test_every_config_field_has_help_and_is_a_flag_or_yaml_key(cls: type) -> None:
    missing = [f"{owner}.{f.name}" for owner, f in _config_fields(cls) if not f.metadata.get("help")]
    assert missing == []
    words = {PretrainConfig: ("pretrain",), FinetuneConfig: ("finetune",), TuneConfig: ("tune",),
             DemoConfig: ("demo",), RayOptions: ("finetune",)}[cls]
    text = " ".join(_help([*words, "--help"]).split())
    omitted = set(TuneConfig.__dataclass_fields__["base"].metadata["flatten"].omit) if cls is TuneConfig else set()
    for _, f in _config_fields(cls):
        if "flatten" in f.metadata or f.name in omitted:
            continue
        flag = "--" + f.name.replace("_", "-")
        assert f"{flag} " in text or f"{flag}," in text, flag
        assert " ".join(f.metadata["help"].split()[:4]) in text, flag


def test_help_of_epochs_warmup_and_weight_decay() -> None:
    text = " ".join(_help(["finetune", "--help"]).split())
    assert "--epochs EPOCHS training epochs (default: 30)" in text
    assert "--warmup-epochs WARMUP_EPOCHS epochs of linear learning-rate warm-up (default: 0)" in text
    assert "--weight-decay WEIGHT_DECAY weight decay (default: 0.0)" in text


def test_every_fine_tuning_option_reaches_a_tune_search(tmp_path: Path) -> None:
    """The search's trials get every fine-tuning setting from flags and YAML keys (trials are
    built from ``TuneConfig.base``; that its values reach the trials' MLflow params is checked in
    test_tune), with the search's own defaults where they differ from a fine-tuning run's."""
    cfg = tmp_path / "tune.yaml"
    cfg.write_text("manifest: m.csv\noptimizer: sgd\nstride: 2\ncache_mb: 8\namp: false\nfractions: [0.5]\n")
    search = config_from_args(TuneConfig, _parse_with_config(("tune",), str(cfg), ["--schedule", "cosine"]))
    base = search.base
    assert (base.optimizer, base.stride, base.cache_mb, base.amp, base.schedule) == ("sgd", 2, 8, False, "cosine")
    assert (base.manifest, search.fractions) == ("m.csv", ["0.5"])
    assert (base.experiment, base.loader_workers) == ("echo-ssl-tune", 0)  # the search's defaults
    assert base == trial_base(manifest="m.csv", optimizer="sgd", stride=2, cache_mb=8, amp=False, schedule="cosine")


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: Path(p).name)
def test_shipped_configs_build_their_jobs_config(path: str) -> None:
    """Every key of the example configs is still an option of its command, and builds the job's config."""
    words = (Path(path).stem.removeprefix("local-"),)
    args = _parse_with_config(words, path, ["--manifest", "m.csv"] if words != ("evaluate",) else [])
    cls = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "tune": TuneConfig}.get(words[0])
    if cls is not None:
        built = config_from_args(cls, args)
        assert not hasattr(built, "mlflow_run_id")  # run state is not part of a config
