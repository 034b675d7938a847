import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpora import good, write_folder, write_parquet, write_tar
from muse import storage
from pipelines.config import ReaderConfig
from pipelines.corpus_data import read_corpus, sample_captions
from pipelines.readers import plan_parts, read_part
from pipelines.rejects import CorpusRefused


def rows_of(parts, cfg):
    """(data rows, end rows) of every part, as dicts."""
    data, ends = [], []
    for part in parts:
        for block in read_part(part, cfg):
            for row in block.to_pylist():
                (ends if row["index"] == -1 else data).append(row)
    return data, ends


def corpus(n: int):
    return [(f"s{i}", *good(i, 40), "") for i in range(n)]


def test_parquet_parts_keys_and_row_ranges(tmp_path):
    rows = [(name, image, caption.encode(), r) for name, image, caption, r in corpus(7)]
    write_parquet(tmp_path / "a.parquet", rows, "jpg", "txt", row_group_size=2)
    cfg = ReaderConfig(image_column="jpg", caption_column="txt", rows_per_part=3, block_rows=2)
    parts = plan_parts(str(tmp_path), "auto", cfg)
    # Whole row groups of 2, as many as fit in 3 rows: no group is read by two parts.
    assert [(p.start, p.stop) for p in parts] == [(0, 2), (2, 4), (4, 7)]
    assert len({p.id for p in parts}) == 3 and parts == plan_parts(str(tmp_path), "parquet", cfg)
    data, ends = rows_of(parts, cfg)
    path = str(tmp_path / "a.parquet")
    assert [r["key"] for r in data] == [f"{path}#{i}" for i in range(7)]
    assert [r["image"] for r in data] == [r[1] for r in rows]
    assert [r["caption"] for r in data] == [r[2] for r in rows]
    assert [e["part_rows"] for e in ends] == [2, 2, 3]
    assert all(r["reject_reason"] == "" and r["part_rows"] == -1 for r in data)

    # Smaller groups are gathered up to rows_per_part; a larger group is a part of its own.
    write_parquet(tmp_path / "a.parquet", rows, "jpg", "txt", row_group_size=1)
    assert [(p.start, p.stop) for p in plan_parts(str(tmp_path), "auto", cfg)] == [(0, 3), (3, 6), (6, 7)]
    write_parquet(tmp_path / "a.parquet", rows, "jpg", "txt", row_group_size=5)
    parts = plan_parts(str(tmp_path), "auto", cfg)
    assert [(p.start, p.stop) for p in parts] == [(0, 5), (5, 7)]
    assert [r["key"] for r in rows_of(parts, cfg)[0]] == [f"{path}#{i}" for i in range(7)]


def test_part_ids_do_not_depend_on_where_the_corpus_lies(tmp_path):
    """Ids, and so shard names and training's file order, are the same for a corpus copied or moved;
    "absolute" ids (outputs from before) hash the full paths."""
    rows = [(n, i, c.encode(), r) for n, i, c, r in corpus(5)]
    cfg = ReaderConfig(rows_per_part=2)
    ids = {}
    for place in ("a", "b/deeper"):
        root = tmp_path / place
        write_folder(root / "folder", rows)
        (root / "parquet").mkdir()
        (root / "tars").mkdir()
        write_parquet(root / "parquet" / "x.parquet", rows, row_group_size=2)
        write_tar(root / "tars" / "x.tar", rows)
        for form in ("folder", "parquet", "tars"):
            for scheme in ("relative", "absolute"):
                ids[place, form, scheme] = [p.id for p in plan_parts(str(root / form), "auto", cfg, ids=scheme)]
        # A single file is named by its basename, as it is inside its folder.
        ids[place, "file", "relative"] = [p.id for p in plan_parts(str(root / "parquet" / "x.parquet"), "auto", cfg)]
    for form in ("folder", "parquet", "tars", "file"):
        assert ids["a", form, "relative"] == ids["b/deeper", form, "relative"]
    assert ids["a", "file", "relative"] == ids["a", "parquet", "relative"]
    for form in ("folder", "parquet", "tars"):
        assert len(set(ids["a", form, "relative"])) == len(ids["a", form, "relative"]) >= 1
        assert not set(ids["a", form, "absolute"]) & set(ids["b/deeper", form, "absolute"])
        assert not set(ids["a", form, "absolute"]) & set(ids["a", form, "relative"])
    with pytest.raises(ValueError, match="ids must be one of"):
        plan_parts(str(tmp_path / "a" / "folder"), "auto", cfg, ids="hashed")


