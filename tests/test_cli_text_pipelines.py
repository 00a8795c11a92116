"""The CLI on SD3, Flux and SDXL pipeline folders: prompts through their own text encoders, Flux's packed latents
through its VAE, for sample, encode, decode and roundtrip (tiny random pipelines saved here, no network)."""

import numpy as np
import pytest
import torch

import flowdiff
from flowdiff import cli
from flowdiff.cli import _prompt as cli_prompt

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from flowdiff.models import tiny_pipelines  # noqa: E402

BUILDERS = {"flux": tiny_pipelines.flux, "sd3": tiny_pipelines.stable_diffusion_3,
            "sdxl": tiny_pipelines.stable_diffusion_xl}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def pipeline_dir(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"cli_{request.param}")
    return request.param, str(BUILDERS[request.param](root)[1])


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return str(path)


def _png(path):
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_sample_with_a_prompt_is_the_guided_flow_through_the_vae(pipeline_dir, tmp_path):
    kind, path = pipeline_dir
    args = ["sample", "--model", path, "--num", "2", "--steps", "3", "--scale", "1"]
    assert cli.main([*args, "--prompt", "a cat", "--negative-prompt", "dog", "--guidance", "3",
                     "--out", str(tmp_path / "cat.png")]) == 0
    cat = _png(tmp_path / "cat.png")
    assert cat.shape == (17 + 1, 2 * 17 + 1, 3)  # a row of two decoded 16×16 images
    # the same from Python: the CLI's seeded noise in the flow's own (packed, for Flux) shape
    flow = flowdiff.from_diffusers(path)
    shape = (16, 16) if kind == "flux" else (4, 8, 8)
    assert flow.sample_shape == shape
    guided = flowdiff.classifier_free_guidance(flow, 3.0, unconditional_kwargs=flow.encode_prompt(["dog"]))
    noise = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    x = flowdiff.generate(guided, noise, steps=3, model_kwargs=flow.encode_prompt(["a cat"])).x
    cli.save_grid(flow.autoencoder.decode(x), tmp_path / "python.png")
    assert np.array_equal(_png(tmp_path / "python.png"), cat)
    # another prompt, and no prompt at all (the empty one, unguided), give other images
    assert cli.main([*args, "--prompt", "dog", "--out", str(tmp_path / "dog.png")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "none.png")]) == 0
    assert np.abs(cat.astype(int) - _png(tmp_path / "dog.png").astype(int)).max() > 0
    assert np.abs(_png(tmp_path / "none.png").astype(int) - _png(tmp_path / "dog.png").astype(int)).max() > 0


def test_encode_decode_return_the_autoencoders_reconstruction(pipeline_dir, image_file, tmp_path, capsys):
    _, path = pipeline_dir
    latents = str(tmp_path / "l.safetensors")
    common = ["--model", path, "--solver", "reversible_heun", "--steps", "3"]
    assert cli.main(["encode", image_file, *common, "--prompt", "a cat", "--guidance", "2", "--out", latents]) == 0
    assert flowdiff.Latent.load(latents).info["prompt"]["prompt"] == "a cat"
    assert cli.main(["decode", latents, "--model", path, "--out", str(tmp_path / "dec")]) == 0  # the recorded prompt
    loaded = cli.load_model(path)
    images = cli.read_images([image_file], cli_prompt.image_shape(loaded)).float()
    assert images.shape == (1, 3, 16, 16)
    own = cli_prompt.to_images(loaded, cli_prompt.to_latents(loaded, images))
    cli.save_images(own, tmp_path / "own", ["own.png"])
    assert np.array_equal(_png(tmp_path / "dec" / "a.png"), _png(tmp_path / "own" / "own.png"))
    capsys.readouterr()
    assert cli.main(["roundtrip", image_file, *common, "--prompt", "a cat"]) == 0
    assert "autoencoder's own reconstruction: max_abs_error 0.000e+00" in capsys.readouterr().out
    assert cli.main(["decode", latents, "--model", path, "--prompt", "dog", "--guidance", "2",
                     "--out", str(tmp_path / "dec2")]) == 1
    assert "encoded with prompt 'a cat'" in capsys.readouterr().err


def test_flux_transformer_alone_is_refused_by_the_cli(pipeline_dir, capsys):
    kind, path = pipeline_dir
    if kind != "flux":
        pytest.skip("Flux only")
    from pathlib import Path

    assert cli.main(["sample", "--model", str(Path(path) / "transformer"), "--num", "1", "--steps", "2"]) == 1
    assert "without its pipeline's VAE" in capsys.readouterr().err


def test_embedded_guidance_is_flux_dev_style_guidance_scale(pipeline_dir, tmp_path, capsys):
    kind, path = pipeline_dir
    args = ["sample", "--model", path, "--num", "1", "--steps", "2", "--scale", "1", "--prompt", "a cat"]
    if kind != "flux":  # SD3 has no guidance embedding: refused by name
        assert cli.main([*args, "--embedded-guidance", "2", "--out", str(tmp_path / "x.png")]) == 2
        assert "no guidance embedding" in capsys.readouterr().err
        return
    assert cli.main([*args, "--embedded-guidance", "1.5", "--out", str(tmp_path / "g.png")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "default.png")]) == 0
    flow = flowdiff.from_diffusers(path)
    flow.prompt_encoder.embedded_guidance = 1.5
    assert torch.equal(flow.encode_prompt(["a cat"])["guidance"], torch.tensor([1.5]))
    noise = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    x = flowdiff.generate(flow, noise, steps=2, model_kwargs=flow.encode_prompt(["a cat"])).x
    cli.save_grid(flow.autoencoder.decode(x), tmp_path / "python.png")
    assert np.array_equal(_png(tmp_path / "python.png"), _png(tmp_path / "g.png"))
    assert not np.array_equal(_png(tmp_path / "default.png"), _png(tmp_path / "g.png"))
    assert cli.main(["sample", "--model", path, "--embedded-guidance", "2", "--num", "1", "--steps", "2"]) == 2
    assert "need --prompt" in capsys.readouterr().err
