"""Token shards: the Parquet files tokenization writes and training reads.

    OUTPUT/
      shards/<run>/<part>-<first>-<stop>.parquet   the accepted rows of one block of one part, written
                                                   by a Ray task, the dataset's last stage
      _manifest/                                   finished parts and their files (pipelines.manifest)
      _job.json                                    what produced the shards (models, sizes, text storage)
      rejects.json, manifest.json                  rejects by reason with example keys; totals

Shard schema, one row per accepted sample:

    key        string          stable source id (source URI + index)
    caption    string          cleaned caption
    tokens_lo  list<int16>     low-res VQGAN ids, h*w flattened row-major (16x16 for f16 at 256px)
    tokens_hi  list<int16>     high-res VQGAN ids (64x64 for f8 at 512px); only with a vqgan_hi
    text_ids   list<int32>     text-encoder token ids trimmed to the true length (incl. EOS)
    text_emb   list<float16>   only with text_storage "embeddings": text_len x dim, flattened
    text_len   int32           only with text_storage "embeddings"
    width      int32           source image size as displayed
    height     int32

The Parquet schema metadata key b"muse" holds JSON: tokens_lo_side, tokens_hi_side, text_dim,
text_storage, format_version, so a reader reshapes without guessing.

Exactly once: each file is written whole (temp + rename locally, one PUT on S3) under its run's
folder, and is published only when its part's manifest entry, naming it, is committed. Readers take
the file list from the manifest, so files of unfinished parts are never read; the next run deletes
them (`output_runs.remove_stale`).
"""

from __future__ import annotations

import contextlib
import io
import json
import zlib
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from muse import storage
from pipelines import manifest
from pipelines.config import IO_TASK_RETRIES
from pipelines.readers import is_bad_source

FORMAT_VERSION = 2
JOB_FILE = "_job.json"

# What a writer task returns for each part in its block: the only thing that reaches the driver.
RECORD_SCHEMA = pa.schema([
    ("part", pa.string()),
    ("ranges", pa.list_(pa.int64())),  # row indices held, as flat [start, stop) pairs
    ("part_rows", pa.int64()),  # rows in the whole part when its end row was in the block, else -1
    ("rows", pa.int64()), ("accepted", pa.int64()), ("rejects", pa.map_(pa.string(), pa.int64())),
    ("examples", pa.string()),  # JSON {reason: [keys]}, a few per reason
    ("file", pa.string()),  # relative to OUTPUT; null when no row was accepted
])


def shard_schema(*, has_hi: bool, text_storage: str, meta: dict) -> pa.Schema:
    fields = [("key", pa.string()), ("caption", pa.string()), ("tokens_lo", pa.list_(pa.int16()))]
    if has_hi:
        fields.append(("tokens_hi", pa.list_(pa.int16())))
    fields.append(("text_ids", pa.list_(pa.int32())))
    if text_storage == "embeddings":
        fields += [("text_emb", pa.list_(pa.float16())), ("text_len", pa.int32())]
    fields += [("width", pa.int32()), ("height", pa.int32())]
    return pa.schema(fields, metadata={b"muse": json.dumps(meta | {"format_version": FORMAT_VERSION})})


# ---------------------------------------------------------------------------------------------
# Writing (a Ray task per block).


def _ranges(index: np.ndarray) -> list[int]:
    """Sorted unique indices -> flat [start, stop) pairs of their consecutive runs."""
    if not len(index):
        return []
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = index[np.r_[0, breaks]]
    stops = index[np.r_[breaks - 1, len(index) - 1]] + 1
    return np.stack([starts, stops], 1).reshape(-1).tolist()


def shard_path(run: str, part: str, ranges: list[int]) -> str:
    """Named by the rows it holds: a retried task rewrites the same file with the same rows."""
    name = f"{part}-{ranges[0]}-{ranges[-1]}"
    if len(ranges) > 2:
        name += f"-{zlib.crc32(np.asarray(ranges, np.int64).tobytes()):08x}"
    return f"{manifest.SHARDS_DIR}/{run}/{name}.parquet"


