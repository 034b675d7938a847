"""The captions file of a folder corpus (pipelines.captions_file): streamed a chunk at a time into an
index on local disk, looked up a part at a time; the same captions as reading it whole, in memory
that does not grow with the file, on S3 through throttling too."""

import json
import os
import tempfile
import tracemalloc
from urllib.parse import urlparse

import pytest
from corpora import empty_folder_corpus, good
from fault_proxy import FaultProxy

from muse import storage
from pipelines import captions_file
from pipelines.captions_file import CaptionsIndex
from pipelines.config import ReaderConfig
from pipelines.readers import plan_parts

# Chosen to trip a careless chunked reader: a BOM, CRLF endings, a blank line, multi-byte characters
# that a small chunk cuts in half, a lone surrogate, a path listed twice, and no final newline.
RECORDS = [{"file": "a.png", "caption": "a red circle"}, {"file": "./b.png", "caption": "café ☕ au lait"},
           {"file": "c.png", "caption": None}, {"file": "d.png", "caption": ["x"]},
           {"file": "e.png", "caption": "bad \ud800"}, {"file": "a.png", "caption": "a red circle, again"},
           {"file": "sub/f.png", "caption": "by its path"}, {"file": "f.png", "caption": "by its name"},
           {"file": "g.png", "caption": "only by its name"}]
EXPECTED = {"a.png": ("a red circle, again", ""), "b.png": ("café ☕ au lait", ""), "c.png": (None, ""),
            "d.png": (None, "caption_not_text"), "e.png": ("bad \ud800", ""), "sub/f.png": ("by its path", ""),
            "other/f.png": ("by its name", ""), "deep/er/g.png": ("only by its name", ""), "h.png": (None, "")}


