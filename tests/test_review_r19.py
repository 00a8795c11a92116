"""Review R19 of this session's merges (Q4: final_euler refused where idle, vmap over generate, one reference check
per distributed compare, PNDM at one step). Each test failed before the fix it names.

1. ``adjoint="checkpoint"``/``"reversible"`` under ``torch.func.vmap`` or ``torch.func.jvp`` alone, with a model whose
   parameters require grad (any ``nn.Module``), was refused as "a torch.func transform of reverse mode (grad, vjp,
   jacrev, hessian)", naming transforms the caller never used; it names vmap/jvp now, and ``torch.no_grad()``, under
   which the solve is the plain one that both run with any adjoint.
2. ``decode`` under ``torch.func.vmap``: a Latent's decode with the default checks stopped inside torch (".item()"),
   not refused up front as ``generate`` is; a plain tensor's decode was refused naming ``noise`` (generate's
   argument); mapped ``model_kwargs`` beside a latent that records its model stopped in the fingerprint ("Cannot
   access data pointer"). A refusal with only ``model_kwargs`` mapped said the noise was.
3. ``tools.reference.checked_reference`` skipped a check of the same objects by identity alone: noise refilled in
   place, a label replaced in the same dict or weights trained in place inside the block passed unchecked, and compare
   measured its runs against a reference of other noise. (Q4's tests also passed with a skip keyed on the reference
   alone, or a block that left its state behind; the guards here fail on both.)
4. (Guard.) PNDM at 1–6 steps against diffusers' own loop off the default spacing and offset: Q4's test covered
   ``steps_offset=1`` with leading spacing alone; these pass, and fail with PNDM's one-step DDIM step taken out.
5. ``Grid(final_euler=False)`` on a one-step grid from σ = ∞ (zero terminal SNR) was refused saying that heun "runs
   in the 'sigma' variables, whose own step into σ = 0 evaluates nothing there", which is not why: that one step is
   the boundary step out of pure noise (flow matching's heun, whose first step is its own, keeps the flag).
"""

import dataclasses

import pytest
import torch

import flowdiff as fd

OFF = fd.Checks(finite=False, growth=None)


