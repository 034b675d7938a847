"""Folder corpora planned as a stream, their image lists spilled to plan files (pipelines.folder_plan):
the same parts and rows as lists kept in memory, locally and on S3, in memory that does not grow with
the corpus."""

import tracemalloc

import pyarrow.parquet as pq
import pytest
from corpora import good, mixed_rows, write_folder

from muse import storage
from pipelines import folder_plan
from pipelines.config import ReaderConfig
from pipelines.readers import plan_parts, read_part


def rows_of(parts, cfg):
    return [r for part in parts for block in read_part(part, cfg) for r in block.to_pylist()]


def test_spilled_parts_are_the_parts_kept_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_plan, "PARTS_PER_PLAN_FILE", 2)  # several plan files
    corpus = tmp_path / "corpus"
    write_folder(corpus / "a", mixed_rows())
    write_folder(corpus / "b", [(f"g{i}", *good(i, 40)[:1], good(i, 40)[1].encode(), "") for i in range(5)])
    cfg = ReaderConfig(rows_per_part=3, block_rows=2)
    kept = plan_parts(str(corpus), "auto", cfg)
    spilled = plan_parts(str(corpus), "auto", cfg, spill=str(tmp_path / "plan"))
    assert len(kept) == len(spilled) >= 5
    assert [p.id for p in spilled] == [p.id for p in kept]
    assert [p.describe() for p in spilled] == [p.describe() for p in kept]
    assert all(p.items == () and p.plan for p in spilled) and all(p.items and p.plan is None for p in kept)
    files = sorted({p.plan for p in spilled})
    assert len(files) == -(-len(spilled) // 2)
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in files][:-1] == [2] * (len(files) - 1)
    assert [p.folder_items() for p in spilled] == [p.items for p in kept]
    assert rows_of(spilled, cfg) == rows_of(kept, cfg)


def test_spilled_plan_on_s3(s3_bucket, tmp_path):
    for d in range(3):
        write_folder(tmp_path / "corpus" / f"d{d}",
                     [(f"g{i}", *good(i, 40)[:1], good(i, 40)[1].encode(), "") for i in range(3 * d, min(3 * d + 3, 7))])
    for f in storage.list_files(str(tmp_path / "corpus")):
        storage.write_bytes(f"{s3_bucket}/corpus/{f[len(str(tmp_path / 'corpus')) + 1:]}", storage.read_bytes(f))
    cfg = ReaderConfig(rows_per_part=2)
    local = plan_parts(str(tmp_path / "corpus"), "auto", cfg)
    spilled = plan_parts(f"{s3_bucket}/corpus/", "auto", cfg, spill=f"{s3_bucket}/out/_plan")
    assert [p.id for p in spilled] == [p.id for p in local]  # relative ids: where the corpus lies does not matter
    assert all(p.plan.startswith(f"{s3_bucket}/out/_plan/") for p in spilled)
    got = rows_of(spilled, cfg)
    assert [r["key"] for r in got if r["index"] >= 0] == [f"{s3_bucket}/corpus/d{i // 3}/g{i}.img.png" for i in range(7)]
    assert all(r["reject_reason"] == "" and r["caption"] for r in got if r["index"] >= 0)


def _planning_peak(root, cfg, spill) -> int:
    tracemalloc.start()
    try:
        parts = plan_parts(str(root), "folder", cfg, spill=spill)
        return tracemalloc.get_traced_memory()[1], len(parts)
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("spilled", [True, False])
def test_planning_memory_does_not_grow_with_the_corpus_when_spilled(tmp_path, spilled):
    """Python memory at peak while planning 2,000 and then 8,000 images (empty files: planning does
    not read them) in folders of 100, more than the listing reads ahead. Spilled, the peak is the
    same for both; kept in memory, it grows with the corpus (the naive way, as the control)."""
    cfg = ReaderConfig(rows_per_part=250)
    peaks = []
    for n in (2_000, 8_000):
        root = tmp_path / f"c{n}"
        for i in range(n):
            d = root / f"{i // 100:05d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:07d}.jpg").touch()
            (d / f"{i:07d}.txt").touch()
        peak, parts = _planning_peak(root, cfg, str(tmp_path / f"plan{n}") if spilled else None)
        assert parts == n // 250
        peaks.append(peak)
    if spilled:
        assert peaks[1] < 1.3 * peaks[0], peaks
    else:
        assert peaks[1] > 3 * peaks[0], peaks