def write_jsonl(path) -> None:
    lines = [json.dumps(r) for r in RECORDS]
    path.write_bytes("\ufeff".encode() + "\r\n".join(lines[:3]).encode() + b"\r\n\r\n"
                     + "\n".join(lines[3:]).encode())


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_chunked_reads_give_the_captions_a_whole_read_gives(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(storage, "READ_CHUNK_BYTES", chunk or storage.READ_CHUNK_BYTES)
    write_jsonl(tmp_path / "captions.jsonl")
    with CaptionsIndex(str(tmp_path / "captions.jsonl"), ReaderConfig()) as index:
        assert index.records == len(RECORDS)
        assert dict(zip(EXPECTED, index.lookup(list(EXPECTED)))) == EXPECTED

    # CSV: a quoted caption spanning lines and a comma, a row without its caption field.
    (tmp_path / "meta.csv").write_text('path,text\nx.png,"two\nlines, and a comma"\nnull.png\ny.png,plain\n',
                                       encoding="utf-8")
    cfg = ReaderConfig(captions_file="meta.csv", file_field="path", caption_field="text")
    with CaptionsIndex(str(tmp_path / "meta.csv"), cfg) as index:
        assert index.lookup(["x.png", "null.png", "y.png"]) == [("two\nlines, and a comma", ""), (None, ""),
                                                                ("plain", "")]


def test_the_index_is_deleted_after_planning_and_after_a_bad_line(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    folders = []  # each index's folder, seen while it loads: (path, existed then)
    load = CaptionsIndex._load

    def spy(self, *args, **kwargs):
        folders.append((self.folder, os.path.isdir(self.folder)))
        return load(self, *args, **kwargs)

    monkeypatch.setattr(CaptionsIndex, "_load", spy)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.png").write_bytes(good(0, 40)[0])
    write_jsonl(corpus / "captions.jsonl")
    (part,) = plan_parts(str(corpus), "auto", ReaderConfig())
    assert [item[2] for item in part.folder_items()] == ["a red circle, again"]
    (corpus / "captions.jsonl").write_text('{"file": "a.png", "caption": "ok"}\n{"file": \n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        plan_parts(str(corpus), "auto", ReaderConfig())
    assert len(folders) == 2
    for folder, existed in folders:
        assert existed and os.path.dirname(folder) == str(tmp_path / "tmp")
        assert not os.path.exists(folder)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_planning_memory_does_not_grow_with_the_captions_file(tmp_path, monkeypatch):
    """Python memory at peak while planning 1,000 and then 4,000 images with a captions file (empty
    image files: planning does not read them), spilled: the same peak for both. The whole file in a
    dict, the naive way, grows with it (the control)."""
    monkeypatch.setattr(captions_file, "INSERT_BATCH", 100)
    monkeypatch.setattr(storage, "READ_CHUNK_BYTES", 4096)
    cfg = ReaderConfig(rows_per_part=100)
    peaks, naive = [], []
    for n in (1_000, 4_000):
        root = tmp_path / f"c{n}"
        empty_folder_corpus(root, n, sidecars=False)
        (root / "captions.jsonl").write_text("\n".join(
            json.dumps({"file": f"{i // 50:05d}/{i:07d}.jpg", "caption": f"caption number {i} " * 4})
            for i in range(n)))
        tracemalloc.start()
        try:
            parts = plan_parts(str(root), "folder", cfg, spill=str(tmp_path / f"plan{n}"))
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.reset_peak()
            held = tracemalloc.get_traced_memory()[0]
            whole = {r["file"]: r["caption"] for r in map(json.loads, (root / "captions.jsonl").open())}
            naive.append(tracemalloc.get_traced_memory()[1] - held)
        finally:
            tracemalloc.stop()
        assert sum(p.stop - p.start for p in parts) == n == len(whole)
        assert parts[-1].folder_items()[-1][2] == whole[f"{(n - 1) // 50:05d}/{n - 1:07d}.jpg"]
    assert peaks[1] < 1.3 * peaks[0], peaks
    assert naive[1] > 3 * naive[0], naive


def test_a_captions_file_on_a_throttled_s3_prefix(s3_server, s3_bucket, monkeypatch):
    """Read in 16-byte ranged GETs through a proxy that throttles 1 in 4 and drops 1 in 20: each
    chunk is retried on its own, and every caption arrives."""
    monkeypatch.setattr(storage, "READ_CHUNK_BYTES", 16)
    lines = [json.dumps(r) for r in RECORDS]
    storage.write_bytes(f"{s3_bucket}/corpus/captions.jsonl", "\n".join(lines).encode())
    up = urlparse(s3_server)
    proxy = FaultProxy((up.hostname, up.port), throttle=0.25, drop=0.05, seed=5)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    try:
        with CaptionsIndex(f"{s3_bucket}/corpus/captions.jsonl", ReaderConfig()) as index:
            got = index.lookup(list(EXPECTED))
    finally:
        proxy.close()
    assert dict(zip(EXPECTED, got)) == EXPECTED
    assert proxy.counts["throttled"] >= 5 and proxy.counts["dropped"] >= 1, proxy.counts


def test_a_rewritten_caption_changes_only_its_parts_id(tmp_path):
    """Cut by names, a part's id covers its captions from the captions file: a caption rewritten
    there (a corpus recaptioned in part) changes the id of the part that holds it, so a re-run refuses
    the output or, with --retire-changed, tokenizes that part again. Lines added for new images or
    the file's lines reordered change no finished part. Count cuts (outputs tokenized before) keep
    ids of names alone."""
    corpus = tmp_path / "corpus"
    empty_folder_corpus(corpus, 600, sidecars=False)
    lines = [{"file": f"{i // 50:05d}/{i:07d}.jpg", "caption": f"caption {i}"} for i in range(600)]

    def ids(records, cuts="names"):
        (corpus / "captions.jsonl").write_text("\n".join(map(json.dumps, records)))
        return [p.id for p in plan_parts(str(corpus), "folder", ReaderConfig(rows_per_part=100), folder_cuts=cuts)]

    before, by_count = ids(lines), ids(lines, "count")
    assert ids(lines[::-1]) == before
    edited = [dict(r, caption="a better caption") if i == 321 else r for i, r in enumerate(lines)]
    assert len(set(before) - set(ids(edited))) == 1
    assert ids(edited, "count") == by_count
    empty_folder_corpus(tmp_path / "more", 50, sidecars=False)
    (tmp_path / "more" / "00000").rename(corpus / "00099")
    grown = ids(lines + [{"file": f"00099/{i:07d}.jpg", "caption": f"new {i}"} for i in range(50)])
    assert len(set(before) - set(grown)) == 1 and len(grown) >= len(before)  # the last part, which ended with the corpus
