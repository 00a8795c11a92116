"""Review F3 (from new-user sweep S6): a reference knows the flow, conditioning and noise it belongs to, and three
arguments taken without a word.

Each test failed before its fix (its docstring says what a user saw).
"""

import dataclasses
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import flowdiff as fd
from flowdiff import ProbabilityFlow, Reference, compare, reference_solution
from flowdiff.models.analytic import Gaussian
from flowdiff.tools.reference import check_reference, check_tolerance, clear_reference_cache

GAUSSIAN = Gaussian(torch.zeros(1, 2, 2), torch.linspace(0.1, 1.0, 4))


class LabelledNet(torch.nn.Module):
    """A class-conditional ε: the Gaussian's exact ε scaled by (1 + 0.1·label) and by a weight."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(weight, dtype=torch.float64))

    def forward(self, x_t, t, class_labels=None):
        eps = GAUSSIAN(x_t, t) * self.weight
        if class_labels is None:
            return eps
        scale = 1.0 + 0.1 * class_labels.to(x_t.dtype)
        return eps * scale.reshape(-1, *[1] * (x_t.dim() - 1)) if scale.dim() else eps * scale


def _flow(weight: float = 1.0) -> ProbabilityFlow:
    return ProbabilityFlow(LabelledNet(weight), GAUSSIAN.schedule)


def _noise(seed: int = 0, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _labels(*values: int) -> dict:
    return {"class_labels": torch.tensor(values)}


RUN = dict(solvers="euler", grids="logsnr", nfe=[4])
TOL = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_reference_cache()
    yield
    clear_reference_cache()


@pytest.fixture(scope="module")
def labelled():
    """A flow, its noise and the reference solved with class 3 repeated over the batch."""
    flow, noise = _flow(), _noise()
    return flow, noise, reference_solution(flow, noise, model_kwargs=_labels(3, 3, 3, 3), **TOL)


def test_a_reference_solved_with_class_labels_is_refused_without_them(labelled):
    """A reference solved with model_kwargs (class labels) passed to a compare without them was accepted, and every
    row's error was measured against the wrong image. Now refused, naming reference and model_kwargs."""
    flow, noise, ref = labelled
    with pytest.raises(ValueError, match=r"reference was solved with model_kwargs.*none are given"):
        compare(flow, noise, reference=ref, **RUN)


@pytest.mark.parametrize("labels", [(4, 4, 4, 4), (3, 3, 3, 4)])
def test_a_reference_solved_with_other_labels_is_refused(labelled, labels):
    flow, noise, ref = labelled
    with pytest.raises(ValueError, match=r"reference was solved with other model_kwargs.*class_labels"):
        compare(flow, noise, model_kwargs=_labels(*labels), reference=ref, **RUN)


def test_a_reference_solved_without_labels_is_refused_beside_them():
    flow, noise = _flow(), _noise()
    ref = reference_solution(flow, noise, **TOL)
    with pytest.raises(ValueError, match=r"reference was solved without model_kwargs.*leave them out"):
        compare(flow, noise, model_kwargs=_labels(3, 3, 3, 3), reference=ref, **RUN)


def test_the_same_conditioning_is_accepted_and_measured_as_a_fresh_reference_would(labelled):
    """The fingerprint's rule of tuned grids and learned solvers: one label repeated over the batch, or given once
    as a 0-d tensor, is the same conditioning."""
    flow, noise, ref = labelled
    fresh = compare(flow, noise, model_kwargs=_labels(3, 3, 3, 3), **RUN)
    for labels in (_labels(3, 3, 3, 3), {"class_labels": torch.tensor(3)}):
        given = compare(flow, noise, model_kwargs=labels, reference=ref, **RUN)
        assert given.reference is ref
        assert [r.rms_error for r in given.runs] == pytest.approx([r.rms_error for r in fresh.runs], rel=1e-3)


def test_per_sample_labels_are_their_own_conditioning():
    flow, noise = _flow(), _noise()
    ref = reference_solution(flow, noise, model_kwargs=_labels(0, 1, 2, 3), **TOL)
    compare(flow, noise, model_kwargs=_labels(0, 1, 2, 3), reference=ref, **RUN)
    with pytest.raises(ValueError, match="other model_kwargs"):
        compare(flow, noise, model_kwargs=_labels(3, 2, 1, 0), reference=ref, **RUN)


