"""Atomic writes: a reader sees the old file or directory or the new one, never a mix.

Every write goes to a temporary sibling that is flushed to disk and then renamed into
place. Used for policy bundles, signatures, registry caches and model caches.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["fsync_dir", "publish_dir", "write_file", "write_synced"]


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk (not atomic by itself)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename in it) to disk, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically (temporary sibling, fsync, rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write_synced(tmp, data)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return target


@contextmanager
def publish_dir(
    path: str | os.PathLike[str], *, keep_existing: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """Fill a temporary sibling directory (yielded), then swap it in for ``path``.

    On an exception nothing is published and the previous directory stays intact. When
    the swap fails because another process published first, and ``keep_existing``
    accepts what is there now, theirs is kept (a cache filled twice is filled once).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old: Path | None = None
    try:
        yield tmp
        try:
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}-{id(tmp)}")
                os.replace(target, old)
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except OSError:
            if old is not None and not target.exists():
                os.replace(old, target)
                old = None
            if keep_existing is None or not keep_existing(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
