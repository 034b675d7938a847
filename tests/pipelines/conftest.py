"""Fixtures for the pipeline tests: random tiny model roots (written once per session)."""

import pytest

from muse.config import from_dict
from pipelines.config import TokenizeConfig


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> str:
    """A random `tiny` model root with every component (vqgan_hi included)."""
    from muse.checkpoint import init_model_root

    root = tmp_path_factory.mktemp("tiny_root")
    init_model_root("tiny", str(root), seed=0)
    return str(root)


@pytest.fixture(scope="session")
def tiny_root_lo_only(tmp_path_factory) -> str:
    """A tiny model root with only a text encoder and a low-res VQGAN."""
    from muse.checkpoint import init_model_root

    root = tmp_path_factory.mktemp("tiny_root_lo")
    init_model_root("tiny", str(root), seed=1, components=("text_encoder", "vqgan_lo"))
    return str(root)


@pytest.fixture(scope="session")
def fast_cfg() -> TokenizeConfig:
    """Small parts and batches, half-CPU actors: fits the 8 logical CPUs of the test Ray."""
    return from_dict(TokenizeConfig, {
        "reader": {"rows_per_part": 4, "block_rows": 4},
        "preprocess": {"num_cpus": 0.5, "batch_size": 8, "min_side": 16},
        "vqgan_lo": {"num_cpus": 0.5, "batch_size": 8},
        "vqgan_hi": {"batch_size": 4},  # runs in the vqgan_lo actors, in two calls per batch
        "text": {"num_cpus": 0.5, "batch_size": 16},
        "write_cpus": 0.25,
        "commit_seconds": 0,
    })
