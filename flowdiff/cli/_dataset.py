"""``flowdiff roundtrip --data DIR`` and ``flowdiff encode --data DIR``: a folder of images, on one process or many
(``torchrun``), resumable.

The folder walk, the fixed batches, the manifest and the completion records are :mod:`flowdiff.runs.datasets`; the
processes are :mod:`flowdiff.runs.distributed`. Outputs, in ``--out OUT``:

    OUT/images/REL           the reconstruction of DIR/REL (roundtrip; lossy types as .png, like decode)
    OUT/latents/REL.safetensors   its latent (encode; roundtrip with --save-latents), for 'flowdiff decode'
    OUT/results.csv          one row per image, sorted by path
    OUT/summary.json         the count, means, percentiles, the worst image, what was skipped
    OUT/run.json             the manifest; OUT/.flowdiff-run/ the completion record of each batch
    OUT/.flowdiff-lock       held while a run writes OUT: a second run into OUT is refused, naming the holder

``--overwrite`` removes what the earlier run recorded in ``OUT/run.json`` wrote (by the names its manifest fixes,
nothing else) before it starts over; a rerun that finds files of recorded batches deleted runs those batches again.

``FLOWDIFF_STOP_AFTER=k`` (a test hook) stops a process the way a kill would once it has finished k images: the
batch holding the k-th has its files written but no completion record, and the command exits with status 3.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..engine.latent import Latent
from ..engine.plugins import decodes_with, solver_plugin
from ..runs import datasets as _ds
from ..runs.distributed import Ranks, close, process_group, rank_device
from ..tools.metrics import max_abs_error, mse, psnr
from . import _commands, _prompt
from ._errors import CommandError, UsageError, one_line, say
from ._images import as_written, write_images
from ._outputs import image_output_name, make_folder, output_dir, plan

#: Images per batch unless --batch-size says otherwise.
DEFAULT_BATCH = 16
#: Exit status of a process stopped by FLOWDIFF_STOP_AFTER.
STOPPED = 3
#: mse, max_abs, psnr: of the decoder's output; the ``_written`` ones: of the image files written (rounded, clipped).
ROUNDTRIP_COLUMNS = ("path", "mse", "max_abs", "psnr", "mse_written", "max_abs_written", "psnr_written",
                     "nfe_encode", "nfe_decode")
ENCODE_COLUMNS = ("path", "latent", "nfe_encode", "latent_mean", "latent_std")
#: Options that do not change a run's numbers (where it is written, how fast, whether to start over).
_NOT_DEFINING = {"func", "command", "data", "images", "out", "overwrite", "threads", "latents", "no_progress"}


class Stopped(CommandError):
    """FLOWDIFF_STOP_AFTER was reached (a simulated kill)."""

    exit_code = STOPPED


def add_data_options(parser: argparse.ArgumentParser, command: str) -> None:
    """--data, --batch-size (and for roundtrip --save-latents) on ``parser``."""
    from ._argtypes import positive_int

    group = parser.add_argument_group("a folder of images (one process, or many under torchrun; resumable)")
    group.add_argument("--data", default=None, metavar="DIR",
                       help="every image under DIR, recursively, instead of image files; needs --out DIR. A rerun "
                            "with the same arguments resumes; under 'torchrun --nproc_per_node N -m flowdiff' the "
                            "processes share the batches")
    group.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                       help=f"images per batch with --data (default: {DEFAULT_BATCH}); the batches are fixed in the "
                            "sorted order of the paths, so the numbers do not depend on the process count")
    if command == "roundtrip":
        group.add_argument("--save-latents", action="store_true",
                           help="with --data, also write each image's latent to OUT/latents/REL.safetensors")
    else:
        parser.set_defaults(save_latents=False)


def with_data(command: str, plain: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The command function: ``plain`` for image files on the command line, the dataset run for ``--data DIR``."""
    def run(args: argparse.Namespace) -> int:
        if args.fixed_point and solver_plugin(args.solver) is not None:
            raise UsageError(f"--fixed-point inverts the decode of --solver, and --solver {args.solver} only encodes "
                             f"(its latents decode with {decodes_with(args.solver)}): give --solver "
                             f"{decodes_with(args.solver)} --fixed-point, or leave --fixed-point out")
        if args.data is None:
            for option in ("batch_size", "save_latents"):
                if getattr(args, option, None):
                    raise UsageError(f"--{option.replace('_', '-')} is for --data DIR runs")
            if not args.images:
                raise UsageError("give image files (IMAGE ...), or --data DIR")
            if command == "encode" and args.out is None:
                args.out = "latents.safetensors"
            return plain(args)
        if args.images:
            raise UsageError(f"give image files or --data DIR, not both (got {len(args.images)} file(s) and --data "
                             f"{args.data!r})")
        if args.out is None:
            raise UsageError(f"--data needs --out DIR: the folder for the results of 'flowdiff {command}'")
        if command == "roundtrip" and getattr(args, "latents", None) is not None:
            raise UsageError("--latents FILE is for image files; with --data, --save-latents writes one latent per "
                             "image under OUT/latents/")
        return run_dataset(args, command)

    run.__doc__ = plain.__doc__
    return run


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _arguments(args: argparse.Namespace, fingerprint: str) -> dict[str, Any]:
    values = {k: v for k, v in sorted(vars(args).items())
              if k not in _NOT_DEFINING and k not in ("nfe", "steps", "default_nfe", "default_steps")}
    values.update(_commands._budget(args))  # the budget in force: --nfe N or --steps N, given or default
    values["batch_size"] = args.batch_size or DEFAULT_BATCH
    if args.device == "cpu":  # CPU kernels block a batch by thread count: another count rounds other bits
        values["threads"] = torch.get_num_threads()  # in force: --threads, 1 for the built-in models, or torch's
    values["model fingerprint"] = fingerprint
    return {k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v) for k, v in values.items()}


