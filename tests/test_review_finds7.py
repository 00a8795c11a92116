"""The open finds of reviews R22 and R23, each reproduced and fixed here.

1. A guided DiT with ``class_labels=torch.tensor(3)`` (0-d, accepted as one label for all) and null label
   ``torch.tensor(1000)`` ran its two branches as two calls, while the ``(1,)`` spelling of the same request paired
   them into one: the results differed in their last digits. A 0-d label of a model with a label table pairs now.
4. ``flowdiff sample --grid karras`` (or logsnr) on a zero-terminal-SNR model advised the Python
   ``grid_options={'sigma_max': ...}``, which no flag spells, with status 1: it is a usage error naming the grids
   the command line has that run there (trailing or leading; leading alone for an epsilon model, and for an encode,
   whose default trailing grid also printed Python advice, grid=grid[1:]).
2. A UNet2DConditionModel with ``num_class_embeds`` needs a prompt and a class label together, which the command line
   refused together ("not both"), and each alone failed later: it is refused at load by name, with the Python call
   that runs it (which does, and differs by label).
3. A UNet with ``class_embed_type`` "timestep" or "identity" has no label table: ``--class-label`` was refused as
   "takes no class labels" and without it the network asked for ``class_labels`` (a bare error from inside it). It is
   refused at load, naming its class_embed_type and the Python call.
5. A ``Stochastic`` generate under a user's ``torch.func.vmap`` right around a ``jvp`` over an ensemble (weights
   stacked and closed over by the model) stopped inside torch: with the checks on, ".item()" on a mapped tensor;
   drawing its step noise, "called random operation while in randomness error mode" (jacfwd of one model too).
   Both are refused by name now; with the checks off and ``step_noise`` given it runs, equal to the members' loop.
"""

from __future__ import annotations

import pytest
import torch
from _ensemble import TinyNet

import flowdiff as fd
from flowdiff import cli
from flowdiff.models import tiny_pipelines


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return tiny_pipelines.dit(tmp_path_factory.mktemp("finds7_dit"))[1]


@pytest.mark.parametrize("batch", [True, False])
def test_every_spelling_of_one_guided_dit_label_gives_the_same_result_bit_for_bit(dit, batch):
    flow = fd.from_diffusers(dit)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    results = []
    for label, null in [(torch.tensor(3), torch.tensor(1000)), (torch.tensor([3]), torch.tensor([1000])),
                        (torch.tensor([3] * 3), torch.tensor([1000] * 3)), (torch.tensor(3), torch.tensor([1000])),
                        (torch.tensor([3] * 3), torch.tensor(1000))]:
        guided = fd.classifier_free_guidance(flow, 4.0, unconditional_kwargs={"class_labels": null}, batch=batch)
        results.append(fd.generate(guided, noise, steps=3, model_kwargs={"class_labels": label}).x)
    assert all(torch.equal(r, results[0]) for r in results[1:])
    plain = [fd.generate(flow, noise, steps=3, model_kwargs={"class_labels": label}).x
             for label in (torch.tensor(3), torch.tensor([3]), torch.tensor([3] * 3))]
    assert all(torch.equal(p, plain[0]) for p in plain[1:])  # unguided, the spellings agree too
    assert not torch.equal(results[0], plain[0])


def test_a_guided_dit_pairs_a_0d_label_into_one_call(dit):
    flow = fd.from_diffusers(dit)
    calls = []
    hook = flow.model.net.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape[0]),
                                                    with_kwargs=True)
    try:
        guided = fd.classifier_free_guidance(flow, 4.0, unconditional_kwargs={"class_labels": torch.tensor(1000)})
        fd.generate(guided, torch.randn(2, 4, 8, 8), steps=2, model_kwargs={"class_labels": torch.tensor(3)})
    finally:
        hook.remove()
    assert calls == [4, 4]


def _zero_snr_unet(root, prediction):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                          down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                          norm_num_groups=4).save_pretrained(root / "unet")
    diffusers.DDIMScheduler(rescale_betas_zero_snr=True, prediction_type=prediction, timestep_spacing="trailing",
                            clip_sample=False).save_pretrained(root / "scheduler")
    return str(root / "unet")


