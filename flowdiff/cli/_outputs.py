"""Outputs that cannot destroy anything: every path a command will write is planned and checked before the work.

A plan refuses, before any model runs: two outputs with one name (or one output's name as another's folder), an
output that is an input, an output that exists (unless ``--overwrite``), a name longer than the file system holds
(NAME_MAX), and a folder that cannot be made or written. Files are then written atomically
(:func:`flowdiff.engine._files.atomic_path`: a temporary file in the target folder, then ``os.replace``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..engine._files import name_max
from ..runs.imageio import LOSSLESS_SUFFIXES
from ._errors import CommandError, UsageError

#: Folders :func:`plan` made in this command, outermost first: a command that then fails removes those it left
#: empty (:func:`remove_planned_folders`), so that a typo in an input leaves no empty ``--out`` behind.
_MADE: list[Path] = []


def forget_planned_folders() -> None:
    """Start a command: no folder made yet (and those of a finished command are its own)."""
    _MADE.clear()


def remove_planned_folders() -> None:
    """After a failed command: remove the folders :func:`plan` made that are still empty, innermost first."""
    while _MADE:
        folder = _MADE.pop()
        try:
            folder.rmdir()  # only an empty folder goes; anything written into it keeps it
        except OSError:
            pass


def make_folder(folder: Path) -> None:
    """Make ``folder`` (and its missing parents), remembering those made for :func:`remove_planned_folders`."""
    missing = []
    probe = folder
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    _MADE.extend(reversed(missing))


def relative_names(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Each input's path relative to the folder all inputs share, so that outputs keep the inputs' layout:
    ``a/x.png b/x.png`` → ``a/x.png``, ``b/x.png``; one input ``d/x.png`` → ``x.png``."""
    resolved = [Path(p).resolve() for p in inputs]
    if not resolved:
        return []
    common = Path(os.path.commonpath([p.parent for p in resolved]))
    return [p.relative_to(common) for p in resolved]


def image_output_name(relative: Path) -> Path:
    """The output name of an input image: its relative path, with ``.png`` for lossy or unknown types (JPEG, …)."""
    return relative if relative.suffix.lower() in LOSSLESS_SUFFIXES else relative.with_suffix(".png")


def plan(outputs: Sequence[tuple[Path, str]], *, inputs: Sequence[str | os.PathLike[str]] = (),
         overwrite: bool = False) -> list[Path]:
    """Check ``(path, what)`` outputs before the work starts; make their folders; return the paths.

    ``what`` says where a path comes from (``"--out"``, ``"the reconstruction of a/x.png"``) for the messages.
    """
    seen: dict[Path, str] = {}
    ins = {Path(p).resolve(): os.fspath(p) for p in inputs}
    for path, what in outputs:
        limit = name_max(path.parent)
        if len(os.fsencode(path.name)) > limit:  # it could not be written after the work (nor even looked up)
            raise CommandError(f"{what} {os.fspath(path)!r}: its name is {len(os.fsencode(path.name))} bytes, and the "
                               f"file system of {os.fspath(path.parent)!r} holds names of up to {limit} bytes; "
                               "shorten the name (outputs keep the inputs' names, latents add '.safetensors')")
        key = path.resolve()
        if key in seen:
            raise UsageError(f"{what} and {seen[key]} would both be written to {os.fspath(path)!r}; give distinct "
                             "names (outputs keep the inputs' relative paths)")
        seen[key] = what
        if key in ins:
            if not overwrite:
                raise UsageError(f"{what} would overwrite the input {ins[key]!r}; write elsewhere (or pass "
                                 "--overwrite to replace the input)")
        elif path.is_dir():
            raise CommandError(f"{what} would be written to {os.fspath(path)!r}, which is a folder; give a file name")
        elif path.exists() and not overwrite:
            raise CommandError(f"{what} would overwrite {os.fspath(path)!r}, which exists; pass --overwrite to "
                               "replace it, or write elsewhere")
    given = {path.resolve(): path for path, _ in outputs}
    for path, what in outputs:  # one output's name taken as another's folder (--latents X beside --out X)
        folder = next((p for p in path.resolve().parents if p in seen), None)
        if folder is not None:
            raise UsageError(f"{what} {os.fspath(path)!r} would be written into {os.fspath(given[folder])!r}, the "
                             f"name of {seen[folder]}; give distinct names")
    for path, what in outputs:
        folder = path.parent
        try:
            make_folder(folder)
        except FileExistsError:
            raise CommandError(f"{what} {os.fspath(path)!r}: {os.fspath(folder)!r} is a file, not a folder") from None
        except OSError as err:
            raise CommandError(f"{what} {os.fspath(path)!r}: cannot create the folder {os.fspath(folder)!r} "
                               f"({err.strerror or err})") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise CommandError(f"{what} {os.fspath(path)!r}: the folder {os.fspath(folder)!r} is not writable")
        probe = None
        try:  # os.access trusts permission bits; a read-only file system says no only when written to
            fd, probe = tempfile.mkstemp(prefix=".flowdiff-probe.", dir=folder)
            os.close(fd)
        except OSError as err:
            raise CommandError(f"{what} {os.fspath(path)!r}: cannot write into the folder {os.fspath(folder)!r} "
                               f"({err.strerror or err})") from None
        finally:
            if probe is not None:
                os.unlink(probe)
    return [path for path, _ in outputs]


def output_dir(text: str, option: str = "--out") -> Path:
    """An output folder option: not an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise CommandError(f"{option} {text!r} is a file; it names the folder to write into")
    return path
