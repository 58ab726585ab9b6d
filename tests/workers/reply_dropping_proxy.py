"""A TCP proxy in front of a real redis-server for fault tests: it forwards both ways, except that it can lose the
reply of a command that Redis ran, the way a connection that drops at the wrong moment does."""

from __future__ import annotations

import socket
import threading


class ReplyDroppingProxy:
    """Forwards every connection to Redis at `port`. Once a command holding `command_marker` (a script's text) has
    gone to Redis, the first reply bytes that come back holding `reply_marker` (None: any reply but an error, which
    says the command did not run) are not forwarded: the connection is closed instead, so Redis has run the command
    and the client never hears of it. That happens `times` times."""

    def __init__(self, port: int, command_marker: bytes, reply_marker: bytes | None, *, times: int = 1) -> None:
        self.target = ("127.0.0.1", port)
        self.command_marker, self.reply_marker = command_marker, reply_marker
        self.left = times
        self.dropped = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        self._listener.close()
        for sock in sockets:
            _close(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            with self._lock:
                if self._closed:
                    _close(client), _close(server)
                    return
                self._sockets += [client, server]
            armed = threading.Event()  # a command holding the marker went to Redis on this connection
            threading.Thread(target=self._commands, args=(client, server, armed), daemon=True).start()
            threading.Thread(target=self._replies, args=(server, client, armed), daemon=True).start()

    def _commands(self, client: socket.socket, server: socket.socket, armed: threading.Event) -> None:
        while data := _recv(client):
            # redis-py sends a command (or a whole pipeline) in one write, and waits for its replies before the next
            if self.command_marker in data:
                armed.set()
            else:
                armed.clear()
            server.sendall(data)
        _close(client), _close(server)

    def _replies(self, server: socket.socket, client: socket.socket, armed: threading.Event) -> None:
        while data := _recv(server):
            if armed.is_set() and self._is_marked(data) and self._take_drop():
                break
            try:
                client.sendall(data)
            except OSError:
                break
        _close(client), _close(server)

    def _is_marked(self, reply: bytes) -> bool:
        return not reply.startswith(b"-") if self.reply_marker is None else self.reply_marker in reply

    def _take_drop(self) -> bool:
        with self._lock:
            if self.left <= 0:
                return False
            self.left -= 1
        self.dropped.set()
        return True


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
