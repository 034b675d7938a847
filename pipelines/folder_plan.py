"""Planning a folder corpus without holding it on the driver.

A folder corpus is cut into parts of about `rows_per_part` images in sorted order, ending at images
chosen by a hash of their names (`ends_part`), so that a change to the corpus moves only the parts
around it. The images are listed as a stream (`muse.storage.iter_files`: one folder at a time, a
few listed ahead), and a part's image list, once cut, goes to a *plan file* (`PlanSpill`) instead
of staying in the driver's memory: the driver keeps each part's id and where its list lies, ~200
bytes per part of 1,000 images, where it kept ~630 bytes per image. The read task (or CPU actor)
reads its part's list back (`part_items`).

Plan files are Parquet, one row group per part, `PARTS_PER_PLAN_FILE` parts per file, under a
folder the caller owns (tokenization: its run's folder, deleted when the run ends and, if the driver
died, by the next run's cleanup). Without a spill folder the lists stay in the parts, for one-off
readers of small corpora (a vocabulary sample, an evaluation sample).

A captions file (`captions.jsonl` / `.csv`) is streamed into an index on the driver's local disk
(`pipelines.captions_file`) and looked up a part at a time, as the part is cut.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq

from muse import storage
from pipelines.captions_file import CAPTIONS_FILE_NAMES, CaptionsIndex, captions_file
from pipelines.rejects import FILE_TOO_LARGE, MISSING_IMAGE

PARTS_PER_PLAN_FILE = 64

# One row per image; paths relative to the corpus folder. A caption is stored as UTF-8 with surrogates
# passed through: a captions file's bad bytes (and lone surrogates) come back as they were read, for
# preprocessing to reject as caption_not_utf8.
PLAN_SCHEMA = pa.schema([("image", pa.string()), ("caption_file", pa.string()), ("caption", pa.binary()),
                         ("reason", pa.string())])

Item = tuple[str, "str | None", "str | None", str]  # (image uri, caption uri, inline caption, reason)


class PlanSpill:
    """Writes parts' image lists to Parquet plan files under `folder`, one row group per part."""

    def __init__(self, folder: str, root: str):
        self.folder, self.root = folder, root
        self.pending: list[pa.Table] = []
        self.files = 0

    def add(self, items: Iterable[Item], names: list[str]) -> tuple[str, int]:
        """Store one part's items (`names`: their images' paths below the corpus, as planning has them);
        returns (plan file, row group) where `part_items` finds them."""
        _, caption_file, caption, reason = zip(*items)
        self.pending.append(pa.table([
            names, [None if c is None else relative(self.root, c) for c in caption_file],
            [None if c is None else c.encode("utf-8", "surrogatepass") for c in caption], list(reason)],
            schema=PLAN_SCHEMA))
        where = (self._name(self.files), len(self.pending) - 1)
        if len(self.pending) == PARTS_PER_PLAN_FILE:
            self.flush()
        return where

    def flush(self) -> None:
        if not self.pending:
            return
        fs, path = storage.filesystem(self._name(self.files))
        if not storage.is_s3(self.folder):
            storage.makedirs(self.folder)
        with fs.open_output_stream(path) as out, pq.ParquetWriter(out, PLAN_SCHEMA) as writer:
            for table in self.pending:
                writer.write_table(table, row_group_size=max(1, table.num_rows))
        self.pending, self.files = [], self.files + 1

    def _name(self, n: int) -> str:
        return storage.join(self.folder, f"plan-{n:06d}.parquet")


def relative(root: str, uri: str) -> str:
    """`uri` below `root` (listed from it, so in the same spelling), without building a client."""
    return uri[len(root):].lstrip("/")


def part_items(root: str, plan: str, group: int) -> tuple[Item, ...]:
    """A spilled part's items, read back from its row group."""
    fs, path = storage.filesystem(plan)
    with fs.open_input_file(path) as fh:
        table = pq.ParquetFile(fh).read_row_group(group)
    root = root.rstrip("/")
    image, caption_file, caption, reason = (table[n].to_pylist() for n in PLAN_SCHEMA.names)
    return tuple(
        (f"{root}/{i}", None if f is None else f"{root}/{f}",
         None if c is None else c.decode("utf-8", "surrogatepass"), r)
        for i, f, c, r in zip(image, caption_file, caption, reason))


