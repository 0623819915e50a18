"""A redis-server of the test's own, with an append-only file: killed and restarted on it."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from .service import free_port


class AofRedis:
    """A redis-server of our own, fsyncing every write to its append-only file."""

    def __init__(self, data: Path) -> None:
        self.data, self.port = data, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.data), "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:  # until it listens; it may still be loading its AOF
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.02)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
