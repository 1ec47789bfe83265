"""A TCP proxy on loopback in front of a real server, for fault tests: `fail(n)` closes the
next n connections with a reset as soon as they are accepted and drops the open ones, as a
server restarting or a network blip does to its clients."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class FlakyProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._failing = 0
        self.refused = 0  # connections reset so far
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(self, connections: int) -> None:
        with self._lock:
            self._failing = connections
            for sock in self._open:
                # Shut down before the close: closing a socket that a pump thread is still
                # reading leaves the connection open, and the server would keep the
                # client's session (and the row locks of its open transaction).
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                _reset(sock)
            self._open.clear()

    def close(self) -> None:
        self.fail(0)
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._failing > 0:
                    self._failing -= 1
                    self.refused += 1
                    _reset(client)
                    continue
                try:
                    upstream = socket.create_connection(self.target)
                except OSError:
                    _reset(client)
                    continue
                self._open += [client, upstream]
            pumps = [threading.Thread(target=_pump, args=pair, daemon=True)
                     for pair in ((client, upstream), (upstream, client))]  # fmt: skip
            for pump in pumps:
                pump.start()
            threading.Thread(target=self._close_after, args=(pumps, client, upstream),
                             daemon=True).start()  # fmt: skip

    def _close_after(self, pumps: list[threading.Thread], *sockets: socket.socket) -> None:
        """Close a connection's two sockets once both directions ended (else every
        connection the proxy ever carried would keep two descriptors open)."""
        for pump in pumps:
            pump.join()
        with self._lock:
            for sock in sockets:
                with contextlib.suppress(ValueError):
                    self._open.remove(sock)
                with contextlib.suppress(OSError):
                    sock.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _reset(sock: socket.socket) -> None:
    """Close with RST, not FIN: the peer sees 'connection reset'."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
