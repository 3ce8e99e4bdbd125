"""An exclusive lock on a folder that a process writes into (a run folder, an experiment folder, a feature
cache being written), so that two processes never mix their files there.

The lock is ``flock(2)`` on ``FOLDER/.bnrhn.lock``: the kernel releases it when the holding process
exits, however it exits (Ctrl-C, ``kill -9``, a crash), so a stale lock file can never block a later run.
The file holds the holder's process id, host name and command line, for the message a second process
gets. (``fcntl`` is used directly: the lock must die with the process, which a lock file checked by
its existence — what most lock-file packages do — cannot guarantee.)
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from bnrhn.errors import UserFacingError

LOCK_NAME = ".bnrhn.lock"


class FolderInUse(UserFacingError, RuntimeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """``with FolderLock(folder, what="run folder"):`` — hold the folder for the block; re-entrant in a process."""

    _held: dict[str, int] = {}  # resolved folder → depth, so that nested users in one process share the lock
    _files: dict[str, object] = {}

    def __init__(self, folder: str | Path, what: str = "folder", wait=None) -> None:
        """``wait``: None refuses a held folder (``FolderInUse``); a callable is told why and the lock is then
        waited for (a feature cache another process is writing: it will be there to reuse)."""
        self.folder = Path(folder)
        self.what = what
        self.wait = wait
        self.key = ""

    def __enter__(self) -> FolderLock:
        import fcntl

        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"{self.what} {self.folder} exists and is not a folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.key = str(self.folder.resolve())
            if self.key in FolderLock._held:
                FolderLock._held[self.key] += 1
                return self
            f = open(self.folder / LOCK_NAME, "a+", encoding="utf-8")
        except OSError as exc:  # read-only file system, no permission, /proc, …: say so in words, before any work
            raise NotADirectoryError(
                f"cannot write into the {self.what} {self.folder}: {exc.strerror or exc}; choose a writable folder"
            ) from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            if self.wait is None:
                f.close()
                raise FolderInUse(
                    f"{self.what} {self.folder} is in use by {holder}; wait for it to finish, stop it, or choose "
                    "another folder"
                ) from None
            self.wait(f"{self.what} {self.folder} is in use by {holder}; waiting for it")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv[:6])})\n")
        f.flush()
        FolderLock._held[self.key] = 1
        FolderLock._files[self.key] = f
        return self

    def __exit__(self, *exc) -> None:
        FolderLock._held[self.key] -= 1
        if FolderLock._held[self.key] == 0:
            del FolderLock._held[self.key]
            f = FolderLock._files.pop(self.key)
            f.close()  # releases the flock


