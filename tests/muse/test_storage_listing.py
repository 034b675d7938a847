"""The streamed listing (`storage.iter_files`): the same files in the same order as sorting the whole
tree, locally and on S3, without holding the tree."""

import os

import pytest

from muse import storage

# Names chosen so that a folder walk that is not careful about "/" puts them out of order: "b.jpg"
# ('.' < '/') comes before folder "b/", which comes before "b0.jpg" ('/' < '0').
TREE = ["a.jpg", "b.jpg", "b/c.jpg", "b/c.txt", "b/d/e.jpg", "b-x.jpg", "b0.jpg", "c/0001.jpg",
        "c/0001.txt", "c/0002.jpg", "z.txt", "é.jpg"]


def test_local_walk_is_the_sorted_tree_and_gives_each_file_its_folder(tmp_path):
    for name in TREE:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * len(name))
    listed = list(storage.iter_files(str(tmp_path)))
    assert [f.uri for f in listed] == sorted(f"{tmp_path}/{n}" for n in TREE)
    # Each file comes with its size, and its folder's files with theirs (a sidecar's, for planning).
    assert {f.uri.removeprefix(f"{tmp_path}/"): f.size for f in listed} == {n: len(n) for n in TREE}
    siblings = {f.uri.removeprefix(f"{tmp_path}/"): f.siblings for f in listed}
    assert siblings["c/0001.jpg"] == {"0001.jpg": 10, "0001.txt": 10, "0002.jpg": 10}
    assert siblings["b/c.jpg"] == {"c.jpg": 7, "c.txt": 7} and siblings["b/d/e.jpg"] == {"e.jpg": 9}
    assert storage.list_files(str(tmp_path)) == [f.uri for f in listed]
    assert storage.list_files(str(tmp_path), recursive=False) == sorted(
        f"{tmp_path}/{n}" for n in TREE if "/" not in n)


def test_local_walk_follows_links_once_and_flags_dangling_ones(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "d", tmp_path / "d" / "loop")  # a folder that contains itself
    os.symlink(tmp_path / "gone.jpg", tmp_path / "d" / "b.jpg")
    listed = list(storage.iter_files(str(tmp_path)))
    assert [(f.uri.removeprefix(f"{tmp_path}/"), f.broken, f.size) for f in listed] == [
        ("d/a.jpg", False, 1), ("d/b.jpg", True, -1)]


def test_a_file_is_listed_alone_and_nothing_is_empty(tmp_path):
    (tmp_path / "one.parquet").write_bytes(b"xyz")
    assert [(f.uri, f.size) for f in storage.iter_files(str(tmp_path / "one.parquet"))] == [
        (f"{tmp_path}/one.parquet", 3)]
    assert list(storage.iter_files(str(tmp_path / "nothing"))) == []


def test_s3_walk_is_the_sorted_tree(s3_bucket):
    for name in TREE:
        storage.write_bytes(f"{s3_bucket}/corpus/{name}", b"x" * len(name))
    storage.write_bytes(f"{s3_bucket}/corpus-other/a.jpg", b"x")  # a sibling prefix is not below it
    listed = list(storage.iter_files(f"{s3_bucket}/corpus"))
    assert [f.uri for f in listed] == sorted(f"{s3_bucket}/corpus/{n}" for n in TREE)
    assert {f.uri.removeprefix(f"{s3_bucket}/corpus/"): f.size for f in listed} == {n: len(n) for n in TREE}
    assert {f.uri.rsplit("/", 1)[1] for f in listed if f.uri.endswith("0002.jpg")} == {"0002.jpg"}
    assert next(f.siblings for f in listed if f.uri.endswith("c/0002.jpg")) == {
        "0001.jpg": 10, "0001.txt": 10, "0002.jpg": 10}


def test_the_walk_streams_folders_instead_of_listing_the_tree_first(tmp_path, monkeypatch):
    """When the first file comes out, only the root and the folders listed ahead have been read."""
    for d in range(40):
        (tmp_path / f"{d:03d}").mkdir()
        for i in range(5):
            (tmp_path / f"{d:03d}" / f"{i}.jpg").write_bytes(b"x")
    listed, scandir = [], os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: listed.append(p) or scandir(p))
    walk = storage.iter_files(str(tmp_path))
    assert next(walk).uri == f"{tmp_path}/000/0.jpg"
    assert len(listed) <= 1 + storage.LISTING_LOOKAHEAD
    assert 1 + sum(1 for _ in walk) == 200 and len(listed) == 41


@pytest.mark.parametrize("lookahead", [1, 3])
def test_any_lookahead_gives_the_same_walk(tmp_path, monkeypatch, lookahead):
    for name in TREE:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.setattr(storage, "LISTING_LOOKAHEAD", lookahead)
    assert [f.uri for f in storage.iter_files(str(tmp_path))] == sorted(f"{tmp_path}/{n}" for n in TREE)