class _Net(torch.nn.Module):
    """A small module (its parameters require grad, as every nn.Module's do) with an optional class label."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4).double()
        torch.nn.init.normal_(self.lin.weight, std=0.4, generator=torch.Generator().manual_seed(0))
        self.calls = 0

    def forward(self, x, t, labels=None):
        self.calls += 1
        out = torch.tanh(self.lin(x)) * (1 + t.reshape(-1, 1) / 1000)
        return out if labels is None else out * (1 + 0.1 * labels)


def _flow() -> tuple[fd.ProbabilityFlow, _Net]:
    net = _Net()
    return fd.ProbabilityFlow(net, fd.Schedule.linear()), net


def _mapped(seed: int = 0) -> torch.Tensor:
    return torch.randn(5, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# -- 1. the torch.func refusal names the transforms in use ------------------------------------------------------------

@pytest.mark.parametrize(("solver", "adjoint"), [("heun", "checkpoint"), ("reversible_heun", "reversible")])
def test_vmap_with_a_modules_parameters_names_vmap_and_no_grad_runs_it(solver, adjoint):
    flow, net = _flow()
    noise = _mapped()

    def run(x):
        return fd.generate(flow, x, solver=solver, steps=4, checks=OFF, adjoint=adjoint).x

    with pytest.raises(ValueError, match=rf"^adjoint='{adjoint}' cannot run under torch\.func\.vmap while the solve is "
                                         r"differentiated.*torch\.no_grad\(\).*adjoint='autograd'") as err:
        torch.func.vmap(run)(noise)
    assert "reverse mode" not in str(err.value)
    assert net.calls == 0  # refused before any evaluation
    with torch.no_grad():
        assert torch.equal(torch.func.vmap(run)(noise), torch.stack([run(x) for x in noise]))


@pytest.mark.parametrize(("solver", "adjoint"), [("heun", "checkpoint"), ("reversible_heun", "reversible")])
def test_jvp_with_a_modules_parameters_names_jvp_and_no_grad_gives_autograds_tangent(solver, adjoint):
    flow, _ = _flow()
    noise = _mapped()[0]
    tangent = torch.randn(noise.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run(adj):
        return lambda x: fd.generate(flow, x, solver=solver, steps=4, adjoint=adj).x

    with pytest.raises(ValueError, match=rf"^adjoint='{adjoint}' cannot run under torch\.func\.jvp while"):
        torch.func.jvp(run(adjoint), (noise,), (tangent,))
    expected = torch.func.jvp(run("autograd"), (noise,), (tangent,))[1]
    with torch.no_grad():
        torch.testing.assert_close(torch.func.jvp(run(adjoint), (noise,), (tangent,))[1], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"cannot run under torch\.func\.vmap and torch\.func\.jvp while"):
        torch.func.jacfwd(lambda x: run(adjoint)(x).sum())(noise)


def test_reverse_mode_is_still_refused_as_reverse_mode():
    flow, _ = _flow()
    with pytest.raises(ValueError, match=r"^adjoint='checkpoint' cannot run under a torch\.func transform of reverse "
                                         r"mode \(grad, vjp, jacrev, hessian\)"):
        torch.func.vmap(torch.func.grad(
            lambda x: fd.generate(flow, x, solver="heun", steps=4, checks=OFF, adjoint="checkpoint").x.sum()))(
            _mapped())


# -- 2. decode under vmap ---------------------------------------------------------------------------------------------

def _latent(flow: fd.ProbabilityFlow, model_kwargs=None) -> fd.Latent:
    with torch.no_grad():
        return fd.encode(flow, 0.3 * _mapped(2)[0], solver="heun", steps=4, model_kwargs=model_kwargs).latent


def test_a_latents_decode_under_vmap_is_refused_up_front_with_the_checks_on_and_equals_the_loop_without():
    flow, net = _flow()
    latent = _latent(flow)
    xs = _mapped()

    def run(checks):
        return lambda x: fd.decode(flow, dataclasses.replace(latent, x=x), checks=checks).x

    net.calls = 0
    with pytest.raises(ValueError, match=r"^decode under torch\.func\.vmap \(latent\.x is mapped over\) with "
                                         r"checks=Checks\(finite=True, growth='auto'\).*first dimension of latent\.x"
                                         r".*Checks\(finite=False, growth=None\)"):
        torch.func.vmap(run(None))(xs)
    assert net.calls == 0
    with torch.no_grad():
        assert torch.equal(torch.func.vmap(run(OFF))(xs), torch.stack([run(OFF)(x) for x in xs]))


def test_a_tensors_decode_under_vmap_names_the_latent_not_generates_noise():
    flow, _ = _flow()
    with pytest.raises(ValueError, match=r"^decode under torch\.func\.vmap \(latent is mapped over\)"):
        torch.func.vmap(lambda x: fd.decode(flow, x, steps=3).x)(_mapped())


def test_mapped_model_kwargs_beside_a_latent_that_records_its_model():
    """The model check fingerprints model_kwargs' values: refused up front naming it; model=False runs as the loop."""
    flow, net = _flow()
    one = torch.tensor(1.0, dtype=torch.float64)
    latent = _latent(flow, {"labels": one})
    assert latent.fingerprint is not None
    labels = torch.tensor([1.0, 1.0, 2.0, 1.0, 0.5], dtype=torch.float64)

    def run(checks):
        return lambda lab: fd.decode(flow, latent, model_kwargs={"labels": lab}, checks=checks).x

    net.calls = 0
    with pytest.raises(ValueError, match=r"^decode under torch\.func\.vmap \(model_kwargs are mapped over\) with "
                                         r"checks=Checks\(finite=True"):
        torch.func.vmap(run(None))(labels)
    with pytest.raises(ValueError, match=r"^decode under torch\.func\.vmap \(model_kwargs are mapped over\) with "
                                         r"checks=Checks\(model=True\).*model=False"):
        torch.func.vmap(run(OFF))(labels)
    assert net.calls == 0
    unchecked = fd.Checks(finite=False, growth=None, model=False)
    with torch.no_grad():
        mapped = torch.func.vmap(run(unchecked))(labels)
        assert torch.equal(mapped, torch.stack([run(unchecked)(lab) for lab in labels]))


