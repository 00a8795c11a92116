"""Review Q4: four finds left open at the close of the last session, each with a test that failed before its fix.

1. ``Grid(final_euler=False)`` was accepted and changed nothing beside solvers whose step into σ = 0 is already their
   own (euler, ipndm, dpmpp_2m, unipc …), on grids that end above 0, and beside ``Stochastic``; beside unipc with an
   ``nfe=`` budget it silently spent one evaluation less than the budget allowed.
2. ``torch.func.vmap`` over ``generate`` stopped inside torch at the noise's NaN check ("data-dependent control
   flow"), whatever the checks. It runs now with the checks that read states on the host turned off, equal to the loop
   of un-mapped calls; with them on (and for what cannot run: adaptive, Stochastic, encode) it is refused up front,
   naming the batch dimension.
3. ``flowdiff.runs.distributed.compare`` checked its reference once per job (two flow fingerprints, a pass over every
   weight, each time); it is checked once per call, on every rank before any job, with the same refusals.
"""

import numpy as np
import pytest
import torch

import flowdiff as fd
import solvers
from flowdiff import Latent
from flowdiff.models.analytic import Gaussian, Mixture

GAUSSIAN = Gaussian(torch.zeros(1, 2, 2), torch.linspace(0.1, 1.0, 4))


