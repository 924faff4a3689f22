"""A loopback TCP proxy in front of a real redis-server that can drop a connection on cue.

It forwards bytes both ways. When armed with ``drop_reply_to(b"EVALSHA", nth=2)``, it forwards the
nth client request that contains that word to Redis, reads Redis's answer, and closes the client's
connection instead of passing the answer on: the command ran, but the client only sees a dropped
connection, which is exactly what makes redis-py retry a command that already happened.
"""

from __future__ import annotations

import socket
import threading
from typing import Callable, Optional


class DroppingProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._word: Optional[bytes] = None
        self._countdown = 0
        self._then: Optional[Callable[[], None]] = None
        self.dropped = 0
        self._closed = False
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def drop_reply_to(self, word: bytes, nth: int = 1, then: Optional[Callable[[], None]] = None) -> None:
        """Drop the connection instead of answering the ``nth`` next request containing ``word``;
        ``then`` runs once Redis has answered it, before the client is cut off."""
        with self._lock:
            self._word, self._countdown, self._then = word, nth, then

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._socks += [client, upstream]
            swallow, answered = threading.Event(), threading.Event()
            threading.Thread(target=self._pump_requests, args=(client, upstream, swallow, answered),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, swallow, answered), daemon=True).start()

    def _should_drop(self, data: bytes) -> bool:
        with self._lock:
            if self._word is None or self._word not in data:
                return False
            self._countdown -= 1
            if self._countdown > 0:
                return False
            self._word = None
            return True

    def _pump_requests(self, client: socket.socket, upstream: socket.socket, swallow: threading.Event,
                       answered: threading.Event) -> None:
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                if self._should_drop(data):
                    # Let Redis run it and answer, then cut the client off: the answer never arrives.
                    swallow.set()
                    upstream.sendall(data)
                    answered.wait(5)
                    if self._then is not None:
                        self._then()
                    self.dropped += 1
                    break
                upstream.sendall(data)
        except OSError:
            pass
        for sock in (client, upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _pump(self, source: socket.socket, sink: socket.socket, swallow: threading.Event,
              answered: threading.Event) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if swallow.is_set():
                    answered.set()
                    break
                sink.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for sock in self._socks:
            try:
                sock.close()
            except OSError:
                pass