def write_block(batch: pa.Table, *, out: str, run: str, schema: pa.Schema, examples: int) -> pa.Table:
    """Write the accepted rows of each part in `batch` to their own shard file; return one record
    per part (RECORD_SCHEMA). Rows a retried read delivered twice are kept once."""
    records = []
    for part in pc.unique(batch["part"]).to_pylist():
        rows = batch.filter(pc.equal(batch["part"], part))
        index = rows["index"].to_numpy()
        end = index == -1
        part_rows = int(rows["part_rows"].to_numpy()[end][0]) if end.any() else -1
        index, first = np.unique(index[~end], return_index=True)
        data = rows.filter(pa.array(~end)).take(pa.array(first))  # unique by index, in order
        reasons = data["reject_reason"]
        ok = pc.equal(reasons, "")
        accepted = data.filter(ok)
        counts = pc.value_counts(reasons.filter(pc.invert(ok)))
        rejects = sorted(zip(counts.field(0).to_pylist(), counts.field(1).to_pylist()))
        keys: dict[str, list[str]] = {}
        for reason, _ in rejects:
            keys[reason] = data["key"].filter(pc.equal(reasons, reason))[:examples].to_pylist()
        ranges = _ranges(index)
        path = None
        if accepted.num_rows:
            path = shard_path(run, part, ranges)
            buf = io.BytesIO()
            pq.write_table(accepted.select(schema.names).cast(schema), buf, compression="zstd")
            storage.write_bytes(storage.join(out, path), buf.getvalue())
        records.append({"part": part, "ranges": ranges, "part_rows": part_rows, "rows": data.num_rows,
                        "accepted": accepted.num_rows, "rejects": rejects, "examples": json.dumps(keys),
                        "file": path})
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


def write_table(out: str, table: pa.Table, part: str = "table") -> None:
    """Publish `table` (already in a shard schema) as a one-part output: its file, then its
    manifest entry. For shards made outside `muse tokenize` (tests, benchmarks)."""
    path = f"{manifest.SHARDS_DIR}/{part}/{part}.parquet"
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(storage.join(out, path), buf.getvalue())
    manifest.write_entries(out, f"manifest-{part}.parquet", [
        {"part": part, "run": part, "source": "", "rows": table.num_rows, "accepted": table.num_rows,
         "rejects": [], "files": [path]}])


# ---------------------------------------------------------------------------------------------
# Reading (training side).


class NoTokenShards(FileNotFoundError):
    """A token output with no published shard: nothing to train on."""


class CorruptShard(ValueError):
    """A published token shard that does not read as Parquet (damaged after it was written)."""


def token_shard_files(uri: str) -> list[str]:
    """The published shards of the output at `uri`, from its manifest (never by listing), sorted."""
    files = pc.list_flatten(manifest.read_manifest(uri)["files"]).to_pylist()
    if not files and not storage.exists(uri):  # asked only when there is nothing to read
        raise NoTokenShards(f"{uri} does not exist: give the --output of a `muse tokenize` run")
    if not files:
        raise NoTokenShards(f"no published token shards under {uri} (no manifest entry names a file): tokenize "
                            "the corpus there first (muse tokenize)")
    return sorted(storage.join(uri, f) for f in files)


def shard_info(uri: str) -> dict:
    """The b"muse" metadata of the shards under `uri` (token sides, text storage, text dim), from the
    first shard's footer; CorruptShard when that shard does not read as one."""
    first = token_shard_files(uri)[0]
    fs, path = storage.filesystem(first)
    with read_as_shard(first, also=(KeyError, TypeError, ValueError)):  # (no b"muse" in it)
        return json.loads(pq.read_schema(path, filesystem=fs).metadata[b"muse"])


