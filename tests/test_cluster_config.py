"""``cluster.yaml`` and ``configs/*.yaml``: valid for the tools that read them, and free of secrets.

- ``cluster.yaml`` validates against the cluster-config JSON schema shipped inside the installed
  ``ray`` package (draft-07), and passes Ray's own offline preparation and checks (the ones
  ``ray up`` runs before touching AWS);
- it holds no AWS keys, session tokens or other secrets (S3 access is by instance profile);
- its node types, install pinned to a commit, and the environment its start commands give Ray;
- its network (issue 17, item 10): no public addresses, the user's security groups only (SSH to the
  head from one CIDR), IMDSv2 required, encrypted volumes; and docs/cluster.md passes the ID key as a
  file on S3 and uses MLflow over HTTPS;
- every example config is accepted by the command that reads it.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
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
    # secret-access-key shaped strings (40 lower-case hex digits are a commit, not a key)
    r"(?<![A-Za-z0-9/+])(?![0-9a-f]{40}(?![A-Za-z0-9/+]))[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])",
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


def test_setup_installs_a_pinned_commit(cluster):
    """A commit, not a tag or branch: the code every node runs cannot be moved under the cluster."""
    installs = [c for c in cluster["setup_commands"] if re.search(r"pip install .*echo-ssl", c)]
    assert len(installs) == 1
    assert re.search(r'"echo-ssl @ git\+https://\S+\.git@[0-9a-f]{40}"', installs[0]), installs[0]


def _node_configs(cluster) -> dict[str, dict]:
    return {name: t["node_config"] for name, t in cluster["available_node_types"].items()}


def test_no_node_has_a_public_address(cluster):
    assert cluster["provider"]["use_internal_ips"] is True
    for name, node in _node_configs(cluster).items():
        interfaces = node.get("NetworkInterfaces")
        assert interfaces, f"node type {name}: no NetworkInterfaces (the subnet would decide the public IP)"
        for ni in interfaces:
            assert ni["AssociatePublicIpAddress"] is False, name
            assert ni["SubnetId"].startswith("subnet-") and ni["Groups"], name


def test_security_groups_are_the_users_and_ssh_reaches_only_the_head(cluster, monkeypatch):
    """Every node type names its security groups, so Ray's bootstrap creates none (its default
    group opens SSH to 0.0.0.0/0); workers are only in the cluster group, the head adds the SSH
    group; nothing in the file opens an address range to the internet. Ray's own bootstrap steps
    (interfaces -> groups) run on the prepared config with AWS pointed at a closed port: creating
    a group would fail the test."""
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.util import prepare_config

    from conftest import free_port

    assert "security_group" not in cluster["provider"]
    assert not re.search(r"0\.0\.0\.0/0|::/0", yaml.safe_dump(cluster))  # comments aside
    head = cluster["head_node_type"]
    groups = {name: {g for ni in node["NetworkInterfaces"] for g in ni["Groups"]}
              for name, node in _node_configs(cluster).items()}
    workers = [g for name, g in groups.items() if name != head]
    assert len({frozenset(g) for g in workers}) == 1  # one cluster group shared by all workers
    assert workers[0] < groups[head]  # the head: the cluster group plus the SSH group

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    prepared = aws_config._configure_from_network_interfaces(prepare_config(copy.deepcopy(cluster)))
    for name, t in prepared["available_node_types"].items():
        assert set(t["node_config"]["SecurityGroupIds"]) == groups[name]
    assert aws_config._configure_security_group(prepared) == prepared


def test_imdsv2_is_required_on_every_node(cluster):
    for name, node in _node_configs(cluster).items():
        options = node.get("MetadataOptions", {})
        assert options.get("HttpTokens") == "required", name
        assert options.get("HttpPutResponseHopLimit", 1) == 1, name


def test_every_ebs_volume_is_encrypted(cluster):
    for name, node in _node_configs(cluster).items():
        volumes = [m["Ebs"] for m in node.get("BlockDeviceMappings", []) if "Ebs" in m]
        assert volumes, name
        assert all(v.get("Encrypted") is True for v in volumes), name


DOCS = REPO / "docs" / "cluster.md"


def test_docs_open_ssh_only_from_the_admin_cidr():
    """The documented security groups: SSH from $ADMIN_CIDR to the head group, everything else only
    from the cluster group itself."""
    text = DOCS.read_text().replace("\\\n", " ")
    rules = [line for line in text.splitlines() if "authorize-security-group-ingress" in line]
    assert len(rules) == 2
    ssh = [r for r in rules if "--cidr" in r]
    assert len(ssh) == 1 and re.search(r'--protocol tcp --port 22 --cidr "\$ADMIN_CIDR"', ssh[0])
    (internal,) = [r for r in rules if r not in ssh]
    assert re.search(r'--group-id "\$CLUSTER_SG" .*UserIdGroupPairs=\[\{GroupId=\$CLUSTER_SG\}\]', internal)


def test_docs_pass_the_id_key_as_a_file_and_mlflow_over_https():
    text = DOCS.read_text().replace("\\\n", " ")
    ingests = [line for line in text.splitlines() if "ray job submit" in line and "echo-ssl ingest" in line]
    assert ingests and all(re.search(r"--id-key-file s3://\S+", line) for line in ingests)
    for match in re.finditer(r"--runtime-env-json\s+'([^']*)'", text):
        assert "ECHO_SSL_ID_KEY" not in match.group(1) and "PASSWORD" not in match.group(1).upper()
    uris = re.findall(r"MLFLOW_TRACKING_URI=(\S+)", text) + re.findall(r"--tracking-uri\s+\"?(\S+)", text)
    remote = [u for u in uris if not u.startswith(("sqlite:", '"sqlite:'))]
    assert remote and all(u.startswith("https://") for u in remote), remote


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
        assert uri and uri.group(1).startswith("https://"), key
        assert re.search(r"^RAY_AUTH_MODE=token$", seen, re.M), key
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "~/.ray/auth_token" in cluster["file_mounts"]
    assert "~/.mlflow/credentials" in cluster["file_mounts"]  # MLflow's password: a file, not the URI


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
