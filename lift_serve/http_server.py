"""The HTTP server's own protections, on top of uvicorn's settings (``Settings.uvicorn_options``).

uvicorn closes idle keep-alive connections but has no deadline for a request head: a client that
sends half a request line or header block (slowloris) holds its connection for ever, and a few
hundred of them exhaust the process's file descriptors. :func:`head_timeout_protocol` is uvicorn's
h11 protocol with that deadline: a connection that has not completed a request head within
``head_timeout_s`` of connecting (or of its previous response) is closed. Bodies and the app's own
work have their own limits (``LIFT_MAX_UPLOAD_BYTES``, ``LIFT_REQUEST_TIMEOUT_S``).
"""

from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadTimeoutH11Protocol(H11Protocol):
    head_timeout_s = 10.0
    _head_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._cancel_head_timer()  # the head is in: the request is the app's now

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request on this connection gets the same deadline

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()


def head_timeout_protocol(head_timeout_s: float) -> type[H11Protocol]:
    """The protocol class uvicorn gets as ``http=``, with this deadline."""
    return type("HeadTimeoutH11Protocol", (HeadTimeoutH11Protocol,), {"head_timeout_s": float(head_timeout_s)})


def server_options(settings) -> dict:
    """uvicorn's options for ``settings``: its limits, and h11 with the request-head deadline."""
    return settings.uvicorn_options() | {"http": head_timeout_protocol(settings.head_timeout_s)}
