"""Files and folder runs: nothing silent, nothing lost (issue 25, part A).

One test per kind of hazard: what a fault sweep found was silently lost, crashed the run or was reported
without the path. Each test makes the hazard for real (a FIFO, a bomb, a rotated JPEG, a busy output folder, …)
and checks that it is refused or handled, by name.
"""

import errno
import json
import os
import signal
import struct
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from _digit_files import write_digits
from PIL import Image

import flowdiff
from flowdiff.cli import main
from flowdiff.runs import datasets
from flowdiff.runs.imageio import MAX_PIXELS_ENV, ImageFormat, read_image, write_image

HAS_DIGITS = (Path(flowdiff.__file__).parent / "weights" / "digits.safetensors").is_file()
needs_digits = pytest.mark.skipif(not HAS_DIGITS, reason="the shipped digits weights are not installed")
ARGS = ["--steps", "2", "--batch-size", "2"]


def run(capsys, *argv):
    code = main([os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(path: Path, side: int, depth: int, color: int) -> int:
    """A PNG declaring side × side pixels whose zero rows compress ~1000:1; returns the bytes it would inflate to."""
    channels = {0: 1, 2: 3}[color]
    row = 1 + side * channels * depth // 8
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(b"\0" * row) for _ in range(side)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, depth, color, 0, 0, 0))
                     + _chunk(b"IDAT", body) + _chunk(b"IEND", b""))
    return row * side


def test_a_decompression_bomb_is_refused_by_its_declared_size_before_it_is_inflated(tmp_path, monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    for depth, color in ((16, 2), (8, 0)):  # the 16-bit colour PNG decoded by flowdiff, the grey one by Pillow
        bomb = tmp_path / f"bomb{depth}.png"
        inflated = png_bomb(bomb, 9000, depth, color)
        assert bomb.stat().st_size * 200 < inflated
        tracemalloc.start()
        try:
            with pytest.raises(ValueError) as info:
                read_image(bomb)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < inflated / 20  # refused on the header: never inflated
        message = str(info.value)
        assert repr(os.fspath(bomb)) in message and "9000×9000" in message and MAX_PIXELS_ENV in message
    # the limit is adjustable: a small image is refused one pixel under its size and read at it
    small = tmp_path / "small.png"
    write_image(small, np.zeros((6, 5, 3), np.uint16), ImageFormat("RGB", 16))
    monkeypatch.setenv(MAX_PIXELS_ENV, "29")
    with pytest.raises(ValueError, match=r"5×6 = 30 pixels, more than the limit of 29"):
        read_image(small)
    monkeypatch.setenv(MAX_PIXELS_ENV, "30")
    assert read_image(small)[0].shape == (6, 5, 3)
    assert read_image(small, max_pixels=30)[0].shape == (6, 5, 3)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match=f"{MAX_PIXELS_ENV}='lots': expected a positive integer"):
        read_image(small)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_only_regular_files_are_read_and_a_fifo_is_skipped_with_the_reason(tmp_path, capsys):
    os.mkfifo(tmp_path / "x.png")
    write_digits(tmp_path, ["a.png"])

    def hung(*_):
        raise TimeoutError("reading the FIFO blocked")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)  # a regression would block for ever in open(); fail instead
    try:
        with pytest.raises(ValueError, match=r"x.png': a FIFO \(named pipe\), not a regular file"):
            read_image(tmp_path / "x.png")
        with pytest.raises(ValueError, match=r"latent file .*x.png': a FIFO \(named pipe\), not a regular file"):
            flowdiff.Latent.load(tmp_path / "x.png")
        folder = datasets.scan(tmp_path)
        man = datasets.manifest("encode", {}, folder)  # hashes every input: would block on the FIFO
        assert main(["decode", str(tmp_path / "x.png"), "--out", str(tmp_path / "out")]) == 1  # the CLI says so too
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert folder.files == ("a.png",) and [p for p, _ in man["inputs"]] == ["a.png"]
    assert folder.skipped == (("x.png", "a FIFO (named pipe), not a regular file; not read"),)
    assert "latents" in (err := capsys.readouterr().err) and "a FIFO (named pipe), not a regular file" in err


