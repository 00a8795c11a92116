"""The command line on class-conditional models: ``--class-label N`` (and ``--guidance W`` with it).

Each run is checked against the same thing done from Python (seeded noise, ``model_kwargs={"class_labels": ...}``,
:func:`flowdiff.classifier_free_guidance`), on the shipped digits model and on a tiny random DiT pipeline.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flowdiff
from flowdiff import cli

pytest.importorskip("diffusers")
from flowdiff.models import tiny_pipelines  # noqa: E402


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return str(tiny_pipelines.dit(tmp_path_factory.mktemp("cli_dit"))[1])


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("digits")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(folder / f"d{i}.png")
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(paths[-1])
    return [str(p) for p in paths]


def _png(path):
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img)


def _noise(n, shape, seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def _labels(n, label):
    return {"class_labels": torch.full((n,), label, dtype=torch.long)}


def _python_grid(flow, x, path):
    autoencoder = getattr(flow, "autoencoder", None)
    images = x if autoencoder is None else autoencoder.decode(x)
    cli.save_grid(images, path)
    return _png(path)


def test_digits_sample_with_a_class_label_is_generate_with_those_labels(tmp_path, capsys):
    args = ["sample", "--num", "3", "--steps", "4", "--scale", "1", "--device", "cpu"]
    assert cli.main([*args, "--class-label", "7", "--out", str(tmp_path / "seven.png")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "none.png")]) == 0
    assert cli.main([*args, "--class-label", "7", "--guidance", "2", "--out", str(tmp_path / "guided.png")]) == 0
    flow = flowdiff.pretrained("digits")
    noise = _noise(3, (1, 8, 8))
    with torch.no_grad():
        seven = flowdiff.generate(flow, noise, steps=4, model_kwargs=_labels(3, 7)).x
        plain = flowdiff.generate(flow, noise, steps=4).x  # no class_labels: the digits model's null class
        guided = flowdiff.generate(flowdiff.classifier_free_guidance(flow, 2.0), noise, steps=4,
                                   model_kwargs=_labels(3, 7)).x
    assert np.array_equal(_png(tmp_path / "seven.png"), _python_grid(flow, seven, tmp_path / "p_seven.png"))
    assert np.array_equal(_png(tmp_path / "none.png"), _python_grid(flow, plain, tmp_path / "p_none.png"))
    assert np.array_equal(_png(tmp_path / "guided.png"), _python_grid(flow, guided, tmp_path / "p_guided.png"))
    assert not np.array_equal(_png(tmp_path / "seven.png"), _png(tmp_path / "none.png"))  # the label reached the net
    assert not np.array_equal(_png(tmp_path / "seven.png"), _png(tmp_path / "guided.png"))


def test_dit_sample_with_a_class_label_and_guidance_is_the_python_flow(dit_dir, tmp_path, capsys):
    args = ["sample", "--model", dit_dir, "--num", "2", "--steps", "3", "--scale", "1", "--device", "cpu"]
    assert cli.main([*args, "--class-label", "3", "--out", str(tmp_path / "three.png")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "null.png")]) == 0
    assert cli.main([*args, "--class-label", "3", "--guidance", "4", "--out", str(tmp_path / "guided.png")]) == 0
    flow = flowdiff.from_diffusers(dit_dir)
    null = flow.model.net.config.num_embeds_ada_norm  # DiT's null class: the index after the last class
    noise = _noise(2, flow.model.sample_shape)
    with torch.no_grad():
        three = flowdiff.generate(flow, noise, steps=3, model_kwargs=_labels(2, 3)).x
        plain = flowdiff.generate(flow, noise, steps=3, model_kwargs=_labels(2, null)).x
        guided_flow = flowdiff.classifier_free_guidance(flow, 4.0, unconditional_kwargs=_labels(2, null))
        guided = flowdiff.generate(guided_flow, noise, steps=3, model_kwargs=_labels(2, 3)).x
    assert np.array_equal(_png(tmp_path / "three.png"), _python_grid(flow, three, tmp_path / "p_three.png"))
    assert np.array_equal(_png(tmp_path / "null.png"), _python_grid(flow, plain, tmp_path / "p_null.png"))
    assert np.array_equal(_png(tmp_path / "guided.png"), _python_grid(flow, guided, tmp_path / "p_guided.png"))
    assert not np.array_equal(_png(tmp_path / "three.png"), _png(tmp_path / "null.png"))


def test_encode_records_the_label_and_decode_follows_it(digit_files, tmp_path, capsys):
    latents = str(tmp_path / "l.safetensors")
    common = ["--steps", "6", "--device", "cpu"]
    assert cli.main(["encode", *digit_files, *common, "--class-label", "7", "--guidance", "2", "--out", latents]) == 0
    latent = flowdiff.Latent.load(latents)
    assert latent.info["class_label"] == {"class_label": 7, "guidance": 2.0}
    flow = flowdiff.pretrained("digits")
    images = cli.read_images(digit_files, (1, 8, 8)).float()
    guided = flowdiff.classifier_free_guidance(flow, 2.0)
    with torch.no_grad():
        enc = flowdiff.encode(guided, images, steps=6, model_kwargs=_labels(2, 7))
        dec = flowdiff.decode(guided, enc.latent, model_kwargs=_labels(2, 7)).x
    assert torch.equal(latent.x, enc.latent.x)
    # decode without --class-label follows the record: the Python decode with label 7 and guidance 2
    assert cli.main(["decode", latents, "--out", str(tmp_path / "dec"), "--device", "cpu"]) == 0
    cli.save_images(dec, tmp_path / "py", ["d0.png", "d1.png"])
    for name in ("d0.png", "d1.png"):
        assert np.array_equal(_png(tmp_path / "dec" / name), _png(tmp_path / "py" / name))
    # the same label and guidance given again is the record; another label or none is refused by name
    assert cli.main(["decode", latents, "--class-label", "7", "--guidance", "2", "--out", str(tmp_path / "again"),
                     "--device", "cpu"]) == 0
    capsys.readouterr()
    for other in (["--class-label", "2", "--guidance", "2"], ["--class-label", "7"]):
        assert cli.main(["decode", latents, *other, "--out", str(tmp_path / "no"), "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert "encoded with --class-label 7 (guidance 2.0)" in err and other[1] in err
    assert not (tmp_path / "no").exists() or not any((tmp_path / "no").iterdir())
    # a record that holds no class index is refused by name, not fed to the network
    latent.info["class_label"] = {"class_label": "7", "guidance": 2.0}
    latent.save(tmp_path / "bad.safetensors")
    assert cli.main(["decode", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "bad"),
                     "--device", "cpu"]) == 1
    assert "class-label record" in capsys.readouterr().err


def test_roundtrip_and_unlabelled_latents_keep_their_record(digit_files, dit_dir, tmp_path, capsys):
    latents = str(tmp_path / "rt.safetensors")
    assert cli.main(["roundtrip", *digit_files, "--steps", "4", "--class-label", "3", "--latents", latents,
                     "--device", "cpu"]) == 0
    flow = flowdiff.pretrained("digits")
    images = cli.read_images(digit_files, (1, 8, 8)).float()
    with torch.no_grad():
        enc = flowdiff.encode(flow, images, steps=4, model_kwargs=_labels(2, 3))
    assert torch.equal(flowdiff.Latent.load(latents).x, enc.latent.x)
    # a DiT encoded without a label ran on its null class; that too is recorded and followed
    from PIL import Image

    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(rgb)
    dit_latents = str(tmp_path / "dit.safetensors")
    assert cli.main(["encode", str(rgb), "--model", dit_dir, "--steps", "3", "--out", dit_latents,
                     "--device", "cpu"]) == 0
    assert flowdiff.Latent.load(dit_latents).info["class_label"] == {"class_label": None, "guidance": 1.0}
    assert cli.main(["decode", dit_latents, "--model", dit_dir, "--out", str(tmp_path / "ddec"),
                     "--device", "cpu"]) == 0
    capsys.readouterr()
    assert cli.main(["decode", dit_latents, "--model", dit_dir, "--class-label", "1", "--out",
                     str(tmp_path / "ddec2"), "--device", "cpu"]) == 1
    assert "encoded with no --class-label" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["3.5", "-1", "seven"])
def test_a_label_that_is_no_class_index_is_a_usage_error(value, tmp_path, capsys):
    assert cli.main(["sample", "--class-label", value, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--class-label" in err and value in err and "integer >= 0" in err
    assert not (tmp_path / "x.png").exists()


def test_refusals_name_the_option_the_value_and_what_is_accepted(dit_dir, tmp_path, capsys):
    out = ["--out", str(tmp_path / "x.png"), "--steps", "2", "--num", "2", "--device", "cpu"]
    cases = [
        (["--class-label", "10"], "--class-label 10: model 'digits' has 10 classes; accepted: 0 … 9"),
        (["--model", dit_dir, "--class-label", "1000"], "has 1000 classes; accepted: 0 … 999"),
        (["--model", "analytic-mixture", "--class-label", "1"], "--class-label 1: model 'analytic-mixture' takes no "
                                                                "class labels"),
        (["--guidance", "3"], "--guidance 3.0: guiding model 'digits' needs --class-label N"),
        (["--class-label", "2", "--prompt", "a cat"], "--class-label 2 and --prompt 'a cat'"),
        (["--class-label", "2", "--guidance", "nan"], "--guidance must be a finite number, got nan"),
    ]
    for extra, message in cases:
        assert cli.main(["sample", *out, *extra]) == 2, extra  # usage errors (README: status 2)
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "x.png").exists()


def test_where_no_label_per_image_can_be_passed_a_dit_is_refused_by_name(dit_dir, digit_files, tmp_path, capsys):
    assert cli.main(["likelihood", digit_files[0], "--model", dit_dir, "--steps", "2"]) == 1
    err = capsys.readouterr().err
    assert "class-conditional DiT (1000 classes)" in err and "class_labels" in err
    folder = str(tmp_path / "in")
    (tmp_path / "in").mkdir()
    for path in digit_files:
        (tmp_path / "in" / path.rsplit("/", 1)[-1]).write_bytes(open(path, "rb").read())
    assert cli.main(["encode", "--data", folder, "--class-label", "1", "--steps", "2", "--out",
                     str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "--data: model 'digits' takes one class label per image" in capsys.readouterr().err
