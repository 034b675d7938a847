import numpy as np
import pyarrow as pa
import pytest

from corpora import expected_counts, mixed_rows
from pipelines.config import PreprocessConfig
from pipelines.preprocess import clean_caption, pack_pixels, preprocess_batch, unpack_pixels
from pipelines.rows import ROW_SCHEMA


def batch_of(rows, end_rows: int | None = None) -> pa.Table:
    cols = {
        "key": [r[0] for r in rows], "image": [r[1] for r in rows], "caption": [r[2] for r in rows],
        "part": ["p"] * len(rows), "index": list(range(len(rows))), "part_rows": [-1] * len(rows),
        "reject_reason": [""] * len(rows),
    }
    if end_rows is not None:
        for name, value in zip(ROW_SCHEMA.names, ("", b"", b"", "p", -1, end_rows, "")):
            cols[name].append(value)
    return pa.table(cols, schema=ROW_SCHEMA)


CFG = PreprocessConfig(min_side=16, max_pixels=50_000_000, max_caption_chars=40)


def test_every_bad_input_is_counted_by_reason_and_good_rows_survive():
    rows = mixed_rows()
    out = preprocess_batch(batch_of(rows, end_rows=len(rows)), lo_size=32, hi_size=64, cfg=CFG)
    assert out.num_rows == len(rows) + 1  # nothing dropped: rejects are counted downstream
    reasons = out["reject_reason"].to_pylist()
    assert reasons[:-1] == [r[3] for r in rows]
    got: dict[str, int] = {}
    for r in reasons:
        if r:
            got[r] = got.get(r, 0) + 1
    assert got == expected_counts(rows) == {
        "corrupt_image": 2, "too_small": 1, "too_many_pixels": 1, "empty_caption": 1, "caption_not_utf8": 1}
    assert "image" not in out.column_names
    for i, (name, *_rest, reason) in enumerate(rows):
        lo, hi = out["pixels_lo"][i].as_py(), out["pixels_hi"][i].as_py()
        if reason:
            assert lo == b"" and hi == b"", name
        else:
            assert len(lo) == 32 * 32 * 3 and len(hi) == 64 * 64 * 3, name
    end = out.slice(len(rows)).to_pylist()[0]
    assert end["part_rows"] == len(rows) and end["reject_reason"] == ""


def pixels(out, name: str, rows, size: int = 32) -> np.ndarray:
    i = [r[0] for r in rows].index(name)
    return np.frombuffer(out["pixels_lo"][i].as_py(), np.uint8).reshape(size, size, 3)


def test_odd_modes_become_the_right_rgb():
    rows = mixed_rows()
    out = preprocess_batch(batch_of(rows), lo_size=32, hi_size=None, cfg=CFG)
    assert "pixels_hi" not in out.column_names
    r, g, b = pixels(out, "cmyk", rows)[16, 16]
    assert r > 200 and g < 60 and b < 60  # CMYK red stays red
    assert abs(int(pixels(out, "png16", rows)[5, 5, 0]) - 85) <= 1  # 65535/3 scaled to 8 bits
    rgba = pixels(out, "rgba", rows)
    assert tuple(rgba[16, 4]) == (0, 0, 255) and tuple(rgba[16, 28]) == (255, 255, 255)  # alpha on white
    i = [r[0] for r in rows].index("good0")
    assert (out["width"][i].as_py(), out["height"][i].as_py()) == (80, 80)


def test_min_side_and_pixel_limit_come_from_config():
    rows = [r for r in mixed_rows() if r[0] == "good0"]  # 80 x 80
    strict = PreprocessConfig(min_side=100)
    assert preprocess_batch(batch_of(rows), lo_size=32, hi_size=None, cfg=strict)["reject_reason"][0].as_py() == "too_small"
    tight = PreprocessConfig(min_side=1, max_pixels=80 * 80 - 1)
    assert preprocess_batch(batch_of(rows), lo_size=32, hi_size=None, cfg=tight)["reject_reason"][0].as_py() == "too_many_pixels"


def test_running_out_of_memory_on_one_image_is_its_reject(monkeypatch):
    """A worker with a memory limit gets a MemoryError for one huge image: that row is rejected,
    the others in its batch are kept."""
    from pipelines import preprocess

    rows = [r for r in mixed_rows() if r[0] in ("good0", "good1", "good2")]
    real, calls = preprocess.to_uint8_array, []

    def fails_on_the_second(img, size):
        calls.append(size)
        if len(calls) == 2:
            raise MemoryError
        return real(img, size)

    monkeypatch.setattr(preprocess, "to_uint8_array", fails_on_the_second)
    out = preprocess_batch(batch_of(rows), lo_size=32, hi_size=None, cfg=CFG)
    assert out["reject_reason"].to_pylist() == ["", "out_of_memory", ""]
    assert [len(p) for p in out["pixels_lo"].to_pylist()] == [32 * 32 * 3, 0, 32 * 32 * 3]


def test_rows_the_reader_refused_pass_through_untouched():
    rows = [r for r in mixed_rows() if r[0] == "good1"]
    batch = batch_of(rows).set_column(6, "reject_reason", pa.array(["missing_caption"]))
    out = preprocess_batch(batch, lo_size=32, hi_size=None, cfg=CFG)
    assert out["reject_reason"].to_pylist() == ["missing_caption"] and out["pixels_lo"][0].as_py() == b""


def test_packed_pixels_are_the_same_pixels_and_smaller_only_where_it_pays():
    rows = [r for r in mixed_rows() if r[0] in ("good0", "rgba")]
    raw = preprocess_batch(batch_of(rows), lo_size=32, hi_size=64, cfg=CFG)
    packed = preprocess_batch(batch_of(rows), lo_size=32, hi_size=64, cfg=CFG, pack=True)
    for column, size in (("pixels_lo", 32), ("pixels_hi", 64)):
        for r, p in zip(raw[column].to_pylist(), packed[column].to_pylist()):
            assert len(r) == size * size * 3 and len(p) * 4 <= len(r) * 3  # flat synthetic images: packed
            assert unpack_pixels(p, size).tobytes() == r
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert pack_pixels(noise) == noise.tobytes()  # incompressible (photos): raw, unpacked for free
    assert (unpack_pixels(pack_pixels(noise), 16) == noise).all()


@pytest.mark.parametrize("raw, expected", [
    (b"  a red   circle\n", ("a red circle", "")),
    (b"\t\n ", ("", "empty_caption")),
    (b"\x00\x00", ("", "empty_caption")),
    (b"caf\xe9", ("", "caption_not_utf8")),
    ("x" * 100, ("x" * 40, "")),
    ("na\u00efve caf\u00e9 \u2603".encode(), ("na\u00efve caf\u00e9 \u2603", "")),
    ("\ufeffa red circle".encode(), ("a red circle", "")),  # a leading BOM is not caption text
    ("bad \ud800".encode("utf-8", "surrogatepass"), ("", "caption_not_utf8")),  # a lone surrogate
])
def test_clean_caption(raw, expected):
    raw = raw.encode() if isinstance(raw, str) else raw
    assert clean_caption(raw, 40) == expected