def test_multi_frame_images_are_refused_with_their_frame_count_never_cut_to_one(tmp_path):
    frames = [Image.fromarray(np.full((8, 8), 40 * i, np.uint8)) for i in range(3)]
    for name in ("pages.tif", "anim.gif", "anim.png"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
        with pytest.raises(ValueError, match=rf"{name}' holds 3 frames"):
            read_image(tmp_path / name)
    frames[0].save(tmp_path / "one.tif", save_all=True)  # a single page is a picture
    assert np.array_equal(read_image(tmp_path / "one.tif")[0][..., 0], np.asarray(frames[0]))


def test_an_exif_rotated_image_is_refused_naming_its_orientation(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 4, 3)).astype(np.uint8)
    for value, shown in ((6, "rotated 90° clockwise"), (3, "rotated 180°"), (2, "mirrored left-right")):
        exif = Image.Exif()
        exif[0x0112] = value
        Image.fromarray(pixels).save(tmp_path / f"o{value}.jpg", exif=exif)
        with pytest.raises(ValueError, match=rf"o{value}.jpg' has the EXIF orientation {value} \({shown}\)"):
            read_image(tmp_path / f"o{value}.jpg")
    exif = Image.Exif()
    exif[0x0112] = 1  # upright: read as stored
    Image.fromarray(pixels).save(tmp_path / "up.png", exif=exif)
    assert np.array_equal(read_image(tmp_path / "up.png")[0], pixels)


