"""Writing files so that nothing is half-written or lost: a temporary file in the target folder, then a rename.

The temporary file is made private (``mkstemp``'s 0600) while it is written, and given the mode an ordinary
``open(path, "w")`` would give before it is renamed into place: the mode of the file it replaces, else
0666 less the process's umask. Its name (``.STEM.XXXXXXXX.tmpSUFFIX``) is cut to fit the folder's NAME_MAX, so
that a long but legal file name can be written. Every ``OSError`` on the way (a full disk, a read-only
folder, a quota) is raised again, of the same type and errno, with what was being written and the path.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: Bytes ``mkstemp`` adds to a name (its random part).
_RANDOM = 8


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


def umask() -> int:
    """The process's umask (read from /proc where it can be, since ``os.umask`` can only be read by setting it)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(path: str | os.PathLike[str]) -> int:
    """The permission bits a write to ``path`` gives: those of the file it replaces, else 0666 less the umask."""
    try:
        st = os.stat(path)
    except OSError:
        return 0o666 & ~umask()
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else 0o666 & ~umask()


def name_max(folder: str | os.PathLike[str]) -> int:
    """The longest file name (in bytes) the file system of ``folder`` holds (asked of its nearest existing folder;
    255 where the system does not say)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def temporary_affixes(path: Path) -> tuple[str, str]:
    """``mkstemp``'s prefix and suffix for a temporary file beside ``path``: ``.STEM.`` and ``.tmpSUFFIX``, the stem
    cut (in bytes) so that the whole name fits the folder's NAME_MAX (the suffix is kept: some writers read it)."""
    stem, suffix = os.fsencode(path.stem), os.fsencode(".tmp" + path.suffix)
    room = name_max(path.parent) - len(suffix) - _RANDOM - 2
    if room < 0:  # a suffix as long as the name itself: drop it rather than fail on a name of our own
        stem, suffix, room = b"", b".tmp", name_max(path.parent) - 4 - _RANDOM - 2
    return "." + os.fsdecode(stem[:max(room, 0)]) + ".", os.fsdecode(suffix)


def io_error(err: OSError, doing: str) -> OSError:
    """``err`` again, of the same type and errno, saying what was being done (naming the path): one line."""
    reason = err.strerror or str(err) or type(err).__name__
    new = type(err)(err.errno, f"{doing}: {reason}") if err.errno is not None else type(err)(f"{doing}: {reason}")
    return new


def regular_file(path: str | os.PathLike[str], what: str = "image") -> os.stat_result:
    """``os.stat`` of ``path`` when it is a regular file (links followed); otherwise the error naming it and its
    kind: ``FileNotFoundError`` when missing, ``ValueError`` for a folder, FIFO, socket or device (reading a FIFO
    blocks until something writes to it)."""
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {name!r}: no such file") from None
    except OSError as err:
        raise OSError(err.errno, f"{what} {name!r}: cannot read its file status ({err.strerror or err})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {name!r}: {file_kind(st.st_mode)}, not a regular file; only regular files are read")
    return st


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words, from its ``st_mode``."""
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], what: str = "file") -> Iterator[Path]:
    """A temporary path in ``path``'s folder (same suffix) to write to; renamed onto ``path`` (``os.replace``) when the
    block succeeds, removed when it fails. A reader never sees half a file, and a failed write leaves an earlier file
    untouched. An ``OSError`` (a full disk, …) comes out naming ``what``, ``path`` and the step that failed."""
    path = Path(path)
    folder = check_folder(path, what)
    target = os.fspath(path)
    prefix, suffix = temporary_affixes(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
        os.close(fd)
    except OSError as err:
        raise io_error(err, f"cannot write the {what} {target!r}: cannot create a temporary file in "
                            f"{os.fspath(folder)!r}") from None
    try:
        try:
            yield Path(tmp)
        except OSError as err:
            raise io_error(err, f"cannot write the {what} {target!r} (through the temporary file {tmp!r})") \
                from None
        try:
            os.chmod(tmp, new_file_mode(path))
            os.replace(tmp, path)
        except OSError as err:
            raise io_error(err, f"cannot write the {what} {target!r}: renaming the temporary file {tmp!r} "
                                "onto it failed") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike[str], data: bytes, what: str = "file") -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, what) as tmp:
        tmp.write_bytes(data)
    return Path(path)