def run_dataset(args: argparse.Namespace, command: str) -> int:
    """One dataset run (see the module docstring); on every rank under ``torchrun``, rank 0 merging."""
    ranks = process_group(args.device)
    lock: _ds.FolderLock | None = None
    try:
        # each rank's setup (the folders, the model), ended by one exchange: a failure on one rank alone (one GPU out
        # of memory, a file one machine cannot read) is said on every rank, 'rank R of N failed: <why>', where the
        # others waited for it in their first exchange and met gloo's closed connection
        with ranks.together():
            folder, out = _folders(args, command)
            if ranks.is_main:  # rank 0 holds OUT for the whole run
                lock = _ds.FolderLock(out)
                try:
                    _make_folder(out)
                    lock.acquire()
                except (_ds.FolderBusy, OSError) as err:
                    raise CommandError(one_line(err)) from None
                if lock.took_over:
                    print(f"note: {lock.took_over}")
            setup = _setup(args, ranks)
        return _run(args, command, folder, out, ranks, *setup)
    finally:
        if lock is not None:
            lock.release()
        close(ranks)


def _folders(args: argparse.Namespace, command: str) -> tuple[_ds.ImageFolder, Path]:
    """``--data`` walked and ``--out`` checked against it."""
    data = Path(args.data)
    out = output_dir(args.out)
    if data.exists() and not data.is_dir():  # "no such folder" for a file that is there sent users looking for it
        raise UsageError(f"--data {args.data!r} is a file, not a folder: give image files without --data "
                         f"('flowdiff {command} {args.data} ...'), or the folder that holds them as --data")
    if not data.is_dir():
        raise CommandError(f"--data {args.data!r}: no such folder")
    if _inside(out, data):
        raise UsageError(f"--out {args.out!r} is inside --data {args.data!r}: its images would become inputs of the "
                         "next run; write elsewhere")
    if _inside(data, out):  # e.g. --data OUT/images: the reconstructions would be written over their own inputs
        raise UsageError(f"--data {args.data!r} is inside --out {args.out!r}: the outputs would be written over the "
                         "inputs; write elsewhere")
    folder = _ds.scan(data)
    if not folder.files:
        seen = ", ".join(_ds.printable(_ds.escaped_name(p)) for p, _ in folder.skipped[:3])
        raise CommandError(f"--data {args.data!r}: no image files" + (f" (skipped: {seen}, …)" if seen else ""))
    return folder, out


def _setup(args: argparse.Namespace, ranks: Ranks) -> tuple[Any, torch.dtype, torch.device, dict[str, Any]]:
    """This rank's model on its device, and the arguments that define the run (for its manifest)."""
    args.device = str(rank_device(args.device, ranks))
    device_given = args.device
    loaded, dtype, device = _commands._setup(args)
    _commands._grid(args, loaded)  # --grid tuned without --nfe, or with none stored: refused before run.json is written
    args.device = torch.device(device_given).type  # the manifest keeps the kind of device, not each rank's index
    return loaded, dtype, device, _arguments(args, _commands.fingerprint(loaded))