def test_a_latent_missing_a_state_its_solver_needs_is_refused_naming_the_key(tmp_path):
    from safetensors.torch import load_file, save_file

    from flowdiff.cli import load_model

    loaded = load_model("analytic-mixture", dtype=torch.float64)
    images = torch.rand(2, *loaded.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    for solver, keys in (("reversible_heun", ["state.k", "state.z"]), ("reversible", ["state.z"])):
        latent = flowdiff.encode(loaded.flow, images, solver=solver, steps=3).latent
        path = tmp_path / f"{solver}.safetensors"
        latent.save(path)
        assert flowdiff.Latent.load(path).solver_state is not None  # whole: read back
        with open(path, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        meta = header["__metadata__"]
        tensors = load_file(path)
        assert sorted(k for k in tensors if k.startswith("state.")) == keys
        for key in keys:  # each state tensor removed in turn, from a file that lists them and from one that does not
            for listed in (True, False):
                broken = tmp_path / f"{solver}-{key}-{listed}.safetensors"
                save_file({k: v for k, v in tensors.items() if k != key}, broken,
                          metadata=meta if listed else {k: v for k, v in meta.items() if k != "state"})
                with pytest.raises(ValueError, match=rf"the tensor '{key}' is missing; solver '{solver}' needs it"):
                    flowdiff.Latent.load(broken)


def test_outputs_take_the_umask_or_the_mode_of_the_file_they_replace(tmp_path):
    pixels, fmt = np.zeros((4, 4, 1), np.uint8), ImageFormat("L", 8)
    old = os.umask(0o022)
    try:
        for mask in (0o022, 0o077, 0o002):
            os.umask(mask)
            path = write_image(tmp_path / f"u{mask:o}.png", pixels, fmt)
            assert path.stat().st_mode & 0o777 == 0o666 & ~mask
        os.chmod(path, 0o640)  # a file replaced keeps its own mode, as open(path, "w") would
        write_image(path, pixels, fmt)
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_a_long_but_legal_file_name_is_written(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    pixels, fmt = np.arange(12, dtype=np.uint8).reshape(3, 4, 1), ImageFormat("L", 8)
    for name in ("a" * (limit - 4) + ".png", "é" * ((limit - 4) // 2) + ".png"):  # at NAME_MAX, in bytes
        assert len(os.fsencode(name)) <= limit
        path = write_image(tmp_path / name, pixels, fmt)
        assert np.array_equal(read_image(path)[0], pixels)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(  # no temporary file left behind
        ["a" * (limit - 4) + ".png", "é" * ((limit - 4) // 2) + ".png"])


def test_a_name_the_file_system_cannot_hold_is_refused_before_the_work(tmp_path, capsys):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    name = "a" * (limit - 3) + ".png"
    code, _, err = run(capsys, "sample", "--model", "analytic-mixture", "--out", tmp_path / name)
    assert code == 1 and f"its name is {limit + 1} bytes" in err and f"names of up to {limit} bytes" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_names_what_and_the_path_and_keeps_the_earlier_file(tmp_path):
    """The file-size limit (RLIMIT_FSIZE) makes the OS refuse the write the way a full disk does."""
    import subprocess

    target = tmp_path / "samples.png"
    target.write_bytes(b"an earlier file")
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (40, resource.RLIM_INFINITY)); "
              "from flowdiff.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, "sample", "--model", "analytic-mixture", "--steps", "2",
                           "--num", "4", "--out", str(target), "--overwrite"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and f"cannot write the image {os.fspath(target)!r}" in line, line
    assert os.strerror(errno.EFBIG) in line
    assert target.read_bytes() == b"an earlier file" and [p.name for p in tmp_path.iterdir()] == ["samples.png"]


@needs_digits
def test_roundtrip_prints_the_errors_of_the_images_it_writes_and_labels_the_decoders_apart(tmp_path, capsys):
    import csv

    from flowdiff.cli import read_images
    from flowdiff.tools.metrics import max_abs_error, mse, psnr

    names = ["a.png", "b.png", "c.png"]
    write_digits(tmp_path / "in", names)
    inputs = [tmp_path / "in" / n for n in names]
    code, out, err = run(capsys, "roundtrip", *inputs, "--steps", "2", "--out", tmp_path / "rec")
    assert code == 0, err
    printed = dict(line.strip().split(": ") for line in out.splitlines() if line.startswith("  "))
    original = read_images([str(p) for p in inputs], (1, 8, 8))
    written = read_images([str(tmp_path / "rec" / n) for n in names], (1, 8, 8))  # what the files hold
    assert printed == {"mse": f"{float(mse(original, written)):.3e}",
                       "max_abs_error": f"{float(max_abs_error(original, written)):.3e}",
                       "psnr_db": f"{float(psnr(original, written)):.2f}"}
    assert "errors on the [0, 1] pixel scale of the images written, rounded to each file's depth" in out
    assert "the decoder's output itself, before rounding and clipping: mse " in out
    # a folder run: the *_written columns are the errors of each file it wrote
    code, out, err = run(capsys, "roundtrip", "--data", tmp_path / "in", "--out", tmp_path / "run", *ARGS)
    assert code == 0, err
    with open(tmp_path / "run" / "results.csv") as fh:
        table = {row["path"]: row for row in csv.DictReader(fh)}
    written = read_images([str(tmp_path / "run" / "images" / n) for n in names], (1, 8, 8))
    for i, name in enumerate(names):
        for column, metric in (("mse_written", mse), ("max_abs_written", max_abs_error), ("psnr_written", psnr)):
            assert float(table[name][column]) == float(metric(original[i:i + 1], written[i:i + 1]))


def content(path: Path):
    """A file's bytes; for a safetensors file its tensors' bytes and its metadata (whose order varies per save)."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    from safetensors import safe_open

    with safe_open(path, "pt") as fh:
        return fh.metadata(), {k: fh.get_tensor(k).numpy().tobytes() for k in fh.keys()}


def tree(out: Path) -> dict:
    """Every file under ``out`` with its content, the run's bookkeeping (records, manifest, lock) aside."""
    return {p.relative_to(out).as_posix(): content(p) for p in sorted(out.rglob("*"))
            if p.is_file() and datasets.RECORDS not in p.parts and p.name not in ("run.json", datasets.LOCK)}


@needs_digits
def test_a_busy_output_folder_is_refused_naming_its_holder_and_a_killed_runs_lock_is_taken_over(tmp_path, capsys):
    import socket
    import subprocess

    write_digits(tmp_path / "data", ["a.png", "b.png", "c.png"])
    out = tmp_path / "out"
    assert run(capsys, "roundtrip", "--data", tmp_path / "data", "--out", out, *ARGS)[0] == 0
    before = tree(out)
    holder = subprocess.Popen(  # another run holding OUT: the lock taken the way a run takes it, then waiting
        [sys.executable, "-c", "import sys; from flowdiff.runs.datasets import FolderLock; "
         f"FolderLock({os.fspath(out)!r}).acquire(); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run(capsys, "roundtrip", "--data", tmp_path / "data", "--out", out, *ARGS, "--overwrite")
        assert code == 1, err
        assert (f"the output folder {os.fspath(out)!r} is in use by another run: pid {holder.pid} on "
                f"{socket.gethostname()}, started ") in err
        assert tree(out) == before  # --overwrite removed nothing of the other run's
    finally:
        holder.kill()  # a kill: its lock file stays behind, unheld
        holder.wait()
    assert (out / datasets.LOCK).is_file()
    code, out_text, err = run(capsys, "roundtrip", "--data", tmp_path / "data", "--out", out, *ARGS, "--overwrite")
    assert code == 0, err
    assert f"took over the lock {os.fspath(out / datasets.LOCK)!r} left by pid {holder.pid} on" in out_text
    assert "no longer runs" in out_text
    assert not (out / datasets.LOCK).exists() and tree(out) == before  # released; the same run made again


@needs_digits
def test_overwrite_removes_every_file_the_earlier_run_wrote_and_nothing_else(tmp_path, capsys):
    write_digits(tmp_path / "one", ["a.png", "deep/b.png", "c.jpg"])
    write_digits(tmp_path / "two", ["x.png", "y.png"], start=5)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert run(capsys, "roundtrip", "--data", tmp_path / "one", "--out", out, *ARGS, "--save-latents")[0] == 0
    assert {"images/deep/b.png", "latents/c.jpg.safetensors"} <= set(tree(out))
    (out / "images" / "mine.png").write_bytes(b"a file of the user's")  # not the run's: kept
    (out / "notes.txt").write_text("kept")
    code, text, err = run(capsys, "roundtrip", "--data", tmp_path / "two", "--out", out, *ARGS, "--overwrite")
    assert code == 0, err
    assert "--overwrite: removed the 8 file(s) the earlier run wrote" in text  # 3 images, 3 latents, csv, summary
    assert run(capsys, "roundtrip", "--data", tmp_path / "two", "--out", fresh, *ARGS)[0] == 0
    assert tree(out) == {**tree(fresh), "images/mine.png": b"a file of the user's", "notes.txt": b"kept"}
    assert not (out / "latents").exists() and not (out / "images" / "deep").exists()  # emptied folders go too


@needs_digits
def test_a_rerun_restores_the_outputs_its_records_list_that_were_deleted(tmp_path, capsys):
    write_digits(tmp_path / "data", ["a.png", "b.png", "c.png", "d.png", "e.png"])
    out = tmp_path / "out"
    argv = ["roundtrip", "--data", tmp_path / "data", "--out", out, *ARGS, "--save-latents"]
    assert run(capsys, *argv)[0] == 0
    before = tree(out)
    (out / "images" / "c.png").unlink()
    (out / "latents" / "e.png.safetensors").unlink()
    (out / "results.csv").unlink()
    code, text, err = run(capsys, *argv)
    assert code == 0, err
    assert "2 file(s) listed by the completion records are missing" in text and "running their 2 batch(es)" in text
    assert "resuming: 1 of 3 batches done" in text  # batch 0 (a, b) kept; c's and e's batches run again
    assert tree(out) == before  # every file back, bit for bit


@needs_digits
def test_file_names_that_are_not_utf8_are_recorded_losslessly_and_reruns_work(tmp_path, capsys):
    import csv

    raw = [b"caf\xe9.png", b"back\\slash.png", "ünï.png".encode()]  # latin-1 bytes, a backslash, UTF-8
    names = [os.fsdecode(n) for n in raw]
    data = tmp_path / "data"
    try:
        write_digits(data, names)
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    out = tmp_path / "out"
    for _ in range(2):  # the first run, then a rerun that resumes and writes the table again
        code, text, err = run(capsys, "roundtrip", "--data", data, "--out", out, *ARGS, "--save-latents")
        assert code == 0, err
    with open(out / "results.csv", encoding="utf-8") as fh:
        paths = [row["path"] for row in csv.DictReader(fh)]
    assert sorted(paths) == sorted(["caf\\xe9.png", "back\\\\slash.png", "ünï.png"])
    assert sorted(datasets.unescaped_name(p) for p in paths) == sorted(names)  # lossless
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["worst"]["path"] in paths
    for name in names:  # the outputs carry the inputs' own names, bytes and all
        assert (out / "images" / name).is_file() and (out / "latents" / f"{name}.safetensors").is_file()
    assert flowdiff.Latent.load(out / "latents" / f"{names[0]}.safetensors").info["images"][0]["name"] == names[0]
