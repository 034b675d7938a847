"""What an images request answers: each image inline (`b64_json`) or as a short-lived file URL
(`url`, stored in the ingress's FileStore and served at /v1/files/<name>, `<id>.<format>`)."""

from __future__ import annotations

import asyncio
import time

from serve.config import Files
from serve.files import FileStore
from serve.specs import Output
from serve.streaming import b64


class Responses:
    def __init__(self, config: Files):
        self.config = config
        self.files = FileStore(config)

    async def item(self, data: bytes, response_format: str, base_url: str, fmt: str = "png") -> dict:
        """{"b64_json": ...} or {"url": ...} for one encoded image."""
        if response_format == "b64_json":
            return {"b64_json": b64(data)}
        base = (self.config.public_url or base_url).rstrip("/")
        name = await asyncio.to_thread(self.files.put, data, fmt)  # disk or S3: off the event loop
        return {"url": f"{base}/v1/files/{name}"}

    async def images(self, images: list[bytes], response_format: str, seed: int, out: Output, base_url: str,
                     used: dict) -> dict:
        """The body of a non-streamed images response, as OpenAI's."""
        items = [await self.item(data, response_format, base_url, out.format) for data in images]
        return {
            "created": int(time.time()),
            "data": [{**item, "revised_prompt": None, "seed": seed, "index": i} for i, item in enumerate(items)],
            "size": f"{out.side}x{out.side}",
            "output_format": out.format,
            "usage": used,
        }

    async def file(self, name: str) -> bytes | None:
        return await asyncio.to_thread(self.files.get, name)
