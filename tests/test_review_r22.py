"""Review R22 of S9's, S10's and F6's merges: each test failed on main before its fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flowdiff
from flowdiff import cli
from flowdiff.cli import _prompt


def _png(path):
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img)


@pytest.fixture
def digit_files(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"d{i}.png")
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(paths[-1])
    return [str(p) for p in paths]


def test_latents_recorded_with_guidance_0_still_decode_as_they_were_encoded(digit_files, tmp_path, monkeypatch,
                                                                            capsys):
    """`--guidance 0` became a usage error (S9), and the check also ran on a decode's record: latents that an
    earlier flowdiff wrote with `--class-label 7 --guidance 0` were refused naming a `--guidance 0` nobody gave, and
    giving the record's values again was refused too, so they could not be decoded at all. The record is followed."""
    latents = str(tmp_path / "l.safetensors")
    with monkeypatch.context() as m:  # the flowdiff that wrote them: guidance 0 not yet refused
        m.setattr(_prompt, "_refuse_zero_guidance", lambda *args: None)
        assert cli.main(["encode", *digit_files, "--steps", "4", "--device", "cpu", "--class-label", "7",
                         "--guidance", "0", "--out", latents]) == 0
    latent = flowdiff.Latent.load(latents)
    assert latent.info["class_label"] == {"class_label": 7, "guidance": 0.0}
    capsys.readouterr()
    assert cli.main(["decode", latents, "--out", str(tmp_path / "dec"), "--device", "cpu"]) == 0, \
        capsys.readouterr().err
    flow = flowdiff.pretrained("digits")
    guided = flowdiff.classifier_free_guidance(flow, 0.0)
    with torch.no_grad():
        dec = flowdiff.decode(guided, latent, model_kwargs={"class_labels": torch.full((2,), 7)}).x
    cli.save_images(dec, tmp_path / "py", ["d0.png", "d1.png"])
    for name in ("d0.png", "d1.png"):
        assert np.array_equal(_png(tmp_path / "dec" / name), _png(tmp_path / "py" / name))
    # given now, guidance 0 is still the usage error S9 made it
    assert cli.main(["encode", *digit_files, "--steps", "4", "--device", "cpu", "--class-label", "7",
                     "--guidance", "0", "--out", str(tmp_path / "again.safetensors")]) == 2
    assert "--guidance 0 with --class-label 7" in capsys.readouterr().err


def test_latents_recorded_with_a_prompt_and_guidance_0_still_decode(tmp_path, monkeypatch, capsys):
    """The same for a prompt's record: an SD pipeline's latents encoded with `--prompt 'a cat' --guidance 0` by an
    earlier flowdiff decode with that record, equal to the decode with `--guidance 0` not refused."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from PIL import Image

    from flowdiff.models.tiny_pipelines import stable_diffusion

    sd_dir = str(stable_diffusion(tmp_path / "sd")[1])
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(image)
    common = ["--model", sd_dir, "--steps", "3"]
    latents = str(tmp_path / "l.safetensors")
    with monkeypatch.context() as m:  # the flowdiff that wrote them: guidance 0 not yet refused
        m.setattr(_prompt, "_refuse_zero_guidance", lambda *args: None)
        assert cli.main(["encode", str(image), *common, "--prompt", "a cat", "--guidance", "0", "--out",
                         latents]) == 0
        assert cli.main(["decode", latents, "--model", sd_dir, "--out", str(tmp_path / "then")]) == 0
    assert flowdiff.Latent.load(latents).info["prompt"]["guidance"] == 0.0
    capsys.readouterr()
    assert cli.main(["decode", latents, "--model", sd_dir, "--out", str(tmp_path / "now")]) == 0, \
        capsys.readouterr().err
    assert np.array_equal(_png(tmp_path / "now" / "a.png"), _png(tmp_path / "then" / "a.png"))
    assert cli.main(["encode", str(image), *common, "--prompt", "a cat", "--guidance", "0", "--out",
                     str(tmp_path / "again.safetensors")]) == 2
    assert "--guidance 0 with --prompt 'a cat'" in capsys.readouterr().err


def test_round_trip_order_refuses_reversible_heun_on_the_shipped_model_in_float64():
    """S10 made round_trip_order refuse rounding-level errors, with a floor of 64 epsilons whatever the steps; on the
    shipped digits model reversible Heun's float64 round trip comes back within ~20 ulps per step (2.9e-14 at 4
    steps … 1.4e-13 at 32, growing), above that floor, and it returned an "order" of about −0.8. Rounding adds up
    over the steps: the floor is per step. Euler's genuine first order on the same model and images still fits."""
    from flowdiff.tools import testing as ft

    flow = flowdiff.pretrained("digits")
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    with pytest.raises(ValueError, match="exact round trip"):
        ft.round_trip_order(flow, images, [4, 8, 16, 32], solver="reversible_heun")
    order, errors = ft.round_trip_order(flow, images, [8, 16, 32], solver="euler")
    assert errors[0] > errors[1] > errors[2] and order > 0.5