def test_generate_with_only_model_kwargs_mapped_says_so():
    flow, _ = _flow()
    noise = _mapped()[0]
    with pytest.raises(ValueError, match=r"^generate under torch\.func\.vmap \(model_kwargs are mapped over\)"):
        torch.func.vmap(lambda lab: fd.generate(flow, noise, steps=3, model_kwargs={"labels": lab}).x)(
            torch.arange(5, dtype=torch.float64))



def test_vmap_over_an_ensembles_stacked_weights_is_refused_up_front_and_runs_as_the_loop_with_the_checks_off():
    """torch.func's ensembling (stack_module_state + functional_call): neither the noise nor model_kwargs is mapped,
    the states become mapped at the first evaluation, and the default checks stopped inside torch ("data-dependent
    control flow") after it."""
    nets = [_Net() for _ in range(3)]
    for k, net in enumerate(nets):
        torch.nn.init.normal_(net.lin.weight, std=0.4, generator=torch.Generator().manual_seed(k))
    params, buffers = torch.func.stack_module_state(nets)
    shell = _Net()
    noise = _mapped()[0]

    def run(checks):
        def one(p, b):
            flow = fd.ProbabilityFlow(lambda x, t: torch.func.functional_call(shell, (p, b), (x, t)),
                                      fd.Schedule.linear())
            return fd.generate(flow, noise, solver="heun", steps=3, checks=checks).x
        return one

    shell.calls = 0
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"^generate under torch\.func\.vmap \(called inside it with noise and "
                                             r"model_kwargs unmapped.*\) with checks=Checks\(finite=True"):
            torch.func.vmap(run(None))(params, buffers)
        assert shell.calls == 0
        mapped = torch.func.vmap(run(OFF))(params, buffers)
        loop = torch.stack([fd.generate(fd.ProbabilityFlow(net, fd.Schedule.linear()), noise, solver="heun", steps=3,
                                        checks=OFF).x for net in nets])
    torch.testing.assert_close(mapped, loop, rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("transform", [torch.func.jacfwd, torch.func.jacrev])
def test_jacobians_keep_running_with_the_default_checks(transform):
    """vmap maps their tangents or cotangents alone, which no check reads: not refused as an ensemble's vmap is."""
    flow, _ = _flow()
    noise = _mapped()[0][:2]
    jac = transform(lambda n: fd.generate(flow, n, solver="heun", steps=3).x.sum(0))(noise)
    assert jac.shape == (4, 2, 4) and bool(torch.isfinite(jac).all())


# -- 3. checked_reference: a check stands only for the very objects it read, unwritten -------------------------------

def _reference_problem():
    flow, net = _flow()
    noise = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    labels = {"labels": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).reshape(3, 1)}
    with torch.no_grad():
        reference = fd.reference_solution(flow, noise, model_kwargs=labels, rtol=1e-6, atol=1e-6)
    return flow, net, noise, labels, reference


