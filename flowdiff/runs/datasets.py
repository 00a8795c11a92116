"""A folder of images as a run that can be split over processes, interrupted and resumed.

A dataset run (``flowdiff roundtrip --data DIR``, ``flowdiff encode --data DIR``) is fixed by three things,
all independent of how many processes share it:

- **the inputs**: every file under DIR, recursively, in the sorted order of their relative POSIX paths
  (:func:`scan`). Files whose suffix names a type Pillow opens are inputs; every other file (a
  ``notes.txt``), every hidden file (a ``.DS_Store``, macOS's ``._x.png``), every file that is not a
  regular file (a FIFO, a socket or a device named ``x.png``) and every hidden folder is *listed as
  skipped*, with the reason, never dropped silently; a folder that cannot be listed is an
  error. An input that then cannot be read is an error naming it.
- **fixed batches** of the global order: batch b holds inputs b·S … (b+1)·S − 1 (:func:`batches`). A
  model evaluated on a batch of 3 and on a batch of 4 may differ at float rounding (matrix kernels
  block differently; an adaptive solve is controlled by its worst sample), so the batches never depend
  on the process count: rank r of N takes the batches left to do at positions r, r + N, … of their list,
  whole, and every number is the number a single process computes, bit for bit.
- **the manifest** ``OUT/run.json`` (:func:`manifest`): the arguments that define the numbers (the
  model's fingerprint, solver, grid, budget, dtype, batch size, the CPU thread count, …) and each input's SHA-256.

Each batch, once its images (and latents) are written, gets a completion record
``OUT/.flowdiff-run/batch-NNNNNN.json`` written atomically by the rank that ran it: the rank's part of
the table. A rerun with the same manifest skips the recorded batches and runs the rest (a batch cut
off by a kill has no record and is run again whole, its files rewritten); a rerun whose manifest
differs is refused with the first differing argument, old and new (:func:`difference`). Rank 0 merges
the records after the last batch (:func:`merge`): every input exactly once, sorted by path, into
``OUT/results.csv``, and a summary (:func:`summarize`) into ``OUT/summary.json``.

A run owns its OUT while it runs: :class:`FolderLock` holds ``OUT/.flowdiff-lock`` (an ``flock`` on it, which
the system drops when the process dies, and in it the holder's pid, host and start time). A second run into
the folder is refused naming the holder; a lock file left by a run that was killed is taken over, and said.

File names are kept as the file system gives them (a name that is not UTF-8 is a ``str`` with surrogate
escapes, ``os.fsdecode``'s form, and the JSON records keep it losslessly). Text meant for people and other
programs — ``results.csv``, ``summary.json`` and what is printed — carries :func:`escaped_name`: a backslash
doubled and each byte that is not UTF-8 as ``\\xNN``; :func:`unescaped_name` gives the name back.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import re
import socket
import stat
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine._files import atomic_path, file_kind

#: Format tag of ``run.json``.
MANIFEST_FORMAT = "flowdiff.dataset-run/1"
#: The folder of per-batch completion records inside OUT.
RECORDS = ".flowdiff-run"
#: The lock file of a run inside OUT.
LOCK = ".flowdiff-lock"


@dataclass(frozen=True)
class ImageFolder:
    """The inputs under ``root`` (relative POSIX paths, sorted) and what was skipped, as (path, reason)."""

    root: Path
    files: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]

    def path(self, relative: str) -> Path:
        return self.root / relative


def image_suffixes() -> frozenset[str]:
    """The file suffixes (lower case) of the image types Pillow can open."""
    from PIL import Image

    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def scan(root: str | os.PathLike[str]) -> ImageFolder:
    """Every file under ``root`` (recursively): the image files as inputs, in sorted order of their relative
    paths, the others listed as skipped with the reason (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {os.fspath(root)!r}: no such folder")
    suffixes = image_suffixes()
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    def unreadable(err: OSError) -> None:  # os.walk would otherwise skip a folder it cannot list, silently
        raise OSError(f"--data {os.fspath(root)!r}: cannot list the folder {err.filename!r} "
                      f"({err.strerror or err}); fix its permissions or move it out of --data") from None

    for folder, dirs, names in os.walk(root, onerror=unreadable):
        here = Path(folder)
        for d in list(dirs):
            rel = (here / d).relative_to(root).as_posix()
            if d.startswith("."):
                dirs.remove(d)
                skipped.append((rel + "/", "hidden folder, not entered"))
            elif (here / d).is_symlink():
                skipped.append((rel + "/", "symbolic link to a folder, not followed"))
        for name in names:
            rel = (here / name).relative_to(root).as_posix()
            suffix = Path(name).suffix.lower()
            mode = _mode(here / name)
            if name.startswith("."):  # e.g. macOS's ._x.png resource forks: not images, whatever their suffix
                skipped.append((rel, "hidden file"))
            elif mode is not None and not stat.S_ISREG(mode):  # a FIFO would block the reader for ever
                skipped.append((rel, f"{file_kind(mode)}, not a regular file; not read"))
            elif suffix in suffixes:
                files.append(rel)
            else:
                skipped.append((rel, f"not an image type flowdiff reads ({suffix or 'no suffix'})"))
    return ImageFolder(root, tuple(sorted(files)), tuple(sorted(skipped)))


def _mode(path: Path) -> int | None:
    """``st_mode`` of ``path`` (links followed); ``None`` when it cannot be read (the input's read names it)."""
    try:
        return os.stat(path).st_mode
    except OSError:
        return None


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as err:
        raise OSError(err.errno, f"cannot read the input {os.fspath(path)!r} to record its SHA-256 in the run's "
                                 f"manifest: {err.strerror or err}") from None
    return h.hexdigest()


def batches(count: int, size: int) -> list[range]:
    """Fixed batches of the global order: batch b is ``range(b·size, min((b+1)·size, count))``."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"batch size must be a positive int, got {size!r}")
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def manifest(command: str, arguments: Mapping[str, Any], folder: ImageFolder) -> dict[str, Any]:
    """What defines a run's numbers: the command, its ``arguments`` (JSON values) and each input with its SHA-256."""
    return {"format": MANIFEST_FORMAT, "command": command, "arguments": dict(arguments),
            "inputs": [[rel, file_digest(folder.path(rel))] for rel in folder.files]}


def run_id(man: Mapping[str, Any]) -> str:
    """A digest of a manifest: every completion record carries it, so that no record of another run is merged."""
    return hashlib.sha256(json.dumps(man, sort_keys=True).encode()).hexdigest()[:16]


def difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """The first difference between two manifests, in words (``None`` if they are equal)."""
    if old.get("format") != new.get("format"):
        return f"the run format: {old.get('format')!r} in the folder, {new.get('format')!r} now"
    if old.get("command") != new.get("command"):
        return f"the command: 'flowdiff {old.get('command')}' made this folder, this is 'flowdiff {new.get('command')}'"
    a, b = old.get("arguments", {}), new.get("arguments", {})
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            what = key if key.startswith("model ") else "--" + key.replace("_", "-")
            return f"{what}: {a.get(key, '(not set)')!r} in the folder's run, {b.get(key, '(not set)')!r} now"
    ia, ib = [tuple(x) for x in old.get("inputs", [])], [tuple(x) for x in new.get("inputs", [])]
    if ia != ib:
        gone = sorted(set(p for p, _ in ia) - set(p for p, _ in ib))
        added = sorted(set(p for p, _ in ib) - set(p for p, _ in ia))
        digests = dict(ia)
        changed = sorted(p for p, d in ib if p in digests and digests[p] != d)
        parts = [f"{len(ia)} images in the folder's run, {len(ib)} now"]
        for label, names in (("removed", gone), ("added", added), ("changed", changed)):
            if names:
                parts.append(f"{label}: {', '.join(names[:3])}{', …' if len(names) > 3 else ''}")
        return "the inputs under --data: " + "; ".join(parts)
    return None


def read_manifest(path: Path) -> dict[str, Any]:
    """``run.json``; a ``ValueError`` naming it when it is not a dataset-run manifest."""
    try:
        man = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{os.fspath(path)!r} is not a flowdiff run manifest ({err})") from None
    if not isinstance(man, dict) or man.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a flowdiff run manifest (format "
                         f"{man.get('format') if isinstance(man, dict) else None!r}, expected {MANIFEST_FORMAT!r})")
    return man


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, atomically."""
    with atomic_path(path, "file") as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def record_path(out: Path, batch: int) -> Path:
    return out / RECORDS / f"batch-{batch:06d}.json"


def write_record(out: Path, run: str, batch: int, rows: Sequence[Mapping[str, Any]], rank: int = 0) -> None:
    """The completion record of ``batch``: its rows and the rank that made them, after its files are written
    (atomically: all or nothing)."""
    record_path(out, batch).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(record_path(out, batch), "completion record") as tmp:
        tmp.write_text(json.dumps({"run": run, "batch": batch, "rank": rank, "rows": list(rows)}))


def _record(out: Path, run: str, batch: int) -> list[dict[str, Any]] | None:
    path = record_path(out, batch)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # none, or not ours: the batch is run again
    if not isinstance(data, dict) or data.get("run") != run or data.get("batch") != batch:
        return None
    return data.get("rows")


def completed(out: Path, run: str, groups: Sequence[range], files: Sequence[str]) -> set[int]:
    """The batches whose completion record of this run is present and lists exactly their inputs."""
    done = set()
    for b, group in enumerate(groups):
        rows = _record(out, run, b)
        if rows is not None and [r.get("path") for r in rows] == [files[i] for i in group]:
            done.add(b)
    return done


def clear_records(out: Path) -> None:
    """Remove every completion record (a run started over)."""
    folder = out / RECORDS
    if folder.is_dir():
        for path in folder.glob("batch-*.json"):
            if path.is_file():
                try:
                    path.unlink()
                except OSError as err:
                    raise OSError(err.errno, f"cannot remove the completion record {os.fspath(path)!r} of the "
                                             f"earlier run: {err.strerror or err}") from None


def merge(out: Path, run: str, groups: Sequence[range], files: Sequence[str]) -> list[dict[str, Any]]:
    """Every record's rows, in the global (sorted path) order; an error naming the batches without one."""
    missing = [b for b in range(len(groups)) if b not in completed(out, run, groups, files)]
    if missing:
        raise RuntimeError(f"batches {missing[:5]}{' …' if len(missing) > 5 else ''} of {len(groups)} have no "
                           "completion record; rerun the same command to finish them")
    rows = [row for b in range(len(groups)) for row in (_record(out, run, b) or [])]
    if [r["path"] for r in rows] != list(files):
        raise RuntimeError("the completion records do not list every input exactly once")
    return rows


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """The rows as CSV (floats in full precision, ``repr``), atomically."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([repr(row[c]) if isinstance(row[c], float) else row[c] for c in columns])
    with atomic_path(path, "results table") as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The q-th percentile by nearest rank: the smallest value with at least q % of the values ≤ it (an actual
    value of the data, never an interpolation between two, so that infinite PSNRs stay well defined)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _stats(values: Sequence[float], higher_is_worse: bool) -> dict[str, float]:
    """Mean, median and the two worse-tail percentiles (p90/p99 of an error, p10/p1 of a PSNR), and the worst."""
    tail = (90, 99) if higher_is_worse else (10, 1)
    out = {"mean": math.fsum(values) / len(values) if all(map(math.isfinite, values)) else
           (math.inf if any(v == math.inf for v in values) else math.nan), "p50": nearest_rank(values, 50)}
    out.update({f"p{q}": nearest_rank(values, q) for q in tail})
    out["worst"] = max(values) if higher_is_worse else min(values)
    return out


def summarize(rows: Sequence[Mapping[str, Any]], metrics: Mapping[str, bool], worst_by: str,
              counts: Iterable[str] = ()) -> dict[str, Any]:
    """The summary of a merged table: the count, per metric (``{name: higher_is_worse}``) its mean, p50, tail
    percentiles and worst value, the worst image by ``worst_by`` with its row, and the least, mean and largest
    of each integer column of ``counts`` (the NFE an image went through: its batch's, shared by the batch)."""
    summary: dict[str, Any] = {"images": len(rows)}
    for name, higher in metrics.items():
        summary[name] = _stats([float(r[name]) for r in rows], higher)
    higher = metrics[worst_by]
    worst = (max if higher else min)(rows, key=lambda r: float(r[worst_by]))
    summary["worst"] = dict(worst)
    for name in counts:
        values = [int(r[name]) for r in rows]
        summary[name] = {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}
    return summary


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as the strings ``"inf"``, ``"-inf"``, ``"nan"`` (JSON has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def escaped_name(name: str) -> str:
    """A file name as text any UTF-8 file or terminal holds, losslessly: each backslash doubled, each byte of the
    name that is not UTF-8 as ``\\xNN`` (``os.fsencode`` of a surrogate-escaped name). :func:`unescaped_name`
    inverts it."""
    return os.fsencode(name).replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


_CONTROLS = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """``text`` (an :func:`escaped_name`, its backslashes doubled) for one printed line: each character that is not
    printable (a newline, an escape ``\\x1b``, a line separator) written as ``\\n``, ``\\xNN`` or ``\\uNNNN``, so
    that a file name cannot break a line or drive the terminal. Files keep the escaped name; only the terminal's lines
    are escaped further."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _CONTROLS.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 256
                                                                    else f"\\u{ord(c):04x}") for c in text)


def unescaped_name(text: str) -> str:
    """The file name (``os.fsdecode`` form) that :func:`escaped_name` wrote as ``text``."""
    def byte(match: re.Match[str]) -> str:
        token = match.group(0)
        return "\\" if token == "\\\\" else chr(0xDC00 + int(token[2:], 16))  # a surrogate escape of the byte

    return os.fsdecode(os.fsencode(re.sub(r"\\\\|\\x[0-9a-f]{2}", byte, text)))


class FolderBusy(RuntimeError):
    """Another live run holds the folder's lock."""


class FolderLock:
    """The lock of a run's output folder: ``OUT/.flowdiff-lock``, ``flock``-ed for as long as the run holds it.

    The file says who holds it (pid, host, start time, command). ``flock`` is dropped by the system when the
    process dies, so a lock file nobody holds is one a killed run left behind: it is taken over, and
    :attr:`took_over` says whose it was. Use as a context manager, or :meth:`acquire` and :meth:`release`.
    """

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.path = Path(out) / LOCK
        self.fd: int | None = None
        self.took_over: str | None = None

    def _holder(self, fd: int) -> dict[str, Any]:
        try:
            text = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")
            holder = json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            holder = {}
        return holder if isinstance(holder, dict) else {}

    @staticmethod
    def describe(holder: Mapping[str, Any]) -> str:
        if not holder:
            return "a process that has not yet said who it is"
        return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
                + (f" ({holder['command']})" if holder.get("command") else ""))

    def acquire(self) -> FolderLock:
        """Take the lock, or raise :class:`FolderBusy` naming the holder (an ``OSError`` naming the file when it
        cannot be made)."""
        import fcntl

        name = os.fspath(self.path)
        while True:
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                raise OSError(err.errno, f"cannot create the lock file {name!r} of the output folder: "
                                         f"{err.strerror or err}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise FolderBusy(f"the output folder {os.fspath(self.path.parent)!r} is in use by another run: "
                                 f"{self.describe(holder)}, holds its lock {name!r}; wait for it to finish, or "
                                 "write elsewhere") from None
            except OSError as err:
                os.close(fd)
                raise OSError(err.errno, f"cannot lock {name!r}: {err.strerror or err}") from None
            try:  # the file may have been released and removed between our open and our flock: then again
                same = os.fstat(fd).st_ino == os.stat(name).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        left = self._holder(fd)
        if left:
            alive = _alive(left)
            self.took_over = (f"took over the lock {name!r} left by {self.describe(left)}, which "
                              + ("no longer runs" if alive is False else "no longer holds it (killed)"))
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv[1:])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (nothing when not held)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _alive(holder: Mapping[str, Any]) -> bool | None:
    """Whether the holder's pid runs (on this host; ``None`` when that cannot be told)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid < 1:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
