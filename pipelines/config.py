"""Typed configuration of the tokenization job (`muse tokenize --config YAML`).

The YAML holds only what differs from these defaults; unknown keys are rejected (`muse.config.load`).
Image sizes are not configured here: they come from the VQGAN configs in the model root, so the
pixels always match the tokenizer that encodes them. The defaults fit a laptop (CPU actors, one of
each); `configs/tokenize-gpu.yaml` is the shape of a GPU-cluster run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from muse.config import load

IO_TASK_RETRIES = 4  # the default of `io_task_retries`, also what training's shard reads get

TEXT_STORAGE = ("ids", "embeddings")


@dataclass(frozen=True)
class ReaderConfig:
    """Where the image bytes and captions are in each source format."""

    image_column: str = "image"  # Parquet: column of encoded image bytes
    caption_column: str = "caption"  # Parquet: column of captions (string or bytes)
    # Folder: a JSONL/CSV file mapping image files to captions (path relative to the folder, or a
    # URI). None: sidecar `<stem>.txt` files, or captions.jsonl / captions.csv when the folder has one.
    captions_file: str | None = None
    file_field: str = "file"  # captions file: field holding the image path relative to the folder
    caption_field: str = "caption"  # captions file: field holding the caption
    image_extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
    # Folders are cut into parts of about this many images (half to twice, ending at images chosen by
    # their names, so a change to the corpus moves only the parts around it); Parquet files into runs
    # of whole row groups of at most this many rows (a larger row group is a part of its own); one
    # WebDataset tar is one part. A part is the unit of resumption, published once.
    rows_per_part: int = 1000
    block_rows: int = 256  # rows per block a read task yields,
    block_bytes: int = 64 << 20  # or fewer: a block holds about this many bytes of images at most
    # A larger image or caption file (or tar member, or Parquet value) is rejected unread
    # (file_too_large): one huge file must not take a worker's memory. None: no limit.
    max_file_bytes: int | None = 256 << 20

    def __post_init__(self):
        if self.rows_per_part < 1 or self.block_rows < 1 or self.block_bytes < 1:
            raise ValueError("reader.rows_per_part, reader.block_rows and reader.block_bytes must be positive")
        if self.max_file_bytes is not None and self.max_file_bytes < 1:
            raise ValueError("reader.max_file_bytes must be positive (or null: no limit)")


PLACEMENTS = ("auto", "tasks", "actors")


@dataclass(frozen=True)
class PreprocessConfig:
    """Decoding limits, and where decoding runs: "tasks" (a CPU task pool of its own that fans out over
    every CPU of the cluster, what GPU actors need; read and write tasks beside it), "actors" (the
    image-tokenizer actors read, decode, encode and, with token ids, write whole parts: no object-store
    hop and no processes of their own, what CPU actors need), or "auto": actors when the
    image-tokenizer pool runs on CPU, tasks when it has GPUs."""

    min_side: int = 32  # images with a shorter side are rejected (too_small)
    max_pixels: int = 64_000_000  # images with more pixels are rejected unread (too_many_pixels)
    max_caption_chars: int = 1024  # longer captions are cut to this many characters
    batch_size: int = 32
    num_cpus: float = 1.0  # per preprocessing task and per read task (placement "tasks")
    # Memory Ray reserves per decoding task or actor (for scheduling; not a cap). Decoding peaks at
    # about 19 bytes per source pixel for an RGBA or 16-bit PNG (an 8000x8000 one, the max_pixels
    # default: ~1.2 GB), ~7 for an RGB PNG, far less for a JPEG (decoded at reduced scale). 512 fits
    # JPEGs and PNGs up to ~24 Mpx; for large RGBA/16-bit PNGs reserve 1536 or lower max_pixels
    # (docs/tokenization.md). An image that still runs out is an `out_of_memory` reject.
    memory_mb: int = 512
    placement: str = "auto"

    def __post_init__(self):
        if min(self.min_side, self.max_pixels, self.max_caption_chars, self.batch_size, self.memory_mb) < 1:
            raise ValueError("preprocess limits, batch_size and memory_mb must be positive")
        if self.max_pixels > PILLOW_MAX_PIXELS:
            raise ValueError(f"preprocess.max_pixels {self.max_pixels:,} is over Pillow's decompression-bomb limit "
                             f"({PILLOW_MAX_PIXELS:,} pixels), which refuses larger images whatever this says")
        if self.num_cpus <= 0:
            raise ValueError("preprocess.num_cpus must be > 0")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"preprocess.placement must be one of {PLACEMENTS}, got {self.placement!r}")


PILLOW_MAX_PIXELS = 178_956_970  # 2 x PIL.Image.MAX_IMAGE_PIXELS: Image.open raises past it


@dataclass(frozen=True)
class PoolConfig:
    """One actor pool: how many actors, what each claims, and the rows per model call."""

    min_size: int = 1
    max_size: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # > 0 runs the model on CUDA
    batch_size: int = 32

    def __post_init__(self):
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError(f"pool sizes need 1 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.batch_size < 1:
            raise ValueError("pool num_cpus/num_gpus must be >= 0 and batch_size >= 1")


@dataclass(frozen=True)
class TokenizeConfig:
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    # The VQGAN actor pool: each actor holds vqgan_lo and, when the root has one, vqgan_hi, so the
    # high-res pixels go to no actor that does not encode them. vqgan_hi sets only its model's batch,
    # which takes effect up to vqgan_lo's (the actor is handed vqgan_lo's batches).
    vqgan_lo: PoolConfig = field(default_factory=PoolConfig)
    vqgan_hi: PoolConfig = field(default_factory=PoolConfig)
    # The text-encoder pool, for text_storage "embeddings" only (ids are added by the preprocessing tasks).
    text: PoolConfig = field(default_factory=lambda: PoolConfig(num_cpus=0.5, batch_size=128))
    # "ids": T5 token ids trimmed to the true length (training re-encodes them with the frozen text
    # encoder); "embeddings": fp16 encoder output trimmed to the true length, plus the ids.
    text_storage: str = "ids"
    precision: str = "bf16"  # model dtype on CUDA ("bf16", "fp16", "fp32"); CPU always runs fp32
    write_cpus: float = 0.25  # per writer task: Parquet encoding and the upload of one block's shards
    # (none run where the CPU actors write their parts themselves)
    commit_seconds: float = 10.0  # the driver commits finished parts to the manifest this often
    # Ray retries a read or write task that still fails on storage I/O, a CPU actor redoes its part
    io_task_retries: int = IO_TASK_RETRIES
    examples_per_reason: int = 5  # example keys kept per reject reason in rejects.json
    ray_progress_bars: bool = False  # Ray Data's per-operator bars, beside the parts bar

    def __post_init__(self):
        if self.text_storage not in TEXT_STORAGE:
            raise ValueError(f"text_storage must be one of {TEXT_STORAGE}, got {self.text_storage!r}")
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be bf16, fp16 or fp32, got {self.precision!r}")
        if self.vqgan_hi != PoolConfig(batch_size=self.vqgan_hi.batch_size):
            raise ValueError("vqgan_hi sets only batch_size: both VQGANs run in each actor of the vqgan_lo pool "
                             "(the high-res pixels go to no other actor); set sizes, CPUs and GPUs in vqgan_lo")
        if self.write_cpus <= 0 or self.commit_seconds < 0 or self.io_task_retries < 0 \
                or self.examples_per_reason < 0:
            raise ValueError("write_cpus must be > 0; commit_seconds, io_task_retries and "
                             "examples_per_reason >= 0")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TokenizeConfig:
    """Defaults <- YAML at `path` <- `key.sub=value` overrides; unknown keys raise ValueError."""
    return load(TokenizeConfig, path, overrides)