FOLDER_CUTS = ("names", "count")


class PassedOver:
    """The files of a folder corpus that are neither an image it reads nor an image's caption, counted
    as the corpus is listed (a few names kept): a caption whose image has a type that is not read
    (`.heic`, `.avif`, a typo), or images of such a type, were passed over without a word."""

    MAX_TYPES = 64  # counted by extension up to this many kinds; the rest together

    def __init__(self, root: str, image_extensions: Iterable[str], captions_file: str | None = None):
        self.root, self.image_extensions = root, set(image_extensions)
        self.captions_names = {*CAPTIONS_FILE_NAMES, (captions_file or "").rpartition("/")[2]}
        self.types: Counter[str] = Counter()
        self.orphans, self.examples = 0, []
        self.skipped: dict[str, tuple[int, list[str]]] = {}  # why -> (count, a few paths)
        self._siblings: dict | None = None
        self._image_stems: set[str] = set()

    def add(self, f: storage.Listed, ext: str) -> None:
        """`f`, a listed file that is neither an image nor a Parquet file or tar; `ext` its lower-case
        extension."""
        name = f.uri.rpartition("/")[2]
        if name in self.captions_names:
            return
        if ext != "txt":
            kind = "." + ext if ext else "no extension"
            self.types[kind if kind in self.types or len(self.types) < self.MAX_TYPES else "other"] += 1
            return
        if f.siblings is not self._siblings:  # one index per folder, as planning's sidecar lookup
            self._siblings = f.siblings
            self._image_stems = {n.rpartition(".")[0] for n in f.siblings
                                 if n.rpartition(".")[2].lower() in self.image_extensions}
        if name[:-4] not in self._image_stems:
            self.orphans += 1
            if len(self.examples) < 3:
                self.examples.append(relative(self.root, f.uri))

    def unlisted(self, path: str, why: str) -> None:
        """A path the listing skipped (`storage.iter_files`: a folder this user may not list, a name
        that is not UTF-8), counted by why, a few named."""
        count, examples = self.skipped.get(why, (0, []))
        self.skipped[why] = (count + 1, examples + [relative(self.root, path)] if len(examples) < 3 else examples)

    def unlisted_line(self) -> str | None:
        """What the listing skipped, in one line (any corpus format); None when nothing was."""
        return "; ".join(f"{count} {why} ({', '.join(examples)}{', ...' if count > len(examples) else ''})"
                         for why, (count, examples) in sorted(self.skipped.items())) or None

    def line(self) -> str | None:
        """What was passed over, in one line; None when nothing was."""
        said = [unlisted] if (unlisted := self.unlisted_line()) else []
        if self.orphans:
            more = ", ..." if self.orphans > len(self.examples) else ""
            said.append(f"{self.orphans} caption(s) with no image of their name beside them "
                        f"({', '.join(self.examples)}{more})")
        if self.types:
            kinds = ", ".join(f"{kind} {n}" for kind, n in self.types.most_common(6))
            said.append(f"{sum(self.types.values())} file(s) of other types ({kinds}"
                        f"{', ...' if len(self.types) > 6 else ''}; reader.image_extensions lists the types read)")
        return "; ".join(said) or None