def _make_folder(out: Path) -> None:
    try:
        make_folder(out)  # a run refused before it wrote anything (a usage error found at setup) leaves no folder
    except OSError as err:
        raise OSError(err.errno, f"--out {os.fspath(out)!r}: cannot create the folder ({err.strerror or err})") \
            from None


def _image_outputs(command: str, save_latents: bool, rels: Iterable[str], out: Path) -> list[tuple[Path, str]]:
    """The files a run writes for the inputs ``rels``: reconstructions and latents, with what each is."""
    outputs: list[tuple[Path, str]] = []
    for rel in rels:
        if command == "roundtrip":
            outputs.append((out / "images" / image_output_name(Path(rel)), f"the reconstruction of {rel!r}"))
        if command == "encode" or save_latents:
            outputs.append((out / "latents" / f"{rel}.safetensors", f"the latent of {rel!r}"))
    return outputs


def _outputs(command: str, args: argparse.Namespace, folder: _ds.ImageFolder, out: Path) -> list[tuple[Path, str]]:
    return _image_outputs(command, args.save_latents, folder.files, out) + [
        (out / name, "--out") for name in ("results.csv", "summary.json", "run.json")]


def _remove_earlier(out: Path, manifest_path: Path) -> str:
    """Remove what the run recorded in ``manifest_path`` wrote (its images, latents, table and summary, by the names
    its manifest fixes: nothing else), and the folders that leaves empty; what was done, in words."""
    try:
        old = _ds.read_manifest(manifest_path)
    except ValueError as err:
        return (f"--overwrite: {one_line(err)}; the files of the run that wrote it cannot be told from others, so "
                "none is removed")
    inputs = [rel for rel, _ in old.get("inputs", [])]
    earlier = _image_outputs(str(old.get("command")), bool(old.get("arguments", {}).get("save_latents")), inputs,
                             out)
    removed, folders = 0, set()
    for path in [p for p, _ in earlier] + [out / "results.csv", out / "summary.json"]:
        if path.is_file() or path.is_symlink():
            try:
                path.unlink()
            except OSError as err:
                raise CommandError(f"--overwrite: cannot remove {os.fspath(path)!r}, written by the earlier run in "
                                   f"--out ({err.strerror or err})") from None
            removed += 1
            folders.update(path.parents)
    for folder in sorted((f for f in folders if _inside(f, out) and f.resolve() != out.resolve()),
                         key=lambda f: len(f.parts), reverse=True):
        with contextlib.suppress(OSError):  # only folders left empty go: rmdir refuses the others
            folder.rmdir()
    return (f"--overwrite: removed the {removed} file(s) the earlier run wrote in {os.fspath(out)!r} "
            f"('flowdiff {old.get('command')}' of {len(inputs)} image(s))")


def _missing(out: Path, command: str, save_latents: bool, folder: _ds.ImageFolder, groups: list[range],
             done: set[int]) -> dict[int, list[str]]:
    """The recorded batches whose files are not all there (deleted since), with the missing files' names in OUT."""
    missing: dict[int, list[str]] = {}
    for b in sorted(done):
        gone = [p for p, _ in _image_outputs(command, save_latents, [folder.files[i] for i in groups[b]], out)
                if not p.is_file()]
        if gone:
            missing[b] = [p.relative_to(out).as_posix() for p in gone]
    return missing


