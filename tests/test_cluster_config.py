"""``cluster.yaml`` and ``configs/*.yaml``: valid for the tools that read them, and free of secrets.

- ``cluster.yaml`` validates against the cluster-config JSON schema shipped inside the installed
  ``ray`` package (draft-07), and passes Ray's own offline preparation and checks (the ones
  ``ray up`` runs before touching AWS);
- it holds no AWS keys, session tokens or other secrets (S3 access is by instance profile);
- its node types, pinned install, and the environment its start commands give Ray;
- every example config is accepted by the command that reads it.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import REPO

CLUSTER = REPO / "cluster.yaml"
CONFIGS = REPO / "configs"

# Patterns of AWS credentials and other secrets that must never be in the file.
SECRET_PATTERNS = [
    r"(?i)aws_access_key_id",
    r"(?i)aws_secret_access_key",
    r"(?i)aws_session_token",
    r"(?i)secret_?access_?key",
    r"(?i)session_?token",
    r"(?i)ray_auth_token\s*[=:]",
    r"(?i)password\s*[=:]",
    r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",  # access key IDs
    r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])",  # secret-access-key shaped strings
]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_matches_rays_schema(cluster):
    schema = _ray_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(cluster), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_check_rejects_a_broken_copy(cluster):
    """The validation above can fail: node-type resources must be integers, keys must be known."""
    validator = jsonschema.Draft7Validator(_ray_schema())
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu"]["resources"]["GPU"] = 0.5
    assert any("resources" in e.path for e in validator.iter_errors(broken))
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu"]["instance_type"] = "g5.2xlarge"
    assert list(validator.iter_errors(broken))


def test_cluster_yaml_passes_rays_offline_checks(cluster):
    """What ``ray up`` does before any cloud call: defaults merged, node types filled, validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["available_node_types"]["head"]["max_workers"] == 0
    # setup_commands run on every node, before each node type's own commands.
    assert prepared["head_setup_commands"][: len(cluster["setup_commands"])] == cluster["setup_commands"]
    assert prepared["worker_setup_commands"][: len(cluster["setup_commands"])] == cluster["setup_commands"]


def test_cluster_yaml_holds_no_credentials():
    text = CLUSTER.read_text()
    found = [p for p in SECRET_PATTERNS if re.search(p, text)]
    assert not found, f"cluster.yaml matches secret pattern(s) {found}"


def test_secret_patterns_catch_keys():
    """The scan above is not vacuous: AWS-style keys in a config are caught."""
    leaked = "env:\n  AWS_ACCESS_KEY_ID: AKIAIOSFODNN7EXAMPLE\n  key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
    assert sum(bool(re.search(p, leaked)) for p in SECRET_PATTERNS) >= 3


def test_node_types(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # nothing is scheduled on the head
    gpu = [t for name, t in types.items() if t["resources"].get("GPU")]
    assert len(gpu) == 1 and gpu[0]["resources"]["GPU"] == 1
    assert gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1
    cpu_only = [t for name, t in types.items() if name != cluster["head_node_type"] and not t["resources"].get("GPU")]
    assert len(cpu_only) == 1 and cpu_only[0]["min_workers"] == 0
    assert sum(t.get("max_workers", 0) for t in types.values()) >= cluster["max_workers"] >= gpu[0]["max_workers"]
    for name, t in types.items():
        profile = t["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Name") or profile.get("Arn"), f"node type {name} has no IAM instance profile for S3"


def test_setup_installs_the_pinned_release(cluster):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    installs = [c for c in cluster["setup_commands"] if re.search(r"pip install .*echo-ssl", c)]
    assert len(installs) == 1
    assert re.search(rf"echo-ssl(==|\s*@\s*git\+\S+@v){re.escape(version)}\b", installs[0]), installs[0]


def test_start_commands_give_ray_the_tracking_uri_and_token_mode(cluster, tmp_path):
    """Run the setup command that writes the environment file and each start command, with a
    stand-in ``ray`` on PATH that records its environment: ``ray start`` (and so every job and
    worker) sees ``MLFLOW_TRACKING_URI`` and ``RAY_AUTH_MODE=token``, and the dashboard stays on
    the head's loopback."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    record = tmp_path / "ray-env"
    fake_ray = bin_dir / "ray"
    fake_ray.write_text(f'#!/bin/sh\nif [ "$1" = start ]; then env > "{record}"; echo "$@" >> "{record}"; fi\n')
    fake_ray.chmod(0o755)
    env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin", "RAY_HEAD_IP": "10.0.0.1"}

    writers = [c for c in cluster["setup_commands"] if "echo-ssl.env" in c]
    assert len(writers) == 1
    subprocess.run(["bash", "-c", writers[0]], env=env, check=True)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        record.unlink(missing_ok=True)
        for command in cluster[key]:
            subprocess.run(["bash", "-c", command], env=env, check=True)
        seen = record.read_text()
        uri = re.search(r"^MLFLOW_TRACKING_URI=(\S+)$", seen, re.M)
        assert uri and uri.group(1).startswith(("http://", "https://")), key
        assert re.search(r"^RAY_AUTH_MODE=token$", seen, re.M), key
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "~/.ray/auth_token" in cluster["file_mounts"]


# command words for each example config (local-X uses X's command)
COMMANDS = {"pretrain": ("pretrain",), "finetune": ("finetune",), "evaluate": ("evaluate",), "tune": ("tune",)}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_accepted_by_their_command(path):
    """Every key is an option of the command, every value converts, the required ones are there;
    cluster configs use r3d_18 on GPUs with S3 data and storage, local ones tiny3d on CPU."""
    from echo.cli import build_parser
    from echo.config import apply_config, load_config

    kind = path.stem.removeprefix("local-")
    assert kind in COMMANDS, f"{path.name}: no command for this config"
    _, leaves = build_parser()
    parser = leaves[COMMANDS[kind]]
    values = load_config(str(path))
    apply_config(parser, values, str(path))  # raises on an unknown key or a bad value
    required = {a.dest for a in parser._actions if a.required}
    assert required <= set(values), f"{path.name} lacks {required - set(values)}"
    get = parser.get_default
    if path.stem.startswith("local-"):
        assert get("backbone") in ("tiny3d", None)
        assert not str(get("manifest")).startswith("s3://")
        assert not get("gpus_per_worker") and not get("gpus_per_trial")
    else:
        assert str(get("manifest")).startswith("s3://")
        assert get("backbone") in ("r3d_18", None)
        assert get("storage") is None or get("storage").startswith("s3://")
        assert get("gpus_per_worker") in (1, None) and get("gpus_per_trial") in (1, None)


def test_job_runs_from_a_config_file_alone(tmp_path):
    """``python jobs/pretrain.py --config configs/local-pretrain.yaml``, the documented command:
    the file supplies the required ``--manifest``, so the job gets as far as opening the manifest
    (absent here: the demo data is not made) instead of stopping at argument parsing."""
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "pretrain.py"), "--config",
                           str(CONFIGS / "local-pretrain.yaml")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "arguments are required" not in output, output[-2000:]
    assert "demo-data/manifest.csv" in output, output[-2000:]
