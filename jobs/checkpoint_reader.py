"""Reading a sharded training checkpoint where it lies (local disk or S3), fetching only the bytes that
this rank's tensors need.

A checkpoint (jobs.checkpointing) is a set of safetensors files, one per saving rank, whose headers say
where each piece sits in the full tensors. `RangedCheckpointReader` is a `torch.distributed.checkpoint`
storage reader over a pyarrow filesystem: it reads the headers (one ranged GET per file, a second only
for a header past 1 MiB), and for each piece a rank loads it reads the rows of dimension 0 that the
piece needs, never the rest of the file. Ranges less than 64 KiB apart are coalesced into one request
and requests run on a few threads, because a checkpoint has hundreds of small tensors (norms, biases).

So a resume on many nodes downloads each FSDP shard once in all, not the whole checkpoint per node, and
needs no local disk. Transient S3 errors are retried by the filesystem's retry strategy
(`muse.storage.s3_filesystem`).
"""

from __future__ import annotations

import json
import math
import struct
import threading
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow.fs as pafs
import torch
from torch.distributed.checkpoint import StorageReader
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Where DCP's safetensors writer records a piece's place in the full tensor (HuggingFaceStorageWriter).
SHARDING_KEY = "DCP_SHARDING_INFO"
OFFSETS_KEY = "saved_offsets"

HEADER_GUESS = 1 << 20  # bytes read for a file's header in one request
COALESCE_GAP = 64 << 10  # bytes: a gap this small costs less than a request (S3 latency ~20 ms)
MAX_REQUEST = 64 << 20  # ... up to this size
THREADS = 8


@dataclass(frozen=True)
class Piece:
    """One saved piece: where its bytes are and what they hold."""
    path: str
    start: int  # absolute byte offset in the file
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize if self.shape else self.dtype.itemsize


