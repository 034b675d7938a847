"""Training data as Ray Datasets (built on the driver) and the collate functions workers apply.

- Token shards (`pipelines.shards`, written by `muse tokenize`) for base and super-res: `tokens_lo`
  (and `tokens_hi`) int16 lists, and the caption as `text_ids` (re-encoded by the frozen text
  encoder on the worker) or as fp16 `text_emb` + `text_len`.
- Raw images for the VQGAN and decoder stages, through the tokenization pipeline's own readers and
  preprocessing (`pipelines.readers`, `pipelines.preprocess`), so a tokenizer is trained on exactly
  the pixels it will later encode.

Both streamed kinds are read in the same data order: the shard files, or the corpus's parts, in a
seeded permutation drawn afresh for every pass over the data (`pipelines.shards.pass_order`), from a
seed the driver derives from the run's newest checkpoint (`data_order_seed`).

Images that preprocessing rejects (a corrupt file, a damaged Parquet file or tar, too small) are left
out of the batches and counted by reason (`RejectTally`), once each however many passes read them: the
run's driver says how many were left out when it ends.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from muse import storage
from muse.data.images import uint8_to_tensor
from jobs.preflight import RunRefused
from pipelines import manifest, readers, shards
from pipelines.config import TokenizeConfig
from pipelines.rows import accepted
from pipelines.preprocess import preprocessed, preprocessed_local


def token_dataset(uri: str, *, hi: bool, cache: bool = False, shuffle_seed: int | None = None):
    """(Ray Dataset of the token shards under `uri`, their metadata). `cache` reads them once on the
    driver into the object store (small data) instead of streaming them from storage every epoch.

    Streamed shards are read in a seeded file permutation drawn afresh for every pass over the data
    (every epoch, and the new pass a restarted worker group starts; `pipelines.shards.pass_order`):
    `shuffle_seed`, which the driver derives from the run's newest checkpoint (`data_order_seed`), so
    a resumed run begins a new permutation instead of the corpus's first files. Rows within a file
    are mixed by each worker's local shuffle buffer (run.shuffle_buffer)."""
    info = shards.shard_info(uri)
    if hi and not info.get("tokens_hi_side"):
        raise RunRefused(f"the token shards under {uri} have no tokens_hi: tokenize with a vqgan_hi in the "
                         "model root to train super-res")
    columns = ["tokens_lo"] + (["tokens_hi"] if hi else [])
    columns += ["text_emb", "text_len"] if info.get("text_storage") == "embeddings" else ["text_ids"]
    if cache:
        import ray.data

        table = held_whole(shards.iter_token_shards(uri, columns), f"the token shards under {uri}")
        return ray.data.from_arrow(table), info
    return shards.read_token_shards(uri, columns, shuffle_seed), info


# run.cache_data holds the whole data in the driver's memory (then in the object store): past this it
# is refused, with a way out, instead of taking the driver down with it.
CACHE_MAX_BYTES = 4 << 30


def held_whole(tables: Iterable[pa.Table], what: str) -> pa.Table:
    """`tables` concatenated, or RunRefused as soon as they pass CACHE_MAX_BYTES."""
    held, total = [], 0
    for table in tables:
        total += table.nbytes
        if total > CACHE_MAX_BYTES:
            raise RunRefused(f"run.cache_data holds {what} in the driver's memory, and they are over "
                             f"{CACHE_MAX_BYTES / 2**30:g} GiB: set run.cache_data=false to stream them")
        held.append(table)
    return pa.concat_tables(held, promote_options="permissive") if held else pa.table({})


def token_rows(uri: str) -> int | None:
    """Rows of the published token shards under `uri`, from their manifest (no shard is read), or
    None when the manifest cannot say."""
    try:
        accepted = manifest.read_manifest(uri)["accepted"].to_pylist()
    except (OSError, ValueError, KeyError):
        return None
    return int(sum(n for n in accepted if n is not None))


