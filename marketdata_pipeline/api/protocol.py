"""The read API's HTTP/1.1 protocol: uvicorn's h11 one, with its headers bounded and its
refusals of bad HTTP in the API's one JSON line."""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

# Request line and headers together. Requests of this API are a path, a short query and
# a key: 8 KiB is ample, and a client that sends more is cut off before it costs memory.
MAX_HEAD_BYTES = 8 * 1024


class JsonErrorsH11(H11Protocol):
    """uvicorn's h11 protocol (httptools has no bound on headers), with its plain-text 400
    for a request it cannot parse answered as `{"error": "..."}`, and 431 for one whose
    head is over MAX_HEAD_BYTES (h11 raises only at that size: the head is never held)."""

    def send_400_response(self, msg: str) -> None:
        received, _ = self.conn.trailing_data
        if len(received) > MAX_HEAD_BYTES:
            status = 431
            line = f"request line and headers over {MAX_HEAD_BYTES // 1024} KiB: refused"
        else:
            status, line = 400, "malformed HTTP request: not parsed"
        body = json.dumps({"error": line}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status]),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()
