"""The HTTP server's own protections, on top of uvicorn's settings (``Settings.uvicorn_options``).

uvicorn closes idle keep-alive connections but has no deadline for a request itself: a client that
sends half a request line or header block (slowloris), or a body a few bytes at a time, holds its
connection for ever, and a few hundred of them exhaust the process's file descriptors.
:class:`DeadlineH11Protocol` is uvicorn's h11 protocol with two deadlines:

* the **head** (request line and headers) must be complete within ``head_timeout_s`` of connecting,
  or of the previous response on the connection;
* the **body** must be complete within ``body_timeout_s`` of the head (a 20 MB upload at 1 MB/s
  takes 20 s; the default 60 s allows about 350 KB/s for the largest body).

and the head may not exceed ``max_head_bytes``: counted exactly up to its blank line, and answered
``431`` with the service's JSON error. (uvicorn's ``h11_max_incomplete_event_size`` alone lets a
head of up to twice the limit through when it arrives in two reads.)

On a deadline the connection is closed, without an answer: the client is not reading one (nginx's
``client_header_timeout`` / ``client_body_timeout`` answer 408 and close; there is no one to read
that here either). A request whose app is still reading its body sees a disconnect. The app's own
work has its own limit (``LIFT_REQUEST_TIMEOUT_S``).
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_END = b"\r\n\r\n"


class DeadlineH11Protocol(H11Protocol):
    head_timeout_s = 10.0
    body_timeout_s = 60.0
    max_head_bytes = 65536
    _head_timer = None
    _body_timer = None
    _head: bytearray | None = None  # the current request head so far; None once it is complete

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            start = max(0, len(self._head) - 3)  # the blank line may straddle two reads
            self._head += data
            end = self._head.find(HEAD_END, start)
            size = len(self._head) if end < 0 else end + len(HEAD_END)
            if size > self.max_head_bytes:
                self._refuse_head()
                return
            if end >= 0:
                self._head = None
        super().data_received(data)

    def _refuse_head(self) -> None:
        self._head = None
        body = json.dumps({"error": {"code": "header_too_large", "message": (
            f"the request line and headers are over {self.max_head_bytes} bytes (LIFT_MAX_HEADER_BYTES); "
            "send fewer or shorter headers")}}).encode()
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
        self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return
        if self._head_timer is not None:  # the head is in: the request is the app's now
            self._head_timer.cancel()
            self._head_timer = None
            if cycle.more_body:
                self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_timed_out, cycle)
        if not cycle.more_body and self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request on this connection gets the same deadlines

    def _arm_head_timer(self) -> None:
        self._head = bytearray()  # a new request head starts: count it
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()

    def _body_timed_out(self, cycle) -> None:
        self._body_timer = None
        if cycle is self.cycle and cycle.more_body and not cycle.response_complete and not self.transport.is_closing():
            self.transport.close()


def deadline_protocol(head_timeout_s: float, body_timeout_s: float, max_head_bytes: int) -> type[H11Protocol]:
    """The protocol class uvicorn gets as ``http=``, with these deadlines and head limit."""
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,),
                {"head_timeout_s": float(head_timeout_s), "body_timeout_s": float(body_timeout_s),
                 "max_head_bytes": int(max_head_bytes)})


def server_options(settings) -> dict:
    """uvicorn's options for ``settings``: its limits, and h11 with the request deadlines."""
    return settings.uvicorn_options() | {"http": deadline_protocol(settings.head_timeout_s, settings.body_timeout_s,
                                                                   settings.max_header_bytes)}
