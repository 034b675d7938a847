"""Folder corpora planned as a stream, their image lists spilled to plan files (pipelines.folder_plan):
the same parts and rows as lists kept in memory, locally and on S3, in memory that does not grow with
the corpus."""

import os
import time
import tracemalloc
from urllib.parse import urlparse

import pyarrow.parquet as pq
import pytest
from corpora import empty_folder_corpus, good, mixed_rows, write_folder, write_parquet, write_tar
from fault_proxy import FaultProxy

from muse import storage
from pipelines import folder_plan
from pipelines.config import ReaderConfig
from pipelines.readers import plan_parts, read_part
from pipelines.rejects import CorpusRefused


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
    """The lowest Python peak of three plannings: how many folders the listing threads hold ahead at
    the peak depends on timing (up to LISTING_LOOKAHEAD of them, ~100 KB here), not on the corpus."""
    peaks = []
    for attempt in range(3):
        tracemalloc.start()
        try:
            parts = plan_parts(str(root), "folder", cfg, spill=spill and f"{spill}-{attempt}")
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    return min(peaks), parts


@pytest.mark.parametrize("spilled", [True, False])
def test_planning_memory_does_not_grow_with_the_corpus_when_spilled(tmp_path, spilled):
    """Python memory at peak while planning 1,000 and then 4,000 images (empty files: planning does
    not read them) in folders of 50, more than the listing reads ahead. Spilled, the peak is the
    same for both; kept in memory, it grows with the corpus (the naive way, as the control). Parts of
    ~250: what the driver keeps per part (~200 bytes on the heap, plus the Part) stays well inside
    the margin at 4x the parts, as it does at 1,000 images per part."""
    cfg = ReaderConfig(rows_per_part=250)
    peaks = []
    for n in (1_000, 4_000):
        root = tmp_path / f"c{n}"
        empty_folder_corpus(root, n)
        peak, parts = _planning_peak(root, cfg, str(tmp_path / f"plan{n}") if spilled else None)
        rows = cfg.rows_per_part
        assert sum(p.stop - p.start for p in parts) == n and n // (2 * rows) <= len(parts) <= 2 * n // rows
        peaks.append(peak)
    if spilled:
        assert peaks[1] < 1.3 * peaks[0], peaks
    else:
        assert peaks[1] > 3 * peaks[0], peaks


def s3_folder(bucket: str, n: int) -> tuple[str, set[str]]:
    for i in range(n):
        image, caption = good(i, 40)
        storage.write_bytes(f"{bucket}/corpus/{i // 10:02d}/g{i}.png", image)
        storage.write_bytes(f"{bucket}/corpus/{i // 10:02d}/g{i}.txt", caption.encode())
    return f"{bucket}/corpus", {f"{bucket}/corpus/{i // 10:02d}/g{i}.png" for i in range(n)}


def test_a_slow_throttled_prefix_plans_and_reads_every_sample_with_reads_in_flight(s3_server, s3_bucket,
                                                                                    monkeypatch):
    """Through a real proxy that holds every request 0.1 s, a part's 24 images and 24 captions (96
    requests: a HEAD and a GET each, 9.6 s one at a time) come in a few seconds, several files at
    once. Through one that throttles 1 in 5 and drops 1 in 20, listing, plan files and reads all
    retry (a throttled read of a tiny caption is the SDK's misfiled INTERNAL_FAILURE), and every
    sample arrives in the part's order."""
    corpus, keys = s3_folder(s3_bucket, 24)
    cfg = ReaderConfig(rows_per_part=100, block_rows=24)  # one part: a part is cut no shorter than half of this
    up = urlparse(s3_server)
    for faults in (False, True):
        proxy = FaultProxy((up.hostname, up.port), throttle=0.2 * faults, drop=0.05 * faults, seed=3,
                           latency=0.0 if faults else 0.1)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        try:
            (part,) = plan_parts(corpus, "auto", cfg, spill=f"{s3_bucket}/out/_plan{faults}")
            start = time.perf_counter()
            got = [r for r in rows_of([part], cfg) if r["index"] >= 0]
            seconds = time.perf_counter() - start
        finally:
            proxy.close()
        assert [r["key"] for r in got] == sorted(keys) and all(r["reject_reason"] == "" for r in got)
        if faults:
            assert proxy.counts["throttled"] >= 10 and proxy.counts["dropped"] >= 2, proxy.counts
        else:
            assert seconds < 4.0, seconds


def test_a_sample_plans_only_the_first_parts_and_lists_no_further(tmp_path, monkeypatch):
    """`max_images` (what a vocabulary sample asks for): the corpus's first parts, the same as a whole
    plan's, from a listing that stops there."""
    empty_folder_corpus(tmp_path / "corpus", 1_000)
    cfg = ReaderConfig(rows_per_part=100)
    whole = plan_parts(str(tmp_path / "corpus"), "auto", cfg)
    listed, scandir = [], os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: listed.append(p) or scandir(p))
    first = plan_parts(str(tmp_path / "corpus"), "auto", cfg, max_images=250)
    assert [p.id for p in first] == [p.id for p in whole[:3]]
    assert len(listed) <= 1 + 6 + storage.LISTING_LOOKAHEAD  # the root, the 6 folders used, a few ahead of 20


