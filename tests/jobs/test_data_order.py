"""The order training reads token shards in: a seeded file permutation, new for every resume point,
so a restarted run does not start again at the corpus's first files."""

from __future__ import annotations

import pyarrow as pa
from test_preflight import write_checkpoint

from jobs.data import data_order_seed, token_dataset
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

    write_checkpoint(run_dir, "checkpoint_2026-12-02_12-00-00.000001", None)
    resumed = data_order_seed(0, run_dir)
    assert resumed != fresh
    resumed_ds, _ = token_dataset(out, hi=False, shuffle_seed=resumed)
    assert file_order(resumed_ds)[:2] != first_epoch[:2]  # the resumed run does not re-read the same first files


ROWS, BATCH = 40, 4  # 10 steps an epoch


def stream_rows(ds, step: int, steps: int, cached_rows: int | None, resumed: dict | None = None,
                where: dict | None = None) -> list[list[int]]:
    """The rows of `steps` batches a worker trains on when its run (re)starts at `step` (from a
    checkpoint's `resumed` place, if given; `where` follows the place as it reads)."""
    from jobs.config import RunSettings
    from jobs.loop import _collate_fn, batch_stream

    run = RunSettings(batch_size=BATCH, shuffle_buffer=8, seed=3)  # a buffer smaller than the data
    stream = batch_stream(ds.iterator(), run, 0, 1, step, cached_rows, _collate_fn(lambda b: b["row"].tolist()),
                          resumed=resumed, where=where)
    return [next(stream) for _ in range(steps)]


def test_a_resumed_cached_run_continues_its_data_stream(ray_session):
    """Data cached in the object store has a known epoch length: a run resumed at step 13 trains on
    the batches an uninterrupted run trains on from step 13 (epoch 1, three batches in), not on the
    cached rows' first batches again."""
    import ray.data

    ds = ray.data.from_arrow(pa.table({"row": list(range(ROWS))})).materialize()
    straight = stream_rows(ds, 0, 25, ROWS)
    assert sorted(sum(straight[:10], [])) == list(range(ROWS))  # an epoch is every row once
    assert sorted(sum(straight[10:20], [])) == list(range(ROWS)) and straight[10:20] != straight[:10]
    assert stream_rows(ds, 13, 12, ROWS) == straight[13:25]
    assert stream_rows(ds, 20, 3, ROWS) == straight[20:23]  # at an epoch's first step
    # Without the epoch's length (streamed data), a restart begins a pass of its own.
    assert stream_rows(ds, 13, 3, None) != straight[13:16]
    # The place a checkpoint records (counters["data"]) gives the same:
    where: dict = {}
    stream_rows(ds, 0, 13, ROWS, where=where)
    assert where == {"epoch": 1, "batch": 3}
    assert stream_rows(ds, 13, 12, ROWS, resumed={**where, "world_size": 1}) == straight[13:25]
    # Saved by another number of workers (another split of the rows): a new epoch, not epoch 1 again.
    regrouped = stream_rows(ds, 13, 10, ROWS, resumed={**where, "world_size": 2})
    assert sorted(sum(regrouped, [])) == list(range(ROWS)) and regrouped != straight[10:20]
    # Saved with another batch size: 3 batches of 8 are 24 rows, not the 12 that 3 batches of 4 would
    # skip; rows 12-23 of the epoch would go unseen. A new epoch instead, as for another split.
    resized = stream_rows(ds, 13, 10, ROWS, resumed={**where, "world_size": 1, "batch_size": 2 * BATCH})
    assert sorted(sum(resized, [])) == list(range(ROWS)) and resized != straight[10:20]
    assert stream_rows(ds, 13, 12, ROWS, resumed={**where, "world_size": 1, "batch_size": BATCH}) == straight[13:25]


def test_workers_split_cached_rows_equally(ray_session):
    """The epoch length `batch_stream` assumes for several workers: Ray Train's equal split gives each
    of 2 workers 41 // 2 rows, so 5 full batches of 4."""
    from concurrent.futures import ThreadPoolExecutor

    import ray.data

    ds = ray.data.from_arrow(pa.table({"row": list(range(41))})).materialize()
    splits = ds.streaming_split(2, equal=True)  # as ray.train's DataConfig splits a dataset
    with ThreadPoolExecutor(2) as pool:
        counts = list(pool.map(lambda it: sum(1 for _ in it.iter_batches(batch_size=BATCH, drop_last=True)), splits))
    assert counts == [(41 // 2) // BATCH] * 2
