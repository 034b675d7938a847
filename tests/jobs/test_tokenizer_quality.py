"""The demo's 64 px tokenizer recipe, trained by the stage's own step on the demo's corpus, must
reconstruct scenes that the attribute judge reads right: the ceiling every transformer trained on
its tokens is held to (benchmarks/vqgan_recipe.py and benchmarks/demo_ceiling.py measure more)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs.config import load_config
from jobs.parallel import WorkerEnv
from jobs.vqgan import VQGANWorker
from jobs.train_job import TrainJob
from muse.config import preset, to_dict
from muse.data.images import pil_to_tensor
from muse.data.synthetic import all_pairs, sample
from muse.evaluate import heldout_images, tokenizer_ceiling

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def corpus_images(n: int, grid: int) -> torch.Tensor:
    """The demo corpus's first n images as the pipeline feeds the 64 px tokenizer: rendered at 128 px,
    reduced to 64 (bicubic), in [-1, 1]."""
    return torch.stack([pil_to_tensor(sample(i, 0, 128, all_pairs(), grid)[1], 64) for i in range(n)])


def test_demo_tokenizer_recipe_reconstructs_scenes_the_judge_reads_right(one_thread):
    section = load_config(DEMO_CONFIG).vqgan
    grid = 8  # the demo's corpus layout (jobs.demo --corpus-grid)
    job = TrainJob(root="", component="vqgan_lo", stage="vqgan", model_config=to_dict(preset(section.lo_model)),
                   run_name="quality")
    torch.manual_seed(0)
    worker = VQGANWorker(section, job, WorkerEnv())
    train = corpus_images(1000, grid)
    gen = torch.Generator().manual_seed(1)
    for step in range(section.run.max_steps):
        worker.reseed(step)
        worker.train_step({"images": train[torch.randint(len(train), (section.run.batch_size,), generator=gen)]}, step)
    samples = heldout_images(48, 128, seed=77, grid=grid)
    result = tokenizer_ceiling(worker.eval_vqgan(), samples)
    judged, originals = result["reconstructions"], result["originals"]
    assert originals["correct"] == 1.0
    # Chance (the same images judged against other captions) is ~0 for the whole scene; the recipe
    # measured 1.00 at this step count (RESULTS.md), so 0.6 leaves room for another CPU's arithmetic.
    assert judged["color"] >= 0.9 and judged["correct"] >= 0.6, judged
