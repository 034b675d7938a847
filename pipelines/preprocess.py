"""Preprocessing: corpus rows -> fixed-size RGB pixels and clean captions, or a counted reject.

`preprocess_batch` is a plain function on a pyarrow batch (a Ray Data task; also callable without
Ray). For each data row it

- decodes the caption as UTF-8 (invalid bytes or a lone surrogate: `caption_not_utf8`), drops a
  leading BOM, strips it and caps its length (nothing left: `empty_caption`);
- decodes the image with `muse.data.images.decode_image_and_size`: EXIF orientation, every mode to
  RGB, alpha on white, a pixel limit checked from the header (`too_many_pixels`), a minimum side
  (`too_small`), anything undecodable or truncated (`corrupt_image`), and an image whose decoding
  or resizing runs out of memory (`out_of_memory`: a worker with a memory limit gets a MemoryError
  for that sample alone, which must not fail the job);
- resizes the shorter side and centre-crops to each tokenizer's size, as uint8 RGB in `pixels_lo`
  (and `pixels_hi`): raw bytes, or with `pack` (tokenization) LZ4-compressed where that saves a
  quarter or more (`pack_pixels`).

Why LZ4 and not PNG/WebP: pixels at the tokenizer's size are already downscaled. Flat or upscaled
images (synthetic corpora, small sources) compress 15-50x with LZ4 at ~0.1 ms; photos gain under
1.1x and ride raw, since a lossless image codec saves them at most 1.5x for 10-70 ms of CPU per
image (encode here, decode in the GPU actor), and CPU is what decoding already runs short of.

A rejected row is kept, with its reason and without pixels, so the consumer can count it against
its part; the model UDFs skip it (`pipelines.rows.accepted`). End rows (see `pipelines.readers`)
pass through unchanged.

`preprocessed` is the read -> preprocess chain as a Ray Dataset, `preprocessed_local` the same chain
in this process; tokenization and the tokenizer-training stages both read images through them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from muse.data.images import ImageRejected, decode_image_and_size, to_uint8_array
from pipelines import corpus_data, readers
from pipelines.config import PreprocessConfig, TokenizeConfig
from pipelines.rejects import CAPTION_NOT_UTF8, EMPTY_CAPTION, OUT_OF_MEMORY


def clean_caption(raw: bytes, max_chars: int) -> tuple[str, str]:
    """(caption, reject reason or "")."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "", CAPTION_NOT_UTF8
    text = " ".join(text.removeprefix("\ufeff").replace("\x00", " ").split())[:max_chars].strip()
    return text, ("" if text else EMPTY_CAPTION)


def pack_pixels(pixels: np.ndarray) -> bytes:
    """(size, size, 3) uint8 -> raw bytes, or LZ4 where that is at most 3/4 of raw (the length
    tells them apart: raw is exactly size*size*3 bytes)."""
    raw = pixels.tobytes()
    packed = pa.compress(raw, codec="lz4", asbytes=True)
    return packed if len(packed) * 4 <= len(raw) * 3 else raw


def unpack_pixels(data: bytes, size: int) -> np.ndarray:
    """The inverse of `pack_pixels` (raw bytes pass through): (size, size, 3) uint8."""
    n = size * size * 3
    if len(data) != n:
        data = pa.decompress(data, decompressed_size=n, codec="lz4", asbytes=True)
    return np.frombuffer(data, np.uint8).reshape(size, size, 3)


