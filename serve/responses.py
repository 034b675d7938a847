"""What an images request answers: each image inline (`b64_json`) or as a short-lived file URL
(`url`, stored in the ingress's FileStore and served at /v1/files/<name>, `<id>.<format>`)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from serve.config import Files
from serve.files import FileStore, StoreFull
from serve.schemas import APIError
from serve.specs import Output
from serve.streaming import b64


class Responses:
    def __init__(self, config: Files):
        self.config = config
        self.files = FileStore(config)

    def check_room(self, count: int, response_format: str | None) -> None:
        """Refuse a request for links (503) before its work when the store could not keep them."""
        if response_format == "url":
            with _refused_when_full():
                self.files.check_room(count)

    async def urls(self, images: list[bytes], base_url: str, fmt: str = "png") -> list[dict]:
        """{"url": ...} for each encoded image, stored all or none."""
        base = (self.config.public_url or base_url).rstrip("/")
        with _refused_when_full():
            try:
                names = await asyncio.to_thread(self.files.put_all, images, fmt)  # disk or S3: off the event loop
            except OSError as e:  # after the filesystem's own retries: an outage, or a full disk
                raise APIError(503, f"the images were made but could not be stored for links ({type(e).__name__}: "
                                    f"{' '.join(str(e).split())[:200]}): ask for response_format b64_json, or retry "
                                    "later", type="server_error", code="files_unavailable") from None
        return [{"url": f"{base}/v1/files/{name}"} for name in names]

    async def images(self, images: list[bytes], response_format: str, seed: int, out: Output, base_url: str,
                     used: dict) -> dict:
        """The body of a non-streamed images response, as OpenAI's."""
        items = [{"b64_json": b64(data)} for data in images] if response_format == "b64_json" else \
            await self.urls(images, base_url, out.format)
        return {
            "created": int(time.time()),
            "data": [{**item, "revised_prompt": None, "seed": seed, "index": i} for i, item in enumerate(items)],
            "size": f"{out.side}x{out.side}",
            "output_format": out.format,
            "usage": used,
        }

    async def file(self, name: str) -> bytes | None:
        return await asyncio.to_thread(self.files.get, name)



@contextlib.contextmanager
def _refused_when_full():
    """StoreFull as the API's 503: new links would cut short the ones given out, so they are refused."""
    try:
        yield
    except StoreFull as e:
        raise APIError(503, f"{e}; ask for response_format b64_json, retry in {e.retry_after_s} s, or set files.uri "
                            "to shared storage", type="server_error", code="files_full") from None