def test_noise_refilled_in_place_inside_the_block_is_checked_again():
    """Identity alone let a noise buffer refilled in place pass: compare then measured every run against the
    reference of the old noise, without an error."""
    from flowdiff.tools.reference import check_reference, checked_reference

    flow, _, noise, labels, reference = _reference_problem()
    with checked_reference(reference, flow, noise, labels):
        assert check_reference(reference, flow, noise, labels) is reference
        noise.mul_(2.0)
        with pytest.raises(ValueError, match="^reference was solved from other noise than the noise given"):
            check_reference(reference, flow, noise, labels)
        with pytest.raises(ValueError, match="^reference was solved from other noise"):
            fd.compare(flow, noise, solvers=["euler"], grids=["trailing"], nfe=[3], model_kwargs=labels,
                       reference=reference)


def test_weights_or_labels_changed_inside_the_block_are_checked_again():
    from flowdiff.tools.reference import check_reference, checked_reference

    flow, net, noise, labels, reference = _reference_problem()
    with checked_reference(reference, flow, noise, labels):
        labels["labels"] = labels["labels"] + 1.0  # the same dict, another label
        with pytest.raises(ValueError, match="conditioning|model_kwargs"):
            check_reference(reference, flow, noise, labels)
        labels["labels"] = labels["labels"] - 1.0
        assert check_reference(reference, flow, noise, labels) is reference  # equal again: checked, and passes
        with torch.no_grad():
            net.lin.bias.add_(0.5)  # trained in place inside the block
        with pytest.raises(ValueError, match="another flow|other flow|network|weights"):
            check_reference(reference, flow, noise, labels)


def test_the_check_is_skipped_for_those_objects_alone_in_that_block_and_that_thread(monkeypatch):
    """Guards for what Q4's tests let pass when mutated: a skip keyed on the reference alone, or a block that left
    its state behind, passed every one of them."""
    import threading

    import flowdiff.tools.reference as reference_module
    from flowdiff.tools.reference import check_reference, checked_reference

    flow, _, noise, labels, reference = _reference_problem()
    other_flow, _ = _flow()
    with torch.no_grad():
        other_flow.model.lin.bias.add_(1.0)
    seen = []
    real = reference_module.flow_fingerprint
    monkeypatch.setattr(reference_module, "flow_fingerprint", lambda f, mk=None: seen.append(1) or real(f, mk))
    with checked_reference(reference, flow, noise, labels):
        seen.clear()
        check_reference(reference, flow, noise, labels)
        assert seen == []  # skipped
        with pytest.raises(ValueError, match="other noise"):
            check_reference(reference, flow, noise.clone() + 1.0, labels)
        with pytest.raises(ValueError):
            check_reference(reference, other_flow, noise, labels)
        with pytest.raises(ValueError):
            check_reference(reference, flow, noise, None)
        in_thread = []
        worker = threading.Thread(target=lambda: in_thread.append(check_reference(reference, flow, noise, labels)))
        seen.clear()
        worker.start()
        worker.join()
        assert in_thread == [reference] and seen  # another thread checks for itself
    seen.clear()
    check_reference(reference, flow, noise, labels)
    assert seen  # after the block, checked again


def test_a_mapped_tensor_nested_in_model_kwargs_is_seen():
    """SDXL's ``added_cond_kwargs``: a mapped tensor one mapping down is refused up front with the checks on, as a flat
    one is, not stopped inside torch (guard: Q4's tests passed with the nested mappings unread)."""
    flow = fd.ProbabilityFlow.from_sigma_field(
        lambda xbar, sigma, added=None: torch.tanh(xbar) * (1 + 0.1 * added["labels"].reshape(-1, 1)),
        fd.Schedule.linear())
    noise = _mapped()[0]

    def run(checks):
        return lambda lab: fd.generate(flow, noise, steps=3, model_kwargs={"added": {"labels": lab}}, checks=checks).x

    labels = torch.arange(5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^generate under torch\.func\.vmap \(model_kwargs are mapped over\)"):
        torch.func.vmap(run(None))(labels)
    assert torch.equal(torch.func.vmap(run(OFF))(labels), torch.stack([run(OFF)(lab) for lab in labels]))


# -- 4. PNDM at 1–6 steps off diffusers' default spacing and offset (guard) -----------------------------------------

_SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
       "skip_prk_steps": True}


