"""Distributed runs: failures outside the exchanges (D2). A setup failure on one rank alone (one GPU out of memory
while loading the model), the GPU check under a launcher that sets only ``WORLD_SIZE`` and ``RANK``, and a command
started from inside a torchrun job, which inherits its environment. Each test failed before the fix beside it.

The torchrun tests start two CPU processes (gloo) on the shipped digits model, as tests/test_new_user_sweep15.py does.
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
from flowdiff.runs import distributed
from flowdiff.runs.distributed import Ranks

ROOT = Path(__file__).resolve().parent.parent
HAS_DIGITS = (Path(flowdiff.__file__).parent / "weights" / "digits.safetensors").is_file()
needs_digits = pytest.mark.skipif(not HAS_DIGITS, reason="the shipped digits weights are not installed")
ARGS = ["--steps", "2", "--batch-size", "1", "--threads", "1"]
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 1; 79.10 GiB total capacity)"

# flowdiff's command line as torchrun's processes run it, with rank 1's model load failing as one GPU out of memory
# does (torch.cuda.OutOfMemoryError) while rank 0's loads
RANK_1_OOM = f"""
import os, sys, torch
from flowdiff.cli import _commands, main

if os.environ["RANK"] == "1":
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError({OOM!r})
    _commands._setup = out_of_memory
sys.exit(main(sys.argv[1:]))
"""


def _errors(stderr: str, command: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"flowdiff {command}: error:")]


def _both_ranks_say_rank_1_is_out_of_memory(script, command: str, argv_for) -> Path:
    """Run ``script`` under torchrun (two CPU processes) with ``argv_for(out)`` until both ranks print their error
    line: the failing rank exits once the failure is exchanged, and torchrun then stops the other, which now and then
    (under load) happens before it has printed its line, so up to three tries. No line may show gloo's closed
    connection; rank 1 says its own cause, rank 0 ``rank 1 of 2 failed:``. Returns the last try's --out."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for attempt in range(3):
        out = script.parent / f"out{attempt}"
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(script), *map(str, argv_for(out))], capture_output=True, text=True, env=env,
                              timeout=120)
        said = _errors(done.stderr, command)
        assert done.returncode != 0 and not any("gloo" in line or "onnection closed" in line for line in said), \
            done.stderr[-3000:]
        assert said and all(OOM in line for line in said), done.stderr[-3000:]
        if len(said) == 2:
            break
    assert len(said) == 2, said
    assert sum(f"rank 1 of 2 failed: {OOM}" in line for line in said) == 1, said  # rank 0's; rank 1 says its own
    return out


@needs_digits
@pytest.mark.parametrize("command", ["roundtrip", "compare"])
def test_a_model_that_one_rank_cannot_load_is_said_on_every_rank(command, tmp_path):
    """Rank 1 out of GPU memory while loading the model: it said so and ended, and rank 0, already waiting in its
    first exchange (the manifest of a folder run, the reference of compare), said gloo's "Connection closed by
    peer". Every rank now ends its setup with one exchange: rank 1 says its cause, rank 0 ``rank 1 of 2 failed:``."""
    script = tmp_path / "rank_1_oom.py"
    script.write_text(RANK_1_OOM)
    data = tmp_path / "data"
    write_digits(data, ["a.png", "b.png"])
    out = _both_ranks_say_rank_1_is_out_of_memory(
        script, command, lambda out: ["roundtrip", "--data", data, "--out", out, *ARGS] if command == "roundtrip" else
        ["compare", "--solver", "euler", "--nfe", "2", "--batch", "2", "--out", out, "--no-progress"])
    assert not (out / "run.json").exists() and not (out / "report.md").exists()


# as RANK_1_OOM, with rank 1's model loaded and its noise (compare's input, drawn on its device) out of GPU memory
RANK_1_NOISE_OOM = RANK_1_OOM.replace("_commands._setup = out_of_memory", "_commands._noise = out_of_memory")


@needs_digits
def test_noise_that_one_rank_cannot_hold_is_said_on_every_rank(tmp_path):
    """`flowdiff compare` under torchrun draws its noise on each rank's device after the setup's exchange: rank 1 out
    of GPU memory there said so and ended, and rank 0 solved the reference alone and met gloo's "Connection closed by
    peer" when it sent it. The noise is drawn inside the setup's block now: rank 0 says ``rank 1 of 2 failed:``."""
    script = tmp_path / "rank_1_noise_oom.py"
    script.write_text(RANK_1_NOISE_OOM)
    out = _both_ranks_say_rank_1_is_out_of_memory(
        script, "compare", lambda out: ["compare", "--solver", "euler", "--nfe", "2", "--batch", "2", "--out", out,
                                        "--no-progress"])
    assert not (out / "reference.safetensors").exists() and not (out / "report.md").exists()


class _FakeRank(Ranks):
    """One of two ranks, in one process: the other rank's failure (or None) is ``theirs``."""

    def __init__(self, rank: int, theirs: str | None) -> None:
        super().__init__(rank=rank, world_size=2)
        object.__setattr__(self, "theirs", theirs)

    def all_gather(self, obj):
        return [obj, self.theirs] if self.rank == 0 else [self.theirs, obj]


