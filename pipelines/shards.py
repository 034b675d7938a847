"""Token shards: the Parquet files tokenization publishes and training reads, and their manifest.

    OUTPUT/
      tokens-<part id>.parquet   one per input part that kept any sample; the name depends only on
                                 the part's source (pipelines.readers.Part.id)
      _manifest/<part id>.json   written after the part's shard: rows, accepted, rejects by reason
      _job.json                  what produced the shards (models, sizes, text storage, limits)
      rejects.json               rejects of all finished parts by reason, with example keys
      manifest.json              all finished parts and totals, rewritten at the end of each run

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

Exactly once: a shard is written whole (temp + rename locally, one PUT on S3) and only then its
manifest entry; a part is finished when its entry exists. A crash between the two leaves a shard
that the re-run overwrites with the same rows under the same name, so no key is ever duplicated.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from muse import storage

FORMAT_VERSION = 1
SHARD_PREFIX = "tokens-"
MANIFEST_DIR = "_manifest"
JOB_FILE = "_job.json"
REJECTS_FILE = "rejects.json"
SUMMARY_FILE = "manifest.json"


def shard_name(part: str) -> str:
    return f"{SHARD_PREFIX}{part}.parquet"


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
# Publishing (driver side).


class ShardWriter:
    """Collects the tokenized rows of each part as they stream in; when a part's end row has arrived
    and every one of its rows with it, publishes the part on a thread: shard, then manifest entry.
    Rows seen twice (a retried read task) count once."""

    def __init__(self, out: str, schema: pa.Schema, sources: dict[str, dict], *, threads: int = 4,
                 examples_per_reason: int = 5, on_published: Callable[[dict], None] | None = None):
        self.out, self.schema, self.sources = out, schema, sources
        self.examples = examples_per_reason
        self.on_published = on_published
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="publish")
        self.buffers: dict[str, list[pa.Table]] = {}
        self.seen: dict[str, set[int]] = {}
        self.expected: dict[str, int] = {}
        self.pending: list[Future] = []
        self.entries: list[dict] = []

    def add(self, batch: pa.Table) -> None:
        for part in pc.unique(batch["part"]).to_pylist():
            rows = batch.filter(pc.equal(batch["part"], part))
            index = rows["index"].to_numpy()
            if (index == -1).any():
                self.expected[part] = int(rows["part_rows"].to_numpy()[index == -1][0])
            data = rows.filter(pc.not_equal(rows["index"], -1))
            if data.num_rows:
                self.buffers.setdefault(part, []).append(data)
                self.seen.setdefault(part, set()).update(index[index != -1].tolist())
            if part in self.expected and len(self.seen.get(part, ())) >= self.expected[part]:
                self._publish_async(part)
        self._raise_failures()

    def _publish_async(self, part: str) -> None:
        tables = self.buffers.pop(part, [])
        self.seen.pop(part, None)
        self.expected.pop(part)
        self.pending.append(self.pool.submit(self._publish, part, tables))

    def _publish(self, part: str, tables: list[pa.Table]) -> dict:
        entry = publish_part(self.out, part, tables, self.schema, self.sources.get(part, {}),
                             self.examples)
        if self.on_published is not None:
            self.on_published(entry)
        return entry

    def _raise_failures(self) -> None:
        still = []
        for f in self.pending:
            if f.done():
                self.entries.append(f.result())  # re-raises a failed publish here
            else:
                still.append(f)
        self.pending = still

    def abort(self) -> None:
        """Stop: let publishes already running finish (each is atomic), drop the rest."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> list[dict]:
        """Wait for every publish; raise if one failed or a part never completed."""
        try:
            for f in self.pending:
                self.entries.append(f.result())
            self.pending = []
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.expected or self.buffers:
            missing = sorted(set(self.expected) | set(self.buffers))
            raise RuntimeError(f"{len(missing)} part(s) ended incomplete, e.g. {missing[:3]}; re-run to finish")
        return self.entries


