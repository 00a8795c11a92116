"""Host–device syncs of a solve: counted on CUDA (none per step for a fixed grid), n/a on the CPU."""

import warnings

import pytest
import torch

import flowdiff
from flowdiff.tools.syncs import SyncCount, count_host_syncs, syncs_per_step

#: a fixed-grid solve may sync a few times in all (the input's check, the divergence guard's start scale, the end
#: state's check)
CONSTANT_SYNCS = 8


@pytest.mark.parametrize("solver, labels", [("euler", None), ("heun", None), ("dpmpp_2m", None),
                                            ("euler", "class"), ("euler", "guided")])
def test_fixed_grid_generate_does_no_host_sync_per_step(device, solver, labels):
    flow = flowdiff.pretrained("digits", device=device)
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    kwargs = {} if labels is None else {"class_labels": torch.arange(8, device=device)}
    if labels == "guided":
        flow = flowdiff.classifier_free_guidance(flow, 2.0)

    def solve(steps):
        with torch.no_grad():
            return flowdiff.generate(flow, noise, solver=solver, steps=steps, grid="trailing", model_kwargs=kwargs)

    counted = syncs_per_step(solve, device, steps=(4, 12))
    if device.type != "cuda":
        assert counted.per_step is None and counted.constant is None and str(counted) == "n/a"
        assert set(counted.counts) == {4, 12}
        return
    assert counted.per_step == 0, counted
    assert 0 <= counted.constant <= CONSTANT_SYNCS, counted


def test_cpu_counts_are_not_applicable():
    out, count = count_host_syncs(lambda: torch.ones(3).sum(), "cpu")
    assert float(out) == 3.0
    assert count == SyncCount("cpu", None) and str(count) == "n/a"


class FakeCuda:
    """Stands in for torch.cuda's sync debug switches: records the modes set, and whether synchronize ran."""

    def __init__(self, monkeypatch):
        self.mode, self.modes, self.synchronized = 0, [], 0
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: setattr(self, "synchronized",
                                                                                   self.synchronized + 1))
        monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: self.mode)
        monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", self.set)

    def set(self, mode):
        self.modes.append(mode)
        self.mode = 1 if mode == "warn" else mode

    def sync(self):  # what PyTorch does at a synchronising call under "warn"
        if self.mode == 1:
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=2)


def test_counting_separates_per_step_from_constant_syncs(monkeypatch):
    """The counting logic itself, on a simulated device: 2 syncs a step plus 3 in all are found as such."""
    cuda = FakeCuda(monkeypatch)

    def solve(steps):
        for _ in range(3 + 2 * steps):
            cuda.sync()
        return steps

    counted = syncs_per_step(solve, "cuda", steps=(5, 9))
    assert (counted.per_step, counted.constant) == (2, 3) and counted.counts == {5: 13, 9: 21}
    assert str(counted) == "2/step + 3"
    assert cuda.mode == 0 and cuda.synchronized == 2  # the mode in force before is back; drained before each
    assert cuda.sync() is None  # outside the count: no warning raised


def test_other_warnings_pass_through_and_the_mode_is_restored_on_error(monkeypatch):
    cuda = FakeCuda(monkeypatch)

    def noisy():
        cuda.sync()
        warnings.warn("something else", RuntimeWarning, stacklevel=2)
        return 1

    with pytest.warns(RuntimeWarning, match="something else"):
        out, count = count_host_syncs(noisy, "cuda:0")
    assert (out, count) == (1, SyncCount("cuda:0", 1))

    def broken():
        cuda.sync()
        raise KeyError("boom")

    with pytest.raises(KeyError):
        count_host_syncs(broken, "cuda")
    assert cuda.mode == 0


def test_bad_arguments_name_themselves(monkeypatch):
    with pytest.raises(ValueError, match="steps must be two different positive int"):
        syncs_per_step(lambda n: n, "cpu", steps=(5, 5))
    with pytest.raises(ValueError, match="steps must be two different positive int"):
        syncs_per_step(lambda n: n, "cpu", steps=(0, 5))
    with pytest.raises(TypeError, match="device must be a str or torch.device"):
        count_host_syncs(lambda: 1, 0)
    with pytest.raises(ValueError, match="device 'gpu' is not a device torch knows"):
        count_host_syncs(lambda: 1, "gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        count_host_syncs(lambda: 1, "cuda")
