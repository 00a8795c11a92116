"""Writing files so that nothing is half-written or lost: a temporary file in the target folder, then a rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_folder(path: str | os.PathLike[str], what: str = "file") -> Path:
    """The folder ``path`` will be written into; an OSError naming it when it cannot be."""
    path = Path(path)
    folder = path.parent
    if not folder.exists():
        raise FileNotFoundError(f"cannot write the {what} {os.fspath(path)!r}: the folder {os.fspath(folder)!r} "
                                "does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write the {what} {os.fspath(path)!r}: {os.fspath(folder)!r} is not a folder")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write the {what} {os.fspath(path)!r}: it is a folder")
    return folder


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], what: str = "file") -> Iterator[Path]:
    """A temporary path in ``path``'s folder (same suffix) to write to; renamed onto ``path`` (``os.replace``) when the
    block succeeds, removed when it fails. A reader never sees half a file, and a failed write leaves an earlier file
    untouched."""
    path = Path(path)
    folder = check_folder(path, what)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike[str], data: bytes, what: str = "file") -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, what) as tmp:
        tmp.write_bytes(data)
    return Path(path)
