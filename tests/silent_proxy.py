"""A TCP proxy on loopback that can make the connections through it go silent: what a
peer that vanished without closing looks like (a host gone, a firewall or NAT that
dropped the connection). Data sent into a silenced connection is read and thrown away,
and nothing ever comes back; connections made afterwards pass normally. It can also cut
connections the moment the server answers: the request went, its answer never comes."""

from __future__ import annotations

import socket
import threading

from elric.redis_server import free_port


class SilentProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self._closed = False
        self.cut_answers = 0   # how many of the next connections lose their first answer
        self.connections = 0
        self.refuse_after: int | None = None   # connections it takes before it closes
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                if self._listener.fileno() == -1:   # closed (refuse_after, close)
                    return
                continue
            silent = threading.Event()
            with self._lock:
                self._pairs.append((client, server, silent))
                self.connections += 1
                cut, self.cut_answers = self.cut_answers > 0, max(self.cut_answers - 1, 0)
                if self.connections == self.refuse_after:   # later ones are refused
                    self._listener.close()
            for src, dst, cuts in ((client, server, False), (server, client, cut)):
                threading.Thread(target=self._pump, args=(src, dst, silent, cuts),
                                 daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, silent: threading.Event,
              cut: bool = False) -> None:
        try:
            while data := src.recv(65536):
                if cut:
                    break
                if not silent.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        if not silent.is_set():   # a silenced connection is never closed by the proxy
            for s in (src, dst):
                shut(s)

    def silence(self) -> int:
        """Make every open connection go silent; returns how many there were."""
        with self._lock:
            for _, _, silent in self._pairs:
                silent.set()
            return len(self._pairs)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            for s in [self._listener, *(s for pair in self._pairs for s in pair[:2])]:
                shut(s)   # close() alone wakes no thread blocked on it, on Linux
                s.close()


def shut(sock: socket.socket) -> None:
    """Shut ``sock`` down both ways, which wakes a thread blocked reading or accepting."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:   # not connected (any more)
        pass
