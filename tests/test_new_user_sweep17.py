"""New-user sweep 17: tuned grids, learned solvers and compare on an EDM-style (variance-exploding) model and a
flow-matching (SD3-style velocity, shift 3) one, both closed-form, and a tiny diffusers flow-matching model saved and
loaded back."""

from __future__ import annotations

import re

import pytest
import torch
from _cli_runs import one_line, run_in

import flowdiff
from flowdiff.models.analytic import Gaussian

MEAN = torch.linspace(-0.6, 0.6, 8, dtype=torch.float64)
VAR = torch.linspace(0.05, 0.5, 8, dtype=torch.float64)
FM = flowdiff.FlowMatchingSchedule(shift=3.0)
VE = flowdiff.VESchedule()


class GaussianVelocity:
    """The rectified-flow velocity v = E[ε − x₀ | x_t] of N(MEAN, VAR) data as ``model(x, t)`` (T·t fed, x = x̄/(1+σ)),
    and x − MEAN at t = 1 (pure noise)."""

    def __init__(self) -> None:
        self.gaussian = Gaussian(MEAN, VAR, FM)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tau = float(t.reshape(-1)[0]) / FM.train_steps
        if tau >= 1.0:
            return x - MEAN.to(x)
        sigma = tau / (1.0 - tau)
        xbar = x.double() * (1.0 + sigma)
        return ((1.0 + sigma) * self.gaussian.eps(xbar, sigma) - xbar).to(x.dtype)


def _flow(kind: str) -> flowdiff.ProbabilityFlow:
    if kind == "fm":
        return flowdiff.ProbabilityFlow(GaussianVelocity(), FM, prediction_type="velocity")
    return flowdiff.ProbabilityFlow(Gaussian(MEAN, VAR, VE), VE)


def _noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _images(n: int, seed: int) -> torch.Tensor:
    return MEAN + VAR.sqrt() * _noise(n, seed)


class _Refused(Exception):
    pass


def _calls(kind: str):
    """Each entry point that runs registered solvers only, called with ``name``; the model raises on its first call,
    so a refusal is made before any evaluation."""
    flow = _flow(kind)

    def model(x, t):
        raise _Refused("the model was evaluated")

    untouched = flowdiff.ProbabilityFlow(model, flow.schedule, prediction_type=flow.prediction_type)
    return {
        "tune": lambda name: flowdiff.tune(untouched, _noise(4, 1), solver=name, nfe=6),
        "learn_solver": lambda name: flowdiff.learn_solver(untouched, _noise(4, 1), solver=name, nfe=6),
        "stored_grid": lambda name: flowdiff.stored_grid(untouched, name, 6),
        "tune_roundtrip": lambda name: flowdiff.tune_roundtrip(untouched, _images(4, 3), solver=name, nfe=6),
        "learn_encoder": lambda name: flowdiff.learn_encoder(untouched, _images(4, 3), solver=name, nfe=6),
        "compare": lambda name: flowdiff.compare(untouched, _noise(2, 1), solvers=["euler", name], nfe=[6]),
        "compare_roundtrip": lambda name: flowdiff.compare(untouched, task="roundtrip", images=_images(2, 3),
                                                           solvers=["euler", name], nfe=[6]),
    }


@pytest.mark.parametrize("kind", ["fm", "ve"])
@pytest.mark.parametrize(("entry", "name", "direction"), [
    ("tune", "flowmatch_heun", "generate"), ("learn_solver", "flowmatch_heun", "generate"),
    ("learn_solver", "pndm", "generate"), ("stored_grid", "flowmatch_heun", "generate"),
    ("tune_roundtrip", "ddim_inverse", "encode"), ("tune_roundtrip", "flowmatch_heun", "generate"),
    ("learn_encoder", "ddim_inverse", "encode"), ("compare", "flowmatch_heun", "generate"),
    ("compare", "ddim_inverse", "encode"), ("compare_roundtrip", "pndm", "generate"),
])
def test_a_generate_or_encode_only_method_is_named_as_such_not_as_an_unknown_solver(kind, entry, name, direction):
    """The flow-matching user who samples with ``solver="flowmatch_heun"`` (diffusers' FlowMatch Heun, README's
    "generate only" row) and then tunes, fits or compares it was told "unknown solver 'flowmatch_heun'", as if
    misspelt; so was ``ddim_inverse`` in tune_roundtrip and learn_encoder. The refusal now says what the method is,
    that the entry point runs registered solvers only, and lists them, before any model evaluation."""
    with pytest.raises(ValueError) as err:
        _calls(kind)[entry](name)
    message = str(err.value)
    assert "unknown solver" not in message
    article = "an" if direction == "encode" else "a"
    assert f"'{name}' is {article} {direction}-only method" in message
    assert "accepted: abm, adaptive_heun" in message
    if entry == "compare" and direction == "generate":
        assert f"flowdiff.generate(flow, noise, solver='{name}'" in message