def publish_part(out: str, part: str, tables: list[pa.Table], schema: pa.Schema, source: dict,
                 examples: int = 5) -> dict:
    """Write one part's shard (accepted rows, in source order) and then its manifest entry."""
    rows = pa.concat_tables(tables, promote_options="permissive") if tables else None
    entry = dict(source) | {"part": part, "rows": 0, "accepted": 0, "rejects": {}, "examples": {},
                            "shard": None}
    if rows is not None and rows.num_rows:
        _, first = np.unique(rows["index"].to_numpy(), return_index=True)
        rows = rows.take(pa.array(first))  # unique by index, sorted by index
        reasons = rows["reject_reason"].to_pylist()
        keys = rows["key"].to_pylist()
        entry["rows"] = rows.num_rows
        entry["rejects"] = dict(Counter(r for r in reasons if r))
        for key, reason in zip(keys, reasons):
            if reason and len(entry["examples"].setdefault(reason, [])) < examples:
                entry["examples"][reason].append(key)
        accepted = rows.filter(pc.equal(rows["reject_reason"], ""))
        entry["accepted"] = accepted.num_rows
        if accepted.num_rows:
            table = accepted.select(schema.names).cast(schema)
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")
            storage.write_bytes(storage.join(out, shard_name(part)), buf.getvalue())
            entry["shard"] = shard_name(part)
    storage.write_text(storage.join(out, MANIFEST_DIR, f"{part}.json"), json.dumps(entry))
    return entry


def finished_parts(out: str) -> dict[str, dict]:
    """{part id: manifest entry} of every finished part under `out`."""
    entries = {}
    for f in storage.list_files(storage.join(out, MANIFEST_DIR)):
        if f.endswith(".json"):
            entry = json.loads(storage.read_text(f))
            entries[entry["part"]] = entry
    return entries


def summarize(out: str, entries: list[dict], examples: int = 5) -> dict:
    """Write rejects.json and manifest.json from all finished parts; return the totals."""
    by_reason: Counter = Counter()
    example_keys: dict[str, list[str]] = {}
    for e in sorted(entries, key=lambda e: e["part"]):
        by_reason.update(e["rejects"])
        for reason, keys in e["examples"].items():
            have = example_keys.setdefault(reason, [])
            have.extend(keys[: max(0, examples - len(have))])
    rejects = {"total": sum(by_reason.values()), "by_reason": dict(sorted(by_reason.items())),
               "examples": dict(sorted(example_keys.items()))}
    storage.write_text(storage.join(out, REJECTS_FILE), json.dumps(rejects, indent=1))
    totals = {
        "parts": len(entries), "rows": sum(e["rows"] for e in entries),
        "accepted": sum(e["accepted"] for e in entries), "rejected": rejects["total"],
        "shards": sorted(e["shard"] for e in entries if e["shard"]),
    }
    storage.write_text(storage.join(out, SUMMARY_FILE), json.dumps(totals, indent=1))
    return totals | {"rejects": rejects}


# ---------------------------------------------------------------------------------------------
# Reading (training side).


def token_shard_files(uri: str) -> list[str]:
    """The published shards under `uri`, sorted (temporary files are never listed)."""
    return [f for f in storage.list_files(uri, recursive=False)
            if f.rsplit("/", 1)[-1].startswith(SHARD_PREFIX) and f.endswith(".parquet")]


def shard_info(uri: str) -> dict:
    """The b"muse" metadata of the shards under `uri` (token sides, text storage, text dim)."""
    files = token_shard_files(uri)
    if not files:
        raise FileNotFoundError(f"no token shards ({SHARD_PREFIX}*.parquet) under {uri}")
    fs, path = storage.filesystem(files[0])
    return json.loads(pq.read_schema(path, filesystem=fs).metadata[b"muse"])


def load_token_shards(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Every shard under `uri` as one pyarrow Table (no Ray): small corpora and tests."""
    files = token_shard_files(uri)
    if not files:
        raise FileNotFoundError(f"no token shards ({SHARD_PREFIX}*.parquet) under {uri}")
    tables = []
    for f in files:
        fs, path = storage.filesystem(f)
        tables.append(pq.read_table(path, filesystem=fs, columns=columns))
    return pa.concat_tables(tables)


def read_token_shards(uri: str, columns: list[str] | None = None):
    """Every shard under `uri` as a Ray Dataset (streamed; what Ray Train workers consume)."""
    import ray

    files = token_shard_files(uri)
    if not files:
        raise FileNotFoundError(f"no token shards ({SHARD_PREFIX}*.parquet) under {uri}")
    fs, _ = storage.filesystem(files[0])
    paths = [storage.filesystem(f)[1] for f in files]
    return ray.data.read_parquet(paths, filesystem=fs, columns=columns)
