"""Dataset round trips (``--data DIR``): one process and two (torchrun, gloo) give one identical table; a run stopped
part-way resumes to the same table; changed arguments and colliding outputs are refused.

The shipped digits model with 3 Euler steps, 7 held-out digits in batches of 2 (4 batches, the last of one image).
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _digit_files import write_digits as _write_digits
from _ranks import AllWorkRank0

import flowdiff
from flowdiff.cli import main
from flowdiff.engine.latent import Latent
from flowdiff.runs import datasets
from flowdiff.runs.distributed import Ranks
from flowdiff.tools.metrics import max_abs_error, mse, psnr

ROOT = Path(__file__).resolve().parent.parent
HAS_DIGITS = (Path(flowdiff.__file__).parent / "weights" / "digits.safetensors").is_file()
pytestmark = pytest.mark.skipif(not HAS_DIGITS, reason="the shipped digits weights are not installed")

NAMES = ["0/a.png", "0/b.png", "1/c.png", "2/deep/e.png", "f.png", "g.jpg", "h.png"]
ARGS = ["--steps", "3", "--batch-size", "2"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_digits(folder: Path, names=NAMES, start: int = 0) -> None:
    _write_digits(folder, names, start)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_digits(folder)
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """The one-process round trip of ``data``, with latents."""
    out = tmp_path_factory.mktemp("one") / "out"
    assert main(["roundtrip", "--data", str(data), "--out", str(out), *ARGS, "--save-latents"]) == 0
    return out


def rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as fh:
        return list(csv.DictReader(fh))


def files(out: Path, sub: str) -> dict[str, bytes]:
    return {p.relative_to(out / sub).as_posix(): p.read_bytes() for p in sorted((out / sub).rglob("*")) if p.is_file()}


def records(out: Path) -> dict[int, dict]:
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in (out / datasets.RECORDS).glob("batch-*.json")}


def test_folder_walk_is_sorted_and_lists_what_it_skips(data):
    folder = datasets.scan(data)
    assert folder.files == tuple(sorted(NAMES))
    assert [p for p, _ in folder.skipped] == ["notes.txt"]
    assert [list(g) for g in datasets.batches(7, 2)] == [[0, 1], [2, 3], [4, 5], [6]]
    two = [Ranks(r, 2).share(range(4)) for r in range(2)]
    assert two == [[0, 2], [1, 3]]
    assert datasets.nearest_rank([3.0, 1.0, 2.0, float("inf")], 50) == 2.0
    assert datasets.nearest_rank([1.0, float("inf")], 99) == float("inf")


def test_hidden_files_are_skipped_whatever_their_suffix(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"")
    (tmp_path / "sub" / "._a.png").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork, not a PNG
    folder = datasets.scan(tmp_path)
    assert folder.files == ("sub/a.png",)
    assert folder.skipped == (("sub/._a.png", "hidden file"),)


def test_one_process_rows_are_the_batches_computed_by_the_api(data, one_process):
    table = rows(one_process)
    assert [r["path"] for r in table] == sorted(NAMES)  # every image once, sorted
    flow = flowdiff.pretrained("digits")
    flow.model.float()
    order = sorted(NAMES)
    for batch in datasets.batches(len(order), 2)[:2]:  # the first two fixed batches, recomputed through the API
        names = [order[i] for i in batch]
        images = flowdiff.cli.read_images([str(data / n) for n in names], (1, 8, 8)).float()
        enc = flowdiff.encode(flow, images, solver="euler", steps=3, grid="trailing")
        dec = flowdiff.decode(flow, enc.latent)
        for i, n in enumerate(names):
            row = next(r for r in table if r["path"] == n)
            assert float(row["mse"]) == float(mse(images, dec.x, reduction="none")[i])
            assert float(row["max_abs"]) == float(max_abs_error(images, dec.x, reduction="none")[i])
            assert float(row["psnr"]) == float(psnr(images, dec.x, reduction="none")[i])
            assert int(row["nfe_encode"]) == enc.stats.nfe == 3 and int(row["nfe_decode"]) == dec.stats.nfe
            own = Latent.load(one_process / "latents" / f"{n}.safetensors")  # one latent per image
            assert torch.equal(own.x, enc.latent.x[i:i + 1]) and own.info["images"][0]["name"] == n
    summary = json.loads((one_process / "summary.json").read_text())
    errors = [float(r["mse"]) for r in table]
    assert summary["images"] == 7 and summary["mse"]["worst"] == max(errors)
    assert summary["mse"]["mean"] == pytest.approx(sum(errors) / 7, rel=1e-12)
    assert summary["worst"]["path"] == table[int(np.argmax(errors))]["path"]
    assert summary["nfe_encode"] == {"min": 3, "mean": 3.0, "max": 3} == summary["nfe_decode"]
    assert summary["skipped"] == [{"path": "notes.txt", "reason": "not an image type flowdiff reads (.txt)"}]
    assert sorted(files(one_process, "images")) == sorted(n.replace(".jpg", ".png") for n in NAMES)  # lossy → .png


def torchrun(*argv, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "flowdiff", *map(str, argv)], capture_output=True, text=True, env=env, timeout=300)


def test_two_processes_under_torchrun_give_the_one_process_table(data, one_process, tmp_path, capsys, monkeypatch):
    """Two ranks finish a run that one process started and was stopped in (batch 0 recorded, batch 1 cut off)."""
    out = tmp_path / "out"
    monkeypatch.setenv("FLOWDIFF_STOP_AFTER", "3")
    assert run(capsys, "roundtrip", "--data", data, "--out", out, *ARGS, "--save-latents")[0] == 3
    monkeypatch.delenv("FLOWDIFF_STOP_AFTER")
    done = torchrun("roundtrip", "--data", data, "--out", out, *ARGS, "--save-latents")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming: 1 of 4 batches done" in done.stdout
    assert done.stdout.count("round trip of 7 image(s)") == 1  # rank 0 alone merges and prints
    assert (out / "results.csv").read_bytes() == (one_process / "results.csv").read_bytes()  # bit for bit
    assert (out / "summary.json").read_bytes() == (one_process / "summary.json").read_bytes()
    assert files(out, "images") == files(one_process, "images")
    for name in NAMES:
        a, b = (Latent.load(o / "latents" / f"{name}.safetensors") for o in (out, one_process))
        assert torch.equal(a.x, b.x)
    made = records(out)
    # batch 0 recorded by the stopped run (as rank 0); the 3 left dealt out in order, rank 0 taking the 1st and 3rd
    assert {b: r["rank"] for b, r in made.items()} == {0: 0, 1: 0, 2: 1, 3: 0}
    assert sorted(row["path"] for r in made.values() for row in r["rows"]) == sorted(NAMES)  # each image once


def test_a_stopped_run_resumes_to_the_same_table(data, one_process, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("FLOWDIFF_STOP_AFTER", "3")
    code, _, err = run(capsys, "roundtrip", "--data", data, "--out", out, *ARGS, "--save-latents")
    assert code == 3 and "FLOWDIFF_STOP_AFTER=3" in err
    assert sorted(records(out)) == [0]  # batch 1 (images 2, 3) was written but, as if killed, not recorded
    assert (out / "images" / "1" / "c.png").is_file() and not (out / "results.csv").exists()
    (out / "images" / "1" / "c.png").write_bytes(b"half a file")  # what a kill mid-write could leave
    monkeypatch.delenv("FLOWDIFF_STOP_AFTER")
    code, text, err = run(capsys, "roundtrip", "--data", data, "--out", out, *ARGS, "--save-latents")
    assert code == 0, err
    assert "resuming: 1 of 4 batches done" in text
    assert (out / "results.csv").read_bytes() == (one_process / "results.csv").read_bytes()
    assert files(out, "images") == files(one_process, "images")
    code, text, _ = run(capsys, "roundtrip", "--data", data, "--out", out, *ARGS, "--save-latents")
    assert code == 0 and "resuming: 4 of 4 batches done" in text  # a finished run is merged again, not rerun
    assert (out / "results.csv").read_bytes() == (one_process / "results.csv").read_bytes()


def test_changed_arguments_or_inputs_are_refused_and_overwrite_starts_over(data, one_process, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(one_process, out)
    for extra, named in ((["--steps", "4"], "--steps: 3 in the folder's run, 4 now"),
                         (["--steps", "3", "--solver", "heun"], "--solver: 'euler' in the folder's run, 'heun' now"),
                         (["--steps", "3", "--batch-size", "3"], "--batch-size: 2 in the folder's run, 3 now"),
                         (["--steps", "3", "--dtype", "float64"], "--dtype: 'float32'")):
        code, _, err = run(capsys, "roundtrip", "--data", data, "--out", out, "--batch-size", "2", "--save-latents",
                           *extra)
        assert code == 2 and named in err, err
    code, _, err = run(capsys, "roundtrip", "--data", data, "--out", out, *ARGS)
    assert code == 2 and "--save-latents: True in the folder's run, False now" in err
    changed = tmp_path / "data"
    shutil.copytree(data, changed)
    write_digits(changed, ["f.png"], start=20)
    code, _, err = run(capsys, "roundtrip", "--data", changed, "--out", out, *ARGS, "--save-latents")
    assert code == 2 and "changed: f.png" in err, err
    code, _, err = run(capsys, "roundtrip", "--data", changed, "--out", out, *ARGS, "--save-latents", "--overwrite")
    assert code == 0, err
    assert rows(out) != rows(one_process) and len(records(out)) == 4


def test_colliding_or_unsafe_outputs_are_refused(data, tmp_path, capsys):
    clash = tmp_path / "clash"
    write_digits(clash, ["x.png", "x.jpg"])
    code, _, err = run(capsys, "roundtrip", "--data", clash, "--out", tmp_path / "o1", *ARGS)
    assert code == 2 and "'x.jpg'" in err and "'x.png'" in err and "would both be written" in err
    code, _, err = run(capsys, "roundtrip", "--data", data, "--out", data / "inside", *ARGS)
    assert code == 2 and "inside --data" in err
    nested = tmp_path / "o2"
    write_digits(nested / "images", ["y.png"])  # a previous run's reconstructions given as inputs
    before = (nested / "images" / "y.png").read_bytes()
    code, _, err = run(capsys, "roundtrip", "--data", nested / "images", "--out", nested, *ARGS)
    assert code == 2 and "inside --out" in err and (nested / "images" / "y.png").read_bytes() == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.csv").write_text("someone else's")
    code, _, err = run(capsys, "roundtrip", "--data", data, "--out", foreign, *ARGS)
    assert code == 1 and "results.csv" in err and "--overwrite" in err
    assert (foreign / "results.csv").read_text() == "someone else's"
    (foreign / "run.json").write_text("{}")
    code, _, err = run(capsys, "roundtrip", "--data", data, "--out", foreign, *ARGS)
    assert code == 1 and "not a flowdiff run manifest" in err
    code, _, err = run(capsys, "roundtrip", "--data", tmp_path / "missing", "--out", tmp_path / "o2", *ARGS)
    assert code == 1 and "no such folder" in err
    code, _, err = run(capsys, "roundtrip", data / "f.png", "--data", data, "--out", tmp_path / "o3")
    assert code == 2 and "not both" in err
    code, _, err = run(capsys, "roundtrip", data / "f.png", "--batch-size", "2")
    assert code == 2 and "--batch-size is for --data" in err
    assert run(capsys, "encode")[0] == 2
    damaged = tmp_path / "damaged"
    write_digits(damaged, ["a.png"])
    (damaged / "b.png").write_bytes(b"\x89PNG not really")
    code, _, err = run(capsys, "roundtrip", "--data", damaged, "--out", tmp_path / "o4", *ARGS)
    assert code == 1 and "b.png" in err and "damaged" in err  # an image type that cannot be read: an error naming it


def test_encode_a_folder_writes_a_latent_per_image(data, one_process, tmp_path, capsys):
    out = tmp_path / "enc"
    code, text, err = run(capsys, "encode", "--data", data, "--out", out, *ARGS)
    assert code == 0, err
    table = rows(out)
    assert [r["path"] for r in table] == sorted(NAMES)
    for r in table:
        latent = Latent.load(out / r["latent"])
        mine = Latent.load(one_process / "latents" / f"{r['path']}.safetensors")  # the round trip's encode
        assert torch.equal(latent.x, mine.x)
        assert float(r["latent_std"]) == float(latent.x.double().flatten().std())
    code, _, err = run(capsys, "decode", out / "latents" / "0" / "a.png.safetensors", "--out", tmp_path / "dec")
    assert code == 0 and (tmp_path / "dec" / "0" / "a.png").is_file(), err  # decode keeps the recorded name


def compare_table(folder: Path) -> list[dict]:
    """compare.csv without the measured wall times."""
    with open(folder / "compare.csv") as fh:
        return [{k: v for k, v in r.items() if k != "wall_time"} for r in csv.DictReader(fh)]


COMPARE = ["compare", "--solver", "euler,heun,dpmpp_2m", "--nfe", "3,5", "--grid", "trailing", "--batch", "2",
           "--no-progress", "--layout", "wide"]


def test_compare_runs_split_over_two_processes_give_one_table(tmp_path, capsys):
    """Round-trip comparison (no reference solve, so that the test costs little more than starting 3 processes)."""
    argv = [*COMPARE, "--task", "roundtrip"]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "one")
    assert code == 0, err
    done = torchrun(*argv, "--out", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| euler | trailing |") == 1  # one table, printed by rank 0
    one, two = compare_table(tmp_path / "one"), compare_table(tmp_path / "two")
    assert len(one) == 6 and one == two


@pytest.mark.slow
def test_generation_compare_over_two_processes_solves_the_reference_once(tmp_path, capsys):
    """Rank 0 solves the reference and keeps it on disk, rank 1 reads it; the table equals one process's."""
    argv = [*COMPARE, "--rtol", "1e-3"]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "one")
    assert code == 0, err
    done = torchrun(*argv, "--out", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(kept in" not in done.stdout and done.stdout.count("best at NFE 3") == 1  # solved by this run
    assert compare_table(tmp_path / "one") == compare_table(tmp_path / "two")
    from flowdiff.tools.compare import Reference

    a, b = (Reference.load(tmp_path / d / "reference.safetensors") for d in ("one", "two"))
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_table(data, one_process, tmp_path, capsys):
    """A real SIGKILL, part-way: the rerun completes the table, identical to one uninterrupted run."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flowdiff", "roundtrip", "--data", str(data), "--out", str(out),
                             *ARGS, "--save-latents"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / datasets.RECORDS).is_dir() and records(out):  # the first batch is recorded: kill it now
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL or len(records(out)) == 4:
        pytest.skip("the run finished before the kill landed")
    code, text, err = run(capsys, "roundtrip", "--data", data, "--out", out, *ARGS, "--save-latents")
    assert code == 0 and "resuming:" in text, err
    assert (out / "results.csv").read_bytes() == (one_process / "results.csv").read_bytes()


def test_distributed_compare_takes_flowdiffs_default_grids_when_none_are_given():
    from flowdiff.models.analytic import Mixture
    from flowdiff.runs import distributed
    from flowdiff.tools.compare import DEFAULT_GRIDS

    centers = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    flow = Mixture(centers, bandwidth=0.5).flow()
    noise = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = flowdiff.reference_solution(flow, noise)
    one = flowdiff.compare(flow, noise, solvers=["euler"], nfe=[4], reference=ref)
    # grids=None is what the CLI passes without --grid
    split = distributed.compare(flow, noise, ranks=AllWorkRank0(rank=0, world_size=2), solvers=["euler"],
                                grids=None, nfe=[4], reference=ref)
    assert [(r.solver, r.grid, r.budget, r.rms_error) for r in split.runs] == \
        [(r.solver, r.grid, r.budget, r.rms_error) for r in one.runs]
    assert {r.grid for r in one.runs} == set(DEFAULT_GRIDS)
