"""Image files in and out at the depth and range they hold: nothing is clipped or converted silently.

:func:`read_image` returns the pixels as stored (uint8, uint16 or float32, shape (H, W, C))
with their :class:`ImageFormat`; :func:`write_image` writes such pixels back to the same kind
of file, atomically. Between the two, :func:`to_data` and :func:`from_data` map pixels to the
model's data range (default [−1, 1]) and back:

    integer pixels   v ∈ {0, …, 2ᵇ − 1}  ↔  x = lo + (hi − lo)·v/(2ᵇ − 1)
    float pixels     v (1 ↔ white)       ↔  x = lo + (hi − lo)·v          (no clipping)

so ``write(from_data(to_data(read(p))))`` reproduces every pixel of ``p`` bit for bit (in
float64; float pixels exactly when |v| ≥ 2⁻²⁹ or v = 0). Supported: 8- and 16-bit grey, grey +
alpha, RGB and RGBA PNG (16-bit colour PNGs are decoded here, since Pillow reads them at 8
bits), 8- and 16-bit grey and 8-bit colour TIFF, 32-bit float grey TIFF, and the 8-bit modes
Pillow opens (JPEG, BMP, …; palette and 1-bit images are expanded to 8-bit grey/RGB(A),
which loses nothing: a palette of greys to grey). Anything else is a ``ValueError`` naming the file.

Reading checks before it decodes: only regular files are opened (a FIFO named ``x.png`` would block
the reader for ever); the width × height the file declares is checked against a limit
(:data:`MAX_PIXELS`, or the environment variable ``FLOWDIFF_MAX_PIXELS``, or ``max_pixels=``)
before a byte of pixel data is inflated, so that a small compressed file declaring a huge image is
refused, not unpacked; a file of several frames (a multi-page TIFF, an animated GIF or PNG) is
refused with its frame count rather than cut to its first; and an EXIF orientation other than
"upright" is refused, since the pixels as stored are not the picture as shown.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..engine._files import atomic_write, regular_file

#: Pillow modes by channel count.
MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type → channels (3, the palette, is Pillow's)
_PNG_COLOR_TYPE = {v: k for k, v in _PNG_CHANNELS.items()}
#: Suffixes of lossless formats: outputs keep them (other inputs, e.g. JPEG, get a .png output).
LOSSLESS_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
#: Default limit on the pixels (width × height) of an image read: 8192 × 8192. ``FLOWDIFF_MAX_PIXELS`` sets another.
MAX_PIXELS = 8192 * 8192
#: The environment variable that sets the limit for the command line (and for :func:`read_image` by default).
MAX_PIXELS_ENV = "FLOWDIFF_MAX_PIXELS"
#: EXIF orientation tag values → what a viewer does to show the picture (1, "upright", and no tag are accepted).
_ORIENTATIONS = {2: "mirrored left-right", 3: "rotated 180°", 4: "mirrored top-bottom",
                 5: "mirrored and rotated 90°", 6: "rotated 90° clockwise", 7: "mirrored and rotated 270°",
                 8: "rotated 90° counter-clockwise"}
_PILLOW_LIMIT = threading.Lock()  # Image.MAX_IMAGE_PIXELS is a module global: set under a lock, then restored


@dataclass(frozen=True)
class ImageFormat:
    """How an image file stores its pixels: ``mode`` (L, LA, RGB, RGBA), ``bits`` per channel
    (8 or 16 for integers, 32 for float) and ``kind`` (``"uint"`` or ``"float"``)."""

    mode: str
    bits: int
    kind: str = "uint"

    def __post_init__(self) -> None:
        depths = {"uint": (8, 16), "float": (32,)}
        if self.mode not in ("L", "LA", "RGB", "RGBA") or self.kind not in depths \
                or isinstance(self.bits, bool) or self.bits not in depths[self.kind]:
            raise ValueError(f"ImageFormat(mode={self.mode!r}, bits={self.bits!r}, kind={self.kind!r}) is not a format "
                             "flowdiff reads or writes; accepted: mode L, LA, RGB or RGBA with bits 8 or 16 (kind "
                             "'uint'), or mode L with bits 32 (kind 'float')")
        if self.kind == "float" and self.mode != "L":
            raise ValueError(f"ImageFormat(mode={self.mode!r}, bits=32, kind='float'): float images are grey (mode "
                             "'L') only")

    @property
    def channels(self) -> int:
        return len(self.mode)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self.kind == "float" else np.dtype(np.uint8 if self.bits == 8 else np.uint16)

    def __str__(self) -> str:
        return f"{self.bits}-bit {'float ' if self.kind == 'float' else ''}{self.mode}"


def pixel_limit() -> int:
    """The limit on width × height of an image read: ``FLOWDIFF_MAX_PIXELS`` when set, else :data:`MAX_PIXELS`."""
    text = os.environ.get(MAX_PIXELS_ENV)
    if text is None or text == "":
        return MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{MAX_PIXELS_ENV}={text!r}: expected a positive integer (the most pixels, width × height, "
                         "an image read may have)")
    return value


def _check_size(name: str, width: int, height: int, limit: int) -> None:
    if width * height > limit:
        raise ValueError(f"image {name!r} declares {width}×{height} = {width * height} pixels, more than the limit "
                         f"of {limit} (a decompression bomb, or a picture too big to read safely); not decoded. "
                         f"Raise the limit with {MAX_PIXELS_ENV}=N (or read_image(..., max_pixels=N)) if you trust "
                         "the file")


def read_image(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> tuple[np.ndarray, ImageFormat]:
    """The pixels of an image file as stored, shape (H, W, C), and their format.

    Raises ``FileNotFoundError``/``ValueError`` naming the file when it is missing, not a regular file, empty,
    truncated, not an image, larger than ``max_pixels`` (default :func:`pixel_limit`) by its declared size, made of
    several frames, EXIF-rotated, or in a mode that cannot be kept exactly (CMYK, 16-bit colour TIFF, …).
    """
    from PIL import Image, UnidentifiedImageError

    name = os.fspath(path)
    if max_pixels is None:
        limit = pixel_limit()
    elif isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"read_image {name!r}: max_pixels must be a positive int, got {max_pixels!r}")
    else:
        limit = max_pixels
    regular_file(name)
    p = Path(name)
    try:
        with open(name, "rb") as fh:
            head = fh.read(33)
    except OSError as err:
        raise OSError(err.errno, f"image {name!r}: cannot read it ({err.strerror or err})") from None
    if not head:
        raise ValueError(f"image {name!r}: the file is empty")
    if head.startswith(_PNG_SIGNATURE) and len(head) >= 24 and head[12:16] == b"IHDR":
        _check_size(name, *struct.unpack(">II", head[16:24]), limit)
    try:
        if head.startswith(_PNG_SIGNATURE) and len(head) >= 33 and head[24] == 16 and head[25] in (2, 4, 6):
            return _read_png16(p)
        with _PILLOW_LIMIT:
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by name
                    img = Image.open(p)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        with img:
            _check_size(name, img.width, img.height, limit)
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                raise ValueError(f"image {name!r} holds {frames} frames (a multi-page or animated {img.format}); "
                                 "flowdiff reads one picture per file and keeps every frame or none: save each "
                                 "frame as a file of its own")
            orientation = img.getexif().get(0x0112)  # values outside 2…8 mean nothing to a viewer either
            if orientation in _ORIENTATIONS:
                turn = _ORIENTATIONS[orientation]
                raise ValueError(f"image {name!r} has the EXIF orientation {orientation} ({turn}): its pixels as "
                                 "stored are not the picture as shown, and flowdiff neither rotates them nor "
                                 "ignores the tag; save it upright without the tag (e.g. PIL.ImageOps."
                                 "exif_transpose)")
            img.load()
            return _from_pillow(img, name)
    except UnidentifiedImageError:
        raise ValueError(f"image {name!r}: not an image file Pillow can read (PNG, TIFF, JPEG, BMP, …)") from None
    except Image.DecompressionBombError:
        raise ValueError(f"image {name!r}: larger than the limit of {limit} pixels (a decompression bomb, or a "
                         f"picture too big to read safely); not decoded. Raise the limit with {MAX_PIXELS_ENV}=N "
                         "if you trust the file") from None
    except (OSError, SyntaxError, zlib.error, struct.error, IndexError) as err:
        raise ValueError(f"image {name!r}: the file is damaged or truncated ({' '.join(str(err).split())})") \
            from None


def _from_pillow(img, name: str) -> tuple[np.ndarray, ImageFormat]:
    mode = img.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        bits = img.tag_v2.get(258) if hasattr(img, "tag_v2") else None  # TIFF BitsPerSample
        if bits is not None and max(bits if isinstance(bits, tuple) else (bits,)) > 8:
            raise ValueError(f"image {name!r}: {mode} TIFF with {bits} bits per sample; Pillow reads it at 8 "
                             "bits, which would lose data (save it as a 16-bit PNG)")
        arr = np.asarray(img, dtype=np.uint8)
        return arr.reshape(img.height, img.width, len(mode)), ImageFormat(mode, 8)
    if mode in ("I;16", "I;16B", "I;16L"):
        arr = np.asarray(img).astype(np.uint16)
        return arr.reshape(img.height, img.width, 1), ImageFormat("L", 16)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        return arr.reshape(img.height, img.width, 1).copy(), ImageFormat("L", 32, "float")
    if mode in ("1", "P", "PA"):  # expanded without loss: 1-bit to 0/255 grey, a palette to its colours
        has_alpha = mode == "PA" or (mode == "P" and "transparency" in img.info)
        target = "L" if mode == "1" or (mode == "P" and not has_alpha and _grey_palette(img)) else \
            ("RGBA" if has_alpha else "RGB")
        return _from_pillow(img.convert(target), name)
    raise ValueError(f"image {name!r}: mode {mode!r} is not supported without conversion; accepted: 8/16-bit grey "
                     "(L), grey + alpha (LA), RGB and RGBA, and 32-bit float grey TIFF")


def _grey_palette(img) -> bool:  # noqa: ANN001 (a PIL image, as _from_pillow takes)
    """Whether every colour a palette image uses is a grey (r = g = b): then its grey expansion loses nothing, and a
    grey model reads it (tools that save greys as palette PNGs are common)."""
    palette = np.asarray(img.getpalette("RGB") or [], dtype=np.uint8)
    if palette.size == 0:
        return False
    colours = palette.reshape(-1, 3)[np.unique(np.asarray(img))]
    return bool((colours == colours[:, :1]).all())


def _read_png16(path: Path) -> tuple[np.ndarray, ImageFormat]:
    """A 16-bit colour (or grey + alpha) PNG, decoded here: Pillow reads these at 8 bits."""
    data = path.read_bytes()
    pos, idat, header = 8, [], None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if len(chunk) != length or pos + 12 + length > len(data):
            raise ValueError(f"image {os.fspath(path)!r}: the file is truncated (in its {kind.decode('latin-1')} "
                             "chunk)")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat.append(chunk)
        elif kind == b"IEND":
            break
        pos += 12 + length
    else:
        raise ValueError(f"image {os.fspath(path)!r}: the file is truncated (no IEND chunk)")
    if header is None or not idat:
        raise ValueError(f"image {os.fspath(path)!r}: not a complete PNG (no IHDR or no image data)")
    width, height, depth, color, _, _, interlace = header
    if interlace:
        raise ValueError(f"image {os.fspath(path)!r}: interlaced 16-bit colour PNGs are not supported; "
                         "save it without interlacing")
    channels = _PNG_CHANNELS[color]
    bpp = 2 * channels
    stride = width * bpp
    expected = height * (stride + 1)
    raw = zlib.decompressobj().decompress(b"".join(idat), expected + 1)  # never inflates past the declared size
    if len(raw) != expected:
        raise ValueError(f"image {os.fspath(path)!r}: the image data has {len(raw)} bytes, expected "
                         f"{expected} (truncated or damaged)")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prior = np.zeros(stride, dtype=np.uint8)
    for r in range(height):
        kind, line = int(rows[r, 0]), rows[r, 1:]
        out[r] = _unfilter(kind, line, prior, bpp, os.fspath(path))
        prior = out[r]
    pixels = out.view(">u2").reshape(height, width, channels).astype(np.uint16)
    return pixels, ImageFormat(MODES[channels], 16)


def _unfilter(kind: int, line: np.ndarray, prior: np.ndarray, bpp: int, name: str) -> np.ndarray:
    """Undo one PNG row filter (W3C PNG specification, section 9)."""
    if kind == 0:
        return line
    if kind == 2:
        return line + prior
    if kind == 1:
        return (line.reshape(-1, bpp).astype(np.int64).cumsum(axis=0) % 256).astype(np.uint8).ravel()
    if kind not in (3, 4):
        raise ValueError(f"image {name!r}: unknown PNG filter type {kind} (the file is damaged)")
    cur = np.zeros_like(line)
    a = np.zeros(bpp, dtype=np.int64)
    pix = line.reshape(-1, bpp).astype(np.int64)
    up = prior.reshape(-1, bpp).astype(np.int64)
    c = np.zeros(bpp, dtype=np.int64)
    for i in range(pix.shape[0]):
        b = up[i]
        if kind == 3:
            value = (pix[i] + (a + b) // 2) % 256
        else:
            p = a + b - c
            pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
            pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
            value = (pix[i] + pred) % 256
        cur[i * bpp:(i + 1) * bpp] = value
        a, c = value, b
    return cur


def _png16_bytes(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG (grey, grey + alpha, RGB or RGBA) of ``pixels`` (H, W, C) uint16, rows unfiltered."""
    height, width, channels = pixels.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = pixels.astype(">u2").reshape(height, width * channels).view(np.uint8)
    raw = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rows], axis=1).tobytes()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, _PNG_COLOR_TYPE[channels], 0, 0, 0)
    return _PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def write_image(path: str | os.PathLike[str], pixels: np.ndarray, fmt: ImageFormat, *, scale: int = 1) -> Path:
    """Write ``pixels`` (H, W, C) in ``fmt`` to ``path``, atomically (a temporary file in the folder, then a rename).

    The file type follows the suffix (``.png``, ``.tif``/``.tiff``, or another Pillow format for
    8-bit pixels); a type that cannot hold ``fmt`` (float in a PNG, 16 bits in a JPEG) is a
    ``ValueError``. ``scale`` magnifies each pixel ``scale``×``scale`` times (nearest neighbour).
    """
    from PIL import Image

    path = Path(path)
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 3 or pixels.shape[-1] != fmt.channels:
        raise ValueError(f"write_image {os.fspath(path)!r}: pixels must be an array (H, W, {fmt.channels}) for "
                         f"{fmt}, got {getattr(pixels, 'shape', type(pixels).__name__)}")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"write_image {os.fspath(path)!r}: scale must be a positive int, got {scale!r}")
    if pixels.dtype != fmt.dtype:
        raise ValueError(f"write_image {os.fspath(path)!r}: pixels are {pixels.dtype}, {fmt} needs {fmt.dtype}")
    pixels = np.ascontiguousarray(pixels)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    suffix = path.suffix.lower()
    if suffix == ".png":
        if fmt.kind == "float":
            raise ValueError(f"write_image {os.fspath(path)!r}: PNG cannot hold {fmt} pixels; use .tif")
        if fmt.bits == 16 and fmt.channels > 1:
            return atomic_write(path, _png16_bytes(pixels), "image")
    elif suffix not in (".tif", ".tiff") and (fmt.bits != 8 or fmt.kind != "uint"):
        raise ValueError(f"write_image {os.fspath(path)!r}: {suffix or 'no suffix'} cannot hold {fmt} pixels; "
                         "use .png (8/16-bit) or .tif (16-bit grey, float grey)")
    elif suffix in (".tif", ".tiff") and fmt.bits != 8 and fmt.channels > 1:
        raise ValueError(f"write_image {os.fspath(path)!r}: Pillow writes {fmt} TIFFs only at 8 bits; use .png")
    img = Image.fromarray(pixels[..., 0] if fmt.channels == 1 else pixels)
    kind = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF"}.get(suffix) or Image.registered_extensions().get(suffix)
    if kind is None:
        raise ValueError(f"write_image {os.fspath(path)!r}: unknown image suffix {suffix or '(none)'}; "
                         f"accepted: {', '.join(LOSSLESS_SUFFIXES)}")
    buffer = io.BytesIO()
    img.save(buffer, format=kind)
    return atomic_write(path, buffer.getvalue(), "image")


