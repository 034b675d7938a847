"""ASGI middleware in front of every route: the API key, the body size and time limits and admission.

    401  /v1/ requests without the API key (when one is configured; the web page, /healthz and file
         URLs stay open). The Bearer scheme is matched case-insensitively.
    400  a Content-Length that is not a non-negative integer.
    408  a body that has not wholly arrived `body_timeout_s` after Guard began reading it (a stalled
         upload would otherwise hold its admission slot for ever).
    413  a body over `max_body_bytes`, by Content-Length or, for chunked uploads, while it is read
         (the body is buffered here, so routes never see more than the limit).
    429  an image request while `max_in_flight` are already in flight on this ingress replica,
         answered at once with Retry-After: excess load is told to come back instead of queueing.
    503  an image request while the server drains to stop (`Admission.draining`): those in flight
         finish, new ones go elsewhere or come back.
"""

from __future__ import annotations

import asyncio
import hmac

from ray.exceptions import TaskCancelledError

from serve.config import Limits
from serve.schemas import error_response

RETRY_AFTER_S = 1  # the Retry-After of a 503 (at capacity, no replica) or 429
IMAGE_ROUTES = ("/v1/images/",)


def authorized(api_key: str | None, header: bytes | None) -> bool:
    if not api_key:
        return True
    scheme, _, token = (header or b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), api_key.encode())


def client_gone_as_disconnect(receive):
    """`receive`, answering http.disconnect where Ray Serve raises TaskCancelledError: it cancels the
    replica's receive from the proxy when the client goes away, and that is no server error."""
    async def wrapped():
        try:
            return await receive()
        except TaskCancelledError:
            return {"type": "http.disconnect"}
    return wrapped


class Admission:
    """An ingress replica's image requests in flight, and whether it drains: shared by its Guard
    and the replica's drain watch (`serve.draining`)."""

    def __init__(self) -> None:
        self.in_flight, self.draining = 0, False


class Guard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, max_in_flight: int,
                 body_timeout_s: float = Limits.model_fields["body_timeout_s"].default,
                 admission: Admission | None = None):
        self.app, self.api_key = app, api_key
        self.max_body_bytes, self.max_in_flight = max_body_bytes, max_in_flight
        self.body_timeout_s = body_timeout_s
        self.admission = admission or Admission()

    @property
    def in_flight(self) -> int:
        return self.admission.in_flight

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        root = scope.get("root_path", "")
        path = scope["path"][len(root):] if scope["path"].startswith(root) else scope["path"]
        if path.startswith("/v1/") and not path.startswith("/v1/files/") and \
                not authorized(self.api_key, headers.get(b"authorization")):
            return await error_response(401, "Incorrect API key provided: send 'Authorization: Bearer <key>'",
                                        code="invalid_api_key",
                                        headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        limit = self.max_body_bytes
        too_large = error_response(413, f"the request body is over {limit} bytes", code="request_too_large")
        declared = headers.get(b"content-length")
        if declared is not None and not declared.isdigit():  # non-numeric or negative: malformed, not large
            shown = declared[:40].decode("latin-1")
            return await error_response(400, f"the Content-Length header must be a non-negative integer, got "
                                             f"{shown!r}", code="invalid_content_length")(scope, receive, send)
        if declared is not None and int(declared) > limit:
            return await too_large(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        image_request = path.startswith(IMAGE_ROUTES)
        if not image_request:
            return await self._with_body(scope, receive, send, too_large)
        admission = self.admission
        if admission.draining:
            return await error_response(503, "the server is shutting down; retry shortly", type="server_error",
                                        code="shutting_down",
                                        headers={"Retry-After": str(RETRY_AFTER_S)})(scope, receive, send)
        if admission.in_flight >= self.max_in_flight:
            return await error_response(429, "too many requests in flight; retry shortly", type="rate_limit_error",
                                        code="rate_limit_exceeded",
                                        headers={"Retry-After": str(RETRY_AFTER_S)})(scope, receive, send)
        # The slot is taken before the body is read (uploads still arriving count) and held until the
        # response, a stream included, has been sent, whatever ends it.
        admission.in_flight += 1
        try:
            return await self._with_body(scope, receive, send, too_large)
        finally:
            admission.in_flight -= 1

    async def _with_body(self, scope, receive, send, too_large):
        """Read the whole body (at most max_body_bytes, else 413; within body_timeout_s, else 408) and
        hand the app a replay of it. A client that leaves meanwhile gets no answer."""
        receive = client_gone_as_disconnect(receive)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.max_body_bytes or not message.get("more_body", False):
                        break
        except TimeoutError:
            # The rest of the body may still come: the connection cannot carry another request.
            return await error_response(408, f"the request body did not arrive within body_timeout_s = "
                                             f"{self.body_timeout_s:g} s", code="request_timeout",
                                        headers={"Connection": "close"})(scope, receive, send)
        if size > self.max_body_bytes:
            return await too_large(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
