"""Review R17 (sweep 6 S6, reference provenance F3, flow-matching peers P3): what a user met, each test failing
before its fix (its docstring says what a user saw)."""

import torch
from _cli_runs import one_line, run_in, write_digits

from flowdiff.cli import _dataset


def test_a_folder_run_written_before_threads_were_recorded_still_resumes(capsys, tmp_path, monkeypatch):
    """A folder run stopped under the previous release (its run.json records no thread count) was refused on resume
    as '--threads: '(not set)' in the folder's run, 1 now', with the advice to rerun with the same arguments, which
    no --threads value can meet: the run could only be started over. It resumes now, as it did, and says that its
    thread count was not recorded."""
    (tmp_path / "d").mkdir()
    write_digits(tmp_path / "d", 4)
    argv = ["roundtrip", "--data", "d", "--out", "o", "--steps", "2", "--batch-size", "2", "--threads", "1"]
    recorded = _dataset._arguments

    def before_threads(args, fingerprint):  # the manifest the previous release wrote
        values = recorded(args, fingerprint)
        values.pop("threads", None)
        return values

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(_dataset, "_arguments", before_threads)
        monkeypatch.setenv("FLOWDIFF_STOP_AFTER", "3")  # batch 0 recorded, batch 1 cut off
        code, _, _ = run_in(capsys, argv, tmp_path)
        assert code == 3
        monkeypatch.delenv("FLOWDIFF_STOP_AFTER")
        monkeypatch.setattr(_dataset, "_arguments", recorded)
        code, out, err = run_in(capsys, argv, tmp_path)
        assert code == 0, one_line(err)
        assert "resuming: 1 of 2 batches done" in out
        assert "thread count" in err
    finally:
        torch.set_num_threads(before)