def _range(data_range: tuple[float, float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise TypeError(f"data_range must be a pair (lo, hi) of numbers, got {data_range!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise ValueError(f"data_range must be finite with hi > lo, got {data_range!r}")
    return lo, hi


def to_data(pixels: np.ndarray, fmt: ImageFormat, *, data_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Pixels (H, W, C) → a float64 tensor (C, H, W) in the model's data range (see the module docstring)."""
    lo, hi = _range(data_range)
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 3 or pixels.shape[-1] != fmt.channels \
            or pixels.dtype != fmt.dtype:
        raise ValueError(f"to_data: pixels must be a {fmt.dtype} array (H, W, {fmt.channels}) for {fmt}, got "
                         f"{getattr(pixels, 'dtype', type(pixels).__name__)} of shape {getattr(pixels, 'shape', '?')}")
    v = torch.from_numpy(np.ascontiguousarray(pixels).astype(np.float64)).permute(2, 0, 1).contiguous()
    if fmt.kind == "float":
        return v * (hi - lo) + lo
    return v / ((2**fmt.bits - 1) / (hi - lo)) + lo


def from_data(x: Tensor, fmt: ImageFormat, *, data_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """A tensor (C, H, W) in the data range → pixels (H, W, C) in ``fmt``: integers rounded and clipped to
    their range (what the file type can hold), floats kept as they are."""
    lo, hi = _range(data_range)
    if not isinstance(x, Tensor):
        raise TypeError(f"from_data: x must be a torch.Tensor (C, H, W) in the data range, got {type(x).__name__}")
    if x.ndim != 3 or x.shape[0] != fmt.channels:
        raise ValueError(f"from_data: need a tensor (C, H, W) with C = {fmt.channels} for {fmt}, got shape "
                         f"{tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"from_data: the image contains NaN or inf; it cannot be written as {fmt}")
    if fmt.kind == "float":
        return ((x - lo) / (hi - lo)).permute(1, 2, 0).numpy().astype(np.float32)
    top = 2**fmt.bits - 1
    v = ((x - lo) * (top / (hi - lo))).round().clamp(0, top).permute(1, 2, 0).numpy()
    return v.astype(fmt.dtype)