def preprocess_batch(batch: pa.Table, *, lo_size: int, hi_size: int | None,
                     cfg: PreprocessConfig, pack: bool = False, text_ids: str | None = None) -> pa.Table:
    """Corpus rows -> rows with `caption` (string), `width`, `height`, `pixels_lo`, `pixels_hi`
    ((size, size, 3) uint8 bytes, raw or with `pack` as `pack_pixels` makes them; empty when
    rejected) and `reject_reason` filled in; with `text_ids` (a text encoder's URI, whose tokenizer
    needs no model) also the captions' token ids, `text_ids` (list<int32>, null when rejected)."""
    n = batch.num_rows
    images = batch.column("image").to_pylist()
    raw_captions = batch.column("caption").to_pylist()
    part_rows = batch.column("part_rows").to_numpy()
    reasons = batch.column("reject_reason").to_pylist()
    captions, widths, heights = [""] * n, np.zeros(n, np.int32), np.zeros(n, np.int32)
    pixels_lo: list[bytes] = [b""] * n
    pixels_hi: list[bytes] = [b""] * n
    draft = max(lo_size, hi_size or 0)
    encode = pack_pixels if pack else np.ndarray.tobytes
    for i in range(n):
        if part_rows[i] != -1 or reasons[i]:
            continue  # an end row, or refused by the reader already
        captions[i], reasons[i] = clean_caption(raw_captions[i] or b"", cfg.max_caption_chars)
        if reasons[i]:
            continue
        try:
            img, (widths[i], heights[i]) = decode_image_and_size(
                images[i], max_pixels=cfg.max_pixels, min_side=cfg.min_side, draft_size=draft)
            pixels_lo[i] = encode(to_uint8_array(img, lo_size))
            if hi_size:
                pixels_hi[i] = encode(to_uint8_array(img, hi_size))
        except ImageRejected as e:
            reasons[i] = e.reason
        except MemoryError:  # one huge image is its own reject, not the job's failure
            pixels_lo[i] = pixels_hi[i] = b""
            reasons[i] = OUT_OF_MEMORY
    out = batch.drop_columns(["image", "caption", "reject_reason"])
    columns = {
        "caption": pa.array(captions, pa.string()),
        "reject_reason": pa.array(reasons, pa.string()),
        "width": pa.array(widths, pa.int32()),
        "height": pa.array(heights, pa.int32()),
        "pixels_lo": pa.array(pixels_lo, pa.binary()),
    }
    if hi_size:
        columns["pixels_hi"] = pa.array(pixels_hi, pa.binary())
    if text_ids:
        columns["text_ids"] = _caption_ids(text_ids, captions, reasons, part_rows)
    for name, col in columns.items():
        out = out.append_column(name, col)
    return out


def _caption_ids(uri: str, captions: list[str], reasons: list[str], part_rows: np.ndarray) -> pa.Array:
    from pipelines.models import cached_tokenizer, caption_ids, list_column

    ok = (part_rows == -1) & np.array([r == "" for r in reasons], bool)
    tokenizer, max_length = cached_tokenizer(uri)
    kept = [c for c, keep in zip(captions, ok) if keep]
    return list_column(caption_ids(tokenizer, max_length, kept) if kept else [], ok, pa.int32())


def preprocessed(parts: list[readers.Part], cfg: TokenizeConfig, lo_size: int, hi_size: int | None,
                 pack: bool = False, text_ids: str | None = None, shuffle_seed: int | None = None):
    """Ray Dataset of the corpus rows of `parts` after `preprocess_batch` (rejects and end rows kept);
    read tasks are retried `cfg.io_task_retries` times on storage errors. `shuffle_seed`: the parts are
    read in a new seeded permutation every pass (`corpus_data.read_parts`; training), else in order."""
    ds = corpus_data.read_parts(parts, cfg.reader, num_cpus=cfg.preprocess.num_cpus, retries=cfg.io_task_retries,
                                shuffle_seed=shuffle_seed)
    # Decoding is a task pool of its own that fans out over every CPU of the cluster. Its memory
    # reservation also keeps Ray from fusing it into the first model pool (Ray fuses ops with equal
    # remote args, as on CPU-only runs), which would cap decoding at that pool's size.
    return ds.map_batches(preprocess_batch, batch_format="pyarrow", batch_size=cfg.preprocess.batch_size,
                          num_cpus=cfg.preprocess.num_cpus, memory=cfg.preprocess.memory_mb * 2**20,
                          fn_kwargs={"lo_size": lo_size, "hi_size": hi_size, "cfg": cfg.preprocess, "pack": pack,
                                     "text_ids": text_ids})


def preprocessed_local(parts: list[readers.Part], cfg: TokenizeConfig, lo_size: int,
                       hi_size: int | None) -> Iterator[pa.Table]:
    """The blocks of `preprocessed`, read and preprocessed in this process (no Ray)."""
    for part in parts:
        for block in readers.read_part(part, cfg.reader):
            yield preprocess_batch(block, lo_size=lo_size, hi_size=hi_size, cfg=cfg.preprocess)
