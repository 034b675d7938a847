"""Small corpora built inside the tests: good synthetic images plus every kind of bad input."""

from __future__ import annotations

import io
import json
import random
import struct
import tarfile
import zlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from muse.data import synthetic


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def good(i: int, size: int = 80) -> tuple[bytes, str]:
    """A synthetic image and its caption."""
    scene, img = synthetic.sample(i, seed=11, size=size, allowed_pairs=synthetic.all_pairs())
    return encode(img), synthetic.caption(scene)


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A PNG header declaring width x height (900 Mpx) with a tiny body."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    data = encode(noise, "JPEG", quality=90)
    return data[: len(data) // 2]


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (72, 72), (0, 255, 255, 0)), "JPEG", quality=95)  # red


def png16() -> bytes:
    return encode(Image.fromarray(np.full((72, 72), 65535 // 3, dtype=np.uint16)))  # dark grey


def rgba_png() -> bytes:
    img = Image.new("RGBA", (72, 72), (0, 0, 255, 0))
    img.paste((0, 0, 255, 255), (0, 0, 36, 72))  # left half opaque blue, right half transparent
    return encode(img)


# (name, image bytes, caption bytes, expected reject reason or "")
def mixed_rows() -> list[tuple[str, bytes, bytes, str]]:
    rows = []
    for i in range(6):
        image, text = good(i)
        rows.append((f"good{i}", image, text.encode(), ""))
    image, text = good(99)
    rows += [
        ("cmyk", cmyk_jpeg(), b"a red square", ""),
        ("png16", png16(), b"a grey square", ""),
        ("rgba", rgba_png(), b"a blue square", ""),
        ("truncated", truncated_jpeg(), b"noise", "corrupt_image"),
        ("garbage", b"this is not an image", b"a red circle", "corrupt_image"),
        ("tiny", encode(Image.new("RGB", (1, 1))), b"a dot", "too_small"),
        ("bomb", png_bomb(), b"a huge image", "too_many_pixels"),
        ("empty_caption", image, b"   \n ", "empty_caption"),
        ("latin1_caption", image, "un cercle rouge \xe9t\xe9".encode("latin-1"), "caption_not_utf8"),
    ]
    return rows


def expected_counts(rows) -> dict[str, int]:
    counts: dict[str, int] = {}
    for *_, reason in rows:
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def write_folder(root, rows, sidecar: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    captions = []
    for name, image, caption, _ in rows:
        (root / f"{name}.img.png").write_bytes(image)  # extension lies for JPEGs: sniffed by content
        if sidecar:
            (root / f"{name}.img.txt").write_bytes(caption)
        else:
            captions.append({"file": f"{name}.img.png", "caption": caption.decode("utf-8", "replace")})
    if not sidecar:
        (root / "captions.jsonl").write_text("\n".join(json.dumps(c) for c in captions))


def empty_folder_corpus(root, n: int, per_folder: int = 50, sidecars: bool = True) -> None:
    """`n` empty image files (planning never opens them) in folders of `per_folder`, as downloaders
    lay them out (`00003/0000150.jpg`), each with an empty `.txt` sidecar unless not `sidecars`."""
    for i in range(n):
        folder = root / f"{i // per_folder:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:07d}.jpg").touch()
        if sidecars:
            (folder / f"{i:07d}.txt").touch()


def write_parquet(path, rows, image_column: str = "image", caption_column: str = "caption",
                  row_group_size: int | None = None) -> None:
    table = pa.table({image_column: pa.array([r[1] for r in rows], pa.binary()),
                      caption_column: pa.array([r[2] for r in rows], pa.binary())})
    pq.write_table(table, path, row_group_size=row_group_size)


def write_tar(path, rows, caption_ext: str = "txt") -> None:
    with tarfile.open(path, "w") as tar:
        for name, image, caption, _ in rows:
            members = [(f"{name}.png", image)] if image is not None else []  # None: no image member
            if caption_ext == "json":
                members.append((f"{name}.json", json.dumps({"caption": caption.decode("utf-8", "replace")}).encode()))
            else:
                members.append((f"{name}.{caption_ext}", caption))
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def shuffled(rows, seed: int = 0):
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def keys_once(table) -> Counter:
    """Each key of a shard table with its count, asserting none was written twice."""
    counts = Counter(table["key"].to_pylist())
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1][:3]
    return counts


def corpus_of_parts(tmp_path, n_files: int = 4, per_file: int = 6) -> tuple[str, set[str], dict]:
    """Parquet files of good rows plus a bad one each, in row groups of 4: rows_per_part 4 cuts each
    in two."""
    bad = {r[0]: r for r in mixed_rows() if r[3]}
    accepted, rejects = set(), Counter()
    folder = tmp_path / "corpus"
    folder.mkdir()
    for f in range(n_files):
        rows = [(f"g{f}-{i}", *good(f * 10 + i, 40), "") for i in range(per_file)]
        rows = [(n, img, cap.encode(), r) for n, img, cap, r in rows]
        rows.insert(2, bad["garbage"] if f % 2 else bad["empty_caption"])
        path = folder / f"c{f}.parquet"
        write_parquet(path, rows, row_group_size=4)
        for i, r in enumerate(rows):
            if r[3]:
                rejects[r[3]] += 1
            else:
                accepted.add(f"{path}#{i}")
    return str(folder), accepted, dict(rejects)
