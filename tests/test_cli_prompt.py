"""The CLI on a latent text-to-image pipeline: --prompt/--negative-prompt/--guidance, images through the autoencoder."""

import numpy as np
import pytest
import torch

from flowdiff import cli
from flowdiff.cli import _prompt as cli_prompt
from flowdiff.cli._commands import fingerprint

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from flowdiff.models.tiny_pipelines import stable_diffusion as build_sd  # noqa: E402


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return str(build_sd(tmp_path_factory.mktemp("cli_sd"))[1])


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "a.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return str(path)


def _png(path):
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_sample_with_a_prompt_is_the_guided_flow(sd_dir, tmp_path, capsys):
    args = ["sample", "--model", sd_dir, "--num", "2", "--steps", "3", "--grid", "leading", "--scale", "1"]
    assert cli.main([*args, "--prompt", "a cat", "--negative-prompt", "dog", "--out", str(tmp_path / "cat.png")]) == 0
    assert cli.main([*args, "--prompt", "dog", "--out", str(tmp_path / "dog.png")]) == 0
    cat, dog = _png(tmp_path / "cat.png"), _png(tmp_path / "dog.png")
    assert cat.shape == (17 + 1, 2 * 17 + 1, 3)  # a row of two 16×16 images: decoded, not 8×8 latents
    assert np.abs(cat.astype(int) - dog.astype(int)).max() > 0  # the prompt reached the UNet

    # the same thing from Python: seeded noise, the guided flow, the autoencoder's decoder
    import flowdiff

    flow = flowdiff.from_diffusers(sd_dir)
    guided = flowdiff.classifier_free_guidance(flow, 7.5, unconditional_kwargs=flow.encode_prompt(["dog"]))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    x = flowdiff.generate(guided, noise, steps=3, grid="leading", model_kwargs=flow.encode_prompt(["a cat"])).x
    cli.save_grid(flow.autoencoder.decode(x), tmp_path / "python.png")
    assert np.array_equal(_png(tmp_path / "python.png"), cat)


def test_encode_decode_retrace_the_prompt_and_return_the_autoencoders_reconstruction(sd_dir, image_file, tmp_path,
                                                                                     capsys):
    latents = str(tmp_path / "l.safetensors")
    common = ["--model", sd_dir, "--solver", "reversible_heun", "--steps", "4"]
    assert cli.main(["encode", image_file, *common, "--prompt", "a cat", "--guidance", "3", "--out", latents]) == 0
    import flowdiff

    record = flowdiff.Latent.load(latents).info["prompt"]  # the latents file keeps the prompt it was made with
    assert record["prompt"] == "a cat" and record["guidance"] == 3.0
    # decode takes the prompt from the latents' record
    assert cli.main(["decode", latents, "--model", sd_dir, "--out", str(tmp_path / "dec")]) == 0
    decoded = _png(tmp_path / "dec" / "a.png")  # the name the image was encoded from
    loaded = cli.load_model(sd_dir)
    images = cli.read_images([image_file], cli_prompt.image_shape(loaded)).float()
    own = cli_prompt.to_images(loaded, cli_prompt.to_latents(loaded, images))  # the VAE's own reconstruction
    cli.save_images(own, tmp_path / "own", ["own.png"])
    assert np.array_equal(decoded, _png(tmp_path / "own" / "own.png"))
    # another prompt is another ODE: decoding these latents with it is refused
    assert cli.main(["decode", latents, "--model", sd_dir, "--prompt", "dog", "--guidance", "3",
                     "--out", str(tmp_path / "dec2")]) == 1
    assert "encoded with prompt 'a cat'" in capsys.readouterr().err


def test_roundtrip_and_errors(sd_dir, image_file, capsys):
    assert cli.main(["roundtrip", image_file, "--model", sd_dir, "--prompt", "a cat", "--solver", "reversible_heun",
                     "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "psnr_db" in out and "autoencoder's own reconstruction: max_abs_error 0.000e+00" in out
    assert cli.main(["sample", "--prompt", "a cat", "--num", "1", "--steps", "2"]) == 2  # digits: no text encoder
    assert "no text encoder" in capsys.readouterr().err
    assert cli.main(["sample", "--model", sd_dir, "--guidance", "2", "--num", "1", "--steps", "2"]) == 2
    assert "need --prompt" in capsys.readouterr().err


def test_compare_keys_its_reference_on_the_prompt_and_guidance(sd_dir):
    """compare keeps its float64 reference on disk under the model's fingerprint: prompts must be part of it."""
    import argparse

    def key(prompt, negative=None, w=None):
        args = argparse.Namespace(prompt=prompt, negative_prompt=negative, guidance=w)
        return fingerprint(cli_prompt.condition(cli.load_model(sd_dir), args))

    same = key("a cat")
    assert key("a cat") == same
    assert len({same, key("dog"), key("a cat", "dog"), key("a cat", None, 3.0), key("a cat", None, 1.0)}) == 5
