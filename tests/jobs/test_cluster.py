"""cluster.yaml passes Ray's own cluster-launcher validation and has the shape the README promises."""

from __future__ import annotations

import copy

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
    """One zone, a cluster placement group, EFA devices in the container, and pinned versions."""
    assert "," not in cluster["provider"]["availability_zone"]  # NCCL never crosses zones
    gpu = cluster["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["Placement"]["GroupName"]
    assert "--device=/dev/infiniband" in gpu["docker"]["worker_run_options"]
    image = cluster["docker"]["image"]
    assert image.startswith("rayproject/ray:2.60.") and "latest" not in image
    assert any("torch==" in c for c in cluster["setup_commands"])