def _noise(seed: int = 0, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _counting(flow: fd.ProbabilityFlow) -> tuple[fd.ProbabilityFlow, list[float]]:
    """``flow`` with every model evaluation's σ recorded."""
    calls: list[float] = []
    field = flow.sigma_field

    def counted(xbar, sigma, **kwargs):
        calls.append(sigma)
        return field(xbar, sigma, **kwargs)

    return fd.ProbabilityFlow.from_sigma_field(counted, flow.schedule), calls


# -- 1. final_euler=False where it changes nothing --------------------------------------------------------------------

@pytest.mark.parametrize("name", [*solvers.available(), "pndm", "flowmatch_heun"])
@pytest.mark.parametrize("budget", [dict(steps=5), dict(nfe=9)])
def test_final_euler_false_is_refused_or_changes_the_solve(name, budget):
    """Every solver: Grid(final_euler=False) either changes the images or the NFE, or is refused naming it and the
    solver, before any evaluation. Before, euler, ipndm, dpmpp_2m, unipc (steps=) … took it and returned the same
    images and NFE as without it."""
    flow, calls = _counting(GAUSSIAN.flow())
    noise = _noise()
    plain = fd.generate(flow, noise, solver=name, grid=fd.Grid("trailing", **budget))
    calls.clear()
    try:
        said = fd.generate(flow, noise, solver=name, grid=fd.Grid("trailing", final_euler=False, **budget))
    except ValueError as err:
        if "below the cost of one step" in str(err):  # dopri8: the flag makes one step cost more than nfe=9
            assert "with final_euler=False" in str(err) and calls == []
            return
        assert "final_euler=False" in str(err) and repr(name) in str(err) and "change nothing" in str(err)
        assert calls == []
        return
    assert not torch.equal(plain.x, said.x) or plain.stats.nfe != said.stats.nfe


@pytest.mark.parametrize("name", ["euler", "ipndm", "dpmpp_2m", "heun3", "unipc"])
def test_final_euler_false_is_refused_where_the_step_into_zero_is_the_solvers_own(name):
    flow, calls = _counting(GAUSSIAN.flow())
    with pytest.raises(ValueError, match=rf"final_euler=False\) beside solver '{name}': '{name}' .*change nothing"):
        fd.generate(flow, _noise(), solver=name, grid=fd.Grid(steps=4, final_euler=False))
    assert calls == []


def test_unipc_with_final_euler_false_no_longer_spends_less_than_its_budget():
    """unipc reaches σ = 0 in its data variables without evaluating there; the budget counted with final_euler=False
    assumed it would: nfe=9 ran 8 evaluations, one short of the 9 the same budget gives without the flag."""
    flow, noise = GAUSSIAN.flow(), _noise()
    assert fd.generate(flow, noise, solver="unipc", nfe=9).stats.nfe == 9
    with pytest.raises(ValueError, match=r"'unipc' runs in the 'data' variables.*change nothing"):
        fd.generate(flow, noise, solver="unipc", grid=fd.Grid(nfe=9, final_euler=False))


def test_final_euler_false_on_a_grid_that_ends_above_zero_is_refused():
    flow, noise = GAUSSIAN.flow(), _noise()
    assert fd.generate(flow, noise, solver="heun", grid=[4.0, 2.0, 1.0, 0.5]).stats.nfe == 6
    with pytest.raises(ValueError, match=r"final_euler=False\) beside solver 'heun': the grid ends at σ = 0.5"):
        fd.generate(flow, noise, solver="heun", grid=fd.Grid(sigmas=[4.0, 2.0, 1.0, 0.5], final_euler=False))


def test_final_euler_false_beside_stochastic_generation_is_refused():
    flow, noise = GAUSSIAN.flow(), _noise()
    with pytest.raises(ValueError, match=r"final_euler=False\) beside solver=flowdiff.Stochastic.*change nothing"):
        fd.generate(flow, noise, solver=fd.Stochastic(0.5, torch.Generator().manual_seed(1)),
                    grid=fd.Grid(steps=4, final_euler=False))


def test_final_euler_false_is_kept_where_it_changes_the_last_step():
    flow, noise = GAUSSIAN.flow(), _noise()
    for name in ("heun", "rk4", "reversible_heun", "flowmatch_heun"):
        plain = fd.generate(flow, noise, solver=name, steps=4)
        said = fd.generate(flow, noise, solver=name, grid=fd.Grid(steps=4, final_euler=False))
        assert not torch.equal(plain.x, said.x), name


def test_a_decode_refuses_final_euler_false_where_it_changes_nothing_and_keeps_it_for_heun():
    flow = GAUSSIAN.flow()
    images = GAUSSIAN.sample(3, generator=torch.Generator().manual_seed(2)).to(torch.float64)
    for name in ("euler", "dpmpp_2m", "unipc"):
        latent = fd.encode(flow, images, solver=name, steps=5).latent
        with pytest.raises(ValueError, match=rf"final_euler=False\) beside this latent's decode with solver '{name}'"):
            fd.decode(flow, latent, grid=fd.Grid(final_euler=False))
    latent = fd.encode(flow, images, solver="heun", steps=5).latent
    assert fd.decode(flow, latent, grid=fd.Grid(final_euler=False)).stats.nfe == fd.decode(flow, latent).stats.nfe + 1
    # a reversible latent decodes by the exact inverse of its encode's steps: no Euler step to switch off
    for name in ("reversible_heun", "reversible"):
        latent = fd.encode(flow, images, solver=name, steps=5).latent
        with pytest.raises(ValueError, match=rf"final_euler=False\) beside this latent of the reversible solver "
                                             rf"'{name}'"):
            fd.decode(flow, latent, grid=fd.Grid(final_euler=False))


def test_a_fixed_point_encode_refuses_final_euler_false_beside_euler(tmp_path):
    """Its decode with euler never takes an Euler step in place of its own; the latent recorded final_euler=False and
    nothing else differed. Latents saved that way before still load and decode as before."""
    flow = GAUSSIAN.flow()
    images = GAUSSIAN.sample(3, generator=torch.Generator().manual_seed(2)).to(torch.float64)
    for spec, grid in (({"final_euler": False}, fd.Grid(steps=3)), ({}, fd.Grid(steps=3, final_euler=False))):
        with pytest.raises(ValueError, match=r"final_euler=False .*beside Inversion solver 'euler'.*change nothing"):
            fd.encode(flow, images, solver=fd.Inversion("fixed_point", spec, solver="euler"), grid=grid)
    heun = fd.encode(flow, images, solver=fd.Inversion("fixed_point", {"final_euler": False}, solver="heun"), steps=3)
    assert heun.latent.final_euler is False
    # an old latent that recorded final_euler=False beside euler loads and decodes as one without it
    enc = fd.encode(flow, images, solver=fd.Inversion("fixed_point", {}, solver="euler"), steps=3)
    old = Latent(enc.latent.x, enc.latent.sigmas, "euler", {}, None, "fixed_point", False)
    old.save(tmp_path / "old.safetensors")
    loaded = Latent.load(tmp_path / "old.safetensors")
    assert loaded.final_euler is False
    assert torch.equal(fd.decode(flow, loaded).x, fd.decode(flow, enc.latent).x)
    assert torch.equal(fd.decode(flow, loaded, grid=fd.Grid(final_euler=False)).x, fd.decode(flow, enc.latent).x)


def test_the_idle_reason_is_a_function_of_solver_and_grid():
    from flowdiff.engine.options import idle_final_euler

    sig = np.array([4.0, 2.0, 1.0, 0.0])
    assert idle_final_euler(solvers.get("heun"), sig) is None
    assert "never evaluates" in idle_final_euler(solvers.get("euler"), sig)
    assert "'data' variables" in idle_final_euler(solvers.get("unipc"), sig)
    assert "above 0" in idle_final_euler(solvers.get("heun"), sig[:-1])


# -- 2. torch.func.vmap over generate ---------------------------------------------------------------------------------

MIXTURE = Mixture(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)), 0.4)
OFF = fd.Checks(finite=False, growth=None)


