"""One exclusive file lock, shared by everything that writes a folder two processes may open at once
(a frame cache, a demonstration collection)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


class FolderBusy(BlockingIOError):
    """Another process holds the lock and the caller asked not to wait."""


@contextlib.contextmanager
def exclusive_lock(path: str | Path, *, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive POSIX lock on ``path`` (created empty when missing) for the block.

    With ``wait=False`` a lock another process holds raises :class:`FolderBusy` at once instead of
    waiting. The lock goes with the process: a killed holder leaves nothing to clean up. Where POSIX
    file locks do not exist the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:  # no POSIX file locks on this system
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as error:
            raise FolderBusy(f"{path} is locked by another process") from error
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


__all__ = ["FolderBusy", "exclusive_lock"]
