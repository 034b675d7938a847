"""A real HTTP proxy on loopback in front of the S3 server, which answers a share of requests with
503 SlowDown and drops a share of connections without an answer: what a hot S3 prefix does. The
faults are drawn from a seeded generator, so a test sees the same sequence each run."""

from __future__ import annotations

import random
import socket
import threading
import time

SLOW_DOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {n}\r\n"
             b"Connection: close\r\n\r\n")
SLOW_DOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                  b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    """Forwards each connection's first request to `upstream` (host, port) unless a fault is drawn.
    `throttle` and `drop` are probabilities per request; `counts` says what happened and `requests`
    lists the request lines ("PUT /bucket/key HTTP/1.1") in arrival order. `latency` seconds pass
    before each request is answered, as a store's first byte takes (requests in flight together wait
    together). `max_in_a_row`: a request line faulted that many times in a row is forwarded next, which
    bounds the SDK's exponential backoff (seconds after a few faults) and so a test's time."""

    def __init__(self, upstream: tuple[str, int], throttle: float, drop: float, seed: int = 0,
                 latency: float = 0.0, max_in_a_row: int | None = None):
        self.upstream, self.throttle, self.drop, self.latency = upstream, throttle, drop, latency
        self.max_in_a_row, self.in_a_row = max_in_a_row, {}
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"forwarded": 0, "throttled": 0, "dropped": 0}
        self.requests: list[str] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self.server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        """One request per connection (the reply says Connection: close), so faults are per request."""
        with client:
            request = self._read_request(client)
            if request is None:
                return
            if self.latency:
                time.sleep(self.latency)
            line = request.split(b"\r\n", 1)[0].decode("latin-1")
            with self.lock:
                draw = self.rng.random()
                fault = "dropped" if draw < self.drop else "throttled" if draw < self.drop + self.throttle \
                    else "forwarded"
                if fault != "forwarded" and self.max_in_a_row is not None:
                    if self.in_a_row.get(line, 0) >= self.max_in_a_row:
                        fault = "forwarded"
                self.in_a_row[line] = 0 if fault == "forwarded" else self.in_a_row.get(line, 0) + 1
                self.counts[fault] += 1
                self.requests.append(line)
            if fault == "dropped":
                client.shutdown(socket.SHUT_RDWR)  # the connection closes with no answer at all
                return
            if fault == "throttled":
                client.sendall(SLOW_DOWN.replace(b"{n}", str(len(SLOW_DOWN_BODY)).encode()) + SLOW_DOWN_BODY)
                return
            with socket.create_connection(self.upstream) as up:
                up.sendall(request)
                while chunk := up.recv(65536):
                    client.sendall(chunk)

    @staticmethod
    def _read_request(sock: socket.socket) -> bytes | None:
        """Headers and body of one HTTP/1.1 request (Content-Length bodies), with the connection
        header rewritten to close so upstream ends the response by closing."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length, expect, chunked = 0, False, False
        kept = [lines[0]]
        for line in lines[1:]:
            name = line.split(b":", 1)[0].strip().lower()
            if name == b"content-length":
                length = int(line.split(b":", 1)[1])
            if name == b"expect":
                expect = True
            if name == b"transfer-encoding" and b"chunked" in line.lower():
                chunked = True
            if name in (b"connection", b"keep-alive", b"expect"):
                continue
            kept.append(line)
        kept.append(b"Connection: close")
        if expect and (chunked or len(body) < length):
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")  # the client waits for this before the body
        while not (_chunked_complete(body) if chunked else len(body) >= length):
            chunk = sock.recv(65536)
            if not chunk:
                return None
            body += chunk
        return b"\r\n".join(kept) + b"\r\n\r\n" + body


def _chunked_complete(body: bytes) -> bool:
    """Whether a chunked body has arrived whole: chunks up to the zero-size one and the blank line
    after its trailers."""
    pos = 0
    while True:
        end = body.find(b"\r\n", pos)
        if end < 0:
            return False
        size = int(body[pos:end].split(b";", 1)[0] or b"0", 16)
        if size == 0:
            return body.find(b"\r\n\r\n", end) >= 0 or body.endswith(b"\r\n", end + 2) and \
                body[end:end + 4] == b"\r\n\r\n"
        pos = end + 2 + size + 2
        if pos > len(body):
            return False
