"""The order training reads token shards in: a seeded file permutation, new for every resume point,
so a restarted run does not start again at the corpus's first files."""

from __future__ import annotations

import pyarrow as pa

from jobs.data import data_order_seed, token_dataset
from muse import storage
from pipelines import shards

FILES = 8


def write_parts(out: str) -> None:
    schema = shards.shard_schema(has_hi=False, text_storage="ids",
                                 meta={"tokens_lo_side": 2, "tokens_hi_side": None, "text_dim": None})
    for part in range(FILES):
        rows = [{"key": f"part{part}/{i}", "caption": "a red circle", "tokens_lo": [part] * 4, "text_ids": [1],
                 "width": 8, "height": 8} for i in range(4)]
        shards.write_table(out, pa.Table.from_pylist(rows, schema=schema), part=f"part{part:02d}")


def file_order(ds) -> list[int]:
    """The part each row came from, collapsed to the order in which parts were first read."""
    order = []
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for tokens in batch["tokens_lo"].to_pylist():
            if not order or order[-1] != tokens[0]:
                order.append(tokens[0])
    return order


def test_a_resumed_run_reads_a_new_permutation_not_the_first_files(ray_session, tmp_path):
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # the file order, unmixed
    out, run_dir = str(tmp_path / "tokens"), str(tmp_path / "runs" / "base")
    write_parts(out)
    fresh = data_order_seed(0, run_dir)
    assert data_order_seed(0, run_dir) == fresh  # same state, same order: restarts are reproducible
    ds, _ = token_dataset(out, hi=False, shuffle_seed=fresh)
    first_epoch = file_order(ds)
    assert sorted(first_epoch) == list(range(FILES))  # every file once per epoch
    assert first_epoch != list(range(FILES))  # not the sorted listing
    second_epoch = file_order(ds)  # each later pass over the dataset draws a new permutation
    assert sorted(second_epoch) == list(range(FILES)) and second_epoch != first_epoch
    assert file_order(token_dataset(out, hi=False, shuffle_seed=fresh)[0]) == first_epoch  # a restart repeats it

    storage.write_text(storage.join(run_dir, "checkpoint_2026-12-02_12-00-00.000001", "meta.json"), "{}")
    resumed = data_order_seed(0, run_dir)
    assert resumed != fresh
    resumed_ds, _ = token_dataset(out, hi=False, shuffle_seed=resumed)
    assert file_order(resumed_ds)[:2] != first_epoch[:2]  # the resumed run does not re-read the same first files