def ends_part(name: str, size: int, rows_per_part: int) -> bool:
    """Whether a part of `size` images whose last is `name` (its path below the corpus) ends there,
    cut by names: from half a part on, at an image whose name hashes to a hit (one in every half
    part), so parts average `rows_per_part`; at twice that, always. Where a part ends depends on its
    own names, not on a count since the corpus's start: a file added or removed changes the part
    that holds it (and at most a part or two after it), where count cuts change every later part."""
    low = max(1, rows_per_part // 2)
    if size < low:
        return False
    if size >= 2 * rows_per_part:
        return True
    digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % max(1, rows_per_part - low) == 0


def plan_folder(root: str, images: Iterable[storage.Listed], rows_per_part: int, cfg,
                make_part: Callable[[str, tuple[Item, ...], int, list[str], str | None, list[str]], object],
                spill: PlanSpill | None = None,
                progress: Callable[..., None] | None = None, max_images: int | None = None,
                cuts: str = "names") -> list:
    """Parts of the folder corpus at `root` from its image files (`images`, sorted, each with the
    names of its folder's files for its sidecar caption), cut by names (`ends_part`) or every
    `rows_per_part` images ("count": how outputs tokenized before name cuts were cut).
    `make_part(first, items, start, names, captions, sizes)` builds a part of `items` (the ids are
    the caller's; `names` are the images' paths below `root`, `sizes` their sizes as listed, each
    with its sidecar's ("size+size"), and `captions` fingerprints the part's captions from a
    captions file when cut by names, so that a caption rewritten there changes its part's id;
    captions are not read here); with `spill`, the part keeps only where its items lie.
    `progress(images, parts)` is called after every part, and `progress(0, 0, captions=records)` while
    a captions file is indexed. With `max_images`, the walk stops after the part that reaches that
    many: the corpus's first parts, as a full plan has them."""
    if cuts not in FOLDER_CUTS:
        raise ValueError(f"cuts must be one of {FOLDER_CUTS}, got {cuts!r}")
    limit = cfg.max_file_bytes

    def over(size: int) -> bool:  # rejected here, unread (file_too_large), from the listing's size
        return limit is not None and size > limit

    with contextlib.ExitStack() as cleanup:
        captions, parts, chunk, names, sizes, start = None, [], [], [], [], 0
        sidecars_of, sidecars = None, {}  # a folder's `.txt` files in any case, by their lower-case name

        def cut() -> None:
            nonlocal chunk, names, sizes, start
            items, fingerprint = tuple(chunk), None
            if captions is not None:
                found = captions.lookup(names)
                items = tuple((uri, None, caption, reason or bad)
                              for (uri, _, _, reason), (caption, bad) in zip(items, found))
                if cuts == "names":  # count cuts: outputs tokenized before, whose ids had no captions
                    fingerprint = hashlib.blake2b(repr(found).encode(), digest_size=10).hexdigest()
            part = make_part(items[0][0], items, start, names, fingerprint, sizes)
            if spill is not None:
                plan, group = spill.add(items, names)
                part = replace(part, items=(), plan=plan, plan_group=group)
            parts.append(part)
            start, chunk, names, sizes = start + len(items), [], [], []
            if progress is not None:
                progress(start, len(parts))

        for n, f in enumerate(images):
            if n == 0 and (path := captions_file(root, cfg)) is not None:  # only for a corpus with images
                indexed = None if progress is None else (lambda records: progress(0, 0, captions=records))
                captions = cleanup.enter_context(CaptionsIndex(path, cfg, indexed))
            reason = MISSING_IMAGE if f.broken else FILE_TOO_LARGE if over(f.size) else ""
            names.append(relative(root, f.uri))
            if captions is not None:
                chunk.append((f.uri, None, None, reason))  # its caption is looked up with its part's
                sizes.append(str(f.size))
            else:
                folder, _, name = f.uri.rpartition("/")
                txt = name.rsplit(".", 1)[0] + ".txt"
                if txt not in f.siblings:  # `a.TXT` beside `a.jpg`: the extension in any case, as an image's
                    if sidecars_of is not f.siblings:  # one index per folder (siblings are shared)
                        sidecars_of = f.siblings
                        sidecars = {n[:-4] + ".txt": n for n in f.siblings if n[-4:].lower() == ".txt"}
                    txt = sidecars.get(txt, txt)
                # A dangling link (listed size -1) is no caption: the sample is missing_caption.
                sidecar = f"{folder}/{txt}" if f.siblings.get(txt, -1) >= 0 else None
                if sidecar and not reason and over(f.siblings[txt]):
                    reason = FILE_TOO_LARGE
                chunk.append((f.uri, sidecar, None, reason))
                sizes.append(f"{f.size}+{f.siblings[txt]}" if sidecar else str(f.size))
            full = len(chunk) == rows_per_part if cuts == "count" else ends_part(names[-1], len(chunk), rows_per_part)
            if full:
                cut()
                if max_images is not None and start >= max_images:
                    break
        if chunk:
            cut()
    if spill is not None:
        spill.flush()
    return parts
