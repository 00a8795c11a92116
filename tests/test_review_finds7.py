"""The open finds of reviews R22 and R23, each reproduced and fixed here.

1. A guided DiT with ``class_labels=torch.tensor(3)`` (0-d, accepted as one label for all) and null label
   ``torch.tensor(1000)`` ran its two branches as two calls, while the ``(1,)`` spelling of the same request paired
   them into one: the results differed in their last digits. A 0-d label of a model with a label table pairs now.
4. ``flowdiff sample --grid karras`` (or logsnr) on a zero-terminal-SNR model advised the Python
   ``grid_options={'sigma_max': ...}``, which no flag spells, with status 1: it is a usage error naming the grids
   the command line has that run there (trailing or leading; leading alone for an epsilon model).
"""

from __future__ import annotations

import pytest
import torch

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
    assert not torch.equal(results[0], fd.generate(flow, noise, steps=3,
                                                   model_kwargs={"class_labels": torch.tensor(3)}).x)


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