class RangedCheckpointReader(StorageReader):
    """A DCP StorageReader for the safetensors files directly under `path` on `filesystem`."""

    def __init__(self, filesystem: pafs.FileSystem, path: str, threads: int = THREADS,
                 coalesce_gap: int = COALESCE_GAP):
        super().__init__()
        self.fs, self.path, self.threads, self.coalesce_gap = filesystem, path.rstrip("/"), threads, coalesce_gap
        self.pieces: dict[MetadataIndex, Piece] = {}
        self._metadata: Metadata | None = None
        self.bytes_read = 0  # payload fetched by read_data (headers excluded), for tests and logs
        self.total_bytes = 0  # the size of the checkpoint's safetensors files
        self._lock = threading.Lock()

    # -- metadata ----------------------------------------------------------------------------------

    def read_metadata(self, *args, **kwargs) -> Metadata:
        """The checkpoint's tensors, sizes and pieces, from the files' headers (read once, then cached)."""
        if self._metadata is None:
            files = [f for f in self.fs.get_file_info(pafs.FileSelector(self.path))
                     if f.type == pafs.FileType.File and f.path.endswith(".safetensors")]
            if not files:
                raise FileNotFoundError(f"no .safetensors files in {self.path}")
            tensors: dict[str, TensorStorageMetadata] = {}
            self.total_bytes = sum(f.size for f in files)
            for info in sorted(files, key=lambda f: f.path):
                for name, offsets, piece in self._read_header(info.path, info.size):
                    index = MetadataIndex(fqn=name, offset=torch.Size(offsets))
                    self.pieces[index] = piece
                    chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(piece.shape))
                    end = [o + s for o, s in zip(offsets, piece.shape)]
                    if name not in tensors:
                        tensors[name] = TensorStorageMetadata(
                            properties=TensorProperties(dtype=piece.dtype), size=torch.Size(end), chunks=[chunk])
                    else:
                        tensors[name].chunks.append(chunk)
                        tensors[name].size = torch.Size(max(a, b) for a, b in zip(tensors[name].size, end))
            self._metadata = Metadata(state_dict_metadata=tensors, storage_data=dict(self.pieces),
                                      storage_meta=StorageMeta())
        self._metadata.storage_meta.load_id = uuid.uuid4().hex
        return self._metadata

    def keys(self) -> set[str]:
        return set(self.read_metadata().state_dict_metadata)

    def _read_header(self, path: str, size: int) -> list[tuple[str, list[int], Piece]]:
        with self.fs.open_input_file(path) as f:
            head = f.read_at(min(size, HEADER_GUESS), 0)
            if len(head) < 8:
                raise ValueError(f"{path}: not a safetensors file ({size} bytes)")
            length = struct.unpack("<Q", head[:8])[0]
            if 8 + length > size:
                raise ValueError(f"{path}: safetensors header of {length} bytes in a {size}-byte file")
            if 8 + length > len(head):
                head += f.read_at(8 + length - len(head), len(head))
        header = json.loads(head[8:8 + length])
        extra = header.pop("__metadata__", None) or {}
        sharding = json.loads(extra[SHARDING_KEY]) if SHARDING_KEY in extra else {}
        out = []
        for name, entry in header.items():
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which training never saves")
            shape = tuple(entry["shape"])
            offsets = sharding.get(name, {}).get(OFFSETS_KEY, [0] * len(shape))
            piece = Piece(path, 8 + length + entry["data_offsets"][0], shape, SAFETENSORS_DTYPES[entry["dtype"]])
            out.append((name, list(offsets), piece))
        return out

    # -- data --------------------------------------------------------------------------------------

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        """Fetch the rows each item needs, coalesced per file, and copy them into the planner's tensors."""
        wanted: dict[str, list[tuple[int, int, ReadItem]]] = {}
        for item in plan.items:
            piece = self.pieces[item.storage_index]
            rows = (item.storage_offsets[0], item.lengths[0]) if piece.shape else (0, 1)
            start = piece.start + rows[0] * piece.row_bytes
            wanted.setdefault(piece.path, []).append((start, start + rows[1] * piece.row_bytes, item))
        requests = [r for path, items in wanted.items()
                    for r in _coalesce(path, sorted(items, key=lambda x: x[0]), self.coalesce_gap)]
        files = {path: self.fs.open_input_file(path) for path in wanted}
        try:
            with ThreadPoolExecutor(max(1, min(self.threads, len(requests)))) as pool:
                for future in [pool.submit(self._fetch, files, req, planner) for req in requests]:
                    future.result()
        finally:
            for f in files.values():
                f.close()
        done: Future = Future()
        done.set_result(None)
        return done

    def _fetch(self, files, request, planner: LoadPlanner) -> None:
        path, begin, end, items = request
        buffer = files[path].read_at(end - begin, begin)  # one ranged GET on S3; thread-safe
        if len(buffer) != end - begin:
            raise OSError(f"{path}: short read of {len(buffer)} bytes at {begin} (expected {end - begin})")
        with self._lock:
            self.bytes_read += len(buffer)
        for start, stop, item in items:
            piece = self.pieces[item.storage_index]
            if stop == start:  # an empty piece (an FSDP shard of a tensor with fewer rows than ranks)
                flat = torch.empty(0, dtype=piece.dtype)
            else:
                with warnings.catch_warnings():  # a read-only buffer: only ever copied from
                    warnings.simplefilter("ignore", UserWarning)
                    flat = torch.frombuffer(buffer, dtype=piece.dtype, count=(stop - start) // piece.dtype.itemsize,
                                            offset=start - begin)
            tensor = flat.reshape((item.lengths[0], *piece.shape[1:]) if piece.shape else ())
            for dim in range(1, len(piece.shape)):
                tensor = tensor.narrow(dim, item.storage_offsets[dim], item.lengths[dim])
            target = planner.resolve_tensor(item).detach()
            if target.size() != tensor.size():
                raise ValueError(f"{item.storage_index.fqn}: saved piece {tuple(tensor.shape)} does not fit "
                                 f"{tuple(target.shape)}")
            target.copy_(tensor)
            planner.commit_tensor(item, target)

    # -- the rest of the StorageReader protocol ----------------------------------------------------

    def reset(self, checkpoint_id=None) -> None:
        pass  # the headers do not change between loads

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False  # always passed as storage_reader=, never found from a checkpoint_id


def _coalesce(path: str, items: list[tuple[int, int, ReadItem]], gap: int):
    """(path, begin, end, items) requests: byte ranges closer than `gap` merged, up to MAX_REQUEST."""
    begin, end, group = items[0][0], items[0][1], [items[0]]
    for start, stop, item in items[1:]:
        if start - end <= gap and max(end, stop) - begin <= MAX_REQUEST:
            end = max(end, stop)
            group.append((start, stop, item))
        else:
            yield path, begin, end, group
            begin, end, group = start, stop, [(start, stop, item)]
    yield path, begin, end, group
