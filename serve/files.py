"""Short-lived images behind `response_format: "url"`: GET /v1/files/<name>.

A name is `<expiry unix seconds>-<32 hex chars>.<format>` (png, jpeg or webp: what the bytes are, and
the only extension it is served under): unguessable (128 random bits, so the URL itself is the
credential, as with OpenAI's signed URLs) and self-expiring (the expiry is read from the name, no
index needed). Two backends: the ingress replica's memory (at most `max_files` unexpired files: past
them a new file is refused, StoreFull, rather than cutting short a link already given out), or a
directory / s3:// prefix through `muse.storage` that every ingress replica shares, swept of expired
files every tenth of the TTL in a background thread. Calls block on storage: the ingress makes them
off its event loop (`asyncio.to_thread`).
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import OrderedDict

from muse import storage
from serve.config import Files

NAME_PATTERN = re.compile(r"^(\d{10,12})-([0-9a-f]{32})\.(png|jpeg|webp)$")


class StoreFull(Exception):
    """The in-memory store holds `max_files` files that have not expired."""

    def __init__(self, max_files: int, retry_after_s: int):
        super().__init__(f"the image store holds {max_files} links that have not expired (files.max_files)")
        self.max_files, self.retry_after_s = max_files, retry_after_s


class FileStore:
    def __init__(self, config: Files, clock=time.time):
        self.config = config
        self.clock = clock
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._last_sweep = 0.0
        if config.uri is not None and not storage.is_s3(config.uri):
            storage.makedirs(config.uri)

    def put(self, data: bytes, fmt: str = "png") -> str:
        """Store encoded image bytes of format `fmt`; returns the file's name."""
        return self.put_all([data], fmt)[0]

    def put_all(self, images: list[bytes], fmt: str = "png") -> list[str]:
        """Store a response's images, all or none (StoreFull); returns their names."""
        if fmt not in ("png", "jpeg", "webp"):
            raise ValueError(f"unknown image format {fmt!r}")
        now = self.clock()
        names = [f"{int(now + self.config.ttl_s)}-{secrets.token_hex(16)}.{fmt}" for _ in images]
        if self.config.uri is None:
            with self._lock:
                self._check_room(len(images), now)
                self._memory.update(zip(names, images))
            return names
        for name, data in zip(names, images):
            storage.write_bytes(self._uri(name), data)
        with self._lock:
            due = now - self._last_sweep > self.config.ttl_s / 10
            if due:
                self._last_sweep = now
        if due:  # listing a shared prefix can be slow: sweep beside the request, not in it
            threading.Thread(target=self._sweep, args=(now,), name="file-sweeper", daemon=True).start()
        return names

    def check_room(self, count: int) -> None:
        """Raise StoreFull now when `count` more files would not fit, before the work that makes them."""
        if self.config.uri is None:
            with self._lock:
                self._check_room(count, self.clock())

    def _check_room(self, count: int, now: float) -> None:
        self._drop_expired(now)
        if len(self._memory) + count > self.config.max_files:
            oldest = int(next(iter(self._memory)).split("-", 1)[0]) if self._memory else int(now)
            raise StoreFull(self.config.max_files, max(1, oldest - int(now)))

    def get(self, file_id: str) -> bytes | None:
        """The bytes, or None when the name is malformed, unknown or expired."""
        match = NAME_PATTERN.match(file_id)
        if match is None or int(match.group(1)) < self.clock():
            return None
        if self.config.uri is None:
            with self._lock:
                return self._memory.get(file_id)
        uri = self._uri(file_id)
        if not storage.exists(uri):
            return None
        try:
            return storage.read_bytes(uri)
        except FileNotFoundError:  # swept (by any replica) between the two calls
            return None

    def _uri(self, file_id: str) -> str:
        return storage.join(self.config.uri, file_id)

    def _drop_expired(self, now: float) -> None:
        for key in [k for k in self._memory if int(k.split("-", 1)[0]) < now]:
            del self._memory[key]

    def _sweep(self, now: float) -> None:
        for uri in storage.list_files(self.config.uri):
            match = NAME_PATTERN.match(uri.rsplit("/", 1)[-1])
            if match is not None and int(match.group(1)) < now:
                storage.delete(uri)
