"""Review R17 (sweep 6 S6, reference provenance F3, flow-matching peers P3): what a user met, each test failing
before its fix (its docstring says what a user saw)."""

import copy
import warnings

import pytest
import torch
from _cli_runs import one_line, run_in, write_digits

import flowdiff
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


def test_the_command_lines_run_flow_in_another_dtype_keeps_what_the_peers_are_configured_from(tmp_path):
    """`flowdiff compare --model FLUX_DIR --peers diffusers` in a --dtype other than the folder's ran its runs on a
    plain ProbabilityFlow copy (in_dtype), which dropped the DiffusersFlow's scheduler_config and packed tokens: the
    flow-matching peers fell back to the schedule's static shift ('linspace, shift 1') instead of the Flux pipeline's
    dynamic shift ('linspace, Flux sigmas, mu'), and the report said so as if it were the users' configuration."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import flowdiff
    from flowdiff.cli import in_dtype
    from flowdiff.models import tiny_pipelines
    from flowdiff.tools import peers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, path = tiny_pipelines.flux(tmp_path)
        flow = flowdiff.from_diffusers(path)
    cast = in_dtype(flow, torch.float64)
    assert next(cast.model.parameters()).dtype == torch.float64 and next(flow.model.parameters()).dtype != torch.float64
    assert type(cast) is type(flow) and cast.scheduler_config == flow.scheduler_config and cast.packed
    want = [(s.name, s.grid, s.options, s.left_out) for s in peers.default_samplers(["diffusers"], flow)]
    assert [(s.name, s.grid, s.options, s.left_out) for s in peers.default_samplers(["diffusers"], cast)] == want


@pytest.mark.parametrize("bad", [dict(peers="diffuser"), dict(progress="yes")])
def test_distributed_compare_refuses_its_arguments_before_the_reference_solve(monkeypatch, bad):
    """distributed.compare checked peers= (and never progress=) after rank 0 had solved the float64 reference, the
    slowest part of a comparison: a misspelt peer cost a whole reference solve before its refusal, where
    flowdiff.compare refuses it first. Now refused, by every rank, before the reference."""
    from _ranks import AllWorkRank0

    from flowdiff.models.analytic import Gaussian
    from flowdiff.runs import distributed

    solved = []
    monkeypatch.setattr(distributed, "reference_solution", lambda *a, **k: solved.append(1))
    flow = Gaussian(torch.zeros(1, 2, 2), torch.linspace(0.1, 1.0, 4)).flow()
    noise = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match="peers|progress"):
        distributed.compare(flow, noise, ranks=AllWorkRank0(rank=0, world_size=2), solvers=["euler"],
                            grids=["logsnr"], nfe=[4], **bad)
    assert not solved


def test_a_cached_reference_is_not_returned_for_weights_changed_in_place():
    """reference_solution cached its answer per flow object: after an in-place change of the network's weights (a
    training step) it returned the reference of the old weights, which compare(flow, noise) then measured every row
    against, silently, and which check_reference (compare(reference=)) refused for this very flow as 'another
    flow'. Now the changed network is solved again."""
    import flowdiff as fd
    from flowdiff.tools.reference import check_reference, clear_reference_cache

    clear_reference_cache()
    shipped = fd.pretrained("digits")
    flow = fd.ProbabilityFlow(copy.deepcopy(shipped.model), shipped.schedule, prediction_type=shipped.prediction_type)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    before = fd.reference_solution(flow, noise, rtol=1e-5, atol=1e-5)
    assert fd.reference_solution(flow, noise, rtol=1e-5, atol=1e-5) is before  # the cache still serves
    with torch.no_grad():
        next(flow.model.parameters()).mul_(1.5)
    after = fd.reference_solution(flow, noise, rtol=1e-5, atol=1e-5)
    assert after is not before and not torch.equal(after.x, before.x)
    assert torch.equal(after.x, fd.reference_solution(flow, noise, rtol=1e-5, atol=1e-5, cache=False).x)
    check_reference(after, flow, noise)
    clear_reference_cache()