def test_a_reference_of_another_flow_is_refused():
    noise = _noise()
    ref = reference_solution(_flow(), noise, **TOL)
    with pytest.raises(ValueError, match=r"reference was solved with another flow"):
        compare(_flow(weight=1.5), noise, reference=ref, **RUN)
    other_schedule = ProbabilityFlow(LabelledNet(), fd.Schedule.linear(100))
    with pytest.raises(ValueError, match=r"reference was solved with another flow"):
        compare(other_schedule, noise, reference=ref, **RUN)


def test_a_reference_of_other_noise_of_the_same_shape_is_refused():
    flow = _flow()
    ref = reference_solution(flow, _noise(0), **TOL)
    with pytest.raises(ValueError, match=r"reference was solved from other noise"):
        compare(flow, _noise(1), reference=ref, **RUN)


def test_the_same_noise_and_network_in_lower_precision_are_accepted():
    """The command line solves its reference from float64 noise and the network as saved, and runs in --dtype:
    the rounded noise and a copy of the network in that precision are the reference's own."""
    flow, noise = _flow(), _noise()
    ref = reference_solution(flow, noise, **TOL)
    low = ProbabilityFlow(LabelledNet().to(torch.float32), GAUSSIAN.schedule)
    result = compare(low, noise.float(), reference=ref, **RUN)
    assert result.reference is ref
    with pytest.raises(ValueError, match="other noise"):
        compare(low, _noise(1).float(), reference=ref, **RUN)


def test_the_records_survive_the_file_and_older_files_load_unchecked(labelled, tmp_path):
    flow, noise, ref = labelled
    path = ref.save(tmp_path / "ref.safetensors")
    loaded = Reference.load(path)
    assert (loaded.flow_keys, loaded.conditioning_keys, loaded.noise_keys) == \
        (ref.flow_keys, ref.conditioning_keys, ref.noise_keys) != ((), (), ())
    with pytest.raises(ValueError, match="model_kwargs"):
        compare(flow, noise, reference=loaded, **RUN)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        meta = {k: v for k, v in fh.metadata().items() if not k.endswith("_keys")}
    old = tmp_path / "old.safetensors"
    save_file({"x": ref.x.contiguous()}, str(old), metadata={**meta, "format": "flowdiff.Reference/3"})
    read = Reference.load(old)
    assert read == dataclasses.replace(ref, x=read.x) and torch.equal(read.x, ref.x)
    assert (read.flow_keys, read.conditioning_keys, read.noise_keys) == ((), (), ())
    says = r"reference: the noise and the flow cannot be checked.*only its shape:.*Reference/3"
    with pytest.warns(UserWarning, match=says):
        compare(flow, noise, model_kwargs=_labels(3, 3, 3, 3), reference=read, **RUN)


def test_a_flow_that_cannot_be_fingerprinted_is_checked_on_its_noise_and_said_so():
    noise = _noise()
    ref = reference_solution(GAUSSIAN.flow(), noise, **TOL)
    wrapped = ProbabilityFlow.from_sigma_field(lambda xbar, sigma: GAUSSIAN.eps(xbar, sigma), GAUSSIAN.schedule)
    says = r"reference: the flow cannot be checked.*shape and noise: the flow given cannot be fingerprinted"
    with pytest.warns(UserWarning, match=says):
        compare(wrapped, noise, reference=ref, **RUN)
    with pytest.raises(ValueError, match="other noise"):
        compare(wrapped, _noise(1), reference=ref, **RUN)


def test_check_reference_names_a_wrong_type_and_shape(labelled):
    flow, noise, ref = labelled
    with pytest.raises(TypeError, match="reference must be a flowdiff.Reference"):
        check_reference(ref.x, flow, noise)
    with pytest.raises(ValueError, match="reference has shape"):
        check_reference(ref, flow, _noise(n=2))


# -- check_tolerance ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [np.float32(1e-4), np.float64(1e-4), 1e-4])
def test_numpy_tolerances_are_accepted(value):
    """check_tolerance('rtol', np.float32(1e-4)) said 'rtol must be a number', while every other numeric argument
    takes NumPy scalars."""
    assert check_tolerance("rtol", value) == float(value)
    assert isinstance(check_tolerance("rtol", value), float)


