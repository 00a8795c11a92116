"""What reading a decompression bomb costs, refused by its declared size and decoded as before the check.

    python benchmarks/bench_file_hazards.py                 # PNGs declaring 10000×10000 pixels (over the default)
    python benchmarks/bench_file_hazards.py --side 14000    # the fault sweep's 14000×14000 (needs ~4 GiB free)

Writes one PNG whose zero rows compress about 1000:1 (16-bit RGB, decoded by flowdiff itself; and the same
picture as 8-bit grey, decoded by Pillow), then reads each in a fresh process twice: with the default limit
(``FLOWDIFF_MAX_PIXELS`` unset: refused on its header) and with the limit raised above its size (decoded, which is
what every read did before the check). Reports per read: the outcome, the wall time of ``read_image`` and the
process's peak resident memory (``getrusage`` maxrss, which includes the ~100 MiB of importing numpy, torch and
Pillow, measured alone as the baseline), and writes ``benchmarks/results/file_hazards.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bomb(path: Path, side: int, depth: int, color: int) -> None:
    channels = {0: 1, 2: 3}[color]
    row = b"\0" * (1 + side * channels * depth // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, depth, color, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def worker(path: str) -> None:
    """One read in this process: outcome, seconds, peak RSS as JSON on stdout (``path`` empty: imports only)."""
    from flowdiff.runs.imageio import read_image

    outcome, seconds = "imports only", 0.0
    if path:
        start = time.perf_counter()
        try:
            pixels, fmt = read_image(path)
            outcome = f"decoded: {pixels.shape[1]}×{pixels.shape[0]} {fmt}"
        except ValueError as err:
            message = str(err)
            outcome = ("refused by its declared size" if "declares" in message else "refused: " + message[:80])
        seconds = time.perf_counter() - start
    print(json.dumps({"outcome": outcome, "seconds": seconds,
                      "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def read(path: str, limit: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("FLOWDIFF_MAX_PIXELS", None)
    if limit is not None:
        env["FLOWDIFF_MAX_PIXELS"] = str(limit)
    proc = subprocess.run([sys.executable, __file__, "--worker", path], capture_output=True, text=True, env=env,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=10000,
                        help="declared width and height (default 10000: over the default limit of 8192×8192)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    base = read("", None)
    lines = [f"# Reading a decompression bomb ({args.side}×{args.side} declared)", "",
             f"Baseline (imports only): peak RSS {base['maxrss_mib']:.0f} MiB.", "",
             "| file | size on disk | would inflate to | FLOWDIFF_MAX_PIXELS | outcome | read s | peak RSS |",
             "|---|---:|---:|---|---|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, depth, color in (("16-bit RGB PNG (flowdiff's decoder)", 16, 2), ("8-bit grey PNG (Pillow)", 8, 0)):
            path = Path(tmp) / f"bomb{depth}.png"
            bomb(path, args.side, depth, color)
            inflated = args.side * (1 + args.side * {0: 1, 2: 3}[color] * depth // 8)
            for limit in (None, args.side * args.side):
                got = read(str(path), limit)
                lines.append(f"| {name} | {path.stat().st_size / 2**20:.2f} MiB | {inflated / 2**20:.0f} MiB | "
                             f"{'unset (default)' if limit is None else limit} | {got['outcome']} | "
                             f"{got['seconds']:.3f} | {got['maxrss_mib']:.0f} MiB |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / "file_hazards.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
