"""Review R31 of S19 (a latent's state maker), S20 (sweep 17) and F8's reference from t = 1 on flow matching."""

import csv
import dataclasses
import math

import pytest
import torch
from _closed_form import mixture, noise
from safetensors import safe_open

import flowdiff
import solvers
from flowdiff import cli
from flowdiff.tools.learned import plain_encoders
from flowdiff.tools.reference import Reference


def _errors(out) -> list[tuple[str, str]]:
    """The rows' RMS and max errors in the report's CSV (not its wall times)."""
    with open(out / "compare.csv", newline="") as fh:
        return [(row["rms_error"], row["max_error"]) for row in csv.DictReader(fh)]


def test_compare_solves_again_a_kept_flow_matching_reference_from_sigma_max(tmp_path):
    # flowdiff compare keeps its reference on disk under a key of model, noise and tolerance, not of the start: a
    # file kept before the reference started at t = 1 on flow matching (F8) started at a finite σ, and was reused
    # as this run's reference, its rows measured against another solution than a fresh run's
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from flowdiff.models import tiny_pipelines

    path = str(tiny_pipelines.stable_diffusion_3(tmp_path / "pipe")[1])
    out = tmp_path / "out"
    args = ["compare", "--model", path, "--solver", "euler", "--grid", "trailing", "--nfe", "2", "--batch", "1",
            "--rtol", "1e-3", "--no-progress", "--out", str(out), "--overwrite"]
    assert cli.main(args) == 0
    fresh = _errors(out)
    kept = out / "reference.safetensors"
    ref = Reference.load(kept)
    assert ref.sigma_start == math.inf
    with safe_open(str(kept), framework="pt") as fh:
        key = fh.metadata()["key"]
    # the file as an earlier flowdiff wrote it: the same key, solved from a finite σ (another image)
    dataclasses.replace(ref, sigma_start=3.0, x=ref.x + 0.5).save(kept, key)
    assert cli.main(args) == 0
    again = Reference.load(kept)
    assert again.sigma_start == math.inf and torch.equal(again.x, ref.x)  # solved again, and kept in its place
    assert _errors(out) == fresh
    # one kept from t = 1 is reused as before: a file of another image under its key is taken as it is
    dataclasses.replace(ref, x=ref.x + 0.5).save(kept, key)
    assert cli.main(args) == 0
    assert torch.equal(Reference.load(kept).x, ref.x + 0.5) and _errors(out) != fresh


class _Conditioned(torch.nn.Module):
    """A network fed a floating conditioning tensor (as prompt embeddings are)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, t, cond=None):
        return self.lin(x) + cond


def test_a_file_checked_with_network_and_conditioning_in_another_precision_says_so():
    # S20's message for a file used in another precision matched the network cast alone: conditioning given in the
    # run's precision too (prompt embeddings of a text encoder loaded with the same --dtype), as a reference's keys
    # already allow, was blamed as "another model, schedule or conditioning"
    torch.manual_seed(0)
    net = _Conditioned()
    flow = flowdiff.ProbabilityFlow(net, flowdiff.Schedule.linear())
    cond = torch.randn(2, 4)
    sigmas = flowdiff.make_sigmas(flow.schedule, "logsnr", 4)
    tuned = flowdiff.TunedGrid(sigmas, "euler", {}, 4, flowdiff.flow_fingerprint(flow, {"cond": cond}))
    tuned.check(flow, {"cond": cond})
    net.double()
    for given in (cond, cond.double()):
        with pytest.raises(ValueError, match="made with it in torch.float32") as err:
            tuned.check(flow, {"cond": given})
        assert "another model, schedule or conditioning" not in str(err.value)
    with pytest.raises(ValueError, match="another model, schedule or conditioning"):
        tuned.check(flow, {"cond": cond.double() + 1})  # other conditioning, in any precision


@pytest.mark.parametrize("entry", ["learn_encoder", "tune_roundtrip"])
def test_an_encode_only_method_refused_by_a_round_trip_fit_lists_what_it_fits(entry):
    # S20's refusal listed every registered solver as accepted, the reversible ones (refused there: "nothing to
    # tune") and those that cannot encode among them
    flow = mixture()
    images = noise(0, 4)
    with pytest.raises(ValueError, match="encode-only method") as err:
        getattr(flowdiff, entry)(flow, images, solver="ddim_inverse", nfe=4)
    listed = str(err.value).split("accepted: ")[1].split(", ")
    assert listed == list(plain_encoders())
    for name in solvers.available():  # each listed name is taken, each other one refused, before any evaluation
        if name not in listed:
            with pytest.raises(ValueError, match=f"solver {name!r} (cannot encode|is reversible)"):
                getattr(flowdiff, entry)(flow, images, solver=name, nfe=4)
    assert {"euler", "heun", "unipc"} <= set(listed) and "reversible" not in listed