def _pndm_model():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 6, generator=g, dtype=torch.float64) * 0.4
    b = torch.randn(6, generator=g, dtype=torch.float64)
    calls: list[int] = []

    def model(x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1)
        calls.append(int(t[0]))
        return torch.tanh(x @ w + b * (t.reshape(-1, 1) / 1000.0)) + 0.1 * x

    return model, calls


@pytest.mark.parametrize(("spacing", "offset", "alpha_one"), [
    ("leading", 0, True), ("leading", 0, False), ("leading", 3, False), ("trailing", 0, True), ("trailing", 2, False)])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6])
def test_pndm_equals_diffusers_loop_off_the_default_spacing_and_offset(spacing, offset, alpha_one, steps):
    """sample_like of a PNDM config equals diffusers' own loop on the same ᾱ table, or refuses the config naming it
    (a one-step loop of zero length; a trailing loop whose DDIM step lands off the next timestep). Its counted NFE
    is diffusers' calls, less the one evaluation of a last step of zero length (σ_min to σ_min), which changes
    nothing."""
    from diffusers import PNDMScheduler

    from flowdiff.models.pipelines import schedule_from_config

    cfg = {**_SD, "timestep_spacing": spacing, "steps_offset": offset, "set_alpha_to_one": alpha_one}
    schedule, prediction_type = schedule_from_config({"_class_name": "PNDMScheduler", **cfg})
    noise = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model, theirs = _pndm_model()
    sched = PNDMScheduler.from_config(cfg)
    sched.set_timesteps(steps)
    sched.alphas_cumprod = torch.tensor(schedule.alphas_cumprod, dtype=torch.float64)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if alpha_one else sched.alphas_cumprod[0]
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, return_dict=False)[0]
    model, ours_calls = _pndm_model()
    flow = fd.ProbabilityFlow(model, schedule, prediction_type=prediction_type)
    try:
        ours = fd.sample_like(flow, noise, {"_class_name": "PNDMScheduler", **cfg}, steps)
    except ValueError as err:
        assert str(err).startswith("scheduler config: ") and ours_calls == []
        assert "zero length" in str(err) or "lands on" in str(err)
        return
    torch.testing.assert_close(ours.x, x, rtol=1e-12, atol=1e-12)
    zero_length_end = not alpha_one and int(sched.timesteps[-1]) == 0
    assert ours.stats.nfe == len(ours_calls) == len(theirs) - zero_length_end



# -- 5. final_euler=False on a one-step grid out of σ = ∞ -------------------------------------------------------------

def test_a_one_step_grid_from_infinity_says_its_step_is_the_boundary_step():
    import numpy as np

    net = _Net()
    schedule = fd.Schedule.from_betas(np.linspace(1e-4, 0.02, 1000), rescale_zero_snr=True)
    flow = fd.ProbabilityFlow(net, schedule, prediction_type="v_prediction")
    noise = _mapped()[0]
    with torch.no_grad():
        for name in ("heun", "rk4", "reversible_heun"):
            assert fd.generate(flow, noise, solver=name, steps=1).sigmas[0] == float("inf")
            net.calls = 0
            with pytest.raises(ValueError, match=rf"final_euler=False\) beside solver '{name}': the grid's one step "
                                                 r"runs from σ = ∞ straight to 0: the boundary step out of pure noise"):
                fd.generate(flow, noise, solver=name, grid=fd.Grid(steps=1, final_euler=False))
            assert net.calls == 0
        plain = fd.generate(flow, noise, solver="flowmatch_heun", steps=1)  # its first step from t = 1 is its own
        said = fd.generate(flow, noise, solver="flowmatch_heun", grid=fd.Grid(steps=1, final_euler=False))
    assert said.stats.nfe == plain.stats.nfe + 1 and not torch.equal(said.x, plain.x)
