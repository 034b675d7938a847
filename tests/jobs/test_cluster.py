"""cluster.yaml passes Ray's own cluster-launcher validation and has the shape the README promises."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from jobs_helpers import REPO

from ray.autoscaler._private.util import prepare_config, validate_config


@pytest.fixture
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_ray_validation(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))  # what `ray up` runs before launching


def test_ray_validation_catches_a_broken_cluster_yaml(cluster):
    cluster["available_node_types"]["gpu_worker"]["min_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(cluster))


def test_head_cpu_workers_and_autoscaled_gpu_workers(cluster):
    assert cluster["provider"]["type"] == "aws"
    nodes = cluster["available_node_types"]
    assert cluster["head_node_type"] == "head" and nodes["head"]["resources"] == {"CPU": 0}
    assert nodes["cpu_worker"]["node_config"]["InstanceType"].startswith("c")
    gpu = nodes["gpu_worker"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"]  # scaled from zero on demand
    assert gpu["node_config"]["InstanceType"].startswith(("p", "g"))
    setup = " ".join(cluster["setup_commands"])
    assert "pip install" in setup and "-e ." in setup and "~/muse-on-ray" in cluster["file_mounts"]


def test_gpu_workers_fit_for_training(cluster):
    """One zone, a cluster placement group, pinned versions, and no device the node is not launched
    with (Docker refuses to start a container given a --device path that does not exist)."""
    assert "," not in cluster["provider"]["availability_zone"]  # NCCL never crosses zones
    gpu = cluster["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["Placement"]["GroupName"]
    efa = any(i.get("InterfaceType") == "efa" for i in gpu["node_config"].get("NetworkInterfaces", []))
    assert efa == ("--device=/dev/infiniband" in gpu["docker"]["worker_run_options"])
    image = cluster["docker"]["image"]
    assert image.startswith("rayproject/ray:2.60.") and "latest" not in image
    assert any("torch==" in c for c in cluster["setup_commands"])
    assert not any("--shm-size" in option for option in cluster["docker"]["run_options"])  # Ray sizes it per node


def test_every_node_names_its_ami_and_instance_profile(cluster):
    """Ray's default AMI has no driver for H100s, and its bootstrap gives a role to the head only:
    every node type names both, so workers reach S3 and GPUs work."""
    for name, node in cluster["available_node_types"].items():
        config = node["node_config"]
        assert config["ImageId"].startswith("ami-"), name
        assert config["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name


def test_the_cluster_runs_with_token_authentication(cluster):
    """Both `ray start` commands turn token auth on and read the token the file mounts bring."""
    token_dir = "~/.muse-ray-auth"
    assert token_dir in cluster["file_mounts"]
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start and f"RAY_AUTH_TOKEN_PATH={token_dir}/auth_token" in start
        assert start.index("RAY_AUTH_MODE") < start.index("ray start")



def test_the_documented_token_command_makes_a_token_ray_reads(tmp_path):
    """The README's and cluster.yaml's first command, run as written (HOME in a temporary folder):
    it writes a private token file that Ray's own loader accepts in token mode."""
    readme = (REPO / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("mkdir -p ~/.muse-ray-auth"))
    assert command in (REPO / "cluster.yaml").read_text()
    env = {**os.environ, "HOME": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", command], env=env, check=True, timeout=60)
    token_file = tmp_path / ".muse-ray-auth" / "auth_token"
    assert token_file.stat().st_mode & 0o077 == 0
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    printed = subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert printed.stdout.strip() == token_file.read_text().strip() and len(printed.stdout.strip()) >= 32

def test_job_packages_leave_the_data_behind():
    """`ray job submit --working-dir .` honours .gitignore and .rayignore: history and local data
    stay out of every job's package (Ray refuses one over 512 MiB)."""
    from ray._private.runtime_env.packaging import get_excludes_from_ignore_files

    excluded = get_excludes_from_ignore_files(REPO, include_gitignore=True)
    for path in (".git/HEAD", "data/corpus/a.png", "out/x", "demo_output/grid.png", "roots/r/base/model.safetensors"):
        assert any(match(REPO / path) for match in excluded), path
    for path in ("jobs/all.py", "configs/train_632m.yaml", "muse/vqgan.py"):
        assert not any(match(REPO / path) for match in excluded), path


def test_a_submitted_jobs_working_dir_carries_every_package_file_and_no_local_data():
    """`ray job submit --working-dir .` drops what .gitignore and .rayignore match, as Ray reads them:
    every file of the packages goes (an unanchored `data/` once dropped muse.data), local data does not."""
    from ray._private.runtime_env.packaging import get_excludes_from_ignore_files

    repo = Path(REPO)
    excluded = get_excludes_from_ignore_files(repo, include_gitignore=True)
    package_files = [p for package in ("muse", "jobs", "pipelines", "serve", "configs")
                     for p in (repo / package).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.parts[-2] == "data" for p in package_files)  # muse/data is among them
    dropped = [str(p.relative_to(repo)) for p in package_files if any(rule(p) for rule in excluded)]
    assert dropped == []
    for local in ("data/corpus/x.parquet", "roots/tiny/base/model.safetensors", "out/grid.png"):
        assert any(rule(repo / local) for rule in excluded), local