def _run(args: argparse.Namespace, command: str, folder: _ds.ImageFolder, out: Path, ranks: Ranks, loaded: Any,
         dtype: torch.dtype, device: torch.device, arguments: dict[str, Any]) -> int:
    # rank 0 hashes the inputs and sends the manifest: N ranks would otherwise read the whole dataset N times (an
    # input it cannot read is said on every rank: 'rank 0 of N failed: ...', not a closed connection)
    man = ranks.from_main(lambda: _ds.manifest(command, arguments, folder))
    run = _ds.run_id(man)
    manifest_path = out / "run.json"
    # every rank reads the old manifest and plans its outputs; the exchange that ends the block is also the barrier
    # rank 0 waits at before it replaces the manifest, and a refusal on one rank alone is said on every rank
    with ranks.together():
        old = None
        if manifest_path.exists() and not args.overwrite:
            try:
                old = _ds.read_manifest(manifest_path)
            except ValueError as err:
                raise CommandError(f"{one_line(err)}; pass --overwrite to start a new run there, or write elsewhere") \
                    from None
            if "threads" not in old.get("arguments", {}) and "threads" in man["arguments"]:
                # written before the thread count was recorded: resumed on its other arguments, as it was, under its
                # own manifest (its batches' records carry that run's id)
                unrecorded = {**man, "arguments": {k: v for k, v in man["arguments"].items() if k != "threads"}}
                if _ds.difference(old, unrecorded) is None:
                    if ranks.is_main:
                        say(f"note: --out {args.out!r} holds a run written before flowdiff recorded the CPU thread "
                            f"count; it resumes with {man['arguments']['threads']} thread(s), and a batch it ran with "
                            "another count may differ in its last bits")
                    man, run = unrecorded, _ds.run_id(unrecorded)
            diff = _ds.difference(old, man)
            if diff is not None:
                raise UsageError(f"--out {args.out!r} holds a run with other arguments ({diff}); rerun with the same "
                                 "arguments to resume it, pass --overwrite to start over, or write elsewhere")
        resume = old is not None
        outputs = _outputs(command, args, folder, out)
        plan(outputs, inputs=[folder.path(rel) for rel in folder.files], overwrite=resume or args.overwrite)
        groups = _ds.batches(len(folder.files), args.batch_size or DEFAULT_BATCH)

    def begin() -> set[int]:
        """On rank 0: a new run's manifest written over what --overwrite removes; or the batches a resumed run
        has done (decided once: a batch whose files were deleted is run again)."""
        if not resume:
            if args.overwrite and manifest_path.exists():
                print(_remove_earlier(out, manifest_path))
                for folder_of in {p.parent for p, _ in outputs}:  # planned folders the removal left empty
                    folder_of.mkdir(parents=True, exist_ok=True)
            _ds.clear_records(out)
            for name in ("results.csv", "summary.json"):
                (out / name).unlink(missing_ok=True)
            _ds.write_json(manifest_path, man)
            return set()
        done = _ds.completed(out, run, groups, folder.files)
        missing = _missing(out, command, args.save_latents, folder, groups, done)
        if missing:
            names = [_ds.printable(_ds.escaped_name(n)) for b in missing for n in missing[b]]
            print(f"{len(names)} file(s) listed by the completion records are missing ({', '.join(names[:3])}"
                  f"{', …' if len(names) > 3 else ''}): running their {len(missing)} batch(es) again")
        return done - set(missing)

    done = ranks.from_main(begin)  # a failure there (a file --overwrite cannot remove) is said on every rank
    # the batches left to do, dealt out: after a rank that stopped early, the others' shares are done, and dealing
    # all batches would leave those ranks idle (waiting for the rest past gloo's timeout on a long run)
    todo = ranks.share([b for b in range(len(groups)) if b not in done])
    if ranks.is_main:
        where = f" over {ranks.world_size} processes" if ranks.distributed else ""
        start = f"resuming: {len(done)} of {len(groups)} batches done, " if resume else ""
        print(f"{start}{len(folder.files)} images in {len(groups)} batches of up to {groups[0].stop}{where}"
              + (f"; skipped {len(folder.skipped)} other file(s): "
                 f"{', '.join(_ds.printable(_ds.escaped_name(p)) for p, _ in folder.skipped[:3])}"
                 f"{', …' if len(folder.skipped) > 3 else ''}"
                 if folder.skipped else ""))
    stop = _stop_after()
    finished = 0
    progress = sys.stderr.isatty()  # a line per batch on a terminal; nothing in logs and pipes
    failure: Exception | None = None
    for k, b in enumerate(todo):
        rels = [folder.files[i] for i in groups[b]]
        try:
            rows = _batch(args, command, loaded, dtype, device, folder, rels, out)
        except BaseException as err:
            if not ranks.distributed or not isinstance(err, Exception):  # one process, or an interrupt
                if ranks.is_main and not resume and finished == 0:
                    _forget_unstarted(out, manifest_path)
                raise
            failure = err  # said to the other ranks below, once every rank has stopped writing
            break
        finished += len(rels)
        if stop is not None and finished >= stop:
            raise Stopped(f"stopped after {finished} image(s) as FLOWDIFF_STOP_AFTER={stop} asks, like a kill: batch "
                          f"{b} has its files but no completion record; rerun the command to finish")
        try:
            _ds.write_record(out, run, b, rows, ranks.rank)
        except Exception as err:  # a record that cannot be written (disk full) is a failure of this rank's, said below
            if not ranks.distributed:
                raise
            failure = err
            break
        if progress:
            who = f"rank {ranks.rank}: " if ranks.distributed else ""
            say(f"{who}batch {b} done ({k + 1} of {len(todo)} to do here)")
    if ranks.distributed:  # every rank learns whether another failed, after all have stopped writing
        _exchange_failures(ranks, failure, lambda: not resume and _forget_unstarted(out, manifest_path))
    if not ranks.is_main:
        return 0
    return _merge(command, folder, out, run, groups)