@pytest.mark.parametrize(("prediction", "advice"), [("v_prediction", "trailing"), ("epsilon", "leading")])
@pytest.mark.parametrize("grid", ["karras", "logsnr"])
def test_cli_sigma_range_grid_on_a_zero_snr_model_is_a_usage_error_naming_cli_grids(tmp_path, capsys, prediction,
                                                                                     advice, grid):
    model = _zero_snr_unet(tmp_path, prediction)
    common = ["sample", "--model", model, "--num", "2", "--steps", "3", "--device", "cpu"]
    out = tmp_path / "x.png"
    assert cli.main([*common, "--grid", grid, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--grid {grid} with --model {model!r}" in err and "σ_max is ∞" in err
    assert f"give --grid {advice}" in err and "grid_options" not in err and not out.exists()
    assert ("--grid trailing" in err) == (prediction != "epsilon")
    assert cli.main([*common, "--grid", advice, "--out", str(out)]) == 0 and out.exists()


@pytest.mark.parametrize("grid", ["karras", "trailing"])
def test_cli_encode_on_a_zero_snr_model_names_the_grid_that_ends_finite(tmp_path, capsys, grid):
    from PIL import Image

    model = _zero_snr_unet(tmp_path, "v_prediction")
    Image.fromarray(torch.zeros(8, 8, dtype=torch.uint8).numpy(), mode="L").save(tmp_path / "a.png")
    common = ["encode", str(tmp_path / "a.png"), "--model", model, "--steps", "3", "--device", "cpu"]
    out = tmp_path / "l.safetensors"
    assert cli.main([*common, "--grid", grid, "--out", str(out)]) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert f"--grid {grid} with --model {model!r}" in err and "give --grid leading, whose last σ is finite" in err
    assert "grid_options" not in err and "grid[1:]" not in err and "--grid trailing or" not in err
    assert cli.main([*common, "--grid", "leading", "--out", str(out)]) == 0 and out.exists()


OFF = fd.Checks(finite=False, growth=None)


_Net = TinyNet


def _ensemble_jvp(spec, checks):
    nets = [_Net(k) for k in range(3)]
    params, buffers = torch.func.stack_module_state(nets)
    shell = _Net(99)
    noise = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    tangent = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def one(p, b):
        flow = fd.ProbabilityFlow(lambda x, t: torch.func.functional_call(shell, (p, b), (x, t)), fd.Schedule.linear())
        return torch.func.jvp(lambda x: fd.generate(flow, x, solver=spec, steps=3, checks=checks).x,
                              (noise,), (tangent,))
    return nets, shell, noise, tangent, lambda: torch.func.vmap(one)(params, buffers)


_STEP_NOISE = torch.randn(3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("spec", [fd.Stochastic(eta=1.0, generator=0), fd.Stochastic(eta=0.5, step_noise=_STEP_NOISE),
                                  fd.Stochastic(eta=0.0)])
def test_a_stochastic_solve_under_vmap_around_a_jvp_over_an_ensemble_with_the_checks_on_is_refused_by_name(spec):
    _, shell, _, _, run = _ensemble_jvp(spec, None)
    with pytest.raises(ValueError, match=r"generate\(solver=flowdiff\.Stochastic\(\.\.\.\)\) under torch\.func\.vmap "
                                         r"around a jvp.*give checks=flowdiff\.Checks\(finite=False, growth=None\)"):
        run()
    assert shell.calls == 1  # at the first evaluation


def test_a_stochastic_solve_drawing_under_vmap_around_a_jvp_is_refused_naming_step_noise():
    _, shell, _, _, run = _ensemble_jvp(fd.Stochastic(eta=1.0, generator=0), OFF)
    with pytest.raises(ValueError, match=r"draws its step noise from its generator.*Stochastic\(step_noise=\.\.\.\)"):
        run()
    flow = fd.ProbabilityFlow(_Net(0), fd.Schedule.linear())
    noise = torch.randn(1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match=r"draws its step noise from torch's global generator \(no generator=\)"):
        torch.func.jacfwd(lambda n: fd.generate(flow, n, solver=fd.Stochastic(eta=1.0), steps=3).x)(noise)


def test_a_stochastic_solve_with_step_noise_under_vmap_around_a_jvp_runs_equal_to_the_members_loop():
    spec = fd.Stochastic(eta=0.5, step_noise=_STEP_NOISE)
    nets, _, noise, tangent, run = _ensemble_jvp(spec, OFF)
    primals, tangents = run()
    for i, net in enumerate(nets):
        want = torch.func.jvp(lambda x, net=net: fd.generate(fd.ProbabilityFlow(net, fd.Schedule.linear()), x,
                                                             solver=spec, steps=3).x, (noise,), (tangent,))
        torch.testing.assert_close(primals[i], want[0], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(tangents[i], want[1], rtol=1e-12, atol=1e-13)
    assert not torch.allclose(primals[0], fd.generate(fd.ProbabilityFlow(nets[0], fd.Schedule.linear()), noise,
                                                      solver=fd.Stochastic(eta=0.0), steps=3).x)


def _sd_with_class_table(root):
    diffusers = pytest.importorskip("diffusers")
    pipe, _ = tiny_pipelines.stable_diffusion(root)
    torch.manual_seed(1)
    pipe.unet = diffusers.UNet2DConditionModel(**{**pipe.unet.config, "num_class_embeds": 5})
    pipe.save_pretrained(root / "sd_classes")
    return str(root / "sd_classes")


def test_cli_refuses_a_text_unet_with_a_class_table_at_load_naming_the_python_call(tmp_path, capsys):
    model = _sd_with_class_table(tmp_path)
    common = ["sample", "--model", model, "--num", "1", "--steps", "2", "--device", "cpu"]
    for extra in (["--prompt", "a cat"], ["--class-label", "2"], ["--prompt", "a cat", "--class-label", "2"]):
        out = tmp_path / "x.png"
        assert cli.main([*common, *extra, "--out", str(out)]) == 1 and not out.exists()
        err = capsys.readouterr().err
        assert f"--model {model!r}: this UNet2DConditionModel needs a prompt's text conditioning and a class" in err
        assert "num_class_embeds=5" in err and "'class_labels': torch.tensor([N])" in err
    flow = fd.from_diffusers(model)  # the advised call runs, and the label conditions it
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a, b = (fd.generate(flow, noise, steps=2, model_kwargs={**flow.encode_prompt(["a cat"]),
                                                            "class_labels": torch.tensor([n])}).x for n in (1, 2))
    assert torch.isfinite(a).all() and not torch.equal(a, b)


@pytest.mark.parametrize("kind", ["timestep", "identity"])
def test_cli_refuses_a_unet_with_a_class_embedding_but_no_table_at_load_by_name(tmp_path, capsys, kind):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                          down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                          norm_num_groups=4, class_embed_type=kind).save_pretrained(tmp_path / "unet")
    diffusers.DDIMScheduler(clip_sample=False).save_pretrained(tmp_path / "scheduler")
    model = str(tmp_path / "unet")
    common = ["sample", "--model", model, "--num", "2", "--steps", "2", "--device", "cpu"]
    for extra in ([], ["--class-label", "3"]):
        out = tmp_path / "x.png"
        assert cli.main([*common, *extra, "--out", str(out)]) == 1 and not out.exists()
        err = capsys.readouterr().err
        assert f"--model {model!r}: this UNet2DModel takes class_labels through its class_embed_type={kind!r}" in err
        assert "model_kwargs={'class_labels': labels}" in err and "takes no class labels" not in err
    flow = fd.from_diffusers(model)  # the advised call runs
    net = flow.model.net
    labels = torch.tensor([3, 7]) if kind == "timestep" else torch.randn(2, net.time_embedding.linear_2.out_features)
    x = fd.generate(flow, torch.randn(2, 1, 8, 8), steps=2, model_kwargs={"class_labels": labels}).x
    assert torch.isfinite(x).all()
