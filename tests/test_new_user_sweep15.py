"""New-user sweep 15: folder runs over many processes (``torchrun --nproc_per_node N -m flowdiff roundtrip --data``),
resumed, merged; what a user saw where the README promised otherwise.

The torchrun tests start two CPU processes (gloo) on the shipped digits model, 3 images, 2 Euler steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _digit_files import write_digits

import flowdiff
from flowdiff.cli import main
from flowdiff.runs import datasets, distributed

ROOT = Path(__file__).resolve().parent.parent
HAS_DIGITS = (Path(flowdiff.__file__).parent / "weights" / "digits.safetensors").is_file()
needs_digits = pytest.mark.skipif(not HAS_DIGITS, reason="the shipped digits weights are not installed")
ARGS = ["--steps", "2", "--batch-size", "1", "--threads", "1"]


def torchrun(*argv):
    # unbuffered, as CI's environment may be: a line written as text and newline apart ran on into the other rank's
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "flowdiff", *map(str, argv)], capture_output=True, text=True, env=env, timeout=120)


def errors(stderr: str) -> list[str]:
    """The lines the ranks printed as flowdiff's errors (torchrun's own report aside)."""
    return [line for line in stderr.splitlines() if line.startswith("flowdiff roundtrip: error:")]


@needs_digits
def test_an_input_rank_0_cannot_read_for_the_manifest_is_said_on_every_rank(tmp_path):
    """The user saw, from rank 1, gloo's "Connection closed by peer [127.0.0.1]:6568 ... GLHF!" beside rank 0's
    "cannot read the input 'data/zz.png'": rank 0 alone hashes the inputs, and its failure was never sent."""
    data = tmp_path / "data"
    write_digits(data, ["a.png", "b.png"])
    (data / "zz.png").symlink_to(tmp_path / "gone.png")  # an image name whose file cannot be read
    # Rank 0 exits once it has sent its failure, and torchrun then stops rank 1, which now and then (under load)
    # happens before rank 1 has printed its line: up to three tries for one in which both ranks speak; none may
    # show gloo's closed connection.
    for attempt in range(3):
        done = torchrun("roundtrip", "--data", data, "--out", tmp_path / f"out{attempt}", *ARGS)
        said = errors(done.stderr)
        assert done.returncode != 0 and not any("gloo" in line for line in said), done.stderr[-3000:]
        assert said and all("zz.png" in line for line in said), said
        if len(said) == 2:
            break
    assert len(said) == 2, said
    assert sum("rank 0 of 2 failed:" in line for line in said) == 1, said


@needs_digits
def test_a_completion_record_a_rank_cannot_write_is_said_by_the_others_which_finish_theirs(tmp_path):
    """The user saw gloo's "Connection closed by peer" from rank 0 when rank 1 could not write its batch's completion
    record (here a folder stands where the record goes; a full disk does the same): the failure skipped the exchange
    in which every rank learns that another failed."""
    data, out = tmp_path / "data", tmp_path / "out"
    write_digits(data, ["a.png", "b.png", "c.png"])
    datasets.record_path(out, 1).mkdir(parents=True)  # batch 1 is rank 1's
    done = torchrun("roundtrip", "--data", data, "--out", out, *ARGS)
    said = errors(done.stderr)
    assert done.returncode != 0 and not any("gloo" in line for line in said), done.stderr[-3000:]
    assert any(line.endswith("failed: cannot write the completion record "
                             f"{os.fspath(datasets.record_path(out, 1))!r}: it is a folder")
               and "rank 1 of 2 failed:" in line for line in said), said
    assert datasets.record_path(out, 0).is_file() and datasets.record_path(out, 2).is_file()  # rank 0 finished


def _torchrun_env(monkeypatch, rank: int, local_world: int) -> None:
    for name, value in (("WORLD_SIZE", 2), ("RANK", rank), ("LOCAL_RANK", rank), ("LOCAL_WORLD_SIZE", local_world),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, str(value))


@needs_digits
def test_device_cuda_under_torchrun_without_cuda_is_refused_naming_the_device(tmp_path, monkeypatch, capsys):
    """The user ran ``torchrun --nproc_per_node 2 -m flowdiff roundtrip --data DIR --device cuda`` on a machine without
    CUDA and saw "Distributed package doesn't have NCCL built in" from each rank (one process says "--device 'cuda':
    CUDA is not available")."""
    import torch.distributed as dist

    data = tmp_path / "data"
    write_digits(data, ["a.png"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    joined = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: joined.append(a))  # must not be reached
    _torchrun_env(monkeypatch, rank=1, local_world=2)
    code = main(["roundtrip", "--data", str(data), "--out", str(tmp_path / "out"), *ARGS, "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 1 and not joined
    assert "device 'cuda': CUDA is not available" in err and "device 'cpu'" in err, err


def test_more_processes_per_machine_than_gpus_is_refused_on_every_rank_before_joining(monkeypatch):
    """Two processes on a machine with one GPU and device 'cuda': rank 1 would take cuda:1, which is not there, and
    fail alone while rank 0 waited for it; now every rank refuses, naming the counts, before the group is joined."""
    import torch.distributed as dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("joined the group"))
    for rank in (0, 1):
        _torchrun_env(monkeypatch, rank=rank, local_world=2)
        with pytest.raises(ValueError, match=r"2 processes run on this machine \(LOCAL_WORLD_SIZE=2\) for its 1 CUDA "
                                             r"device\(s\): start at most 1"):
            distributed.process_group("cuda")
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    joined = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: joined.append(k))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    _torchrun_env(monkeypatch, rank=0, local_world=1)  # one process per machine (two machines): each has its GPU
    assert distributed.process_group("cuda") == distributed.Ranks(0, 2, 0) and len(joined) == 1


@needs_digits
def test_a_resumed_run_deals_the_batches_left_to_do_over_every_rank(tmp_path):
    """Rank 1 failed at its first batch (a full disk) while rank 0, as the README promises, finished and recorded its
    own share; the user freed the disk and reran on 2 processes: rank 0 found every batch of its fixed share (0, 2, …)
    done and sat idle while rank 1 ran the rest alone, rank 0 waiting in a collective whose default timeout
    (torch's ``default_pg_timeout``) is 30 minutes. The
    batches left are dealt out, so both ranks work; the table is the one-process table all the same."""
    data, out = tmp_path / "data", tmp_path / "out"
    write_digits(data, ["a.png", "b.png", "c.png", "d.png"])
    assert main(["roundtrip", "--data", str(data), "--out", str(out), *ARGS]) == 0
    table = (out / "results.csv").read_bytes()
    for b in (1, 3):  # rank 1's share, unrecorded
        datasets.record_path(out, b).unlink()
    done = torchrun("roundtrip", "--data", data, "--out", out, *ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming: 2 of 4 batches done" in done.stdout
    ranks = {b: datasets.json.loads(datasets.record_path(out, b).read_text())["rank"] for b in (1, 3)}
    assert sorted(ranks.values()) == [0, 1], ranks
    assert (out / "results.csv").read_bytes() == table


SPLIT_ROUNDTRIP = """
import os, torch
from flowdiff.models.analytic import Gaussian
from flowdiff.runs import distributed

torch.set_num_threads(1)
flow = Gaussian(torch.zeros(1, 4, 4), torch.linspace(0.05, 1.0, 16)).flow()
seed = int(os.environ["RANK"]) if os.environ.get("SEED_BY_RANK") else 0  # a user seeding with the rank by mistake
images = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
ranks = distributed.process_group()
try:
    result = distributed.compare(flow, ranks=ranks, task="roundtrip", images=images, solvers=["euler", "heun"],
                                 grids=["trailing"], nfe=[4])
    if ranks.is_main:
        print("rows", [(r.solver, r.rms_error) for r in result.runs])
finally:
    distributed.close(ranks)
"""


def test_split_round_trip_comparison_refuses_images_that_differ_between_ranks(tmp_path):
    """``flowdiff.runs.distributed.compare(task="roundtrip", images=...)`` with images drawn from a per-rank seed: the
    user got one table, rank 0's Euler row on its images beside rank 1's Heun row on others (on the digits model,
    Heun's RMS 41.35 where one process gives 47.29), without a word; a generation's differing noise was caught only
    as "reference was solved from other noise than the noise given". Now every rank refuses, naming what differs and
    on which rank."""
    script = tmp_path / "split.py"
    script.write_text(SPLIT_ROUNDTRIP)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SEED_BY_RANK": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0 and "rows" not in done.stdout, done.stdout
    refusals = [line for line in done.stderr.splitlines()
                if "ValueError: images on rank 1 of 2 is not rank 0's" in line]
    assert len(refusals) == 2, done.stderr[-3000:]  # raised by both ranks alike, before any run


def test_data_naming_a_file_says_it_is_a_file(tmp_path, capsys):
    """``flowdiff roundtrip --data x.png --out o`` said "--data 'x.png': no such folder" of a file that is there."""
    image = tmp_path / "x.png"
    write_digits(tmp_path, ["x.png"])
    code = main(["roundtrip", "--data", str(image), "--out", str(tmp_path / "o"), "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and f"--data {str(image)!r} is a file, not a folder" in err and "no such folder" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [
    ["sample", "--num", "2", "--steps", "2"],
    ["likelihood", "IMAGE"],
    ["likelihood", "--data", "."],
    ["encode", "IMAGE", "--steps", "2"],
])
def test_a_command_that_does_not_split_is_refused_under_torchrun(argv, tmp_path, monkeypatch, capsys):
    """``torchrun --nproc_per_node 2 -m flowdiff sample`` (or ``likelihood``, or ``encode`` of image files) did the
    whole job on every process: the same lines printed twice and the same file written twice (S15). Refused by name
    before any work, on every rank; ``compare`` and the ``--data`` runs split and are not refused."""
    image = tmp_path / "one.png"
    write_digits(tmp_path, ["one.png"])
    argv = [str(image) if a == "IMAGE" else a for a in argv]
    _torchrun_env(monkeypatch, rank=1, local_world=2)
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "does not split its work over torchrun's processes (WORLD_SIZE=2)" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png"]  # nothing written


class _Writes:
    def __init__(self):
        self.calls = []

    def write(self, text):
        self.calls.append(text)

    def flush(self):
        pass


def test_every_line_the_command_line_prints_on_stderr_is_one_write(monkeypatch):
    """CI saw rank 0's error line run on into rank 1's: ``print`` wrote each line's text and its newline apart, and
    under an unbuffered stderr the two processes' writes spliced. A line is now one write, whole with its newline."""
    from flowdiff.cli._errors import say
    from flowdiff.runs.distributed import _say_on_stderr

    seen = _Writes()
    monkeypatch.setattr(sys, "stderr", seen)
    say("flowdiff roundtrip: error: one")
    _say_on_stderr(1)("run two")
    monkeypatch.setattr(sys, "argv", ["flowdiff"])
    assert main(["sample", "--num", "0"]) != 0  # an error of the command's own, printed by main
    assert seen.calls[:2] == ["flowdiff roundtrip: error: one\n", "[rank 1] run two\n"]
    assert len(seen.calls) == 3 and seen.calls[2].startswith("flowdiff sample: error:") and \
        seen.calls[2].endswith("\n") and seen.calls[2].count("\n") == 1, seen.calls
