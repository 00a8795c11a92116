"""Dataset round trips on CPU: images per second and peak memory per process, one process against two (torchrun).

    python benchmarks/bench_dataset.py              # 256 held-out digits, Euler 10 steps, batches of 16, 3 repeats
    python benchmarks/bench_dataset.py --images 364 --steps 20 --procs 1,2,4 --repeat 1

Writes a folder of ``--images`` PNGs (the shipped model's held-out test digits, cycled if more are asked for),
runs ``flowdiff roundtrip --data`` on it with each process count (``python -m torch.distributed.run
--standalone --nproc_per_node N``, gloo, for N > 1), and reports per run: the end-to-end wall time (process
start, imports and model load included), the time of the command itself in each process (from ``main``'s start
to its return, measured inside), images per second on each, and each process's peak resident memory
(``getrusage`` maxrss). The process counts are run in turn ``--repeat`` times and the fastest run of each is
reported (on a shared machine the others measure the neighbours). It checks that every run wrote a results.csv
identical to the one-process one, and writes ``benchmarks/results/dataset.md``. Each process uses one torch
thread (``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(argv: list[str]) -> int:
    """One process of a run: the flowdiff command, then its time and peak memory to ``$BENCH_STATS/rank-R.json``."""
    from flowdiff.cli import main

    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    rank = int(os.environ.get("RANK", "0"))
    stats = {"rank": rank, "seconds": seconds, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(os.environ["BENCH_STATS"], f"rank-{rank}.json").write_text(json.dumps(stats))
    return code


def make_folder(folder: Path, count: int) -> None:
    import numpy as np
    from PIL import Image

    import flowdiff

    images = flowdiff.digits_data("test").images
    for i in range(count):
        pixels = ((images[i % len(images)][0].numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
        path = folder / f"{i // 100:02d}" / f"digit-{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(path)


def run(procs: int, data: Path, out: Path, stats: Path, options: list[str]) -> dict:
    stats.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "BENCH_STATS": str(stats)}
    command = ["roundtrip", "--data", str(data), "--out", str(out), *options]
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   "--nproc_per_node", str(procs)]
    start = time.perf_counter()
    done = subprocess.run([*launcher, __file__, "--worker", *command], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{procs} process(es) failed:\n{done.stderr[-3000:]}")
    ranks = sorted((json.loads(p.read_text()) for p in stats.glob("rank-*.json")), key=lambda r: r["rank"])
    return {"procs": procs, "wall": wall, "ranks": ranks, "results": (out / "results.csv").read_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--procs", default="1,2", help="comma-separated process counts (default: 1,2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each process count, the fastest kept")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dataset.md"))
    args = parser.parse_args()
    options = ["--solver", "euler", "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_folder(data, args.images)
        runs = [run(int(n), data, Path(tmp) / f"out-{n}-{k}", Path(tmp) / f"stats-{n}-{k}", options)
                for k in range(args.repeat) for n in args.procs.split(",")]
    same = all(r["results"] == runs[0]["results"] for r in runs)
    results = [min((r for r in runs if r["procs"] == int(n)), key=lambda r: max(x["seconds"] for x in r["ranks"]))
               for n in args.procs.split(",")]
    load = os.getloadavg()
    lines = [f"`python benchmarks/bench_dataset.py --images {args.images} --steps {args.steps} --batch-size "
             f"{args.batch_size} --procs {args.procs} --repeat {args.repeat}`: "
             f"`flowdiff roundtrip --data` on {args.images} 8×8 digits, "
             f"shipped model, Euler {args.steps} steps ({2 * args.steps} NFE per image), batches of {args.batch_size}, "
             f"one torch thread per process; the fastest of {args.repeat} run(s) each; {os.cpu_count()} CPU cores, "
             f"load average {load[0]:.1f} at the end.",
             "",
             "| processes | wall s (end to end) | images/s (end to end) | command s per process | images/s (command) "
             "| peak RSS per process (MiB) |",
             "|---:|---:|---:|---|---:|---|"]
    for r in results:
        command = max(x["seconds"] for x in r["ranks"])
        seconds = ", ".join(f"{x['seconds']:.1f}" for x in r["ranks"])
        memory = ", ".join(f"{x['maxrss_mib']:.0f}" for x in r["ranks"])
        lines.append(f"| {r['procs']} | {r['wall']:.1f} | {args.images / r['wall']:.1f} | {seconds} | "
                     f"{args.images / command:.1f} | {memory} |")
    lines += ["", f"results.csv identical across all {len(runs)} runs: {'yes' if same else 'NO'}"]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text("# Dataset round trips: processes\n\n" + text)
    if not same:
        raise SystemExit("the process counts gave different results.csv")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2:]))
    main()
