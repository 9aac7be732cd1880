"""A doorbell a thread rings to wake `multiprocessing.connection.wait` in another (a socket pair's read end turns
readable). The job waits on worker pipes, the GPU decoders' outbox and the inference thread's results at once."""
from __future__ import annotations

import socket


class Doorbell:
    def __init__(self):
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def fileno(self) -> int:
        return self._r.fileno()

    def ring(self) -> None:
        try:
            self._w.send(b"\0")
        except (BlockingIOError, OSError):  # full: wake-ups are pending anyway
            pass

    def clear(self) -> None:
        """Take back every ring so far (call before looking at what the ringer left)."""
        try:
            while self._r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        self._r.close()
        self._w.close()