def _mapped_noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(5, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("name", "adjoint"), [("euler", "autograd"), ("heun", "checkpoint"), ("dpmpp_2m", "autograd"),
                                               ("unipc", "autograd"), ("reversible_heun", "reversible"),
                                               ("pndm", "autograd")])
def test_vmap_over_generate_equals_the_loop_of_calls(name, adjoint):
    flow, noise = MIXTURE.flow(), _mapped_noise()

    def run(x):
        return fd.generate(flow, x, solver=name, steps=4, checks=OFF, adjoint=adjoint).x

    assert torch.equal(torch.func.vmap(run)(noise), torch.stack([run(x) for x in noise]))


def test_per_sample_gradients_by_vmap_of_grad_equal_the_loop():
    flow, noise = MIXTURE.flow(), _mapped_noise()

    def loss(x):
        return fd.generate(flow, x, solver="heun", steps=4, checks=OFF).x.pow(2).sum()

    mapped = torch.func.vmap(torch.func.grad(loss))(noise)
    assert torch.allclose(mapped, torch.stack([torch.func.grad(loss)(x) for x in noise]), rtol=1e-12, atol=0)


def test_vmap_still_refuses_a_non_finite_noise_anywhere_in_the_mapped_batch():
    flow, noise = MIXTURE.flow(), _mapped_noise()
    noise[3, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="noise contains NaN or inf"):
        torch.func.vmap(lambda x: fd.generate(flow, x, steps=4, checks=OFF).x)(noise)


@pytest.mark.parametrize(("kwargs", "said"), [
    (dict(steps=4), r"checks=Checks\(finite=True, growth='auto'\)"),
    (dict(steps=4, checks=fd.Checks(finite=False)), r"checks=Checks\(growth='auto'\)"),
    (dict(steps=4, checks=fd.Checks(growth=None)), r"checks=Checks\(finite=True\)"),
])
def test_vmap_with_checks_that_read_the_host_is_refused_naming_them_and_the_batch_dimension(kwargs, said):
    flow, calls = _counting(MIXTURE.flow())
    with pytest.raises(ValueError, match=rf"generate under torch.func.vmap \(noise is mapped over\) with {said}.*"
                                         r"first dimension of noise.*Checks\(finite=False, growth=None\)"):
        torch.func.vmap(lambda x: fd.generate(flow, x, **kwargs).x)(_mapped_noise())
    assert calls == []


def test_vmap_of_what_reads_values_inside_the_solve_is_refused_up_front():
    flow, calls = _counting(MIXTURE.flow())
    noise = _mapped_noise()
    with pytest.raises(ValueError, match=r"adaptive=.*torch.func.vmap.*step control.*first dimension of noise"):
        torch.func.vmap(lambda x: fd.generate(flow, x, solver="dopri5", adaptive=fd.Adaptive(), checks=OFF).x)(noise)
    with pytest.raises(ValueError, match=r"Stochastic.*torch.func.vmap.*first dimension of noise"):
        torch.func.vmap(lambda x: fd.generate(flow, x, solver=fd.Stochastic(0.5), steps=4, checks=OFF).x)(noise)
    with pytest.raises(ValueError, match=r"encode does not run under torch.func.vmap.*first dimension of images"):
        torch.func.vmap(lambda x: fd.encode(flow, x, steps=4, checks=OFF).x)(noise)
    assert calls == []


def test_vmap_over_class_labels_alone_is_seen_too():
    """A mapped model_kwargs tensor makes the solve's states mapped after the first evaluation: refused up front."""
    flow, noise = MIXTURE.flow(), _mapped_noise()[0]

    def labelled(xbar, sigma, labels=None):
        return MIXTURE.eps(xbar, sigma) * (1 + 0.1 * labels.reshape(-1, 1))

    cond = fd.ProbabilityFlow.from_sigma_field(labelled, flow.schedule)
    labels = torch.arange(15, dtype=torch.float64).reshape(5, 3)
    with pytest.raises(ValueError, match=r"generate under torch.func.vmap.*checks=Checks"):
        torch.func.vmap(lambda lab: fd.generate(cond, noise, steps=4, model_kwargs={"labels": lab}).x)(labels)
    mapped = torch.func.vmap(lambda lab: fd.generate(cond, noise, steps=4, model_kwargs={"labels": lab},
                                                      checks=OFF).x)(labels)
    loop = torch.stack([fd.generate(cond, noise, steps=4, model_kwargs={"labels": lab}, checks=OFF).x
                        for lab in labels])
    assert torch.equal(mapped, loop)