def test_parquet_string_captions_and_missing_values(tmp_path):
    image, caption = good(0, 40)
    table = pa.table({"image": pa.array([image, None, image], pa.binary()),
                      "caption": pa.array([caption, caption, None], pa.string())})
    pq.write_table(table, tmp_path / "b.parquet")
    data, _ = rows_of(plan_parts(str(tmp_path), "auto", ReaderConfig()), ReaderConfig())
    assert data[0]["caption"] == caption.encode()
    assert [r["reject_reason"] for r in data] == ["", "missing_image", "missing_caption"]


def test_parquet_without_the_columns_is_a_config_error(tmp_path):
    pq.write_table(pa.table({"img": [b"x"]}), tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="image_column"):
        plan_parts(str(tmp_path), "auto", ReaderConfig())


def test_any_parquet_file_without_the_columns_is_refused_at_planning(tmp_path):
    """One file without a column would be a single `unreadable_source` reject for all its rows, which
    would vanish from the totals: refused before any work, naming the file and its columns. A corpus
    whose only files are unreadable says so, naming them."""
    rows = [(n, i, c.encode(), r) for n, i, c, r in corpus(2)]
    write_parquet(tmp_path / "a_ok.parquet", rows)
    pq.write_table(pa.table({"image": [rows[0][1]] * 500, "text": ["a caption"] * 500}), tmp_path / "b_text.parquet")
    with pytest.raises(CorpusRefused, match=r"b_text\.parquet has no 'caption' column \(reader\.image_column / "
                                            r"reader\.caption_column\); its columns: \['image', 'text'\]$"):
        plan_parts(str(tmp_path), "auto", ReaderConfig())
    with pytest.raises(CorpusRefused, match=r"a_ok\.parquet has no 'text' column .*: \['image', 'caption'\]$"):
        plan_parts(str(tmp_path), "auto", ReaderConfig(caption_column="text"))

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for name in ("x.parquet", "y.parquet"):
        (garbage / name).write_bytes(b"PAR1 garbage")
    with pytest.raises(CorpusRefused, match=r"no Parquet file could be read: .*garbage/x\.parquet and 1 more "
                                            r"\(\w+: .*\); are they Parquet files"):
        plan_parts(str(garbage), "auto", ReaderConfig())


def test_corrupt_parquet_is_one_counted_row_not_a_crash(tmp_path):
    rows = [(n, i, c.encode(), r) for n, i, c, r in corpus(2)]
    write_parquet(tmp_path / "ok.parquet", rows)
    (tmp_path / "zz.parquet").write_bytes(b"PAR1 garbage")
    parts = plan_parts(str(tmp_path), "auto", ReaderConfig())
    data, ends = rows_of(parts, ReaderConfig())
    assert len(parts) == 2 and len(data) == 3
    assert data[-1]["reject_reason"] == "unreadable_source" and data[-1]["key"].endswith("zz.parquet#error")
    assert [e["part_rows"] for e in ends] == [2, 1]


def test_folder_with_sidecar_captions(tmp_path):
    rows = [(n, i, c.encode(), r) for n, i, c, r in corpus(5)]
    write_folder(tmp_path / "f", rows)
    (tmp_path / "f" / "nocap.png").write_bytes(rows[0][1])
    (tmp_path / "f" / "notes.json").write_text("{}")  # ignored
    cfg = ReaderConfig(rows_per_part=4)
    parts = plan_parts(str(tmp_path / "f"), "auto", cfg)
    assert {p.format for p in parts} == {"folder"}
    assert sum(len(p.items) for p in parts) == 6 and all(2 <= len(p.items) <= 8 for p in parts[:-1])
    data, ends = rows_of(parts, cfg)
    by_key = {r["key"].rsplit("/", 1)[-1]: r for r in data}
    assert by_key["nocap.png"]["reject_reason"] == "missing_caption"
    for name, image, caption, _ in rows:
        assert by_key[f"{name}.img.png"]["image"] == image
        assert by_key[f"{name}.img.png"]["caption"] == caption
    assert sum(e["part_rows"] for e in ends) == 6


