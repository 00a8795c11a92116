"""Image files read and written at their depth and range: every format round-trips bit for bit."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from flowdiff.runs.imageio import ImageFormat, _png16_bytes, from_data, read_image, to_data, write_image

FORMATS = [  # (mode, bits, kind, suffix)
    *[(mode, bits, "uint", ".png") for mode in ("L", "LA", "RGB", "RGBA") for bits in (8, 16)],
    *[(mode, 8, "uint", ".tif") for mode in ("L", "LA", "RGB", "RGBA")],
    ("L", 16, "uint", ".tif"),
    ("L", 32, "float", ".tif"),
    ("L", 8, "uint", ".bmp"),
    ("RGB", 8, "uint", ".bmp"),
]


def random_pixels(fmt: ImageFormat, shape=(5, 7), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if fmt.kind == "float":  # beyond [0, 1] too: float images keep their range
        pix = rng.uniform(-0.5, 1.5, size=(*shape, 1)).astype(np.float32)
        pix[0, :3, 0] = [0.0, 1.0, 0.5]
        return pix
    top = 2**fmt.bits - 1
    pix = rng.integers(0, top + 1, size=(*shape, fmt.channels), dtype=np.int64)
    pix[0, 0], pix[0, 1] = 0, top  # both ends of the range
    return pix.astype(fmt.dtype)


@pytest.mark.parametrize(("mode", "bits", "kind", "suffix"), FORMATS, ids=lambda v: str(v))
def test_every_format_round_trips_bit_for_bit_through_the_data_range(tmp_path, mode, bits, kind, suffix):
    fmt = ImageFormat(mode, bits, kind)
    pixels = random_pixels(fmt)
    first = tmp_path / f"a{suffix}"
    write_image(first, pixels, fmt)
    got, got_fmt = read_image(first)
    assert got_fmt == fmt and got.dtype == pixels.dtype
    assert np.array_equal(got, pixels)
    # through the model's data range and back (what encode/decode see), in float64
    x = to_data(got, got_fmt)
    assert x.dtype == torch.float64 and x.shape == (fmt.channels, 5, 7)
    if kind == "uint":
        assert float(x.min()) == -1.0 and float(x.max()) == 1.0  # 0 and 2^b − 1 map to the range's ends
    second = tmp_path / f"b{suffix}"
    write_image(second, from_data(x, got_fmt), got_fmt)
    again, again_fmt = read_image(second)
    assert again_fmt == fmt and np.array_equal(again, pixels)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_pngs_keep_all_16_bits_and_differ_from_their_8_bit_clip(tmp_path, channels):
    fmt = ImageFormat({1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels], 16)
    pixels = random_pixels(fmt, seed=channels)
    path = tmp_path / "x.png"
    write_image(path, pixels, fmt)
    got, _ = read_image(path)
    assert np.array_equal(got, pixels)
    assert not np.array_equal(got >> 8 << 8, got)  # the low byte is there: what an 8-bit reading would lose
    if channels > 1:  # the file is a valid PNG for Pillow too, which reads its high bytes
        with Image.open(path) as img:
            assert img.size == (7, 5)


def _filtered_png(pixels: np.ndarray, filter_type: int) -> bytes:
    """A 16-bit colour PNG whose rows use one filter type (W3C PNG, section 9), written independently of the reader."""
    height, width, channels = pixels.shape
    bpp = 2 * channels
    rows = pixels.astype(">u2").reshape(height, width * channels).view(np.uint8).astype(np.int64)
    out, prior = [], np.zeros(rows.shape[1], dtype=np.int64)
    for row in rows:
        left = np.concatenate([np.zeros(bpp, dtype=np.int64), row[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, dtype=np.int64), prior[:-bpp]])
        if filter_type == 0:
            f = row
        elif filter_type == 1:
            f = row - left
        elif filter_type == 2:
            f = row - prior
        elif filter_type == 3:
            f = row - (left + prior) // 2
        else:
            p = left + prior - upleft
            pa, pb, pc = abs(p - left), abs(p - prior), abs(p - upleft)
            f = row - np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prior, upleft))
        out.append(bytes([filter_type]) + (f % 256).astype(np.uint8).tobytes())
        prior = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    color = {2: 4, 3: 2, 4: 6}[channels]
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(out)))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("filter_type", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("channels", [2, 3, 4])
def test_16_bit_colour_pngs_decode_every_row_filter(tmp_path, filter_type, channels):
    fmt = ImageFormat({2: "LA", 3: "RGB", 4: "RGBA"}[channels], 16)
    pixels = random_pixels(fmt, shape=(6, 9), seed=10 * filter_type + channels)
    path = tmp_path / "f.png"
    path.write_bytes(_filtered_png(pixels, filter_type))
    got, got_fmt = read_image(path)
    assert got_fmt == fmt and np.array_equal(got, pixels)


def _damaged(tmp_path):
    png = tmp_path / "ok.png"
    write_image(png, random_pixels(ImageFormat("L", 8)), ImageFormat("L", 8))
    rgb16 = _png16_bytes(random_pixels(ImageFormat("RGB", 16)))
    cases = {
        "empty.png": b"",
        "text.png": b"not an image at all",
        "truncated.png": png.read_bytes()[:40],
        "truncated16.png": rgb16[:60],
        "nodata16.png": rgb16[:33] + rgb16[-12:],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    Image.new("CMYK", (4, 4)).save(tmp_path / "cmyk.tif")
    Image.new("I", (4, 4)).save(tmp_path / "int32.tif")
    return [*cases, "cmyk.tif", "int32.tif", "missing.png"]


def test_unreadable_image_files_are_errors_that_name_the_file(tmp_path):
    for name in _damaged(tmp_path):
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            read_image(tmp_path / name)
        assert name in str(info.value), (name, str(info.value))


@pytest.mark.parametrize(("fmt", "suffix", "fragment"), [
    (ImageFormat("L", 32, "float"), ".png", "PNG cannot hold"),
    (ImageFormat("L", 16), ".jpg", "cannot hold"),
    (ImageFormat("RGB", 16), ".tif", "only at 8 bits"),
    (ImageFormat("L", 8), ".nope", "unknown image suffix"),
])
def test_a_file_type_that_cannot_hold_the_pixels_is_refused(tmp_path, fmt, suffix, fragment):
    path = tmp_path / f"out{suffix}"
    with pytest.raises(ValueError, match=fragment) as info:
        write_image(path, random_pixels(fmt), fmt)
    assert str(path) in str(info.value)
    assert not path.exists() and list(tmp_path.iterdir()) == []  # nothing half-written is left


def test_writes_are_atomic_and_keep_an_earlier_file_when_they_fail(tmp_path):
    path = tmp_path / "x.png"
    fmt = ImageFormat("L", 8)
    write_image(path, random_pixels(fmt), fmt)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_image(path, np.zeros((5, 7, 3), dtype=np.uint8), fmt)  # wrong channel count
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["x.png"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_image(tmp_path / "no" / "x.png", random_pixels(fmt), fmt)


def test_pixels_of_another_dtype_a_bad_scale_or_non_finite_data_are_refused(tmp_path):
    fmt = ImageFormat("L", 8)
    with pytest.raises(ValueError, match="uint8"):
        write_image(tmp_path / "a.png", np.zeros((4, 4, 1), dtype=np.uint16), fmt)  # would wrap 16 bits to 8
    with pytest.raises(ValueError, match="scale"):
        write_image(tmp_path / "a.png", np.zeros((4, 4, 1), dtype=np.uint8), fmt, scale=0)
    with pytest.raises(ValueError, match="NaN"):
        from_data(torch.full((1, 4, 4), float("nan")), fmt)
    assert list(tmp_path.iterdir()) == []
