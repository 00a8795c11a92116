"""Review R14: the diffusers-config merges (D2, H2) and the buffer restore of the adjoint backward pass.
Each test failed on main before its fix, but two that guard a fix: the inversion one (the first fix must not reach
DDIMInverseScheduler's reading) and the one of threads a model starts (the thread fix must not leave them out)."""

from __future__ import annotations

import copy
import inspect
import warnings

import numpy as np
import pytest
import torch

import flowdiff
from flowdiff.cli import main
from flowdiff.engine.plugins import plugins
from flowdiff.engine.scheduler_grids import ddim_inverse_sigmas, schedule_from_config, scheduler_sigmas
from flowdiff.tools.scheduler_suite import Case, run_case

diffusers = pytest.importorskip("diffusers")

SD_BETAS = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
#: betas schedulers of diffusers without ``rescale_betas_zero_snr``: their from_config ignores the key
NO_RESCALE = ("PNDMScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler")


def _from_config(cls: str, config: dict) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' "were passed ... will be ignored"
        return getattr(diffusers, cls).from_config(config)


def _keys(cls: str) -> set[str]:
    return set(inspect.signature(getattr(diffusers, cls).__init__).parameters)


@pytest.mark.parametrize("cls", NO_RESCALE)
def test_rescale_betas_zero_snr_does_nothing_where_the_class_lacks_it(cls):
    """A PNDM (LMS, Heun) config with rescale_betas_zero_snr=True: diffusers' class has no such key, ignores it, and
    runs its betas unrescaled (last σ ≈ 14.6); flowdiff rescaled them (last σ = ∞), another schedule, silently."""
    assert "rescale_betas_zero_snr" not in _keys(cls)  # the premise, in the installed diffusers
    config = {"_class_name": cls, **SD_BETAS, "skip_prk_steps": True, "rescale_betas_zero_snr": True}
    ours, _ = schedule_from_config(config)
    acp = _from_config(cls, config).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(ours.sigmas, np.sqrt((1 - acp) / acp), rtol=1e-4)  # diffusers: float32
    assert np.isfinite(ours.sigmas[-1])