@pytest.mark.parametrize(("argv", "says"), [
    (["compare", "--solver", "flowmatch_heun"], "'flowmatch_heun' is a generate-only method"),
    (["compare", "--task", "roundtrip", "--solver", "euler,pndm"], "'pndm' is a generate-only method"),
    (["encode", "--solver", "flowmatch_heun", "x.png"], "'flowmatch_heun' is a generate-only method"),
    (["sample", "--solver", "ddim_inverse"], "'ddim_inverse' is an encode-only method"),
])
def test_the_command_line_names_a_generate_or_encode_only_method_as_such(capsys, tmp_path, argv, says):
    """``flowdiff compare --solver flowmatch_heun`` said "unknown solver 'flowmatch_heun'", though ``flowdiff sample
    --solver flowmatch_heun`` takes it."""
    code, _, err = run_in(capsys, argv, tmp_path)
    assert code == 2
    line = one_line(err)
    assert says in line and "unknown solver" not in line
    assert re.search(r"accepted: abm, .*unipc", line)


def _fm_folder(tmp_path):
    """A tiny diffusers flow-matching model (a seeded UNet and FlowMatchEulerDiscreteScheduler(shift=3)), saved and
    loaded back as flowdiff.from_diffusers loads it (float32)."""
    diffusers = pytest.importorskip("diffusers")
    from _tiny_unet import tiny_unet

    tiny_unet(diffusers).save_pretrained(tmp_path / "fm" / "unet")
    diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(tmp_path / "fm" / "scheduler")
    return tmp_path / "fm" / "unet", flowdiff.from_diffusers(str(tmp_path / "fm" / "unet"))


def test_a_learned_file_used_in_another_precision_says_so_not_another_model(tmp_path, capsys):
    """A learned solver fitted on the tiny flow-matching folder (float32, as ``flowdiff sample`` loads it) and run with
    ``--dtype float64`` was refused as made for "another model, schedule or conditioning": it is the same model, its
    network in another precision. The refusal says so and which --dtype the file was made with; the same refusal from
    Python (``LearnedSolver.load`` on the network in float64), and for a tuned grid."""
    folder, flow = _fm_folder(tmp_path)
    sigmas = flowdiff.make_sigmas(flow.schedule, "logsnr", 4)
    learned = flowdiff.LearnedSolver(solver="unipc", solver_options={}, nfe=4, sigmas=sigmas, coefficients=(),
                                     fingerprint=flowdiff.flow_fingerprint(flow), kept=True, learn=("shifts",),
                                     shifts=(0.02, -0.02, 0.02, -0.02))
    path = learned.save(tmp_path / "unipc4.learned.json")
    code, _, err = run_in(capsys, ["sample", "--model", folder, "--learned", path, "--dtype", "float64", "--num", 1,
                                   "--out", "x.png", "--device", "cpu"], tmp_path)
    assert code == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]  # diffusers may log (no accelerate) while loading the folder
    assert line.startswith("flowdiff sample: error: --learned")
    assert "another model, schedule or conditioning" not in line
    assert "its network in torch.float64 where the file was made with it in torch.float32" in line
    assert "--dtype float32" in line
    assert not (tmp_path / "x.png").exists()
    flowdiff.LearnedSolver.load(path, flow)  # the precision it was made in loads
    flow.model.double()
    with pytest.raises(ValueError, match="the same model and conditioning, its network in torch.float64"):
        flowdiff.LearnedSolver.load(path, flow)
    tuned = flowdiff.TunedGrid(sigmas, "unipc", {}, 4, learned.fingerprint)
    with pytest.raises(ValueError, match="made with it in torch.float32"):
        tuned.check(flow)
    other = flowdiff.ProbabilityFlow(flow.model, flowdiff.FlowMatchingSchedule(shift=1.0), prediction_type="velocity")
    with pytest.raises(ValueError, match="another model, schedule or conditioning"):
        tuned.check(other)  # another schedule is not another precision, in any precision
