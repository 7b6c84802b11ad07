"""uvicorn's h11 protocol with a header timeout: a connection that has not sent a whole request head
within `header_timeout_s` is closed (uvicorn times out idle keep-alive connections, not slow heads)."""
from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def header_timeout_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """An H11Protocol class whose connections must finish each request head within `header_timeout_s`."""

    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_late)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # a new request head begun on a kept-alive connection gets its own clock
            if self._head_timer is None and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_late)

        def handle_events(self) -> None:
            super().handle_events()
            if self._head_timer is not None and self.conn.their_state is not h11.IDLE:
                self._head_timer.cancel()  # the head is in: the request's own deadline takes over
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