def test_pndm_loop_with_an_ignored_rescale_is_diffusers_own():
    """End to end: sample_like of a PNDM config with rescale_betas_zero_snr=True equals diffusers' own loop of it (the
    suite's random network); it ran the rescaled table's levels. (LMS and Heun read their grid and timesteps off
    diffusers' scheduler, so their loop matched; their flow's schedule did not, as above.)"""
    config = {**SD_BETAS, "skip_prk_steps": True, "steps_offset": 1, "rescale_betas_zero_snr": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, ref, nfe, calls = run_case(Case("r14", "PNDMScheduler", config, steps=6), torch.float32,
                                        checks=flowdiff.Checks(growth=None))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert nfe == calls


def test_a_pndm_config_with_clip_sample_is_pndms_grid():
    """PNDMScheduler has no clip_sample (diffusers ignores one in its config); scheduler_sigmas refused such a config
    as if the loop clipped x̂₀. Its grid is that of the config without the key, and is diffusers' own."""
    assert "clip_sample" not in _keys("PNDMScheduler")
    config = {"_class_name": "PNDMScheduler", **SD_BETAS, "skip_prk_steps": True, "set_alpha_to_one": False,
              "steps_offset": 1}
    plain = scheduler_sigmas(config, 10)
    np.testing.assert_array_equal(scheduler_sigmas({**config, "clip_sample": True}, 10), plain)
    np.testing.assert_array_equal(flowdiff.scheduler_plan({**config, "clip_sample": True}, 10).sigmas,
                                  flowdiff.scheduler_plan(config, 10).sigmas)


def test_a_pndm_config_inverted_is_read_by_ddim_inverse():
    """encode_like reads a PNDM config as DDIMInverseScheduler.from_config does, and that class has
    rescale_betas_zero_snr: the key keeps acting there (the schedule read by the config's own class would drop it)."""
    assert "rescale_betas_zero_snr" in _keys("DDIMInverseScheduler")
    config = {"_class_name": "PNDMScheduler", **SD_BETAS, "skip_prk_steps": True, "rescale_betas_zero_snr": True,
              "clip_sample": False}  # read by DDIMInverseScheduler, whose default clips
    grid, ts = ddim_inverse_sigmas(config, 10)
    inverse = _from_config("DDIMInverseScheduler", config)
    acp = inverse.alphas_cumprod.double().numpy()
    inverse.set_timesteps(10)
    np.testing.assert_array_equal(ts, inverse.timesteps.numpy())
    np.testing.assert_allclose(grid[1:], np.sqrt((1 - acp[ts]) / acp[ts]), rtol=1e-4)


class _Cache(torch.nn.Module):
    """A field that keeps a history of its inputs' means in a buffer it assigns anew at each call (a growing cache);
    its output does not read it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4, bias=False, dtype=torch.float64)  # a bias before BatchNorm: no gradient
        self.norm = torch.nn.BatchNorm1d(4, dtype=torch.float64)  # in training mode: updated in place
        self.register_buffer("history", torch.zeros(0, dtype=torch.float64))

    def forward(self, x, t):
        self.history = torch.cat([self.history, x.detach().mean().reshape(1)])
        return self.norm(self.lin(x)) * (1.0 + t.to(x.dtype)[:, None] / 1000.0)


@pytest.mark.parametrize(("solver", "adjoint"), [("euler", "checkpoint"), ("reversible_heun", "checkpoint")])
def test_a_buffer_assigned_anew_is_put_back(solver, adjoint):
    """The restore copied the kept values into whatever tensor the buffer name held after the backward pass: a buffer
    the model assigns anew (a cache that grows) made the backward pass fail with an unnamed shape error. The buffers
    now end as autograd's, and an in-place one (BatchNorm's) is still the same tensor object."""
    start = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = {}
    for mode in ("autograd", adjoint):
        net = copy.deepcopy(_Cache())
        mean = net.norm.running_mean
        x = start.clone().requires_grad_()
        res = flowdiff.generate(flowdiff.ProbabilityFlow(net, flowdiff.Schedule.linear()), x, solver=solver,
                                steps=4, adjoint=mode)
        grads = torch.autograd.grad(res.x.pow(2).sum(), [x, *net.parameters()])
        assert net.norm.running_mean is mean
        out[mode] = grads, {k: b.clone() for k, b in net.named_buffers()}
    assert len(out["autograd"][1]["history"]) > 0
    for g, r in zip(out[adjoint][0], out["autograd"][0], strict=True):
        assert float((g - r).norm()) <= 1e-10 * float(r.norm())
    for name, value in out["autograd"][1].items():
        assert torch.equal(out[adjoint][1][name], value), name


@pytest.mark.parametrize("name", sorted(plugins("solver", "generate")))
def test_sample_takes_each_solver_generate_takes(capsys, tmp_path, name):
    """R12: 'flowdiff sample --solver flowmatch_heun' said "unknown solver" though generate(solver='flowmatch_heun')
    runs it (the CLI accepted the solvers package's names only, not the generate-only solver plug-ins)."""
    path = tmp_path / "s.png"
    code = main(["sample", "--model", "analytic-mixture", "--num", "2", "--steps", "3", "--solver", name,
                 "--out", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"with {name} " in out and "3 steps" in out and path.is_file()


class _Handing(torch.nn.Module):
    """A field that, once ``armed``, lets another thread run its own module at its next evaluation and waits for it
    (the backward pass's recomputation, here)."""

    def __init__(self, go, done) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4, dtype=torch.float64)
        self.go, self.done, self.armed = go, done, False

    def forward(self, x, t):
        if self.armed and not self.go.is_set():
            self.go.set()
            assert self.done.wait(timeout=60)
        return self.lin(x)


def test_the_restore_leaves_other_threads_modules_alone():
    """The forward pre-hook that keeps buffers is global: a BatchNorm another thread trained while a backward pass
    ran was put back to its state at its first call in that time, its updates lost without a word."""
    import threading

    other = torch.nn.BatchNorm1d(4, dtype=torch.float64)
    go, done = threading.Event(), threading.Event()

    def train_other() -> None:
        go.wait(timeout=60)
        for _ in range(3):
            other(torch.randn(8, 4, dtype=torch.float64) + 3.0)
        done.set()

    net = _Handing(go, done)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    res = flowdiff.generate(flowdiff.ProbabilityFlow(net, flowdiff.Schedule.linear()), x, solver="euler", steps=3,
                            adjoint="checkpoint")
    worker = threading.Thread(target=train_other)
    worker.start()
    net.armed = True
    res.x.sum().backward()
    worker.join(timeout=60)
    assert go.is_set() and done.is_set()  # the other thread ran inside the backward pass
    assert int(other.num_batches_tracked) == 3 and float(other.running_mean.min()) > 0


def test_reversible_refuses_a_model_that_assigns_a_buffer_anew():
    """Since R15, adjoint='reversible' refuses any model that changes a buffer during the solve (its inverse steps
    cannot see the values the forward pass saw), naming the buffer; 'checkpoint' replays them (above)."""
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    flow = flowdiff.ProbabilityFlow(copy.deepcopy(_Cache()), flowdiff.Schedule.linear())
    with pytest.raises(ValueError, match=r"adjoint='reversible': the model changed its buffers _Cache\.history"):
        flowdiff.generate(flow, x, solver="reversible_heun", steps=4, adjoint="reversible")


class _InThread(torch.nn.Module):
    """A field that runs its BatchNorm (training mode) in a thread it starts at each call, as ``nn.DataParallel``
    runs its replicas."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4, bias=False, dtype=torch.float64)
        self.norm = torch.nn.BatchNorm1d(4, dtype=torch.float64)
        self.norm._is_replica = True  # as nn.DataParallel marks the copies it runs in its threads (adjoint._ours)

    def forward(self, x, t):
        import threading

        out, grad_mode = [], torch.is_grad_enabled()

        def run() -> None:
            with torch.set_grad_enabled(grad_mode):
                out.append(self.norm(self.lin(x)))

        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
        return out[0] * (1.0 + t.to(x.dtype)[:, None] / 1000.0)


def test_a_model_that_runs_modules_in_its_own_threads_has_its_buffers_put_back():
    """The restore leaves other threads' modules alone, but not the replicas a model runs in threads it starts during
    the backward pass (nn.DataParallel's, marked ``_is_replica``; R15 narrowed it to those, so that another request's
    solve in a thread started meanwhile keeps its own buffers): their BatchNorm statistics end as autograd's."""
    start = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = {}
    for mode in ("autograd", "checkpoint"):
        net = _InThread()
        x = start.clone().requires_grad_()
        res = flowdiff.generate(flowdiff.ProbabilityFlow(net, flowdiff.Schedule.linear()), x, solver="heun", steps=3,
                                adjoint=mode)
        res.x.pow(2).sum().backward()
        out[mode] = {k: b.clone() for k, b in net.named_buffers()}
    assert int(out["autograd"]["norm.num_batches_tracked"]) > 0
    for name, value in out["autograd"].items():
        assert torch.equal(out["checkpoint"][name], value), name


def test_sample_grid_tuned_with_a_plugin_solver_says_none_is_stored(capsys, tmp_path):
    """With --solver flowmatch_heun taken, '--grid tuned' answered "unknown solver 'flowmatch_heun'" (the tuned-grid
    store knows the solvers package's names only): it is the one-line 'no tuned grid is stored' refusal."""
    code = main(["sample", "--model", "analytic-mixture", "--solver", "flowmatch_heun", "--grid", "tuned",
                 "--nfe", "10", "--out", str(tmp_path / "s.png")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "no tuned grid is stored" in err and "--solver flowmatch_heun" in err and "unknown solver" not in err


@pytest.mark.parametrize("name", sorted(plugins("solver", "generate")))
def test_sample_budget_refusal_names_the_flag_for_plugin_solvers(capsys, tmp_path, name):
    """The budget is checked before the work for a plug-in solver too, so that its refusal names the flag typed
    ('--nfe 5000'), as for the solvers package's names; it named the Python keyword it became ('steps=2500')."""
    code = main(["sample", "--model", "analytic-mixture", "--solver", name, "--nfe", "5000",
                 "--out", str(tmp_path / "s.png")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "--nfe 5000" in err and f"--solver {name}" in err and "steps=" not in err