class _Embedded(torch.nn.Module):
    """An ε conditioned on a floating embedding (as a prompt's): the Gaussian's ε scaled by w·(1 + 0.1·emb)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))
        from flowdiff.models.analytic import Gaussian

        self.gaussian = Gaussian(torch.zeros(1, 2, 2), torch.linspace(0.1, 1.0, 4))

    def forward(self, x_t, t, emb):
        scale = self.w.to(x_t.dtype) * (1 + 0.1 * emb.to(x_t.dtype).reshape(-1, 1, 1, 1))
        return self.gaussian(x_t, t) * scale


def test_a_reference_accepts_its_conditioning_in_the_precision_of_the_run(tmp_path):
    """check_reference took the network of a float32 reference in bfloat16 but not its conditioning: a run in
    bfloat16 given the same prompt embeddings in bfloat16 (as DiffusersFlow.encode_prompt casts them to the network's
    dtype) was refused as 'solved with other model_kwargs'. Other values are still refused, in any precision."""
    from flowdiff import ProbabilityFlow, Reference, reference_solution
    from flowdiff.tools.reference import check_reference

    net = _Embedded()
    flow = ProbabilityFlow(net, net.gaussian.schedule)
    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    emb = torch.tensor([0.3, 0.7])
    ref = reference_solution(flow, noise, model_kwargs={"emb": emb}, rtol=1e-6, atol=1e-6)
    ref = Reference.load(ref.save(tmp_path / "r.safetensors"))
    run = ProbabilityFlow(copy.deepcopy(net).to(torch.bfloat16), net.gaussian.schedule)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            check_reference(ref, run, noise.to(dtype), {"emb": emb.to(dtype)})
            check_reference(ref, flow, noise, {"emb": emb.to(dtype)})
    for other in (emb * 2, (emb * 2).to(torch.bfloat16), emb[[1, 0]].to(torch.float16)):
        with pytest.raises(ValueError, match="other model_kwargs"):
            check_reference(ref, run, noise, {"emb": other})


@pytest.mark.parametrize("kwargs", [dict(channels="3"), dict(channels=["3"]), dict(channels=[0]), dict(channels=[]),
                                    dict(channels=[True]), dict(max_batch=0), dict(max_side=2.5)])
def test_batch_shapes_checks_its_arguments_when_built(kwargs):
    """batch_shapes(channels="3") drew shapes such as (1, '3', 1, 1) (a string's letters as channel counts), the
    mistake sweep 6 fixed in the other strategies; now a ValueError naming the argument when built."""
    from flowdiff.tools import testing as ft

    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ft.batch_shapes(**kwargs)


def test_batch_shapes_takes_one_channel_count_alone():
    from hypothesis import find

    from flowdiff.tools import testing as ft

    assert find(ft.batch_shapes(channels=3), lambda shape: True)[1] == 3
    assert find(ft.batch_shapes(channels=(2,)), lambda shape: True)[1] == 2


def test_a_float64_reference_keeps_the_flows_timesteps_table():
    """reference_solution of a flow whose network is float32 solves a float64 copy; the copy was a new
    ProbabilityFlow, which dropped the flow's timesteps table (and a DiffusersFlow's attributes): the reference fed
    the model t(σ) where the flow feeds the table's time, silently (R17's find, fixed by the lead)."""
    from flowdiff.tools.reference import _float64_flow

    class Eps(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.3))

        def forward(self, x, t):
            return self.w * torch.tanh(x) * (1 + t[:, None] / 100)

    class Subclassed(flowdiff.ProbabilityFlow):  # as a DiffusersFlow is, with attributes of its own
        pass

    flow = Subclassed(Eps(), flowdiff.Schedule.linear())
    sigma = float(flow.schedule.sigma_max)
    flow = flow.with_timesteps({sigma: 500.0})
    flow.extra = "kept"
    solved = _float64_flow(flow)
    assert solved.model.w.dtype == torch.float64 and flow.model.w.dtype == torch.float32
    assert type(solved) is Subclassed and solved.extra == "kept" and solved.timesteps == {sigma: 500.0}
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    by_table = solved.field()(sigma, x)
    torch.testing.assert_close(by_table, flow.field()(sigma, x.float()).double(), rtol=1e-6, atol=1e-7)
    untabled = flowdiff.ProbabilityFlow(solved.model, flow.schedule).field()(sigma, x)
    assert (by_table - untabled).abs().max() > 1e-2  # the table changes the field there


def test_a_0d_budget_and_a_bare_sample_shape_are_named():
    """R17: compare(nfe=np.array(5)) said 'iteration over a 0-d array' and testing.closed_form_models(4) said
    "'int' object is not iterable", naming nothing. A 0-d array or tensor is one budget (as np.int64(5) is);
    a sample shape that is not a tuple of positive ints is refused naming sample_shape."""
    import numpy as np

    from flowdiff.tools import testing
    from flowdiff.tools.compare import _check_budgets
    assert _check_budgets(np.array(5)) == _check_budgets(torch.tensor(5)) == _check_budgets(5) == [5]
    with pytest.raises(TypeError, match=r"nfe must be an int or a list of ints .*got float 2\.5"):
        _check_budgets(np.array(2.5))
    for bad in (4, (), (0, 8), ("8",), "8x8"):
        with pytest.raises(ValueError, match=r"sample_shape must be a non-empty tuple of positive ints"):
            testing.closed_form_models(bad)
    testing.closed_form_models((1, 8, 8))
    testing.closed_form_models(torch.Size([4]))
