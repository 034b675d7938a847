"""The corpus as Ray Data: one read task per part (`pipelines.readers.read_part`), or one row per
part for a pool that reads its parts itself (`part_list`). Planning and reading live in
`pipelines.readers`; this module only wraps them (and is what imports Ray, lazily)."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from pipelines.config import IO_TASK_RETRIES, ReaderConfig
from pipelines.readers import Part, plan_parts, read_part
from pipelines.rows import ROW_SCHEMA, accepted
from pipelines.shards import pass_order, read_datasource_retried

PART_SCHEMA = pa.schema([("part", pa.string())])


def corpus_datasource(parts: list[Part], cfg: ReaderConfig, images: bool = True, shuffle_seed: int | None = None):
    """A Ray Data datasource with one read task per part (`read_part`). With `shuffle_seed`, every pass
    reads the parts in a new seeded permutation (`pipelines.shards.pass_order`), as training's token
    shards are read; without, in `parts`' order."""
    return _part_datasource("Corpus", parts, lambda p: read_part(p, cfg, images), ROW_SCHEMA, shuffle_seed)


def _part_datasource(name: str, parts: list[Part], read, schema: pa.Schema, shuffle_seed: int | None = None):
    """A Ray Data datasource with one read task per part, yielding the blocks of `read(part)`, in the
    order `pass_order` gives each pass."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class PartDatasource(Datasource):
        def get_name(self) -> str:
            return name

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            return [
                ReadTask(lambda p=p: read(p),
                         BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[p.uri]),
                         schema=schema)
                for p in pass_order(parts, shuffle_seed, data_context)
            ]

    return PartDatasource()


def read_parts(parts: list[Part], cfg: ReaderConfig, num_cpus: float = 1.0, retries: int = IO_TASK_RETRIES,
               images: bool = True, shuffle_seed: int | None = None):
    """Ray Dataset of corpus rows (with bookkeeping columns and end rows) for `parts`. A read task
    that still fails on storage I/O after the filesystem's own retries runs again, `retries` times.
    `shuffle_seed`: read the parts in a new seeded permutation every pass (`corpus_datasource`)."""
    return read_datasource_retried(corpus_datasource(parts, cfg, images, shuffle_seed), retries,
                                   override_num_blocks=max(1, len(parts)), num_cpus=num_cpus)


def part_list(parts: list[Part], *, num_cpus: float, num_gpus: float, memory: float):
    """Ray Dataset of one row per part, its `Part.to_json` (column `part`), for a pool that reads its
    parts itself: given the pool's resources, Ray Data fuses these reads into the pool, so nothing is
    read twice and no process of its own starts (`pipelines.models.PartTokens`)."""
    import ray

    def describe(part: Part) -> Iterator[pa.Table]:
        yield pa.table({"part": [part.to_json()]}, schema=PART_SCHEMA)

    return ray.data.read_datasource(_part_datasource("Parts", parts, describe, PART_SCHEMA),
                                    override_num_blocks=max(1, len(parts)), num_cpus=num_cpus,
                                    num_gpus=num_gpus, memory=memory)


def read_corpus(uri: str, format: str = "auto", cfg: ReaderConfig | None = None, images: bool = True,
                max_images: int | None = None):
    """Ray Dataset of the corpus at `uri`: one row per readable sample, columns key, image, caption
    (bytes). Rows the reader refused (no caption, no image, unreadable file) are left out. With
    `images=False` the image column is empty and no image is read (see `read_part`). `max_images`:
    a folder corpus's first parts only (`plan_parts`)."""
    cfg = cfg or ReaderConfig()
    parts = plan_parts(uri, format, cfg, max_images=max_images)

    def keep(batch: pa.Table) -> pa.Table:
        return batch.filter(accepted(batch)).select(["key", "image", "caption"])

    return read_parts(parts, cfg, images=images).map_batches(keep, batch_format="pyarrow", batch_size=None)


def sample_captions(uri: str, n: int, format: str = "auto", cfg: ReaderConfig | None = None) -> list[str]:
    """Up to `n` captions of the corpus at `uri`, from its first parts (read by Ray tasks, streamed
    and stopped once `n` are in): what a text encoder's vocabulary is fitted to. A folder corpus is
    planned only as far as its first 2n images (room for rejects), not listed whole."""
    rows = (read_corpus(uri, format, cfg, images=False, max_images=2 * n).select_columns(["caption"])
            .limit(n).take_all())
    return [r["caption"].decode("utf-8", errors="replace") for r in rows]