def data_order_seed(run_seed: int, run_dir: str) -> int:
    """The file-order seed of a run (re)started now: run.seed mixed with the name of the checkpoint it
    resumes (`jobs.preflight.newest_checkpoint_state`: the latest Ray Train registered, not a newer
    folder an interrupted upload left), so each resume point reads a different permutation while a
    restart from the same checkpoint reads the same one."""
    from jobs.preflight import newest_checkpoint_state

    found = newest_checkpoint_state(run_dir) if storage.exists(run_dir) else None
    newest = found[0].rstrip("/").rsplit("/", 1)[-1] if found else ""
    digest = hashlib.sha256(f"{run_seed}:{newest}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def image_dataset(uri: str, size: int, cfg: TokenizeConfig, format: str = "auto", cache: bool = False,
                  spill: str | None = None, shuffle_seed: int | None = None,
                  count_rejects: Callable[[list], None] | None = None):
    """Ray Dataset with one column `pixels` (raw (size, size, 3) uint8 RGB bytes) of every accepted
    image of the corpus at `uri`, decoded, resized and centre-cropped as tokenization does it.
    `cache` runs the same reader and preprocessing functions once on the driver and keeps the pixels
    in the object store (small corpora) instead of decoding every image again each epoch. `spill`: a
    folder for a folder corpus's part lists (`pipelines.folder_plan`), which must outlive the dataset.
    `count_rejects` is called with the (part, index, reason, key) of the images left out (`RejectTally.add`).

    Streamed, the corpus's parts (`readers.plan_parts`) are read as `token_dataset` reads shard files:
    with `shuffle_seed` (`data_order_seed`), in a seeded permutation drawn afresh for every pass, so
    neither a new epoch, nor a restarted worker group, nor a resumed run starts at the corpus's first
    parts again; without, in the plan's order."""
    if cache:
        import ray.data

        return ray.data.from_arrow(read_images(uri, size, cfg, format, count_rejects))
    parts = readers.plan_parts(uri, format, cfg.reader, spill=spill)
    if not parts:
        raise RunRefused(f"no images in the corpus at {uri}")
    ds = preprocessed(parts, cfg, lo_size=size, hi_size=None, shuffle_seed=shuffle_seed)
    return ds.map_batches(_accepted_pixels, batch_format="pyarrow", batch_size=None,
                          fn_kwargs={"count_rejects": count_rejects})


@contextmanager
def run_images(uri: str, size: int, cfg: TokenizeConfig, format: str, cache: bool, run_dir: str, run_seed: int):
    """`image_dataset` for a training run: its parts read in the run's data order (`data_order_seed` of
    run.seed `run_seed` and the run's newest checkpoint in `run_dir`), and a folder corpus's part
    lists in `RUN_DIR/_plan` (the driver keeps ~200 bytes per part instead of ~630 per image),
    deleted when the run ends. A run that ends says how many images its data left out, by reason."""
    import ray

    from jobs.placement import on_this_node
    from jobs.progress import say

    seed = data_order_seed(run_seed, run_dir)  # before the plan is written into run_dir
    plan = storage.join(run_dir, manifest.PLAN_DIR)
    # Streamed, the tally is an actor that the read tasks count into; cached, the reads run here.
    tally = RejectTally() if cache else ray.remote(num_cpus=0)(RejectTally).options(**on_this_node()).remote()
    count = tally.add if cache else functools.partial(_count_in_actor, tally)
    try:
        yield image_dataset(uri, size, cfg, format, cache, spill=plan, shuffle_seed=seed, count_rejects=count)
        counts, examples, capped = tally.totals() if cache else ray.get(tally.totals.remote(), timeout=30)
        if counts:
            name = run_dir.rstrip("/").rsplit("/", 1)[-1]
            found = ", ".join(f"{r} {n:,} (e.g. {examples[r]})" for r, n in sorted(counts.items()))
            say(f"[{name}] left out of training, rejected as tokenization rejects them{' (at least)' if capped else ''}: "
                f"{found}; docs/tokenization.md, \"Reject reasons\", says what each means")
    finally:
        storage.delete(plan)
        if not cache:
            ray.kill(tally)


def read_images(uri: str, size: int, cfg: TokenizeConfig, format: str = "auto",
                count_rejects: Callable[[list], None] | None = None) -> pa.Table:
    """The `pixels` table of `image_dataset`, read in this process with the same functions (no Ray)."""
    parts = readers.plan_parts(uri, format, cfg.reader)
    blocks = preprocessed_local(parts, cfg, lo_size=size, hi_size=None)
    table = held_whole((_accepted_pixels(block, count_rejects) for block in blocks),
                       f"the images of {uri} at {size} px")
    if table.num_rows == 0:
        raise RunRefused(f"no image of the corpus at {uri} passed preprocessing")
    return table


