"""Bad inputs that one sample (or one file name) carries: each is a counted reject or a clear
planning error, never a job failure mid-run. Readers and preprocessing only, no Ray."""

import io
import json
import os
import shutil
import tarfile
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpora import good
from other_user import as_another_user
from muse import storage
from pipelines.config import PreprocessConfig, ReaderConfig
from pipelines.preprocess import preprocess_batch
from pipelines.readers import NoInput, plan_parts, read_part

CFG = PreprocessConfig(min_side=16)


def read(uri, cfg=ReaderConfig(), spill: str | None = None) -> list[dict]:
    """Every data row of the corpus at `uri` after preprocessing: key, caption, reject_reason (a folder
    planned with its image lists in plan files under `spill`, as `muse tokenize` plans one)."""
    out = []
    for part in plan_parts(str(uri), "auto", cfg, spill=spill):
        for block in read_part(part, cfg):
            done = preprocess_batch(block, lo_size=16, hi_size=None, cfg=CFG)
            out += [{k: r[k] for k in ("key", "caption", "reject_reason")}
                    for r in done.to_pylist() if r["index"] != -1]
    return out


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_bad_text_in_a_tar_is_a_counted_reject(tmp_path):
    image, caption = good(0, 40)
    # GNU format with latin-1 names: "café" is stored as the byte 0xe9, which is not UTF-8.
    with tarfile.open(tmp_path / "a.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        add(tar, "ok.png", image)
        add(tar, "ok.txt", caption.encode())
        add(tar, "surrogate.png", image)
        add(tar, "surrogate.json", json.dumps({"caption": "bad \ud800 caption"}).encode())  # valid JSON
        add(tar, "caf\xe9.png", image)
        add(tar, "caf\xe9.txt", b"a cafe")
        add(tar, "listed.png", image)
        add(tar, "listed.json", json.dumps({"caption": ["two", "captions"]}).encode())
        add(tar, "bom.png", image)
        add(tar, "bom.txt", "\ufeffa red circle".encode())
        add(tar, "broken.png", image)
        add(tar, "broken.json", b'{"caption": "cut sho')  # not JSON: not a missing caption either
        add(tar, "latin.png", image)
        add(tar, "latin.json", '{"caption": "caf\xe9"}'.encode("latin-1"))
    rows = {r["key"].split("#", 1)[1]: r for r in read(tmp_path)}
    assert rows["ok"]["reject_reason"] == "" and rows["ok"]["caption"] == caption
    assert rows["surrogate"]["reject_reason"] == "caption_not_utf8"
    assert rows["caf\\xe9"]["reject_reason"] == "" and rows["caf\\xe9"]["caption"] == "a cafe"  # key shows the byte
    assert rows["listed"]["reject_reason"] == "caption_not_text"
    assert rows["bom"]["caption"] == "a red circle"
    assert rows["broken"]["reject_reason"] == "caption_not_text"
    assert rows["latin"]["reject_reason"] == "caption_not_utf8"


def test_folder_sidecar_captions_match_their_extension_in_any_case(tmp_path):
    """`a.TXT` beside `a.png` is its caption, as `.PNG` is an image; the name before the extension
    still has to match exactly."""
    image, caption = good(0, 40)
    for name, text_name in (("upper", "upper.TXT"), ("mixed", "mixed.Txt"), ("plain", "plain.txt"),
                            ("Stem", "stem.txt")):
        (tmp_path / f"{name}.png").write_bytes(image)
        (tmp_path / text_name).write_text(f"{caption} {name}")
    rows = {r["key"].rsplit("/", 1)[1]: (r["reject_reason"], r["caption"]) for r in read(tmp_path)}
    assert rows == {"upper.png": ("", f"{caption} upper"), "mixed.png": ("", f"{caption} mixed"),
                    "plain.png": ("", f"{caption} plain"), "Stem.png": ("missing_caption", "")}


def test_a_key_repeated_back_to_back_in_a_tar_is_two_samples(tmp_path):
    """Tars appended to (`tar -r`) or concatenated can hold the same members twice in a row: the
    second is a sample of its own under a unique key, not written over the first."""
    first, second = good(0, 40), good(1, 40)
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        add(tar, "x.png", first[0])
        add(tar, "x.txt", b"the first")
        add(tar, "x.png", second[0])
        add(tar, "x.txt", b"the second")
        add(tar, "y.png", first[0])
        add(tar, "y.txt", b"after them")
    rows = read(tmp_path)
    assert [r["caption"] for r in rows] == ["the first", "the second", "after them"]
    assert len({r["key"] for r in rows}) == 3 and all(r["reject_reason"] == "" for r in rows)


def test_tar_fields_with_dots_empty_images_and_null_json_captions(tmp_path):
    """Members named as plain `tar` packs a folder of photos (`IMG.2021.png`: key `IMG`, field
    `2021.png`) are read by their last suffix; an empty image is corrupt, not missing; a .json
    whose "caption" is null falls back to its "text"."""
    image, caption = good(0, 40)
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        add(tar, "IMG.2021.png", image)
        add(tar, "IMG.2021.txt", caption.encode())
        add(tar, "exact.png", image)
        add(tar, "exact.seg.png", b"not this one")  # an exact field wins over a suffix
        add(tar, "exact.txt", caption.encode())
        add(tar, "empty.png", b"")
        add(tar, "empty.txt", caption.encode())
        add(tar, "described.png", image)
        add(tar, "described.json", json.dumps({"caption": None, "text": caption}).encode())
    rows = {r["key"].split("#", 1)[1]: (r["reject_reason"], r["caption"]) for r in read(tmp_path)}
    assert rows == {"IMG": ("", caption), "exact": ("", caption), "empty": ("corrupt_image", caption),
                    "described": ("", caption)}


def test_a_plain_tar_of_dotted_photo_names_is_a_sample_per_stem(tmp_path):
    """`IMG.2021.jpg`, `IMG.2022.jpg` ... share the WebDataset key `IMG`: as several stems each hold an
    image and a caption, each stem is its own sample (keyed by itself, the same on every read), and a
    stem with an image alone is counted missing_caption, not dropped. A WebDataset sample with an extra
    image field of no caption of its own stays one sample."""
    image, caption = good(0, 40)
    other, other_caption = good(1, 40)
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        add(tar, "IMG.2021.png", image)
        add(tar, "IMG.2021.txt", caption.encode())
        add(tar, "IMG.2022.png", other)
        add(tar, "IMG.2022.txt", other_caption.encode())
        add(tar, "IMG.2023.png", image)  # no caption
        add(tar, "2021.05.01.PNG", other)
        add(tar, "2021.05.01.txt", other_caption.encode())
        add(tar, "2021.05.02.png", image)
        add(tar, "2021.05.02.json", json.dumps({"caption": caption}).encode())
        add(tar, "a.png", image)
        add(tar, "a.seg.png", b"not this one")
        add(tar, "a.txt", caption.encode())
    want = [("IMG.2021", "", caption), ("IMG.2022", "", other_caption), ("IMG.2023", "missing_caption", ""),
            ("2021.05.01", "", other_caption), ("2021.05.02", "", caption), ("a", "", caption)]
    for _ in range(2):  # resume depends on keys: the same ones each read
        rows = [(r["key"].split("#", 1)[1], r["reject_reason"], r["caption"]) for r in read(tmp_path)]
        assert rows == want


def test_an_empty_image_file_is_corrupt_not_missing(tmp_path):
    image, caption = good(0, 40)
    for name, data in (("a", image), ("empty", b"")):
        (tmp_path / f"{name}.png").write_bytes(data)
        (tmp_path / f"{name}.txt").write_text(caption)
    assert [r["reject_reason"] for r in read(tmp_path)] == ["", "corrupt_image"]


def test_tar_members_that_are_neither_image_nor_caption_are_not_read(tmp_path, monkeypatch):
    image, caption = good(0, 40)
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        add(tar, "s0.png", image)
        add(tar, "s0.mp4", b"\0" * 100_000)
        add(tar, "s0.txt", caption.encode())
        add(tar, "s1.npy", b"\0" * 10)  # a sample of its own, with neither: missing image
    extracted = []
    real = tarfile.TarFile.extractfile

    def spy(self, member):
        extracted.append(member.name)
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    rows = read(tmp_path)
    assert sorted(extracted) == ["s0.png", "s0.txt"]
    assert [(r["key"].rsplit("#", 1)[1], r["reject_reason"]) for r in rows] == [("s0", ""), ("s1", "missing_image")]


def test_captions_file_values_that_are_not_text(tmp_path):
    image, _ = good(0, 40)
    for name in ("text", "null", "absent", "number", "list", "surrogate", "bom", "unlisted"):
        (tmp_path / f"{name}.png").write_bytes(image)
    lines = [{"file": "text.png", "caption": "a red circle"}, {"file": "null.png", "caption": None},
             {"file": "absent.png"}, {"file": "number.png", "caption": 3},
             {"file": "list.png", "caption": ["x", "y"]}, {"file": "surrogate.png", "caption": "bad \ud800"},
             {"file": "bom.png", "caption": "\ufeffa blue square"}]
    # The file itself starts with a BOM, as editors on Windows write it.
    (tmp_path / "captions.jsonl").write_bytes("\ufeff".encode() + "\n".join(map(json.dumps, lines)).encode())
    for spill in (None, f"{tmp_path}-plan"):  # held in the parts, and in plan files as tokenize plans
        rows = {r["key"].rsplit("/", 1)[1]: r for r in read(tmp_path, spill=spill)}
        reasons = {k.removesuffix(".png"): r["reject_reason"] for k, r in rows.items()}
        assert reasons == {"text": "", "null": "missing_caption", "absent": "missing_caption",
                           "number": "caption_not_text", "list": "caption_not_text", "surrogate": "caption_not_utf8",
                           "bom": "", "unlisted": "missing_caption"}
        assert rows["text.png"]["caption"] == "a red circle" and rows["bom.png"]["caption"] == "a blue square"
    # A CSV saved in cp1252: its bytes are no UTF-8, one sample's reject, also through a plan file.
    (tmp_path / "captions.jsonl").unlink()
    (tmp_path / "captions.csv").write_bytes(b"file,caption\ntext.png,a red circle\nnull.png,a caf\xe9 sign\n")
    rows = {r["key"].rsplit("/", 1)[1]: r["reject_reason"] for r in read(tmp_path, spill=f"{tmp_path}-plan2")}
    assert rows["text.png"] == "" and rows["null.png"] == "caption_not_utf8"

    # CSV: a row without its caption field (no comma) is a missing caption, not the text "None".
    (tmp_path / "captions.csv").write_text("file,caption\ntext.png,a red circle\nnull.png\n")
    rows = {r["key"].rsplit("/", 1)[1]: r["reject_reason"] for r in read(tmp_path)}
    assert rows["text.png"] == "" and rows["null.png"] == "missing_caption"


def test_a_malformed_captions_file_fails_planning_naming_file_and_line(tmp_path):
    (tmp_path / "a.png").write_bytes(good(0, 40)[0])
    path = tmp_path / "captions.jsonl"
    path.write_text('{"file": "a.png", "caption": "ok"}\n\n{"file": "b.png", "caption": "cut\n')
    with pytest.raises(ValueError, match=rf"{path}, line 3: not valid JSON"):
        plan_parts(str(tmp_path), "auto", ReaderConfig())
    path.write_text('{"file": "a.png", "caption": "ok"}\n["a.png", "ok"]\n')
    with pytest.raises(ValueError, match=rf"{path}, line 2: a record must be a JSON object, got list"):
        plan_parts(str(tmp_path), "auto", ReaderConfig())
    path.write_text('{"file": "a.png", "text": "ok"}\n')  # the configured caption_field is nowhere
    with pytest.raises(ValueError, match="no record has 'caption'"):
        plan_parts(str(tmp_path), "auto", ReaderConfig())


def test_non_utf8_file_names_are_skipped_and_named(tmp_path, capfd):
    image, caption = good(0, 40)
    root = os.fsencode(tmp_path)
    for name in (b"ok", b"caf\xe9"):
        open(root + b"/" + name + b".png", "wb").write(image)
        open(root + b"/" + name + b".txt", "wb").write(caption.encode())
    os.mkdir(root + b"/d\xe9j\xe0")
    open(root + b"/d\xe9j\xe0/inner.png", "wb").write(image)
    files = storage.list_files(str(tmp_path))
    assert files == [f"{tmp_path}/ok.png", f"{tmp_path}/ok.txt"]
    err = capfd.readouterr().err
    assert "skipped 3 path(s)" in err and "caf\\xe9.png" in err and "d\\xe9j\\xe0" in err
    assert [r["reject_reason"] for r in read(tmp_path)] == [""]


def test_what_this_user_may_not_read_is_named_or_a_counted_reject_never_the_end_of_the_job(capfd):
    """Shared corpora hold folders and files of other users. A folder the job's user may not list is
    skipped and named when planning ends; an image or a tar it may not read is a `permission_denied`
    reject. Both failed the whole job with a bare PermissionError."""
    image, caption = good(0, 40)
    corpus = tempfile.mkdtemp(dir="/tmp")  # not below pytest's folder, which only its owner may enter
    try:
        os.chmod(corpus, 0o755)
        for folder, name in (("open", "a"), ("open", "b"), ("closed", "c")):
            os.makedirs(os.path.join(corpus, folder), mode=0o755, exist_ok=True)
            open(os.path.join(corpus, folder, f"{name}.png"), "wb").write(image)
            open(os.path.join(corpus, folder, f"{name}.txt"), "w").write(caption)
        assert len(read(corpus)) == 3  # as root, before anything is closed: the code paths are warm
        os.chmod(os.path.join(corpus, "closed"), 0o700)
        os.chmod(os.path.join(corpus, "open", "b.png"), 0o600)
        capfd.readouterr()
        rows = as_another_user(lambda: read(corpus))
        assert [(r["key"].rpartition("/")[2], r["reject_reason"]) for r in rows] == [
            ("a.png", ""), ("b.png", "permission_denied")]
        out = capfd.readouterr().out
        assert f"[corpus] {corpus}: not read: 1 folder(s) this user may not list (permission denied) (closed)" in out

        tars = os.path.join(corpus, "tars")
        os.makedirs(tars, mode=0o755)
        for name in ("x", "y"):
            with tarfile.open(os.path.join(tars, f"{name}.tar"), "w") as tar:
                add(tar, f"{name}.png", image)
                add(tar, f"{name}.txt", caption.encode())
        os.chmod(os.path.join(tars, "y.tar"), 0o600)
        rows = as_another_user(lambda: read(tars))
        assert [r["reject_reason"] for r in rows] == ["", "permission_denied"]
        assert rows[1]["key"] == f"{tars}/y.tar#error"
    finally:
        shutil.rmtree(corpus)


def test_dangling_symlinks_are_missing_images_not_dropped(tmp_path):
    image, caption = good(0, 40)
    (tmp_path / "a.png").write_bytes(image)
    (tmp_path / "a.txt").write_text(caption)
    os.symlink(tmp_path / "nowhere.png", tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("a caption")
    os.symlink(tmp_path / "a.png", tmp_path / "c.png")  # a live link is an image like any other
    (tmp_path / "c.txt").write_text(caption)
    broken: list[str] = []
    assert storage.list_files(str(tmp_path), broken_links=broken) == sorted(
        f"{tmp_path}/{n}" for n in ("a.png", "a.txt", "b.txt", "c.png", "c.txt"))
    assert broken == [f"{tmp_path}/b.png"]
    rows = {r["key"].rsplit("/", 1)[1]: r["reject_reason"] for r in read(tmp_path)}
    assert rows == {"a.png": "", "b.png": "missing_image", "c.png": ""}
    # A dangling link as the sidecar caption: that sample's missing caption, not a failed read.
    (tmp_path / "d.png").write_bytes(image)
    os.symlink(tmp_path / "nowhere.txt", tmp_path / "d.txt")
    rows = {r["key"].rsplit("/", 1)[1]: r["reject_reason"] for r in read(tmp_path)}
    assert rows == {"a.png": "", "b.png": "missing_image", "c.png": "", "d.png": "missing_caption"}


def write(path, columns: dict) -> None:
    pq.write_table(pa.table(columns), path)


def test_parquet_hugging_face_image_structs_are_read(tmp_path):
    """`datasets`' Image feature: struct<bytes, path>; a null struct or one with a path only has no image."""
    image, caption = good(0, 40)
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    write(tmp_path / "hf.parquet", {
        "image": pa.array([{"bytes": image, "path": "a.png"}, None, {"bytes": None, "path": "c.png"}], kind),
        "caption": pa.array([caption, caption, caption], pa.large_string())})
    rows = read(tmp_path)
    assert [r["reject_reason"] for r in rows] == ["", "missing_image", "missing_image"]
    assert rows[0]["caption"] == caption


def test_parquet_text_as_categories_views_or_nulls_only_is_read(tmp_path):
    """What pandas, Polars and Arrow >= 16 writers make of text columns: dictionary-encoded strings
    (pandas' category), string and binary views, and a column of nulls only."""
    image, caption = good(0, 40)
    write(tmp_path / "category.parquet", {"image": pa.array([image, image]),
                                          "caption": pa.array([caption, None]).dictionary_encode()})
    write(tmp_path / "views.parquet", {"image": pa.array([image], pa.binary_view()),
                                       "caption": pa.array([caption], pa.string_view())})
    write(tmp_path / "no_captions.parquet", {"image": pa.array([image]), "caption": pa.nulls(1)})
    write(tmp_path / "no_images.parquet", {"image": pa.nulls(1), "caption": pa.array([caption])})
    rows = {r["key"].rsplit("/", 1)[1]: (r["reject_reason"], r["caption"]) for r in read(tmp_path)}
    assert rows == {"category.parquet#0": ("", caption), "category.parquet#1": ("missing_caption", ""),
                    "views.parquet#0": ("", caption), "no_captions.parquet#0": ("missing_caption", ""),
                    "no_images.parquet#0": ("missing_image", "")}


@pytest.mark.parametrize("image, caption, message", [
    (pa.array(["https://example.com/a.jpg"]), pa.array(["c"]), "does not fetch URLs"),
    (pa.array([1]), pa.array(["c"]), "type int64; it must hold encoded image bytes"),
    (pa.array([{"path": "a.png"}]), pa.array(["c"]), "without a binary 'bytes' field"),
    (pa.array([b"x"]), pa.array([["a", "b"]]), "holds lists"),
    (pa.array([b"x"]), pa.array([1.5]), "type double; it must be string or binary"),
])
def test_parquet_columns_of_the_wrong_type_are_refused_at_planning(tmp_path, image, caption, message):
    write(tmp_path / "a.parquet", {"image": image, "caption": caption})
    with pytest.raises(ValueError, match=message) as e:
        plan_parts(str(tmp_path), "auto", ReaderConfig())
    assert str(tmp_path / "a.parquet") in str(e.value)


def test_files_over_the_size_limit_are_rejected_unread(tmp_path, monkeypatch):
    """A 4 GiB "image" (sparse: no disk) is `file_too_large` from its listed size, without one byte
    read, at the default limit. With a small limit, a sidecar, an image grown since planning, a tar
    member and a Parquet value over it are rejected too, and the other samples are read."""
    image, caption = good(0, 40)
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.png").write_bytes(image)
        (folder / f"{name}.txt").write_text(caption)
    with open(folder / "huge.png", "wb") as f:
        f.truncate(4 << 30)
    (folder / "huge.txt").write_text(caption)
    opened = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri, limit=None: opened.append(uri) or real(uri, limit))
    rows = {r["key"].rsplit("/", 1)[1]: r["reject_reason"] for r in read(folder)}
    assert rows == {"a.png": "", "b.png": "", "c.png": "", "huge.png": "file_too_large"}
    assert not [u for u in opened if "huge" in u]
    (folder / "huge.png").unlink()

    small = ReaderConfig(max_file_bytes=len(image) + 10)
    (folder / "b.txt").write_text("x" * (len(image) + 11))
    parts = plan_parts(str(folder), "auto", small)
    with open(folder / "c.png", "ab") as f:  # grown after planning: the capped read finds it
        f.write(b"\0" * 11)
    got = {r["key"].rsplit("/", 1)[1]: r["reject_reason"] for part in parts for block in read_part(part, small)
           for r in block.to_pylist() if r["index"] != -1}
    assert got == {"a.png": "", "b.png": "file_too_large", "c.png": "file_too_large"}

    (tmp_path / "tars").mkdir()
    with tarfile.open(tmp_path / "tars" / "a.tar", "w") as tar:
        add(tar, "s0.png", image)
        add(tar, "s0.txt", caption.encode())
        add(tar, "s1.png", image + b"\0" * 11)
        add(tar, "s1.txt", caption.encode())
    assert [(r["key"].rsplit("#", 1)[1], r["reject_reason"]) for r in read(tmp_path / "tars", small)] == [
        ("s0", ""), ("s1", "file_too_large")]
    (tmp_path / "pq").mkdir()
    write(tmp_path / "pq" / "a.parquet", {"image": [image, image + b"\0" * 11], "caption": [caption, caption]})
    assert [r["reject_reason"] for r in read(tmp_path / "pq", small)] == ["", "file_too_large"]
    assert [r["reject_reason"] for r in read(tmp_path / "pq", ReaderConfig(max_file_bytes=None))] == ["", ""]


def test_the_size_limit_on_s3(s3_bucket):
    """On S3 the limit holds the same way: from the listing's sizes at planning, and a capped read."""
    image, caption = good(0, 40)
    for name, data in (("a.png", image), ("a.txt", caption.encode()), ("b.png", image + b"\0" * 11),
                       ("b.txt", caption.encode())):
        storage.write_bytes(f"{s3_bucket}/sized/{name}", data)
    small = ReaderConfig(max_file_bytes=len(image) + 10)
    rows = {r["key"].rsplit("/", 1)[1]: r["reject_reason"] for r in read(f"{s3_bucket}/sized", small)}
    assert rows == {"a.png": "", "b.png": "file_too_large"}
    assert storage.read_bytes(f"{s3_bucket}/sized/a.png", len(image)) == image
    with pytest.raises(storage.FileTooLarge):
        storage.read_bytes(f"{s3_bucket}/sized/a.png", len(image) - 1)


def test_a_format_that_finds_nothing_is_refused_and_auto_says_what_it_leaves(tmp_path, capsys):
    image, caption = good(0, 40)
    (tmp_path / "a.png").write_bytes(image)
    (tmp_path / "a.txt").write_text(caption)
    with pytest.raises(NoInput, match=r"--format webdataset: .* holds no tars \(1 image files\)"):
        plan_parts(str(tmp_path), "webdataset", ReaderConfig())
    write(tmp_path / "b.parquet", {"image": [image], "caption": [caption]})
    parts = plan_parts(str(tmp_path), "auto", ReaderConfig())
    assert [p.format for p in parts] == ["parquet"]
    assert "read as parquet; not read: 1 image files" in capsys.readouterr().out


def test_planning_notes_its_progress_while_listing_and_reading_footers(tmp_path, monkeypatch):
    """What keeps the driver's heartbeat (and the planning line) going on a corpus of many Parquet
    files or tars, where no folder part is cut."""
    from pipelines import readers

    monkeypatch.setattr(readers, "LISTED_NOTE", 2)
    image, caption = good(0, 40)
    for n in range(4):
        write(tmp_path / f"{n}.parquet", {"image": [image], "caption": [caption]})
    notes = []
    plan_parts(str(tmp_path), "auto", ReaderConfig(), progress=lambda images, parts, note=None: notes.append(note))
    assert notes == ["2 Parquet files and 0 tars listed", "4 Parquet files and 0 tars listed",
                     "2 of 4 Parquet footers read", "4 of 4 Parquet footers read"]


def test_every_reject_reason_is_explained_in_the_docs():
    """The docs' table is what a user reads a manifest's rejects by: none may be missing there, and
    decoding's reasons (the library's) are the ones listed."""
    import re

    from muse.data import images
    from pipelines.rejects import IMAGE_REASONS, REASONS

    assert IMAGE_REASONS == (images.CORRUPT, images.TOO_SMALL, images.TOO_MANY_PIXELS)
    docs = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "tokenization.md")).read()
    table = docs.split("## Reject reasons", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| (`.*?`(?:, `.*?`)*) \|", table, re.M))
    named = {name for cell in documented for name in re.findall(r"`(\w+)`", cell)}
    assert set(REASONS) <= named, set(REASONS) - named