def _exchange_failures(ranks: Ranks, failure: Exception | None, forget: Callable[[], object]) -> None:
    """After the batches of every rank: raise ``failure`` on the rank it happened on and, on the others, a
    ``RuntimeError`` saying which rank failed and why (:meth:`~flowdiff.runs.distributed.Ranks.raise_failures`). A
    failing rank used to end at once, and the others then met a closed connection (gloo's "Connection closed by
    peer"), or wrote into the folders its exit had just removed as empty ("the folder ... does not exist"), reporting
    that instead of the cause. The batches recorded stay recorded: a rerun resumes. ``forget`` (rank 0, a new run)
    removes the manifest if no batch wrote anything."""
    try:
        ranks.raise_failures(failure)
    except Exception:
        if ranks.is_main:
            forget()
        raise


def _forget_unstarted(out: Path, manifest_path: Path) -> None:
    """After a new run failed in its first batch (an argument only the solve refuses, e.g. a solver that cannot
    encode): remove its manifest if nothing else was written, so that the corrected command starts afresh rather
    than being refused as "a run with other arguments"."""
    if not any(p.is_file() and p != manifest_path and p.name != _ds.LOCK for p in out.rglob("*")):
        manifest_path.unlink(missing_ok=True)


def _stop_after() -> int | None:
    text = os.environ.get("FLOWDIFF_STOP_AFTER")
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"FLOWDIFF_STOP_AFTER={text!r}: expected a positive integer (images)") from None
    if value < 1:
        raise UsageError(f"FLOWDIFF_STOP_AFTER={text!r}: expected a positive integer (images)")
    return value


def _one(latent: Latent, i: int, info: dict[str, Any]) -> Latent:
    """Image ``i`` of a batch's latent, as a latent of its own (``flowdiff decode`` takes it)."""
    st = latent.solver_state
    if st is not None:
        st = st._replace(z=st.z[i:i + 1], k=None if st.k is None else st.k[i:i + 1])  # its maker kept
    # every other field (grid, solver, options, decode shifts, ...) as the batch's: replace, not a field-by-field copy
    return dataclasses.replace(latent, x=latent.x[i:i + 1], sigmas=latent.sigmas.copy(),
                               solver_options=dict(latent.solver_options), solver_state=st, info=info)


def _batch(args: argparse.Namespace, command: str, loaded: Any, dtype: torch.dtype, device: torch.device,
           folder: _ds.ImageFolder, rels: list[str], out: Path) -> list[dict[str, Any]]:
    """Encode (and decode) one batch, write its files, and return its rows."""
    from ..api.sampling import decode

    batch_args = copy.copy(args)
    batch_args.images = [os.fspath(folder.path(rel)) for rel in rels]
    images, formats, enc = _commands._encode(batch_args, loaded, dtype, device)
    latent = enc.latent
    rows: list[dict[str, Any]] = []
    if command == "encode" or args.save_latents:
        for i, (rel, fmt) in enumerate(zip(rels, formats)):
            info = {**latent.info, "images": [{"name": rel, "mode": fmt.mode, "bits": fmt.bits, "kind": fmt.kind}]}
            _commands._save_latent(_one(latent, i, info), out / "latents" / f"{rel}.safetensors")
    if command == "encode":
        x = latent.x.detach().to(torch.float64).reshape(len(rels), -1)
        for i, rel in enumerate(rels):
            rows.append({"path": rel, "latent": f"latents/{rel}.safetensors", "nfe_encode": enc.stats.nfe,
                         "latent_mean": float(x[i].mean()), "latent_std": float(x[i].std())})
        return rows
    with torch.no_grad():
        dec = decode(loaded.flow, latent, model_kwargs=loaded.model_kwargs or None)
    recon = _prompt.to_images(loaded, dec.x)
    write_images(recon, [out / "images" / image_output_name(Path(rel)) for rel in rels], formats)
    errors = [m(images, recon, reduction="none").tolist() for m in (mse, max_abs_error, psnr)]
    original, written = as_written(images, formats), as_written(recon, formats)  # what the files hold
    held = [m(original, written, reduction="none").tolist() for m in (mse, max_abs_error, psnr)]
    for i, rel in enumerate(rels):
        rows.append({"path": rel, "mse": errors[0][i], "max_abs": errors[1][i], "psnr": errors[2][i],
                     "mse_written": held[0][i], "max_abs_written": held[1][i], "psnr_written": held[2][i],
                     "nfe_encode": enc.stats.nfe, "nfe_decode": dec.stats.nfe})
    return rows