def _accepted_pixels(batch: pa.Table, count_rejects: Callable[[list], None] | None = None) -> pa.Table:
    keep = accepted(batch)
    if count_rejects is not None:
        rejected = batch.filter(pc.and_(pc.invert(keep), pc.equal(batch["part_rows"], -1)))  # (not end rows)
        if rejected.num_rows:
            count_rejects(list(zip(*(rejected[c].to_pylist() for c in ("part", "index", "reject_reason", "key")))))
    return batch.filter(keep).select(["pixels_lo"]).rename_columns(["pixels"])


def _count_in_actor(tally, rejects: list) -> None:
    """`RejectTally.add` on the run's tally actor, waited for: a batch's images must not reach training
    before their rejects are counted."""
    import ray

    ray.get(tally.add.remote(rejects), timeout=60)


class RejectTally:
    """The images a training run's data left out, by reason, each counted once however many passes
    read it: rejects are known by (part, index in part). A Ray actor while the data streams. Past
    `MAX_KEYS` distinct rejects it stops counting, and says so (its totals are then a floor)."""

    MAX_KEYS = 200_000  # ~30 MB of keys

    def __init__(self):
        self.seen: set[tuple[str, int]] = set()
        self.counts: Counter = Counter()
        self.examples: dict[str, str] = {}  # the first sample's key by reason: where to look
        self.capped = False

    def add(self, rejects: list[tuple[str, int, str, str]]) -> None:
        """(part, index in part, reason, the sample's key) of each reject."""
        for part, index, reason, key in rejects:
            if (part, index) in self.seen:
                continue
            if len(self.seen) < self.MAX_KEYS:
                self.seen.add((part, index))
                self.counts[reason] += 1
                self.examples.setdefault(reason, key)
            else:
                self.capped = True

    def totals(self) -> tuple[dict[str, int], dict[str, str], bool]:
        """(count by reason, an example key by reason, whether counting stopped at MAX_KEYS)."""
        return dict(self.counts), dict(self.examples), self.capped


# ---------------------------------------------------------------------------------------------
# Collate (worker side): numpy batches from iter_torch_batches -> tensors.


def collate_images(batch: dict[str, np.ndarray], size: int) -> dict[str, torch.Tensor]:
    raw = list(batch["pixels"])
    pixels = np.frombuffer(b"".join(bytes(r) for r in raw), np.uint8).reshape(len(raw), size, size, 3)
    return {"images": uint8_to_tensor(pixels)}  # (B, 3, H, W) in [-1, 1]


def _stack(column: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(x) for x in column]) if column.dtype == object else np.asarray(column)


def pad_rows(rows: list[np.ndarray], dtype=np.int64) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length rows -> (padded (B, L, ...) tensor, mask (B, L) bool). L >= 1."""
    length = max(1, max(len(r) for r in rows))
    shape = (len(rows), length) + tuple(np.asarray(rows[0]).shape[1:])
    out = np.zeros(shape, dtype=dtype)
    mask = np.zeros((len(rows), length), dtype=bool)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
        mask[i, :len(r)] = True
    return torch.from_numpy(out), torch.from_numpy(mask)


def collate_tokens(batch: dict[str, np.ndarray], text_dim: int | None = None) -> dict[str, torch.Tensor]:
    """Token shard rows -> tokens_lo (B, n_lo) long, [tokens_hi (B, n_hi)], and the text as
    text_ids (B, L) long or text_emb (B, L, D) float, with text_mask (B, L) bool."""
    out = {k: torch.from_numpy(_stack(batch[k]).astype(np.int64)) for k in ("tokens_lo", "tokens_hi") if k in batch}
    if "text_emb" in batch:
        lengths = np.asarray(batch["text_len"]).astype(int)
        rows = [np.asarray(e, np.float32).reshape(n, -1) for e, n in zip(batch["text_emb"], lengths)]
        if text_dim is not None and rows and rows[0].shape[1] != text_dim:
            raise ValueError(f"text_emb rows have width {rows[0].shape[1]}, the model expects {text_dim}")
        out["text_emb"], out["text_mask"] = pad_rows(rows, np.float32)
    else:
        out["text_ids"], out["text_mask"] = pad_rows([np.asarray(r) for r in batch["text_ids"]])
    return out
