"""compare's peers, its report and the tuned grid on the command line (issue 27), and compare's argument checks
(issue 22).

The peers' rows are checked against their own loops written out here (diffusers' set_timesteps/step,
k-diffusion's sample_*), on the same noise and reference; the report against the runs it reports.
"""

from __future__ import annotations

import ast
import csv
import math
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import flowdiff
from flowdiff.cli import main
from flowdiff.models.analytic import Gaussian
from flowdiff.models.kdiffusion import to_denoiser
from flowdiff.tools import peers
from flowdiff.tools.compare import clear_reference_cache, compare

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("diffusers")


def _flow() -> flowdiff.ProbabilityFlow:
    return Gaussian(torch.zeros(1, 4, 4), torch.linspace(0.05, 1.0, 16)).flow()


def _noise(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.to(torch.float64) - ref).pow(2).mean().sqrt())


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_reference_cache()
    yield
    clear_reference_cache()


def _kdiffusion():
    if peers.unavailable("k-diffusion") is not None:
        pytest.skip("k-diffusion is not installed")
    return peers.load_kdiffusion()


def test_peer_rows_equal_their_own_loops_run_directly():
    import diffusers

    K = _kdiffusion()
    flow, noise, budget = _flow(), _noise(), 5  # T = 1000 is a multiple of 5: DDIM steps to the next timestep
    result = compare(flow, noise, solvers=["euler"], grids=["trailing"], nfe=[budget],
                     peers=["diffusers", "k-diffusion"])
    rows = {(r.source, r.solver): r for r in result.runs}
    assert {s for s, _ in rows} == {"flowdiff", "diffusers", "k-diffusion"}
    assert {name for s, name in rows if s != "flowdiff"} == \
        {s.name for s in peers.DIFFUSERS_DEFAULT + peers.KDIFFUSION_DEFAULT}
    ref = result.reference.x
    field = flow.field()
    calls = []

    def eps_model(x_t, t):  # diffusers' model(x_t, t) -> ε, written out here
        calls.append(t)
        sigma = float(flow.schedule.sigma_at(float(t)))
        return field(sigma, x_t * math.sqrt(1 + sigma * sigma))

    ac = flow.schedule.alphas_cumprod
    betas = (1 - ac / np.concatenate([[1.0], ac[:-1]])).tolist()
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=len(ac), trained_betas=betas,
                                                  use_karras_sigmas=True)
    sched.set_timesteps(budget)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(eps_model(sched.scale_model_input(x, t), t), t, x).prev_sample
    row = rows[("diffusers", "DPM++ 2M Karras")]
    assert row.rms_error == _rms(x, ref) and row.nfe == len(calls) == budget and row.grid == "karras"

    denoiser = to_denoiser(flow)
    sigmas = K.get_sigmas_karras(budget, flow.schedule.sigma_min, flow.schedule.sigma_max).double()
    x = K.sample_dpmpp_2m(denoiser, noise * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, disable=True)
    assert rows[("k-diffusion", "dpmpp_2m")].rms_error == _rms(x, ref)
    x = K.sample_heun(denoiser, noise * math.sqrt(1 + float(sigmas[0]) ** 2),
                      K.get_sigmas_karras(3, flow.schedule.sigma_min, flow.schedule.sigma_max).double(), disable=True)
    heun = rows[("k-diffusion", "heun")]
    assert heun.rms_error == _rms(x, ref) and (heun.steps, heun.nfe) == (3, 5)  # 2 a step, 1 into σ = 0
    # DDIM on trailing timesteps is flowdiff's Euler on the trailing grid: the harness measures both alike (up to
    # diffusers keeping alphas_cumprod in float32)
    assert math.isclose(rows[("diffusers", "DDIM")].rms_error, rows[("flowdiff", "euler")].rms_error, rel_tol=1e-5)
    assert all(r.nfe <= r.budget for r in result.runs)


