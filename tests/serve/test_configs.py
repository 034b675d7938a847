"""The shipped Serve configs: valid for Ray Serve's deploy schema and for the app's own arguments,
and the cluster one fit for the GPU nodes of cluster.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve.config import AppArgs, load_args

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["config.yaml", "config-gpu.yaml"])
def test_serve_configs_validate(name):
    path = REPO / "serve" / name
    ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))  # what `serve deploy` checks
    AppArgs.model_validate(load_args(path))  # what build_app checks


def test_the_cluster_config_runs_the_models_on_gpus_from_shared_storage():
    """On a cluster the replicas run on nodes other than the one that built the app: the root is read
    from S3, the key travels in the application's runtime_env, and the stages share the GPUs."""
    path = REPO / "serve" / "config-gpu.yaml"
    args = AppArgs.model_validate(load_args(path))
    assert args.checkpoint.startswith("s3://") and args.device == "cuda"
    stages = (args.text_encoder, args.base, args.superres, args.decoder)
    assert all(stage.num_gpus > 0 for stage in stages) and sum(stage.num_gpus for stage in stages) <= 1.0 + 1e-9
    assert args.ingress.num_gpus == 0
    app = yaml.safe_load(path.read_text())["applications"][0]
    assert args.api_key_env in app["runtime_env"]["env_vars"]
