"""ROOT/sampling.json (muse/root_sampling.py): what a model root records of the sampling it draws well with."""

from __future__ import annotations

import pytest

from muse.root_sampling import SAMPLING_FILE, RootSampling, read_root_sampling, write_root_sampling


def test_recorded_settings_come_back_and_nothing_recorded_writes_nothing(tmp_path):
    assert read_root_sampling(str(tmp_path)) == RootSampling()  # a root without the file
    write_root_sampling(str(tmp_path), RootSampling())
    assert not (tmp_path / SAMPLING_FILE).exists()
    write_root_sampling(str(tmp_path), RootSampling(guidance_scale=1.0, superres_top_k=1))
    assert read_root_sampling(str(tmp_path)).recorded() == {"guidance_scale": 1.0, "superres_top_k": 1}


@pytest.mark.parametrize("text, said", [
    ("{not json", "Expecting property name"),
    ("[1, 2]", "a JSON object of settings, got list"),
    ('{"guidance": 1.0}', "unknown settings ['guidance']"),
    ('{"steps": 0}', "sampling.steps must be an integer >= 1, got 0"),
    ('{"guidance_scale": "high"}', "sampling.guidance_scale must be a number >= 0, got 'high'"),
    ('{"superres_top_k": true}', "sampling.superres_top_k must be an integer >= 1, got True"),
])
def test_a_file_that_is_not_one_is_refused_naming_it(tmp_path, text, said):
    """Sampling with settings the recipe did not choose would draw other images without a word."""
    (tmp_path / SAMPLING_FILE).write_text(text)
    with pytest.raises(ValueError, match=rf"{tmp_path}/{SAMPLING_FILE} is not a model root's sampling: .*"):
        read_root_sampling(str(tmp_path))
    with pytest.raises(ValueError) as refused:
        read_root_sampling(str(tmp_path))
    assert said in str(refused.value)


def test_the_pipeline_carries_its_roots_sampling_and_saves_it_again(tmp_path):
    from muse.checkpoint import init_model_root
    from muse.pipeline import MusePipeline

    root, copy = str(tmp_path / "root"), str(tmp_path / "copy")
    init_model_root("tiny", root)
    write_root_sampling(root, RootSampling(guidance_scale=1.0, superres_top_k=1))
    pipe = MusePipeline.from_pretrained(root)
    assert pipe.root_sampling.recorded() == {"guidance_scale": 1.0, "superres_top_k": 1}
    pipe.save_pretrained(copy)
    assert read_root_sampling(copy) == pipe.root_sampling
    assert MusePipeline.from_preset("tiny").root_sampling == RootSampling()  # nothing recorded
