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


def write_digits(folder: Path, names, start: int = 0) -> None:
    images = flowdiff.digits_data("test").images[start:start + len(names)]
    for name, image in zip(names, images):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = ((image[0].numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(path)


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
def test_only_regular_files_are_read_and_a_fifo_is_skipped_with_the_reason(tmp_path):
    os.mkfifo(tmp_path / "x.png")
    write_digits(tmp_path, ["a.png"])

    def hung(*_):
        raise TimeoutError("reading the FIFO blocked")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)  # a regression would block for ever in open(); fail instead
    try:
        with pytest.raises(ValueError, match=r"x.png': a FIFO \(named pipe\), not a regular file"):
            read_image(tmp_path / "x.png")
        folder = datasets.scan(tmp_path)
        man = datasets.manifest("encode", {}, folder)  # hashes every input: would block on the FIFO
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert folder.files == ("a.png",) and [p for p, _ in man["inputs"]] == ["a.png"]
    assert folder.skipped == (("x.png", "a FIFO (named pipe), not a regular file; not read"),)


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
