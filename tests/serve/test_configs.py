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


@pytest.mark.parametrize("in_flight, ongoing, ok", [(48, 64, True), (63, 64, True), (64, 64, False), (80, 64, False)])
def test_admission_must_answer_before_the_ingress_queue(in_flight, ongoing, ok):
    """At or past the ingress's max_ongoing_requests, image requests would wait in Serve's queue
    instead of getting max_in_flight's 429: such a config is refused, naming both settings."""
    data = {"checkpoint": "x", "limits": {"max_in_flight": in_flight}, "ingress": {"max_ongoing_requests": ongoing}}
    if ok:
        AppArgs.model_validate(data)
        return
    with pytest.raises(ValueError, match=r"limits\.max_in_flight .* ingress\.max_ongoing_requests"):
        AppArgs.model_validate(data)


@pytest.mark.parametrize("seconds, ok", [(0.5, True), (0, False), (-1, False), (float("inf"), False)])
def test_the_body_timeout_is_a_positive_finite_time(seconds, ok):
    data = {"checkpoint": "x", "limits": {"body_timeout_s": seconds}}
    if ok:
        assert AppArgs.model_validate(data).limits.body_timeout_s == seconds
        return
    with pytest.raises(ValueError, match="body_timeout_s"):
        AppArgs.model_validate(data)