def test_a_missing_peer_is_reported_not_raised(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails, as if not installed
    result = compare(_flow(), _noise(1), solvers=["euler"], grids=["trailing"], nfe=[4],
                     peers=["diffusers", "k-diffusion"])
    assert set(result.unavailable) == {"diffusers"}
    assert "not available" in result.unavailable["diffusers"] and "pip install diffusers" in result.unavailable[
        "diffusers"]
    assert not any(r.source == "diffusers" for r in result.runs)
    for name in [m for m in sys.modules if m.startswith("_flowdiff_peer_k_diffusion")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "k_diffusion", None)
    assert "k-diffusion is not available" in peers.unavailable("k-diffusion")
    code = main(["compare", "--model", "analytic-mixture", "--batch", "1", "--nfe", "3", "--solver", "euler",
                 "--grid", "trailing", "--rtol", "1e-4", "--peers", "diffusers,k-diffusion", "--no-progress",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and out.count("peer not run") == 2
    report = (tmp_path / "compare.md").read_text()
    assert "diffusers not run" in report and "k-diffusion not run" in report


def _demo_args() -> list[str]:
    """The arguments of `make demo`'s `flowdiff compare`, from the Makefile."""
    text = (ROOT / "Makefile").read_text()
    line = re.search(r"^demo:.*\n\t\$\(BIN\)/flowdiff (compare[^\n]*)", text, re.M).group(1)
    return shlex.split(line)


def test_the_demo_report_shows_flowdiff_and_the_peers_and_holds_every_run(capsys, tmp_path):
    _kdiffusion()
    args = _demo_args()
    assert args[0] == "compare" and "--peers" in args
    shrink = ["--batch", "2", "--nfe", "10,20", "--solver", "euler,dpmpp_2m", "--grid", "trailing,tuned",
              "--rtol", "1e-3", "--no-progress", "--out", str(tmp_path)]  # later options override the demo's
    assert main([*args, *shrink]) == 0
    out = capsys.readouterr().out
    table = out[out.index("| solver |"):]
    for source in ("diffusers: ", "k-diffusion: "):
        assert f"| {source}" in table
    assert re.search(r"^\| dpmpp_2m \|", table, re.M)
    rows = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert {r["source"] for r in rows} == {"flowdiff", "diffusers", "k-diffusion"}
    assert len(rows) == 2 * 2 * 2 + len(peers.DIFFUSERS_DEFAULT + peers.KDIFFUSION_DEFAULT) * 2
    report = (tmp_path / "compare.md").read_text()
    fingerprint = flowdiff.flow_fingerprint(flowdiff.pretrained("digits"))
    for fact in (fingerprint, "seed 0", "estimated error", "flowdiff ", f"torch {torch.__version__}",
                 f"diffusers {peers.version('diffusers')}", f"k-diffusion {peers.version('k-diffusion')}",
                 "](frontier.png)", "](samples.png)", "](compare.png)"):
        assert fact in report, fact
    for r in rows:  # every run is in the report's full table, with its error as printed
        name = r["solver"] if r["source"] == "flowdiff" else f"{r['source']}: {r['solver']}"
        assert f"| {name} | {r['grid']} |" in report and f"{float(r['rms_error']):.2e}" in report
    from PIL import Image

    for name in ("frontier.png", "samples.png", "compare.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and img.width > 200
    # the command the report prints reproduces the best flowdiff row at the largest budget
    command = re.search(r"reproduce the best flowdiff row at NFE 20: flowdiff (.*)", out).group(1)
    assert command in report
    best = min((r for r in rows if r["source"] == "flowdiff" and r["budget"] == "20"),
               key=lambda r: float(r["rms_error"]))
    argv = shlex.split(command.split("#")[0])
    assert argv[argv.index("--solver") + 1] == best["solver"] and argv[argv.index("--grid") + 1] == best["grid"]
    assert main([*argv, "--out", str(tmp_path / "best.png")]) == 0
    assert f"with {best['solver']} on the {best['grid']} grid: 20 NFE" in capsys.readouterr().out


def test_grid_tuned_on_the_command_line_uses_the_stored_grid_or_refuses(capsys, tmp_path):
    flow = flowdiff.pretrained("digits")
    stored = flowdiff.stored_grid(flow, "unipc", 10)
    assert stored is not None
    common = ["--solver", "unipc", "--num", "3", "--seed", "4"]
    assert main(["sample", *common, "--grid", "tuned", "--nfe", "10", "--out", str(tmp_path / "t.png")]) == 0
    assert "on the tuned grid: 10 NFE" in capsys.readouterr().out
    # the same images as generate on the stored grid, from the same seeded noise
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64).float()
    expected = flowdiff.generate(flow, noise, solver="unipc", grid=stored.sigmas).x
    from flowdiff.cli._images import save_grid

    save_grid(expected, tmp_path / "e.png", scale=8)
    assert (tmp_path / "t.png").read_bytes() == (tmp_path / "e.png").read_bytes()
    assert main(["sample", *common, "--grid", "tuned", "--nfe", "7", "--out", str(tmp_path / "u.png")]) == 1
    err = capsys.readouterr().err
    assert "--grid tuned" in err and "--nfe 7" in err and "unipc at 10" in err
    assert main(["sample", *common, "--grid", "tuned", "--steps", "5", "--out", str(tmp_path / "v.png")]) == 1
    assert "needs --nfe" in capsys.readouterr().err
    from PIL import Image

    image = tmp_path / "in.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, "L").save(image)
    assert main(["roundtrip", str(image), "--solver", "unipc", "--grid", "tuned", "--nfe", "10"]) == 0
    assert "on the tuned grid" in capsys.readouterr().out


def test_the_roundtrip_report_shows_inputs_reconstructions_and_error_maps(capsys, tmp_path):
    assert main(["compare", "--task", "roundtrip", "--model", "digits", "--batch", "2", "--nfe", "4,8", "--solver",
                 "euler,dpmpp_2m", "--grid", "trailing", "--no-progress", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "compare.md").read_text()
    assert "](roundtrip.png)" in report and "](frontier.png)" in report
    rows = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert len(rows) == 4 and all(int(r["nfe"]) == int(r["encode_nfe"]) + int(r["decode_nfe"]) for r in rows)
    from PIL import Image

    with Image.open(tmp_path / "roundtrip.png") as img:
        assert img.format == "PNG" and img.height > img.width / 4
    assert main(["compare", "--task", "roundtrip", "--peers", "diffusers", "--batch", "2", "--no-progress",
                 "--out", str(tmp_path / "p")]) == 1
    assert "--peers applies to --task generate" in capsys.readouterr().err


@pytest.mark.parametrize("given", [{"noise": _noise(1)}, {"rtol": 5.0}, {"atol": 1e-3},
                                   {"reference_solver": "dopri5"}, {"calibration_noise": _noise(1)},
                                   {"tune_options": {"max_evals": 3}}, {"peers": ["diffusers"]}, {"keep_images": 2}])
def test_roundtrip_refuses_what_only_generation_uses(given):
    (name,) = given
    images = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"^{name}= does not apply to task='roundtrip'"):
        compare(_flow(), task="roundtrip", images=images, solvers=["euler"], grids=["trailing"], nfe=[2], **given)


@pytest.mark.parametrize(("peers_arg", "error", "match"), [
    ("torchdiffeq", ValueError, "unknown peer 'torchdiffeq'.*accepted: diffusers, k-diffusion"),
    ([], ValueError, "at least one peer"),
    ([3], TypeError, "names"),
    ({"keep_images": -1}, ValueError, "keep_images"),
])
def test_bad_peers_and_keep_images_are_named(peers_arg, error, match):
    kwargs = peers_arg if isinstance(peers_arg, dict) else {"peers": peers_arg}
    with pytest.raises(error, match=match):
        compare(_flow(), _noise(1), solvers=["euler"], grids=["trailing"], nfe=[2], **kwargs)


def test_compare_imports_tuning_and_tuning_does_not_register_itself():
    def imports(module: str) -> set[str]:
        tree = ast.parse((ROOT / "flowdiff" / "tools" / f"{module}.py").read_text())
        return {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1
                for alias in node.names} | {node.module for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom) and node.module}
    assert "tuning" in imports("compare")
    assert not {"compare", "flowdiff.tools.compare"} & imports("tuning")
    import flowdiff.tools.compare as compare_module

    assert not hasattr(compare_module, "GRID_PROVIDERS")


def test_the_device_defaults_to_the_gpu_when_torch_sees_one():
    from flowdiff.cli._parser import build_parser

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    for command in (["compare"], ["sample"], ["encode", "a.png"], ["roundtrip", "a.png"]):
        assert build_parser().parse_args(command).device == expected
    assert build_parser().parse_args(["sample", "--device", "cpu"]).device == "cpu"