@contextlib.contextmanager
def read_as_shard(file: str, also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Around a read of the token shard `file`: an error that says the file is not one (or is one of
    `also`) is CorruptShard, naming it and the way out; a storage error stays itself (retried)."""
    try:
        yield
    except Exception as e:
        if not (is_bad_source(e) or isinstance(e, also)):
            raise
        raise CorruptShard(f"{file} is not a readable token shard ({type(e).__name__}: {str(e)[:200]}): restore "
                           "it, or tokenize the corpus again into a new output") from None


def load_token_shards(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Every published shard under `uri` as one pyarrow Table (no Ray): small corpora and tests."""
    return pa.concat_tables(iter_token_shards(uri, columns), promote_options="permissive")


def iter_token_shards(uri: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Each published shard under `uri` as a pyarrow Table, one at a time (no Ray)."""
    for f in token_shard_files(uri):
        fs, path = storage.filesystem(f)
        with read_as_shard(f):
            table = pq.read_table(path, filesystem=fs, columns=columns)
        yield table


def io_retry_args(retries: int) -> dict:
    """Ray remote args that run a read or write task again when it still fails on storage I/O after
    the filesystem's own retries. (Ray 2.60 has no named parameter for task retries, only these
    deprecated remote args.)"""
    return {"max_retries": retries, "retry_exceptions": [OSError]}


def read_datasource_retried(datasource, retries: int, **kwargs):
    """`ray.data.read_datasource` whose read tasks are retried on storage errors (`io_retry_args`),
    without Ray 2.60's deprecation warning for those args on every run (there is no other way yet)."""
    import warnings

    import ray

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        return ray.data.read_datasource(datasource, ray_remote_args=io_retry_args(retries), **kwargs)


def read_token_shards(uri: str, columns: list[str] | None = None, shuffle_seed: int | None = None):
    """Every published shard under `uri` as a Ray Dataset, streamed (what Ray Train workers consume).

    The files come from the manifest, so nothing lists storage or reads Parquet footers to plan the
    read (Ray Data's own `read_parquet` starts a pool of footer-reading actors for every pass over the
    data). With `shuffle_seed`, every pass reads the files in a new permutation drawn from the seed
    and the pass's index, so a restart from the same state repeats its order."""
    files = token_shard_files(uri)
    return read_datasource_retried(token_shard_datasource(files, columns, shuffle_seed), IO_TASK_RETRIES,
                                   override_num_blocks=len(files))


def pass_order(items: list, shuffle_seed: int | None, data_context=None) -> list:
    """The order in which one pass over a dataset reads its `items` (files, corpus parts): as given
    without a seed, else a permutation drawn from (`shuffle_seed`, the pass's index). Ray Data counts
    the passes over a dataset in the DataContext it gives `Datasource.get_read_tasks` (its own file
    shuffle uses that count), so every epoch, and the new pass a restarted worker group starts, gets a
    new permutation, and a restart from the same state repeats its order."""
    if shuffle_seed is None:
        return list(items)
    execution = getattr(data_context, "_execution_idx", 0) or 0
    return [items[i] for i in np.random.default_rng([shuffle_seed, execution]).permutation(len(items))]


def token_shard_datasource(files: list[str], columns: list[str] | None, shuffle_seed: int | None):
    """A Ray Data datasource with one read task per shard file, yielding one block per row group."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    def read(file: str):
        fs, path = storage.filesystem(file)
        with read_as_shard(file):  # a storage error stays itself, and its read task is retried
            with fs.open_input_file(path) as f:
                shard = pq.ParquetFile(f)
                for group in range(shard.num_row_groups):
                    yield shard.read_row_group(group, columns=columns)

    class TokenShards(Datasource):
        def get_name(self) -> str:
            return "TokenShards"

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            return [ReadTask(lambda f=f: read(f), BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                                                input_files=[f]),
                             per_task_row_limit=per_task_row_limit)
                    for f in pass_order(files, shuffle_seed, data_context)]

    return TokenShards()