# -- 3. distributed.compare checks its reference once ----------------------------------------------------------------

def _counted_fingerprints(monkeypatch) -> list[object]:
    import flowdiff.tools.reference as reference_module

    seen: list[object] = []
    real = reference_module.flow_fingerprint

    def counted(flow, model_kwargs=None):
        seen.append(model_kwargs)
        return real(flow, model_kwargs)

    monkeypatch.setattr(reference_module, "flow_fingerprint", counted)
    return seen


def _split_problem():
    flow = Gaussian(torch.zeros(1, 2, 2), torch.linspace(0.05, 1.0, 4)).flow()
    noise = _noise(5)
    return flow, noise, fd.reference_solution(flow, noise, rtol=1e-6, atol=1e-6)


RUNS = dict(solvers=["euler", "heun"], grids=["trailing", "karras"], nfe=[3, 5])


def test_distributed_compare_checks_a_given_reference_once_per_call_not_per_job(monkeypatch):
    from _ranks import AllWorkRank0

    from flowdiff.runs import distributed
    from flowdiff.tools.reference import check_reference

    flow, noise, reference = _split_problem()
    seen = _counted_fingerprints(monkeypatch)
    check_reference(reference, flow, noise)
    one = len(seen)
    assert one > 0
    seen.clear()
    split = distributed.compare(flow, noise, ranks=AllWorkRank0(rank=0, world_size=2), reference=reference, **RUNS)
    assert len(split.runs) + len(split.skipped) == 8  # eight jobs
    assert len(seen) == one  # was 8 × one
    # the table is the one-process table
    whole = fd.compare(flow, noise, reference=reference, **RUNS)
    assert [(r.solver, r.grid, r.budget, r.nfe, r.rms_error) for r in split.runs] == [
        (r.solver, r.grid, r.budget, r.nfe, r.rms_error) for r in whole.runs]


def test_distributed_compare_checks_the_reference_it_solved_once_too(monkeypatch):
    """The reference rank 0 solves and sends is checked on every rank once, whatever the number of jobs."""
    from _ranks import AllWorkRank0

    from flowdiff.runs import distributed

    flow, noise, _ = _split_problem()
    seen = _counted_fingerprints(monkeypatch)
    counts = []
    for runs in (RUNS, dict(solvers=["euler"], grids=["trailing"], nfe=[3])):
        fd.tools.reference.clear_reference_cache()
        seen.clear()
        distributed.compare(flow, noise, ranks=AllWorkRank0(rank=0, world_size=2), rtol=1e-6, atol=1e-6, **runs)
        counts.append(len(seen))
    assert counts[0] == counts[1]  # 8 jobs and 1 job: the same fingerprints (was 2 more per job)


def test_a_rank_without_jobs_checks_the_reference_too_and_refusals_come_before_any_job(monkeypatch):
    from _ranks import AllWorkRank0

    from flowdiff.runs import distributed

    flow, noise, reference = _split_problem()

    class Idle(AllWorkRank0):  # rank 1 of 2 with no job of its own
        def share(self, items):
            return []

    seen = _counted_fingerprints(monkeypatch)
    with pytest.raises(RuntimeError, match=r"returned runs \[\] of 8"):  # this stand-in's rank 0 has no rows either
        distributed.compare(flow, noise, ranks=Idle(rank=1, world_size=2), reference=reference, **RUNS)
    assert len(seen) == 2  # the flow alone and with its conditioning: one check, before the (empty) jobs
    ran = []
    other = _noise(6)
    with pytest.raises(ValueError, match="^reference was solved from other noise than the noise given"):
        distributed.compare(flow, other, ranks=AllWorkRank0(rank=0, world_size=2), reference=reference,
                            progress=ran.append, **RUNS)
    assert ran == []  # refused before the first job (it was refused inside the first job)
    with pytest.raises(TypeError, match="^reference must be a flowdiff.Reference or None, got Tensor"):
        distributed.compare(flow, noise, ranks=AllWorkRank0(rank=0, world_size=2), reference=reference.x,
                            progress=ran.append, **RUNS)
    assert ran == []


