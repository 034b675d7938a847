"""The order the image stages (VQGAN, decoder fine-tune) read their corpus in: its parts in a seeded
permutation, new for every pass and every resume point, as the token stages read their shards
(tests/jobs/test_data_order.py), so neither a new epoch nor a restarted or resumed run starts again
at the corpus's first parts."""

from __future__ import annotations

import io
import os
import re
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_preflight import write_checkpoint

from jobs.data import run_images
from muse import storage
from pipelines.config import PreprocessConfig, ReaderConfig, TokenizeConfig

PARTS, PER_PART, SIZE = 8, 2, 32
CFG = TokenizeConfig(reader=ReaderConfig(rows_per_part=PER_PART), preprocess=PreprocessConfig(memory_mb=64))


def shade(image: int) -> int:
    """The grey level of image number `image` (0 .. PARTS * PER_PART - 1): a flat image keeps it
    through resizing, so each row says which image, and so which part, it is."""
    return 10 + 12 * image


def png(image: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (48, 48), (shade(image),) * 3).save(out, format="PNG")
    return out.getvalue()


def write_corpus(uri: str, format: str) -> None:
    """PARTS parts of PER_PART images, named so that the plan lists them in image order."""
    os.makedirs(uri)
    images = range(PARTS * PER_PART)
    if format == "parquet":  # a file of one row group per part
        for part in range(PARTS):
            mine = images[part * PER_PART:(part + 1) * PER_PART]
            pq.write_table(pa.table({"image": [png(i) for i in mine], "caption": [f"grey {i}" for i in mine]}),
                           os.path.join(uri, f"part{part:02d}.parquet"))
    elif format == "webdataset":  # a tar per part
        for part in range(PARTS):
            with tarfile.open(os.path.join(uri, f"part{part:02d}.tar"), "w") as tar:
                for i in images[part * PER_PART:(part + 1) * PER_PART]:
                    for name, data in ((f"{i:03d}.png", png(i)), (f"{i:03d}.txt", f"grey {i}".encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    else:  # a folder: images with sidecar captions, cut into parts of about PER_PART by their names
        for i in images:
            with open(os.path.join(uri, f"{i:03d}.png"), "wb") as f:
                f.write(png(i))
            with open(os.path.join(uri, f"{i:03d}.txt"), "w") as f:
                f.write(f"grey {i}")


def image_order(ds) -> list[int]:
    """The number of each image, in the order the dataset yields them."""
    order = []
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for pixels in batch["pixels"].to_pylist():
            order.append(SHADES[np.frombuffer(pixels, np.uint8)[0]])
    return order


SHADES = {shade(i): i for i in range(PARTS * PER_PART)}
EVERY_IMAGE = list(range(PARTS * PER_PART))


def part_order(images: list[int]) -> list[int]:
    """The part each image came from, collapsed to the order in which parts were first read."""
    order = []
    for i in images:
        if not order or order[-1] != i // PER_PART:
            order.append(i // PER_PART)
    return order


def read(corpus: str, run_dir: str, cache: bool = False, seed: int = 0) -> list[int]:
    with run_images(corpus, SIZE, CFG, "auto", cache, run_dir, seed) as ds:
        return image_order(ds)


@pytest.fixture
def ordered():
    import ray.data

    context = ray.data.DataContext.get_current()
    before = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # the part order, unmixed
    yield
    context.execution_options.preserve_order = before


def test_an_image_stage_reads_a_new_part_permutation_every_pass_and_resume(ray_session, ordered, tmp_path):
    corpus, run_dir = str(tmp_path / "corpus"), str(tmp_path / "runs" / "vqgan_lo")
    write_corpus(corpus, "parquet")
    with run_images(corpus, SIZE, CFG, "auto", False, run_dir, 0) as ds:
        first_pass = image_order(ds)
        assert sorted(first_pass) == EVERY_IMAGE  # every image once per epoch
        first_parts = part_order(first_pass)
        assert sorted(first_parts) == list(range(PARTS))  # whole parts, each read once
        assert first_parts != list(range(PARTS))  # not the plan's order
        second_pass = image_order(ds)  # each later pass over the dataset (an epoch) draws a new permutation
        assert sorted(second_pass) == EVERY_IMAGE and part_order(second_pass) != first_parts
    assert read(corpus, run_dir) == first_pass  # the same seed and run folder: a restart repeats it
    assert part_order(read(corpus, run_dir, seed=1))[:2] != first_parts[:2]  # another run.seed, another order

    write_checkpoint(run_dir, "checkpoint_2026-12-02_12-00-00.000001", None)  # a resume point
    resumed = read(corpus, run_dir)
    assert sorted(resumed) == EVERY_IMAGE
    assert part_order(resumed)[:2] != first_parts[:2]  # the resumed run does not re-read the same first parts
    assert not storage.exists(storage.join(run_dir, "_plan"))  # run_images still cleans up after itself


@pytest.mark.parametrize("format", ["webdataset", "folder"])
def test_every_corpus_format_is_read_whole_in_a_seeded_order(ray_session, ordered, tmp_path, format):
    """Tars and folder corpora (whose part lists run_images spills into the run folder) are permuted
    by part too; the cached path (cache_data) still reads every image."""
    corpus, run_dir = str(tmp_path / "corpus"), str(tmp_path / "runs" / "decoder_vqgan_lo")
    write_corpus(corpus, format)
    streamed = read(corpus, run_dir)
    assert sorted(streamed) == EVERY_IMAGE and streamed != EVERY_IMAGE
    assert sorted(read(corpus, run_dir, cache=True)) == EVERY_IMAGE


def test_cached_data_past_the_cap_is_refused_with_the_way_out(tmp_path, monkeypatch):
    """run.cache_data holds everything in the driver: a corpus or token output past the cap is a
    refusal naming the setting, found while reading (before the rest is held), not a driver OOM."""
    from jobs import data
    from jobs.preflight import RunRefused

    corpus = str(tmp_path / "corpus")
    write_corpus(corpus, "parquet")
    monkeypatch.setattr(data, "CACHE_MAX_BYTES", SIZE * SIZE * 3 * 5)  # five images' pixels
    with pytest.raises(RunRefused, match="run.cache_data=false"):
        data.read_images(corpus, SIZE, CFG)
    monkeypatch.setattr(data, "CACHE_MAX_BYTES", 1 << 30)
    assert data.read_images(corpus, SIZE, CFG).num_rows == len(EVERY_IMAGE)


def test_the_images_left_out_are_counted_once_by_reason(ray_session, ordered, tmp_path, capsys):
    """A damaged Parquet file (its images) and a corrupt image are left out of the batches and counted
    by reason once, however many passes read them; the run says so when it ends, streamed or
    cached."""
    corpus, run_dir = str(tmp_path / "corpus"), str(tmp_path / "runs" / "vqgan_lo")
    write_corpus(corpus, "parquet")
    damaged = os.path.join(corpus, "part03.parquet")
    with open(damaged, "r+b") as f:
        f.truncate(os.path.getsize(damaged) // 2)
    pq.write_table(pa.table({"image": [png(5 * PER_PART), b"not an image"], "caption": ["grey", "broken"]}),
                   os.path.join(corpus, "part05.parquet"))  # its first image kept, its second corrupt
    kept = [i for i in EVERY_IMAGE if i // PER_PART != 3 and i != 5 * PER_PART + 1]
    # A damaged file is one reject (what it held is unknown), as tokenization counts it; each reason
    # names a sample (or file) of it.
    said = re.compile(r"\[vqgan_lo\] left out of training, rejected as tokenization rejects them: corrupt_image 1 "
                      r"\(e\.g\. \S+/part05\.parquet#1\), unreadable_source 1 \(e\.g\. \S+/part03\.parquet#error\); "
                      r"docs/tokenization\.md")
    with run_images(corpus, SIZE, CFG, "auto", False, run_dir, 0) as ds:
        assert sorted(image_order(ds)) == kept
        assert sorted(image_order(ds)) == kept  # a second epoch: its rejects are the same ones
        assert not said.search(capsys.readouterr().out)  # said when the run ends
    assert said.search(capsys.readouterr().out)
    with run_images(corpus, SIZE, CFG, "auto", True, run_dir, 0) as ds:  # cached: read once, here
        assert sorted(image_order(ds)) == kept
    assert said.search(capsys.readouterr().out)


def test_the_reject_tally_counts_each_reject_once_and_stops_at_its_cap(monkeypatch):
    from jobs.data import RejectTally

    monkeypatch.setattr(RejectTally, "MAX_KEYS", 3)
    tally = RejectTally()
    tally.add([("p0", 1, "corrupt_image", "a"), ("p0", 2, "too_small", "b"), ("p1", 1, "corrupt_image", "c")])
    tally.add([("p0", 1, "corrupt_image", "a")])  # the next pass's
    examples = {"corrupt_image": "a", "too_small": "b"}
    assert tally.totals() == ({"corrupt_image": 2, "too_small": 1}, examples, False)
    tally.add([("p2", 0, "too_small", "d")])  # a fourth: past the cap, a floor
    assert tally.totals() == ({"corrupt_image": 2, "too_small": 1}, examples, True)