def test_folder_with_captions_jsonl_and_csv(tmp_path):
    rows = [(n, i, c.encode(), r) for n, i, c, r in corpus(3)]
    write_folder(tmp_path / "j", rows, sidecar=False)
    data, _ = rows_of(plan_parts(str(tmp_path / "j"), "auto", ReaderConfig()), ReaderConfig())
    assert sorted(r["caption"] for r in data) == sorted(r[2] for r in rows)
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "x.png").write_bytes(rows[0][1])
    (folder / "meta.csv").write_text('path,text\nx.png,"a caption, with a comma"\n')
    cfg = ReaderConfig(captions_file="meta.csv", file_field="path", caption_field="text")
    data, _ = rows_of(plan_parts(str(folder), "auto", cfg), cfg)
    assert [r["caption"] for r in data] == [b"a caption, with a comma"]


def test_webdataset_txt_and_json_captions_and_missing_members(tmp_path):
    rows = [(n, i, c.encode(), r) for n, i, c, r in corpus(3)]
    write_tar(tmp_path / "a.tar", rows)
    write_tar(tmp_path / "b.tar", rows[:2], caption_ext="json")
    with tarfile.open(tmp_path / "c.tar", "w") as tar:  # a caption with no image
        info = tarfile.TarInfo("lonely.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    cfg = ReaderConfig()
    parts = plan_parts(str(tmp_path), "auto", cfg)
    assert [p.format for p in parts] == ["webdataset"] * 3
    data, ends = rows_of(parts, cfg)
    assert [e["part_rows"] for e in ends] == [3, 2, 1]
    a = str(tmp_path / "a.tar")
    assert [r["key"] for r in data[:3]] == [f"{a}#s0", f"{a}#s1", f"{a}#s2"]
    assert [r["caption"] for r in data[:5]] == [r[2] for r in rows] + [r[2] for r in rows[:2]]
    assert data[5]["reject_reason"] == "missing_image"


def test_truncated_tar_keeps_rows_before_the_damage(tmp_path):
    rows = [(n, i, c.encode(), r) for n, i, c, r in corpus(4)]
    write_tar(tmp_path / "t.tar", rows)
    with tarfile.open(tmp_path / "t.tar") as tar:
        cut = tar.getmember("s2.png").offset_data + 50  # inside the third image
    (tmp_path / "t.tar").write_bytes((tmp_path / "t.tar").read_bytes()[:cut])
    parts = plan_parts(str(tmp_path / "t.tar"), "auto", ReaderConfig())
    got, ends = rows_of(parts, ReaderConfig())
    assert got[-1]["reject_reason"] == "unreadable_source"
    kept = [r for r in got if not r["reject_reason"]]
    assert [r["image"] for r in kept] == [r[1] for r in rows[:2]]
    assert ends[0]["part_rows"] == len(got)


def test_parquet_on_s3(s3_bucket):
    rows = [(n, i, c.encode(), r) for n, i, c, r in corpus(3)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": [r[1] for r in rows], "caption": [r[2] for r in rows]}), buf)
    storage.write_bytes(f"{s3_bucket}/corpus/p.parquet", buf.getvalue())
    parts = plan_parts(f"{s3_bucket}/corpus", "auto", ReaderConfig())
    data, _ = rows_of(parts, ReaderConfig())
    assert [r["key"] for r in data] == [f"{s3_bucket}/corpus/p.parquet#{i}" for i in range(3)]
    assert [r["image"] for r in data] == [r[1] for r in rows]


def test_read_corpus_through_ray(ray_session, tmp_path):
    rows = [(n, i, c.encode(), r) for n, i, c, r in corpus(5)]
    write_tar(tmp_path / "a.tar", rows[:3])
    write_tar(tmp_path / "b.tar", rows[3:])
    got = read_corpus(f"file://{tmp_path}", "webdataset").take_all()
    assert sorted(r["caption"] for r in got) == sorted(r[2] for r in rows)
    assert set(got[0]) == {"key", "image", "caption"}


def test_sample_captions_stops_at_n_and_leaves_rejected_rows_out(ray_session, tmp_path):
    rows = [(n, i, c.encode(), r) for n, i, c, r in corpus(6)]
    rows[2] = (rows[2][0], None, rows[2][2], rows[2][3])  # a reject (no image) keeps its caption out
    write_tar(tmp_path / "a.tar", rows[:3])
    write_tar(tmp_path / "b.tar", rows[3:])
    captions = {r[2].decode() for i, r in enumerate(rows) if i != 2}
    got = sample_captions(f"file://{tmp_path}", 100, "webdataset")
    assert sorted(got) == sorted(captions) and all(isinstance(c, str) for c in got)
    few = sample_captions(f"file://{tmp_path}", 2, "webdataset")
    assert len(few) == 2 and set(few) <= captions


@pytest.mark.parametrize("form", ["folder", "parquet", "webdataset"])
def test_captions_only_reads_no_image(tmp_path, form):
    """What fits a vocabulary reads captions, not images: the folder's image files are deleted after
    planning (reading one would fail), and no image bytes come out of any form."""
    rows = [(n, i, c.encode(), r) for n, i, c, r in corpus(5)]
    rows[1] = (rows[1][0], b"", rows[1][2], "")  # an empty image: only decoding would call it corrupt
    if form == "folder":
        write_folder(tmp_path / "c", rows)
    elif form == "parquet":
        (tmp_path / "c").mkdir()
        write_parquet(tmp_path / "c" / "a.parquet", rows)
    else:
        (tmp_path / "c").mkdir()
        write_tar(tmp_path / "c" / "a.tar", rows)
    parts = plan_parts(str(tmp_path / "c"), form, ReaderConfig())
    if form == "folder":
        for f in (tmp_path / "c").glob("*.png"):
            f.unlink()
    got = [r for p in parts for b in read_part(p, ReaderConfig(), images=False) for r in b.to_pylist()
           if r["index"] != -1]
    assert all(r["image"] == b"" for r in got)
    kept = [r["caption"] for r in got if not r["reject_reason"]]
    assert sorted(kept) == sorted(r[2] for r in rows)


def test_bad_files_are_rejects_by_reason(tmp_path):
    """Permanent damage is a counted reject: no Parquet footer, corrupt compressed pages (pyarrow's
    bare OSError). (A file without the configured columns is refused at planning.)"""
    rows = [(n, i, c.encode(), r) for n, i, c, r in corpus(6)]
    write_parquet(tmp_path / "a_ok.parquet", rows)
    write_parquet(tmp_path / "b_corrupt.parquet", rows, row_group_size=2)
    data = (tmp_path / "b_corrupt.parquet").read_bytes()
    first = pq.ParquetFile(tmp_path / "b_corrupt.parquet").metadata.row_group(1).column(0)
    start = first.dictionary_page_offset or first.data_page_offset
    (tmp_path / "b_corrupt.parquet").write_bytes(data[:start + 40] + b"\x00" * 2000 + data[start + 2040:])
    (tmp_path / "d_garbage.parquet").write_bytes(b"PAR1 garbage")
    parts = plan_parts(str(tmp_path), "auto", ReaderConfig())
    data, ends = rows_of(parts, ReaderConfig())
    bad = {r["key"].rsplit("/", 1)[-1] for r in data if r["reject_reason"] == "unreadable_source"}
    assert bad == {"b_corrupt.parquet#error", "d_garbage.parquet#error"}
    assert [e["part_rows"] for e in ends] == [6, 1, 1]


@pytest.mark.parametrize("error", [
    KeyError("image"), ValueError("a bug"), TypeError("a bug"),  # code bugs fail the job
    OSError("When reading information for key 'c/p.parquet': AWS Error NETWORK_CONNECTION during "
            "HeadObject operation: curlCode: 56"),  # storage: retried by the filesystem, then Ray
    ConnectionResetError(104, "Connection reset by peer"),
])
def test_bugs_and_storage_errors_raise_instead_of_becoming_rejects(tmp_path, monkeypatch, error):
    from pipelines import readers

    rows = [(n, i, c.encode(), r) for n, i, c, r in corpus(2)]
    write_parquet(tmp_path / "a.parquet", rows)

    def broken(part, cfg, rows):
        yield None
        raise error

    from dataclasses import replace

    monkeypatch.setitem(readers.FILE_FORMATS, "parquet", replace(readers.FILE_FORMATS["parquet"], read=broken))
    with pytest.raises(type(error)):
        rows_of(plan_parts(str(tmp_path), "auto", ReaderConfig()), ReaderConfig())


@pytest.mark.parametrize("form", ["parquet", "folder", "webdataset"])
def test_a_block_holds_about_block_bytes_of_images(tmp_path, form):
    """Blocks are cut by bytes as well as rows: a worker holds a block, so photos of tens of MB must
    not make blocks of GBs. Every row still arrives, once, in order."""
    rows = [(name, image, caption.encode(), reason) for name, image, caption, reason in corpus(24)]
    image_bytes = max(len(r[1]) for r in rows)
    if form == "parquet":
        write_parquet(tmp_path / "c.parquet", rows, row_group_size=24)
    elif form == "webdataset":
        write_tar(tmp_path / "c.tar", rows)
    else:
        write_folder(tmp_path / "c", rows)
    uri = str(tmp_path / ("c" if form == "folder" else f"c.{'tar' if form == 'webdataset' else 'parquet'}"))
    cfg = ReaderConfig(block_rows=256, block_bytes=3 * image_bytes, rows_per_part=100)
    blocks = [b for part in plan_parts(uri, form, cfg) for b in read_part(part, cfg)]
    data = [b for b in blocks if b["index"].to_pylist() != [-1]]
    for b in data:  # a block is cut at the row that reaches block_bytes
        held = [len(i) + len(c) for i, c in zip(b["image"].to_pylist(), b["caption"].to_pylist())]
        assert sum(held[:-1]) < cfg.block_bytes, [b.num_rows for b in data]
    assert len(data) > 1 and sum(b.num_rows for b in data) == 24
    keys = [k for b in data for k in b["key"].to_pylist()]
    assert len(set(keys)) == 24


def test_a_new_reader_is_its_module_and_one_registry_entry(tmp_path, monkeypatch, capsys):
    """A format registered in `readers.FILE_FORMATS` alone is listed, told apart by "auto", planned,
    named in refusals and read: no other place in the readers knows the formats."""
    import base64

    from pipelines import readers
    from pipelines.rows import add_sample

    def plan(p: readers.FilePlan) -> list[readers.Part]:
        return [readers.Part(p.part_id(f), "lines", f) for f in p.files]

    def read(part, cfg, rows):  # one sample per line: base64 image, a tab, the caption
        for i, line in enumerate(storage.read_text(part.uri).splitlines()):
            image, _, caption = line.partition("\t")
            yield add_sample(rows, f"{part.uri}#{i}", base64.b64decode(image), caption)

    monkeypatch.setitem(readers.FILE_FORMATS, "lines",
                        readers.FileFormat("sample lists", ("samples",), plan, read))
    samples = corpus(3)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.samples").write_text(
        "".join(f"{base64.b64encode(image).decode()}\t{caption}\n" for _, image, caption, _ in samples))
    write_folder(tmp_path / "c", [(n, i, c.encode(), r) for n, i, c, r in samples[:1]])  # a stray image: said, not read
    cfg = ReaderConfig()
    assert "lines" in readers.formats()
    parts = plan_parts(str(tmp_path / "c"), "auto", cfg)
    assert [p.format for p in parts] == ["lines"]
    assert "is read as lines; not read: 1 image files" in capsys.readouterr().out
    assert parts == plan_parts(str(tmp_path / "c"), "lines", cfg)
    data, ends = rows_of(parts, cfg)
    assert [r["caption"].decode() for r in data] == [c for _, _, c, _ in samples]
    assert [r["image"] for r in data] == [image for _, image, _, _ in samples] and ends[0]["part_rows"] == 3
    (tmp_path / "d").mkdir()
    write_parquet(tmp_path / "d" / "x.parquet", [(n, i, c.encode(), r) for n, i, c, r in samples], "image", "caption")
    with pytest.raises(readers.NoInput, match=r"holds no sample lists \(1 Parquet files\)"):
        plan_parts(str(tmp_path / "d"), "lines", cfg)
