"""The second new-user sweep: what the first left, and what varying each command's flags found next.

Each test here failed before its fix: an option silently ignored, a file written under a name that says another
kind, an error naming a Python keyword where the user typed a flag, a model output silently converted.
"""

import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_runs import one_line, write_digits
from _cli_runs import run_in as run

import flowdiff
import solvers
from flowdiff.models.analytic import Gaussian

# -- likelihood --dequantization none --dequantize K -----------------------------------------------------

def test_likelihood_refuses_dequantize_levels_without_dequantization(tmp_path, capsys):
    """--dequantization none adds no noise: --dequantize 256 beside it was silently ignored."""
    (png,) = write_digits(tmp_path, 1)
    code, out, err = run(capsys, ["likelihood", png, "--dequantization", "none", "--dequantize", "256",
                                  "--steps", "2"], tmp_path)
    assert code != 0 and out == ""
    line = one_line(err)
    assert "--dequantize 256" in line and "--dequantization none" in line


def test_likelihood_without_dequantize_still_dequantizes_to_256_levels(tmp_path, capsys):
    (png,) = write_digits(tmp_path, 1)
    code, out, err = run(capsys, ["likelihood", png, "--steps", "2"], tmp_path)
    assert code == 0, err
    assert "dequantization to 256 levels" in out


# -- encode --out x.png ------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["encode", "--out", "x.png"], ["roundtrip", "--latents", "x.PNG"]])
def test_latents_output_with_an_image_name_is_refused(tmp_path, capsys, argv):
    """`encode --out x.png` wrote a safetensors file under a .png name (no viewer opens it; decode reads it)."""
    (png,) = write_digits(tmp_path, 1)
    code, out, err = run(capsys, [argv[0], png, *argv[1:], "--steps", "2"], tmp_path)
    assert code == 2 and out == ""
    line = one_line(err)
    assert f"{argv[1]} '{argv[2]}'" in line and ".safetensors" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d0.png"]


# -- CLI errors name the flags, not the Python keywords they become ----------------------------------------

@pytest.mark.parametrize("argv, flag", [
    (["sample", "--nfe", "2000", "--out", "s.png"], "--nfe 2000"),
    (["sample", "--steps", "2000", "--out", "s.png"], "--steps 2000"),
    (["encode", "{png}", "--steps", "2000", "--out", "l.safetensors"], "--steps 2000"),
    (["roundtrip", "{png}", "--solver", "heun", "--nfe", "1"], "--nfe 1"),
    (["likelihood", "{png}", "--solver", "heun"], "--steps N"),
    (["likelihood", "{png}", "--dequantize", "3"], "--dequantize 3"),
])
def test_cli_errors_name_the_flag_not_the_keyword(tmp_path, capsys, argv, flag):
    """`sample --nfe 2000` said "steps=2000 exceeds ...", `likelihood --dequantize 3` "dequantize=3: ..."."""
    (png,) = write_digits(tmp_path, 1)
    code, out, err = run(capsys, [str(png) if a == "{png}" else a for a in argv], tmp_path)
    assert code != 0 and out == ""
    line = one_line(err)
    assert flag in line
    assert not re.search(r"\b(steps|nfe|dequantize|dequantization)=", line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d0.png"]


# -- a model whose output is no floating-point tensor ----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
@pytest.mark.parametrize("kind", ["model", "sigma_field"])
def test_a_model_returning_integers_is_refused_naming_the_dtype(kind, dtype):
    """A model returning an int64 (a rounded ε) or bool tensor was silently cast to the state's float dtype."""
    def out(x):
        return torch.round(x).to(dtype)

    if kind == "model":
        flow = flowdiff.ProbabilityFlow(lambda x, t: out(x), flowdiff.Schedule.linear())
    else:
        flow = flowdiff.ProbabilityFlow.from_sigma_field(lambda x, sigma: out(x), flowdiff.Schedule.linear())
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(solvers.SolveError, match=rf"step 0 .*returned a tensor of dtype {name} at σ=.*floating-point"):
        flowdiff.generate(flow, torch.randn(2, 3), solver="euler", steps=2)


def test_a_model_returning_integers_at_infinite_sigma_is_refused():
    flow = flowdiff.ProbabilityFlow(lambda x, t: torch.zeros_like(x, dtype=torch.int32), flowdiff.Schedule.linear(),
                                    prediction_type="v_prediction")
    with pytest.raises(TypeError, match="dtype int32 at σ = ∞"):
        flow.step_from_noise(torch.randn(2, 3), 10.0)


# -- flow_fingerprint of model_kwargs holding an arbitrary object ------------------------------------------

class _Conditioning:
    pass


def test_fingerprint_refuses_model_kwargs_whose_digest_is_an_address():
    """repr() of a plain object names its address: the fingerprint changed between runs, so a tuned grid saved with
    such kwargs never matched again. Refused, naming the key and the accepted types."""
    flow = Gaussian(torch.zeros(3), 0.5).flow()
    with pytest.raises(TypeError, match=r"model_kwargs\['extra'\]\['hook'\] is a _Conditioning.*tensors, numbers"):
        flowdiff.flow_fingerprint(flow, {"extra": {"hook": _Conditioning()}})
    kwargs = {"scale": 0.5, "labels": torch.arange(2), "mode": "x", "n": np.int64(3), "opts": [None, True]}
    assert flowdiff.flow_fingerprint(flow, kwargs) == flowdiff.flow_fingerprint(flow, dict(kwargs))
    assert flowdiff.flow_fingerprint(flow, kwargs) != flowdiff.flow_fingerprint(flow, {**kwargs, "scale": 0.25})


# -- examples/reconstruction.py --images nodir ----------------------------------------------------------

def test_reconstruction_example_refuses_a_missing_folder_in_one_line(tmp_path, capsys):
    """It ended in a FileNotFoundError traceback from Path.iterdir."""
    example = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "reconstruction.py"))
    with pytest.raises(SystemExit) as exit_:
        example["main"](["--images", str(tmp_path / "nodir"), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--images" in err and "nodir" in err and "no such folder" in err and "Traceback" not in err


# -- file names with a newline or an escape in folder runs ---------------------------------------------------

@pytest.mark.parametrize("command", ["roundtrip", "encode"])
def test_folder_runs_print_control_characters_in_names_escaped(tmp_path, capsys, command):
    """A file named "a\\nb.png" broke the printed lines in two ("worst: a" / "b.png (mse ...)"), and an escape
    character in a name reached the terminal. The lines print them escaped (\\n, \\x1b); the files keep the names."""
    (tmp_path / "d").mkdir()
    paths = write_digits(tmp_path / "d", 2)
    paths[0].rename(tmp_path / "d" / "a\nb.png")
    paths[1].rename(tmp_path / "d" / "e\x1bf.png")
    (tmp_path / "d" / "n\not.txt").write_text("not an image")
    code, out, err = run(capsys, [command, "--data", "d", "--out", "r", "--steps", "2"], tmp_path)
    assert code == 0, err
    assert "\x1b" not in out
    lines = out.splitlines()
    assert any(r"n\not.txt" in line for line in lines)
    assert not any(line.startswith(("b.png", "f.png", "ot.txt")) for line in lines), out
    # the worst round trip, or the latent with the largest std, is one of the two images, named escaped
    assert any(r"a\nb.png" in line or r"e\x1bf.png" in line for line in lines), out
    assert (tmp_path / "r" / "results.csv").is_file()