def test_together_raises_the_own_failure_on_the_failing_rank_and_names_it_on_the_others():
    """The exchange behind the setup's: the failing rank keeps its own error (type and all); the others name the rank
    and its cause in one line; a block that fails nowhere passes."""
    with pytest.raises(torch.cuda.OutOfMemoryError, match="out of memory"):
        with _FakeRank(1, None).together():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.\n  Tried")
    with pytest.raises(RuntimeError, match=r"^rank 1 of 2 failed: CUDA out of memory\. Tried$"):
        with _FakeRank(0, "CUDA out of memory. Tried").together():
            pass
    with pytest.raises(RuntimeError, match=r"^rank 0 of 2 failed: gone$"):
        with _FakeRank(1, "gone").together():
            pass
    with _FakeRank(0, None).together():
        pass
    with pytest.raises(OSError, match="mine"):  # both failed: each its own
        with _FakeRank(0, "theirs").together():
            raise OSError("mine")


def _launcher_env(monkeypatch, rank: int, **more: str) -> None:
    """What srun or mpirun with a user's exports give a process: WORLD_SIZE and RANK, and the rendezvous address."""
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"WORLD_SIZE": "2", "RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
                        **more}.items():
        monkeypatch.setenv(name, value)


def test_device_cuda_without_local_world_size_is_decided_alike_on_every_rank(monkeypatch):
    """Two processes from a launcher that sets WORLD_SIZE and RANK alone, on a machine with one GPU: the count of
    processes here was taken as LOCAL_RANK + 1, so rank 0 (1 process) joined the group and rank 1 (2 processes) was
    refused, leaving rank 0 to wait for it. Every rank now refuses alike, naming what to set."""
    import torch.distributed as dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("joined the group"))
    for rank in (0, 1):
        _launcher_env(monkeypatch, rank)
        with pytest.raises(ValueError, match=r"LOCAL_RANK and LOCAL_WORLD_SIZE are not set .*srun or mpirun.*set "
                                             r"LOCAL_RANK .* and LOCAL_WORLD_SIZE .*'cuda:INDEX'"):
            distributed.process_group("cuda")
        _launcher_env(monkeypatch, rank, LOCAL_RANK=str(rank))
        with pytest.raises(ValueError, match=r"and LOCAL_WORLD_SIZE is not set"):
            distributed.process_group("cuda")
    # a GPU named by index needs neither: each process says which it takes
    joined = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: joined.append(k))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    _launcher_env(monkeypatch, 1)
    assert distributed.process_group("cuda:0") == Ranks(1, 2, 0) and len(joined) == 1


def _inherited_env(monkeypatch) -> None:
    """What a process started from inside torchrun's rank 1 of 2 inherits."""
    for name, value in (("WORLD_SIZE", 2), ("RANK", 1), ("LOCAL_RANK", 1), ("LOCAL_WORLD_SIZE", 2),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500"), ("TORCHELASTIC_RUN_ID", "none")):
        monkeypatch.setenv(name, str(value))


@needs_digits
def test_a_command_started_from_inside_a_torchrun_job_is_told_to_say_it_is_one_process(tmp_path, monkeypatch, capsys):
    """A rank's script ran ``flowdiff sample`` as a subprocess, which inherits the rank's whole environment and was
    refused as one of torchrun's processes, with no word of how to run it. Nothing in the environment tells such a
    process from a rank (a rank can run flowdiff under a shell too), so the refusal says how: ``WORLD_SIZE=1``, with
    which it runs as one process (and a ``--data`` run does not join the job's group) whatever else it inherited."""
    import torch.distributed as dist

    _inherited_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    code = main(["sample", "--num", "1", "--steps", "2", "--out", "s.png"])
    err = capsys.readouterr().err
    assert code == 2 and "WORLD_SIZE=2" in err and "start it with WORLD_SIZE=1 in its environment" in err, err
    assert not (tmp_path / "s.png").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("joined the job's group"))
    assert main(["sample", "--num", "1", "--steps", "2", "--out", "s.png"]) == 0 and (tmp_path / "s.png").is_file()
    write_digits(tmp_path / "data", ["a.png"])
    assert main(["roundtrip", "--data", "data", "--out", "out", *ARGS]) == 0
    assert (tmp_path / "out" / "results.csv").is_file()


class _LoggedRank(_FakeRank):
    """:class:`_FakeRank` whose rank 0 succeeded in its part of ``main_first``, logging each exchange it enters."""

    def __init__(self, rank: int, theirs: str | None) -> None:
        super().__init__(rank, theirs)
        object.__setattr__(self, "log", [])

    def broadcast(self, obj):
        self.log.append("broadcast")
        return obj if self.rank == 0 else None

    def all_gather(self, obj):
        self.log.append("all_gather")
        return super().all_gather(obj)


def test_main_first_says_a_failure_of_the_other_ranks_read_on_every_rank():
    """`flowdiff compare` under torchrun: rank 0 solves the reference and keeps it in a file, then the others read it
    (`Ranks.main_first`). Where rank 1 could not read it (a machine that does not see rank 0's --out), rank 1 said so
    and ended, while rank 0 had returned and gone on to its next exchange, to meet gloo's closed connection. Both ranks
    now enter the same exchanges, and rank 0 says `rank 1 of 2 failed: <why>`."""
    rank0 = _LoggedRank(0, "[Errno 2] No such file or directory: 'out/reference.safetensors'")
    with pytest.raises(RuntimeError, match=r"^rank 1 of 2 failed: \[Errno 2\] No such file"):
        rank0.main_first(lambda: "solved")
    rank1 = _LoggedRank(1, None)

    def unreadable():
        raise FileNotFoundError(2, "No such file or directory", "out/reference.safetensors")

    with pytest.raises(FileNotFoundError):  # the failing rank keeps its own error
        rank1.main_first(unreadable)
    assert rank0.log == rank1.log == ["broadcast", "all_gather"]  # the same exchanges, in the same order
    assert _LoggedRank(0, None).main_first(lambda: "solved") == "solved"
    assert _LoggedRank(1, None).main_first(lambda: "read") == "read"