# -- 4. PNDM at one step: diffusers' loop evaluates once -------------------------------------------------------------

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
PNDM_CONFIGS = {
    "sd15": {**SD_BETAS, "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False},
    "alpha_one": {**SD_BETAS, "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": True},
}


def _pndm_network():
    """A fixed random nonlinear ε(x, t) whose output changes with t (float64)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 6, generator=g, dtype=torch.float64) * 0.4
    b = torch.randn(6, generator=g, dtype=torch.float64)
    calls: list[float] = []

    def model(x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1)
        calls.append(float(t[0]))
        return torch.tanh(x @ w + b * (t.reshape(-1, 1) / 1000.0)) + 0.1 * x

    return model, calls


def _diffusers_pndm(config: dict, steps: int, noise: torch.Tensor, table: np.ndarray):
    """diffusers' own PNDMScheduler loop on flowdiff's float64 ᾱ table: (image, model calls)."""
    from diffusers import PNDMScheduler

    model, calls = _pndm_network()
    sched = PNDMScheduler.from_config(config)
    sched.set_timesteps(steps)
    sched.alphas_cumprod = torch.tensor(table, dtype=torch.float64)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if config["set_alpha_to_one"] \
        else sched.alphas_cumprod[0]
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, return_dict=False)[0]
    return x, len(calls)


@pytest.mark.parametrize("config", sorted(PNDM_CONFIGS))
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6])
def test_pndm_reproduces_diffusers_loop_and_its_model_calls_at_every_step_count(config, steps):
    """diffusers' PLMS loop of one step lists its timestep once: one evaluation, DDIM's step. flowdiff's pndm took its
    Heun start there (2 evaluations, another image), and sample_like refused steps=1."""
    from flowdiff.models.pipelines import schedule_from_config

    cfg = PNDM_CONFIGS[config]
    schedule, prediction_type = schedule_from_config({"_class_name": "PNDMScheduler", **cfg})
    noise = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref, diffusers_calls = _diffusers_pndm(cfg, steps, noise, schedule.alphas_cumprod)
    model, calls = _pndm_network()
    flow = fd.ProbabilityFlow(model, schedule, prediction_type=prediction_type)
    ours = fd.sample_like(flow, noise, {"_class_name": "PNDMScheduler", **cfg}, steps)
    torch.testing.assert_close(ours.x, ref, rtol=1e-12, atol=1e-12)
    assert len(calls) == ours.stats.nfe == diffusers_calls == steps + (steps > 1)


def test_pndm_of_one_step_is_ddims_step_and_its_budget_one_evaluation():
    flow, noise = GAUSSIAN.flow(), _noise()
    one = fd.generate(flow, noise, solver="pndm", steps=1)
    assert torch.equal(one.x, fd.generate(flow, noise, solver="euler", steps=1).x) and one.stats.nfe == 1
    assert fd.generate(flow, noise, solver="pndm", nfe=1).stats.nfe == 1  # refused before: one step cost 2
    assert [fd.generate(flow, noise, solver="pndm", steps=n).stats.nfe for n in (2, 3, 4)] == [3, 4, 5]


def test_a_pndm_loop_whose_second_step_has_zero_length_is_the_heun_start_alone():
    """PNDMScheduler(steps_offset=0, set_alpha_to_one=False) at 2 steps: its last step runs σ_min to σ_min (one
    evaluation that changes nothing, left out), so what is left is one step of the grid: the Heun start, not the
    DDIM step of a one-step loop."""
    from flowdiff.models.pipelines import schedule_from_config

    cfg = {**SD_BETAS, "skip_prk_steps": True, "steps_offset": 0, "set_alpha_to_one": False}
    plan = fd.scheduler_plan({"_class_name": "PNDMScheduler", **cfg}, 2)
    assert len(plan.sigmas) == 2 and plan.solver == "heun"
    schedule, prediction_type = schedule_from_config({"_class_name": "PNDMScheduler", **cfg})
    noise = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref, diffusers_calls = _diffusers_pndm(cfg, 2, noise, schedule.alphas_cumprod)
    model, calls = _pndm_network()
    ours = fd.sample_like(fd.ProbabilityFlow(model, schedule, prediction_type=prediction_type), noise,
                          {"_class_name": "PNDMScheduler", **cfg}, 2)
    torch.testing.assert_close(ours.x, ref, rtol=1e-12, atol=1e-12)
    assert len(calls) == ours.stats.nfe == diffusers_calls - 1 == 2