@pytest.mark.parametrize("function", ["sample_like", "encode_like"])
def test_sample_like_and_encode_like_refuse_nfe_naming_steps(function):
    """S9 made sample_like/encode_like refuse grid=, adaptive= (and encode_like's solver=) naming the scheduler's own
    loop; nfe= still reached generate/encode beside the scheduler's grid and was refused as "nfe=5 beside
    grid=explicit σ", a grid the caller never gave. It is refused like the others, before any evaluation."""
    pytest.importorskip("diffusers")
    calls = []
    flow = flowdiff.pretrained("digits")
    flow = flow.with_model(lambda x, t, **kw: calls.append(t) or flow.model(x, t, **kw))
    flow.scheduler_config = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000,
                             "beta_schedule": "linear", "timestep_spacing": "leading", "steps_offset": 1,
                             "set_alpha_to_one": False, "clip_sample": False}
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(TypeError, match=rf"{function} takes no nfe=: it runs the scheduler's own loop \(its step "
                                        r"count is steps=, the (pipeline|inversion)'s num_inference_steps\)"):
        getattr(flowdiff, function)(flow, x, steps=3, nfe=5)
    assert calls == []


def test_encode_negative_prompt_refuses_n_beside_the_prompts(tmp_path):
    """`encode_negative_prompt(["x", "y", "z"], n=2)` ignored n and returned a batch of 3 (refused later, at the
    network, as a batch of 3 for 2 samples); n beside the prompts is refused naming both, and without prompts it
    still gives n empty prompts."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from flowdiff.models.tiny_pipelines import stable_diffusion

    flow = flowdiff.from_diffusers(stable_diffusion(tmp_path / "sd")[1])
    with pytest.raises(TypeError, match=r"takes n= \(default 1\) without negative_prompts only: .*negative_prompts="
                                        r"\['x', 'y', 'z'\]; got n=2"):
        flow.encode_negative_prompt(["x", "y", "z"], n=2)
    assert torch.equal(flow.encode_negative_prompt(["x", "y"])["encoder_hidden_states"],
                       flow.encode_prompt(["x", "y"])["encoder_hidden_states"])
    assert flow.encode_negative_prompt(n=3)["encoder_hidden_states"].shape[0] == 3
    assert flow.encode_negative_prompt()["encoder_hidden_states"].shape[0] == 1


def test_cli_sample_of_an_epsilon_model_from_infinity_is_a_usage_error_naming_a_cli_grid(tmp_path, capsys):
    """F6 refused an epsilon model on a grid from σ = ∞ before the solve, advising `grid=grid[1:]`; the command line
    printed that Python advice (which no flag spells) with status 1. It is a usage error (status 2) naming the
    flags and `--grid leading`, whose first σ is finite, and that advice runs."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                          down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                          norm_num_groups=4).save_pretrained(tmp_path / "unet")
    diffusers.DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="epsilon", timestep_spacing="trailing",
                            clip_sample=False).save_pretrained(tmp_path / "scheduler")
    model = str(tmp_path / "unet")
    common = ["sample", "--model", model, "--num", "2", "--steps", "3", "--device", "cpu"]
    out = tmp_path / "x.png"
    assert cli.main([*common, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--grid trailing with --model {model!r}: prediction_type 'epsilon'" in err and "σ_max = ∞" in err
    assert "give --grid leading" in err and "grid[1:]" not in err and not out.exists()
    assert cli.main([*common, "--grid", "leading", "--out", str(out)]) == 0 and out.exists()
