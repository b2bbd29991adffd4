"""The listening end of the engine channel (`engine_channel.py`), on its own so that the server
can open it and spawn the engine process (`engine_launch.py`) before importing torch: the
channel's message frames need torch, the socket does not."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path


class ChannelListener:
    """A Unix socket listening in a new folder only this user can enter (mode 0700), made
    before any event loop runs, so that the engine process can be started, and connect, while
    the front is still importing (`ocula.server.engine_launch`). A connection made before the
    front accepts waits in the socket's backlog."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="ocula-"))
        self.path = self.folder / "engine.sock"
        self.socket: socket.socket | None = None
        try:
            self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.socket.bind(str(self.path))
            self.socket.listen(1)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Closes the socket (nothing more once a channel's server has closed it) and removes its
        folder (already gone once the engine connected; left behind by an engine killed before
        it connected)."""
        if self.socket is not None:
            self.socket.close()
        shutil.rmtree(self.folder, ignore_errors=True)
