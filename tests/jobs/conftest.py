"""Tiny data for the training tests: a random tiny model root, a synthetic corpus and token shards
encoded from it in-process (no Ray), shared by the whole session."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from jobs_helpers import write_token_shards


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> SimpleNamespace:
    from muse.checkpoint import init_model_root
    from muse.data.synthetic import write_corpus

    base = tmp_path_factory.mktemp("jobs_data")
    root, corpus, tokens = str(base / "root"), str(base / "corpus"), str(base / "tokens")
    init_model_root("tiny", root)
    write_corpus(corpus, 24, size=128, shard_size=12)
    write_token_shards(root, corpus, tokens)
    return SimpleNamespace(root=root, corpus=corpus, tokens=tokens)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread, as each Ray worker of half a CPU gets: on a shared 2-core box more threads
    thrash and run many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