def test_name_cuts_move_only_the_parts_around_a_change(tmp_path):
    """Parts of about `rows_per_part` cut at images chosen by their names: a file removed or added
    in the middle, or a folder added at the end, changes the part that holds it and at most a couple
    after it. Cut by count (the control, what outputs tokenized before keep), a file removed in the
    middle changes every part after it."""
    corpus = tmp_path / "corpus"
    empty_folder_corpus(corpus, 3_000)
    cfg = ReaderConfig(rows_per_part=100)

    def ids(cuts="names"):
        return [p.id for p in plan_parts(str(corpus), "folder", cfg, folder_cuts=cuts)]

    whole = plan_parts(str(corpus), "folder", cfg)
    sizes = [p.stop - p.start for p in whole]
    assert all(50 <= n <= 200 for n in sizes[:-1]) and 70 <= sum(sizes) / len(sizes) <= 140, sizes
    before, by_count = ids(), ids("count")
    assert len(by_count) == 30
    for name in ("0001500.jpg", "0001500.txt"):
        (corpus / "00030" / name).unlink()
    assert 1 <= len(set(before) - set(ids())) <= 2
    assert len(set(by_count) - set(ids("count"))) >= 14
    (corpus / "00010" / "0000512b.jpg").touch()  # a file added in the middle
    assert len(set(before) - set(ids())) <= 4
    empty_folder_corpus(tmp_path / "more", 50)
    (tmp_path / "more" / "00000").rename(corpus / "00060")
    after = ids()
    assert len(after) >= len(before) and len(set(before) - set(after)) <= 6


def test_a_file_written_again_with_another_size_changes_only_its_parts_id(tmp_path):
    """Part ids cover the files' sizes as listed: an image replaced, a sidecar caption edited, a
    Parquet file or a tar written again, each with another size, changes the id of the part that
    reads it and no other. The same bytes written again change nothing, and ids planned without
    sizes (outputs tokenized before) do not see any of it."""
    cfg = ReaderConfig(rows_per_part=4)
    folder, parquet, tars = tmp_path / "folder", tmp_path / "parquet", tmp_path / "tars"
    rows = [(f"g{i}", good(i, 40)[0], good(i, 40)[1].encode(), "") for i in range(12)]
    write_folder(folder, rows)
    parquet.mkdir()
    tars.mkdir()
    for f in range(2):
        write_parquet(parquet / f"c{f}.parquet", rows[f * 6:f * 6 + 6], row_group_size=3)
        write_tar(tars / f"c{f}.tar", rows[f * 6:f * 6 + 6])

    def ids(root, sizes=True):
        return [p.id for p in plan_parts(str(root), "auto", cfg, sizes=sizes)]

    def changed(root, rewrite) -> int:
        """How many parts' ids changed; planned without sizes, none does."""
        before, before_unsized = ids(root), ids(root, sizes=False)
        rewrite()
        after, after_unsized = ids(root), ids(root, sizes=False)
        assert len(after) == len(before) >= 2 and after_unsized == before_unsized
        return sum(a != b for a, b in zip(before, after))

    image, sidecar = folder / "g5.img.png", folder / "g9.img.txt"
    assert changed(folder, lambda: image.write_bytes(image.read_bytes())) == 0
    assert changed(folder, lambda: image.write_bytes(good(99, 40)[0])) == 1
    assert changed(folder, lambda: sidecar.write_bytes(sidecar.read_bytes() + b" again")) == 1
    same = (parquet / "c1.parquet").read_bytes()
    assert changed(parquet, lambda: (parquet / "c1.parquet").write_bytes(same)) == 0
    assert changed(parquet, lambda: write_parquet(parquet / "c1.parquet", rows[:6], row_group_size=3)) == 2
    # A tar is padded to whole records of 10 KiB: a change smaller than that can keep its size.
    assert changed(tars, lambda: write_tar(tars / "c0.tar", rows[:2])) == 1


def test_files_a_folder_corpus_does_not_read_are_said_in_one_line(tmp_path, capsys):
    """A caption whose image has a type that is not read (`.heic`), or no image at all, and files of
    other types were passed over without a word: planning says what it did not read, and the parts
    are the same as without those files."""
    corpus = tmp_path / "corpus"
    write_folder(corpus, [(f"g{i}", *good(i, 40)[:1], good(i, 40)[1].encode(), "") for i in range(3)])
    cfg = ReaderConfig(rows_per_part=8)
    before = plan_parts(str(corpus), "auto", cfg)
    assert "not read" not in capsys.readouterr().out
    (corpus / "photo.heic").write_bytes(b"\0" * 10)
    (corpus / "photo.txt").write_text("a photo of a type not read")
    (corpus / "sub").mkdir()
    (corpus / "sub" / "lonely.TXT").write_text("no image of this name")
    (corpus / "README").write_text("about this corpus")
    (corpus / "captions.csv.bak").write_text("x")
    after = plan_parts(str(corpus), "auto", cfg)
    assert [p.id for p in after] == [p.id for p in before]
    assert capsys.readouterr().out.splitlines() == [
        f"[corpus] {corpus}: not read: 2 caption(s) with no image of their name beside them (photo.txt, "
        "sub/lonely.TXT); 3 file(s) of other types (no extension 1, .bak 1, .heic 1; reader.image_extensions "
        "lists the types read)"]
    for i in range(3):  # a folder with no image it reads: the refusal names what it has
        (corpus / f"g{i}.img.png").unlink()
    with pytest.raises(CorpusRefused, match=r"no Parquet files, tars or image files \(it holds .*\.heic 1"):
        plan_parts(str(corpus), "auto", cfg)
