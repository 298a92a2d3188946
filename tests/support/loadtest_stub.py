"""A misbehaving HTTP server for the load-test client's tests: it accepts connections and then does one bad thing
(never answers, stalls a stream midway, half-closes, answers 400, streams an error event, ends after one token).
Plain sockets in a thread; nothing here is part of the package."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator

MODES = ("silent", "stall", "half_close", "http_400", "event_400", "event_500", "one_token")
TOKENS = list(range(1000, 3000))  # what /tokenize answers (2000 ids)


def _sse(*events: object) -> bytes:
    body = b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)
    return body


class StubServer:
    """``with StubServer("stall") as stub: stub.url``; ``stub.connections`` counts accepted connections."""

    def __init__(self, mode: str):
        assert mode in MODES, mode
        self.mode = mode
        self.connections = 0
        self._closing = threading.Event()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def __enter__(self) -> StubServer:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._sock.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            while not self._closing.is_set():
                request = _read_request(conn)
                if request is None:
                    return
                method, path = request
                if self.mode == "silent":
                    self._closing.wait()
                    return
                if not self._answer(conn, method, path):
                    return

    def _answer(self, conn: socket.socket, method: str, path: str) -> bool:
        """Answer one request; ``False`` when the connection is finished with."""
        if method == "GET":
            conn.sendall(_response(404, b'{"detail": "Not Found"}', "application/json"))
            return True
        if path == "/tokenize":
            conn.sendall(_response(200, json.dumps({"tokens": TOKENS, "count": len(TOKENS)}).encode()))
            return True
        if self.mode == "half_close":
            conn.shutdown(socket.SHUT_WR)
            self._closing.wait(5)
            return False
        if self.mode == "http_400":
            body = json.dumps({"object": "error", "message": "sparsemm_budget must be from 9 to 64", "code": 400})
            conn.sendall(_response(400, body.encode()))
            return True
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                b"Connection: keep-alive\r\n\r\n")  # fmt: skip
        conn.sendall(head)
        one = {"text": "a", "output_ids": [5], "meta_info": {"prompt_tokens": 7, "completion_tokens": 1}}
        if self.mode == "stall":
            conn.sendall(_chunk(_sse(one)))
            self._closing.wait()
            return False
        code = {"event_400": 400, "event_500": 500}.get(self.mode)
        if code is not None:
            error = {"error": {"message": f"the stub's error {code}", "type": "invalid_request_error", "code": code}}
            conn.sendall(_chunk(_sse(error, b"[DONE]")) + b"0\r\n\r\n")
            return True
        conn.sendall(_chunk(_sse(one, b"[DONE]")) + b"0\r\n\r\n")  # one_token
        return True


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _response(status: int, body: bytes, ctype: str = "application/json") -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _read_request(conn: socket.socket) -> tuple[str, str] | None:
    """Method and path of the next request on ``conn`` (its body read and dropped), or ``None`` at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    method, path = lines[0].split()[:2]
    length = next((int(v) for k, _, v in (x.partition(":") for x in lines[1:]) if k.lower() == "content-length"), 0)
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        rest += chunk
    return method, path


@contextlib.contextmanager
def stub(mode: str) -> Iterator[StubServer]:
    with StubServer(mode) as server:
        yield server