def _nfe(count: dict[str, float]) -> str:
    """``5``, or ``5–7 (mean 6.2)`` where the batches' adaptive solves spent different counts."""
    if count["min"] == count["max"]:
        return str(count["min"])
    return f"{count['min']}–{count['max']} (mean {count['mean']:.1f})"


def _merge(command: str, folder: _ds.ImageFolder, out: Path, run: str, groups: list[range]) -> int:
    try:
        rows = _ds.merge(out, run, groups, folder.files)
    except RuntimeError as err:
        raise CommandError(one_line(err)) from None
    # names as text (a name that is not UTF-8 keeps its bytes as \xNN; see flowdiff.runs.datasets.escaped_name)
    rows = [{**r, **{k: _ds.escaped_name(r[k]) for k in ("path", "latent") if k in r}} for r in rows]
    skipped = [{"path": _ds.escaped_name(p), "reason": r} for p, r in folder.skipped]
    if command == "encode":
        _ds.write_csv(out / "results.csv", rows, ENCODE_COLUMNS)
        summary = _ds.summarize(rows, {"latent_std": True}, "latent_std", counts=("nfe_encode",))
        summary["skipped"] = skipped
        _ds.write_json(out / "summary.json", _ds.json_safe(summary))
        s = summary["latent_std"]
        print(f"encoded {summary['images']} image(s), {_nfe(summary['nfe_encode'])} NFE each; per-image std of x_T: "
              f"mean {s['mean']:.4f}, p50 {s['p50']:.4f}, p90 {s['p90']:.4f}, p99 {s['p99']:.4f}, largest "
              f"{s['worst']:.4f} ({_ds.printable(summary['worst']['path'])})")
    else:
        _ds.write_csv(out / "results.csv", rows, ROUNDTRIP_COLUMNS)
        summary = _ds.summarize(rows, {"mse": True, "max_abs": True, "psnr": False, "mse_written": True,
                                       "max_abs_written": True, "psnr_written": False}, "mse",
                                counts=("nfe_encode", "nfe_decode"))
        summary["skipped"] = skipped
        _ds.write_json(out / "summary.json", _ds.json_safe(summary))
        w = summary["worst"]
        for suffix, what in (("", "round trip of {n} image(s); errors on the [0, 1] pixel scale of the decoder's "
                                  "output (columns mse, max_abs, psnr):"),
                             ("_written", "and of the image files written, rounded to their depth and clipped to "
                                          "their range (columns *_written):")):
            m, a, p = (summary[name + suffix] for name in ("mse", "max_abs", "psnr"))
            print(what.format(n=summary["images"]))
            print(f"  mse:     mean {m['mean']:.3e}, p50 {m['p50']:.3e}, p90 {m['p90']:.3e}, p99 {m['p99']:.3e}")
            print(f"  max_abs: mean {a['mean']:.3e}, p50 {a['p50']:.3e}, p90 {a['p90']:.3e}, p99 {a['p99']:.3e}")
            print(f"  psnr_db: mean {p['mean']:.2f}, p50 {p['p50']:.2f}, p10 {p['p10']:.2f}, p1 {p['p1']:.2f}")
        print(f"  worst: {_ds.printable(w['path'])} (mse {w['mse']:.3e}, max_abs {w['max_abs']:.3e}, "
              f"psnr {w['psnr']:.2f} dB)")
        print(f"  NFE per image: encode {_nfe(summary['nfe_encode'])}, decode {_nfe(summary['nfe_decode'])}")
    if folder.skipped:
        print(f"skipped {len(folder.skipped)} file(s) flowdiff does not read (listed with the reason in summary.json)")
    print(f"wrote {out / 'results.csv'}, {out / 'summary.json'}")
    return 0