def test_a_reference_solves_at_a_numpy_tolerance():
    flow, noise = _flow(), _noise()
    ref = reference_solution(flow, noise, rtol=np.float32(1e-6), atol=np.float64(1e-6))
    assert ref.rtol == float(np.float32(1e-6)) and type(ref.rtol) is float
    compare(flow, noise, rtol=np.float32(1e-6), atol=np.float32(1e-6), **RUN)


@pytest.mark.parametrize("value", [True, np.float32(math.nan), math.nan, 0, np.float64(-1e-5), 1e-2, "1e-4", None])
def test_tolerances_still_refused(value):
    with pytest.raises(ValueError, match=r"rtol must be a number in \(0, 1e-3\]"):
        check_tolerance("rtol", value)


# -- pndm and final_euler ------------------------------------------------------------------------------------------

def test_pndm_refuses_final_euler_false_naming_it():
    """generate(solver='pndm', grid=Grid(..., final_euler=False)) gave the same images and NFE as without it: PNDM's
    last step is its own Adams–Bashforth step, never an Euler one to switch off."""
    flow, noise = GAUSSIAN.flow(), _noise()
    with pytest.raises(ValueError, match=r"final_euler=False.*'pndm'.*Adams–Bashforth"):
        fd.generate(flow, noise, solver="pndm", grid=fd.Grid("trailing", steps=5, final_euler=False))
    default = fd.generate(flow, noise, solver="pndm", grid=fd.Grid("trailing", steps=5))
    said = fd.generate(flow, noise, solver="pndm", grid=fd.Grid("trailing", steps=5, final_euler=True))
    assert torch.equal(default.x, said.x) and default.stats.nfe == said.stats.nfe == 6


def test_final_euler_false_still_changes_other_solvers():
    flow, noise = GAUSSIAN.flow(), _noise()
    euler_end = fd.generate(flow, noise, solver="heun", grid=fd.Grid("trailing", steps=4))
    heun_end = fd.generate(flow, noise, solver="heun", grid=fd.Grid("trailing", steps=4, final_euler=False))
    assert heun_end.stats.nfe == euler_end.stats.nfe + 1


HAS_DIGITS = (Path(fd.__file__).parent / "weights" / "digits.safetensors").is_file()


@pytest.mark.skipif(not HAS_DIGITS, reason="the shipped digits weights are not installed")
def test_the_command_line_reuses_its_reference_at_every_precision_without_a_warning(capsys, tmp_path):
    """flowdiff compare solves its reference from the network as saved and float64 noise and runs in --dtype: the
    kept reference is the float16 run's own (its noise rounded, its network copied), so it is checked, not
    refused, and nothing is said."""
    from _cli_runs import run_in

    args = ["compare", "--batch", 2, "--nfe", 4, "--solver", "euler", "--grid", "trailing", "--rtol", "1e-3",
            "--out", "out", "--no-progress", "--overwrite"]
    for dtype in ("float32", "float16", "float64"):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            code, out, err = run_in(capsys, [*args, "--dtype", dtype], tmp_path)
        assert code == 0, err
        assert ("kept in" in out.splitlines()[0]) == (dtype != "float32")
        assert not [w for w in said if str(w.message).startswith("reference")]


def test_precision_fingerprints_equal_the_cast_networks_own_without_copying_it(monkeypatch):
    """A reference records its network in every precision by casting one tensor at a time: the keys equal the
    fingerprints of the network cast as a whole (model.to(dtype)), and no copy of the network is made (F3 had
    deep-copied it once per precision: 4 copies, one of them float64, of an SD-size network per reference)."""
    import copy

    from flowdiff.engine.fingerprint import flow_fingerprint, precision_fingerprints
    from flowdiff.tools import reference as reference_module
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    net[1].running_mean.uniform_()
    flow = ProbabilityFlow(net, fd.Schedule.linear())
    dtypes = (torch.float64, torch.float16, torch.bfloat16)
    expected = [flow_fingerprint(flow)]
    for dtype in dtypes:
        cast = copy.deepcopy(flow.model).to(dtype)
        expected.append(flow_fingerprint(ProbabilityFlow(cast, flow.schedule)))
    copies = []
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: copies.append(a) or pytest.fail("network copied"))
    assert precision_fingerprints(flow, None, dtypes) == tuple(dict.fromkeys(expected))
    alone, conditioned = reference_module._flow_keys(flow, None)
    assert set(expected) <= set(alone) and not copies
