"""New-user sweep 9: diffusers pipelines, guidance and latent models, as the README shows them.

A user builds tiny random Stable-Diffusion-like and DiT pipelines, saves them, loads them back with
``flowdiff.from_diffusers`` and samples, encodes and guides with them. Most tests here failed on main before
their fix; the others check what a fix must keep (the null class, [null, null] components, image sizes that are
multiples) or an equivalence with the pipeline itself that a user relies on (guidance below 1,
``num_images_per_prompt``).
"""

import json
import shutil

import pytest
import torch

import flowdiff
from flowdiff.models import tiny_pipelines

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_pipelines.stable_diffusion(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return tiny_pipelines.dit(tmp_path_factory.mktemp("dit"))


def _copy(folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    return copy


def _edit_config(path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(("component", "changes", "what"), [
    ("transformer", {"num_layers": 2}, "missing from the weights"),        # the config builds more than was saved
    ("vae", {"layers_per_block": 2}, "missing from the weights"),
])
def test_weights_that_do_not_fill_the_config_are_refused_naming_the_files(dit, tmp_path, component, changes, what):
    """diffusers only logs parameters left at their random initialisation: the flow sampled from a partly random
    network with no error. Now a ValueError names the weights and the config."""
    copy = _copy(dit[1], tmp_path)
    _edit_config(copy / component / "config.json", **changes)
    with pytest.raises(ValueError, match=rf"{component}.*do not match its config .*config\.json: .*{what}"):
        flowdiff.from_diffusers(copy)


@pytest.mark.parametrize(("layers", "what"), [(3, "missing from the weights, left random"),
                                              (1, "weights the config has no parameter for")])
def test_text_encoder_weights_that_do_not_match_its_config_are_refused(sd, tmp_path, layers, what):
    copy = _copy(sd[1], tmp_path)
    _edit_config(copy / "text_encoder" / "config.json", num_hidden_layers=layers)
    with pytest.raises(ValueError, match=rf"CLIPTextModel weights in .*text_encoder .*model\.safetensors.*{what}"):
        flowdiff.from_diffusers(copy)


def _noise(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("labels", "match"), [
    (None, r"DiTTransformer2DModel is class-conditional and needs model_kwargs=\{'class_labels'"),
    (torch.tensor([1001, 3]), r"class_labels must lie in 0 … 1000 .*null class.*got \[1001, 3\]"),
    (torch.tensor([-1, 3]), r"class_labels must lie in 0 … 1000 .*got \[-1, 3\]"),
    (torch.tensor([1.0, 3.0]), r"class_labels must be an integer tensor of shape \(2,\).*got a torch.float32 tensor"),
    ([1, 3], r"class_labels must be an integer tensor .*got list \[1, 3\]"),
    (torch.tensor([1, 2, 3]), r"class_labels must be an integer tensor of shape \(2,\).*shape \(3,\)"),
])
def test_dit_class_labels_are_checked_naming_the_argument_and_what_it_takes(dit, labels, match):
    """Before: an IndexError 'index out of range in self', torch's embedding() dtype errors, a size mismatch."""
    flow = flowdiff.from_diffusers(dit[1])
    kwargs = None if labels is None else {"class_labels": labels}
    with pytest.raises(ValueError, match=match):
        flowdiff.generate(flow, _noise((2, 4, 8, 8)), steps=2, model_kwargs=kwargs)


def test_dit_one_label_for_the_batch_equals_it_repeated_and_the_null_class_is_accepted(dit):
    flow = flowdiff.from_diffusers(dit[1])
    noise = _noise((2, 4, 8, 8))
    one = flowdiff.generate(flow, noise, steps=2, model_kwargs={"class_labels": torch.tensor([7])}).x
    scalar = flowdiff.generate(flow, noise, steps=2, model_kwargs={"class_labels": torch.tensor(7)}).x
    both = flowdiff.generate(flow, noise, steps=2, model_kwargs={"class_labels": torch.tensor([7, 7])}).x
    assert torch.equal(one, both) and torch.equal(scalar, both)
    null = flowdiff.generate(flow, noise, steps=2, model_kwargs={"class_labels": torch.tensor([1000, 1000])}).x
    assert torch.isfinite(null).all() and not torch.equal(null, both)


def test_dit_latents_not_a_multiple_of_its_patch_are_refused_naming_the_patch(dit):
    """Before: 'model returned shape (2, 8, 6, 6) for input shape (2, 4, 7, 7)'."""
    flow = flowdiff.from_diffusers(dit[1])
    with pytest.raises(ValueError, match=r"height and width \(7, 7\).*2×2 patches.*multiples of 2"):
        flowdiff.generate(flow, _noise((2, 4, 7, 7)), steps=2, model_kwargs={"class_labels": torch.tensor([1, 2])})


def test_class_labels_given_to_a_unet_without_class_embedding_are_refused_not_ignored(sd):
    """A Stable Diffusion UNet has no class embedding: diffusers' UNet2DConditionModel drops class_labels
    silently, so the labels changed nothing."""
    flow = flowdiff.from_diffusers(sd[1])
    kwargs = {**flow.encode_prompt(["a cat", "dog"]), "class_labels": torch.tensor([1, 2])}
    with pytest.raises(ValueError, match=r"class_labels, but this UNet2DConditionModel has no class embedding"):
        flowdiff.generate(flow, _noise((2, 4, 8, 8)), steps=2, model_kwargs=kwargs)


@pytest.mark.parametrize(("method", "shape", "match"), [
    ("encode", (1, 3, 17, 17), r"images must be \(batch, 3, H, W\).*multiples of 2 .*\(1, 3, 17, 17\)"),
    ("encode", (1, 1, 16, 16), r"images must be \(batch, 3, H, W\): the VAE's in_channels=3.*\(1, 1, 16, 16\)"),
    ("encode", (3, 16, 16), r"images must be \(batch, 3, H, W\).*got shape \(3, 16, 16\)"),
    ("decode", (1, 3, 8, 8), r"latents must be \(batch, 4, H, W\): the VAE's latent_channels=4.*\(1, 3, 8, 8\)"),
])
def test_autoencoder_refuses_images_and_latents_of_the_wrong_shape(sd, method, shape, match):
    """Before: 17×17 images encoded to 8×8 latents (the last row and column dropped: a 16×16 decode), a 3-dim
    batch was 'not enough values to unpack', a wrong channel count a conv2d RuntimeError."""
    flow = flowdiff.from_diffusers(sd[1])
    with pytest.raises(ValueError, match=match):
        getattr(flow.autoencoder, method)(torch.rand(*shape) * 2 - 1)


def test_autoencoder_round_trip_keeps_the_image_size_for_every_multiple(sd):
    flow = flowdiff.from_diffusers(sd[1])
    images = torch.rand(2, 3, 18, 22, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = flow.autoencoder.encode(images)
    assert latents.shape == (2, 4, 9, 11)
    assert flow.autoencoder.decode(latents).shape == images.shape
    vae = sd[0].vae  # the pipeline's own VAE: the posterior mean times scaling_factor
    with torch.no_grad():
        expected = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    assert torch.equal(latents, expected)


@pytest.mark.parametrize("entry", ["oops", ["diffusers"], [None, "AutoencoderKL"], 3])
def test_a_damaged_component_entry_in_the_index_is_refused_not_read_as_absent(dit, tmp_path, entry):
    """Before: a "vae" entry that is no [library, class] pair loaded the flow without its autoencoder."""
    copy = _copy(dit[1], tmp_path)
    _edit_config(copy / "model_index.json", vae=entry)
    with pytest.raises(ValueError, match=r"model_index\.json: 'vae' must be a \[library, class\] pair .*got"):
        flowdiff.from_diffusers(copy)


def test_a_component_saved_as_none_is_still_accepted(tmp_path):
    """[null, null] is how diffusers saves a component left out (SD's safety_checker): not damage."""
    pipe, folder = tiny_pipelines.dit(tmp_path)
    _edit_config(folder / "model_index.json", vae=[None, None])
    flow = flowdiff.from_diffusers(folder)
    assert flow.autoencoder is None and flow.sample_shape == (4, 8, 8)


@pytest.mark.parametrize("condition", [["--prompt", "a cat"], ["--prompt", "a cat", "--negative-prompt", "dog"]])
def test_cli_guidance_zero_with_a_prompt_is_refused_since_the_prompt_would_change_nothing(sd, tmp_path, capsys,
                                                                                           condition):
    """`--guidance 0` (diffusers' and SD-Turbo's spelling of "no guidance") sampled the negative prompt's model
    alone: the prompt was ignored, with exit code 0."""
    from flowdiff import cli

    args = ["sample", "--model", str(sd[1]), "--num", "1", "--steps", "2", *condition, "--guidance", "0",
            "--out", str(tmp_path / "x.png")]
    assert cli.main(args) == 2  # a usage error (sweep 10: options that cannot work together exit 2)
    err = capsys.readouterr().err
    assert "--guidance 0 with --prompt 'a cat'" in err and "--guidance 1" in err
    assert not (tmp_path / "x.png").exists()


def test_cli_guidance_zero_with_a_class_label_is_refused(dit, tmp_path, capsys):
    from flowdiff import cli

    args = ["sample", "--model", str(dit[1]), "--num", "1", "--steps", "2", "--class-label", "3", "--guidance", "0",
            "--out", str(tmp_path / "x.png")]
    assert cli.main(args) == 2
    assert "--guidance 0 with --class-label 3" in capsys.readouterr().err


def test_guidance_below_one_is_the_formula_here_and_no_guidance_in_diffusers(sd):
    """Measured against StableDiffusionPipeline: its guidance_scale ≤ 1 is the conditional model (flowdiff's w = 1),
    while flowdiff's w = 0 is the negative prompt's model alone (what the README now says)."""
    pipe, folder = sd
    flow = flowdiff.from_diffusers(folder)
    noise = _noise((2, 4, 8, 8), seed=3)
    cond, uncond = flow.encode_prompt(["a cat", "dog"]), flow.encode_prompt(["blurry", "blurry"])

    def theirs(scale):
        with torch.no_grad():
            return pipe(["a cat", "dog"], negative_prompt=["blurry"] * 2, guidance_scale=scale, num_inference_steps=3,
                        output_type="latent", latents=noise.clone(), height=16, width=16).images

    def ours(w, kwargs=cond):
        guided = flow if w == 1 else flowdiff.classifier_free_guidance(flow, w, unconditional_kwargs=uncond)
        return flowdiff.sample_like(guided, noise, steps=3, model_kwargs=kwargs).x

    conditional = ours(1.0)
    tol = {"rtol": 2e-5, "atol": 2e-5}
    for scale in (0.0, 0.5, 1.0):
        assert torch.allclose(theirs(scale), conditional, **tol)
    assert torch.allclose(theirs(3.0), ours(3.0), **tol)
    assert torch.allclose(ours(0.0), ours(1.0, uncond), **tol)           # w = 0: the negative prompt alone
    assert not torch.allclose(ours(0.0), conditional, **tol)


@pytest.mark.parametrize("where", ["model_kwargs", "unconditional_kwargs"])
def test_prompt_embeddings_of_another_batch_are_refused_naming_the_keyword(sd, where):
    """Three prompts' embeddings for two samples: a RuntimeError from the UNet's attention reshape
    ("shape '[3, -1, 2, 4]' is invalid"), which named neither the keyword nor the batches."""
    flow = flowdiff.from_diffusers(sd[1])
    three, two = flow.encode_prompt(["a", "b", "c"]), flow.encode_prompt(["x", "y"])
    cond, uncond = (three, two) if where == "model_kwargs" else (two, three)
    guided = flowdiff.classifier_free_guidance(flow, 5.0, unconditional_kwargs=uncond)
    with pytest.raises(ValueError, match=r"keyword argument encoder_hidden_states has a batch of 3 .* for 2 samples"):
        flowdiff.sample_like(guided, _noise((2, 4, 8, 8)), steps=2, model_kwargs=cond)


def test_flow_matching_transformer_without_its_text_conditioning_names_what_it_needs(tmp_path):
    """SD3's transformer sampled without model_kwargs failed with "'NoneType' object has no attribute 'dtype'"."""
    net, folder, kwargs = tiny_pipelines.sd3_transformer(tmp_path)
    flow = flowdiff.from_diffusers(folder)
    with pytest.raises(ValueError, match=r"SD3Transformer2DModel needs encoder_hidden_states and pooled_projections"):
        flowdiff.generate(flow, _noise((2, 4, 8, 8)), steps=2)
    with pytest.raises(ValueError, match=r"needs pooled_projections in model_kwargs"):
        flowdiff.generate(flow, _noise((2, 4, 8, 8)), steps=2,
                          model_kwargs={"encoder_hidden_states": kwargs["encoder_hidden_states"]})
    assert torch.isfinite(flowdiff.generate(flow, _noise((2, 4, 8, 8)), steps=2, model_kwargs=kwargs).x).all()


@pytest.mark.parametrize("shape", [(1, 16, 4, 4), (1, 16, 3)])
def test_flux_latents_that_are_not_packed_tokens_are_refused_at_the_entry(tmp_path, shape):
    """Unpacked (batch, C, h, w) latents or the wrong channel count went to the transformer: a matmul
    RuntimeError ("mat1 and mat2 shapes cannot be multiplied")."""
    pipe, folder = tiny_pipelines.flux(tmp_path)
    flow = flowdiff.from_diffusers(folder)
    given = ", ".join(map(str, shape))
    with pytest.raises(ValueError, match=rf"noise has shape \({given}\); .*takes \(batch, any, 16\)"):
        flowdiff.sample_like(flow, _noise(shape), steps=2, model_kwargs=flow.encode_prompt(["a cat"]))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return tiny_pipelines.stable_diffusion_xl(tmp_path_factory.mktemp("sdxl"))


def test_sdxl_without_a_negative_prompt_guides_against_zero_embeddings_as_its_pipeline(sdxl):
    """StableDiffusionXLPipeline without negative_prompt guides against zero embeddings (its
    force_zeros_for_empty_prompt); the empty prompt's embeddings, which the CLI used, were 1.2 off (latents ~16)."""
    pipe, folder = sdxl
    flow = flowdiff.from_diffusers(folder)
    noise = _noise((2, 4, 8, 8))
    with torch.no_grad():
        ref = pipe(["a cat", "dog"], guidance_scale=5.0, num_inference_steps=3, output_type="latent",
                   latents=noise.clone(), height=16, width=16).images
    uncond = flow.encode_negative_prompt()
    assert not uncond["encoder_hidden_states"].any() and not uncond["text_embeds"].any()
    guided = flowdiff.classifier_free_guidance(flow, 5.0, unconditional_kwargs=uncond)
    ours = flowdiff.sample_like(guided, noise, steps=3, model_kwargs=flow.encode_prompt(["a cat", "dog"])).x
    torch.testing.assert_close(ours, ref, rtol=2e-5, atol=2e-5)
    # an explicit empty negative prompt is encoded, as the pipeline encodes negative_prompt=""
    assert torch.equal(flow.encode_negative_prompt([""])["encoder_hidden_states"],
                       flow.encode_prompt([""])["encoder_hidden_states"])


def test_cli_sdxl_prompt_without_negative_prompt_is_the_pipelines_guidance(sdxl, tmp_path):
    import numpy as np
    from PIL import Image

    from flowdiff import cli

    folder = str(sdxl[1])
    out = tmp_path / "cat.png"
    assert cli.main(["sample", "--model", folder, "--num", "2", "--steps", "3", "--scale", "1", "--prompt", "a cat",
                     "--guidance", "3", "--out", str(out)]) == 0
    flow = flowdiff.from_diffusers(folder)
    guided = flowdiff.classifier_free_guidance(flow, 3.0, unconditional_kwargs=flow.encode_negative_prompt())
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    x = flowdiff.generate(guided, noise, steps=3, model_kwargs=flow.encode_prompt(["a cat"])).x
    cli.save_grid(flow.autoencoder.decode(x), tmp_path / "python.png")
    with Image.open(out) as a, Image.open(tmp_path / "python.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_encode_negative_prompt_without_prompts_is_the_empty_prompt_elsewhere(sd):
    flow = flowdiff.from_diffusers(sd[1])
    assert torch.equal(flow.encode_negative_prompt(n=2)["encoder_hidden_states"],
                       flow.encode_prompt(["", ""])["encoder_hidden_states"])
    with pytest.raises(ValueError, match="n must be the number of samples, an int >= 1, got 0"):
        flow.encode_negative_prompt(n=0)
    with pytest.raises(TypeError, match="n must be the number of samples, an int >= 1, got float 2.0"):
        flow.encode_negative_prompt(n=2.0)


@pytest.mark.parametrize(("function", "keyword", "value"), [
    ("sample_like", "grid", "karras"), ("sample_like", "adaptive", "Adaptive"),
    ("encode_like", "grid", "karras"), ("encode_like", "solver", "euler"),
])
def test_like_functions_name_the_keywords_the_scheduler_sets(dit, function, keyword, value):
    """sample_like(..., grid="karras") was "generate() got multiple values for keyword argument 'grid'"; adaptive=
    a message about a grid= the call had not given."""
    flow = flowdiff.from_diffusers(dit[1])
    extra = {keyword: flowdiff.Adaptive() if value == "Adaptive" else value}
    with pytest.raises(TypeError, match=rf"{function} takes no {keyword}=: it runs the scheduler's own loop"):
        getattr(flowdiff, function)(flow, _noise((2, 4, 8, 8)), steps=3,
                                    model_kwargs={"class_labels": torch.tensor([1, 2])}, **extra)


@pytest.fixture(scope="module")
def flux_plain(tmp_path_factory):
    return tiny_pipelines.flux(tmp_path_factory.mktemp("flux_plain"), guidance_embeds=False)


def test_embedded_guidance_on_a_flux_without_guidance_embedding_is_refused_not_ignored(flux_plain):
    """Setting flow.prompt_encoder.embedded_guidance on a Flux without guidance_embeds changed nothing, silently."""
    flow = flowdiff.from_diffusers(flux_plain[1])
    with pytest.raises(ValueError, match=r"embedded_guidance=6.0: .*no guidance embedding .*change nothing"):
        flow.prompt_encoder.embedded_guidance = 6.0


def test_embedded_guidance_reaches_a_distilled_flux_as_its_pipelines_guidance_scale(tmp_path):
    pipe, folder = tiny_pipelines.flux(tmp_path)
    flow = flowdiff.from_diffusers(folder)
    with pytest.raises(TypeError, match=r"embedded_guidance must be a finite number .*got 'high'"):
        flow.prompt_encoder.embedded_guidance = "high"
    flow.prompt_encoder.embedded_guidance = 6
    noise = _noise((2, *flow.sample_shape))
    with torch.no_grad():
        ref = pipe(["a cat", "dog"], guidance_scale=6.0, num_inference_steps=3, output_type="latent",
                   latents=noise.clone(), height=16, width=16).images
    ours = flowdiff.sample_like(flow, noise, steps=3, model_kwargs=flow.encode_prompt(["a cat", "dog"])).x
    torch.testing.assert_close(ours, ref, rtol=2e-5, atol=2e-5)


def test_sdxl_vae_latent_statistics_are_read_as_its_pipeline_reads_them(tmp_path):
    """An SDXL folder whose VAE config has latents_mean/latents_std (Playground v2.5's): StableDiffusionXLPipeline
    decodes z·latents_std/scaling_factor + latents_mean; flowdiff's autoencoder ignored them."""
    _, folder = tiny_pipelines.stable_diffusion_xl(tmp_path)
    _edit_config(folder / "vae" / "config.json", latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 2.0, 1.0, 0.8])
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    flow = flowdiff.from_diffusers(folder)
    noise = _noise((1, 4, 8, 8))
    with torch.no_grad():
        ref = pipe("a cat", negative_prompt="dog", guidance_scale=5.0, num_inference_steps=3, output_type="pt",
                   latents=noise.clone(), height=16, width=16).images
    guided = flowdiff.classifier_free_guidance(flow, 5.0, unconditional_kwargs=flow.encode_prompt(["dog"]))
    latents = flowdiff.sample_like(guided, noise, steps=3, model_kwargs=flow.encode_prompt(["a cat"])).x
    images = (flow.autoencoder.decode(latents) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, ref, rtol=2e-5, atol=2e-5)
    # encode is its inverse map: encode(decode(z)) = z up to the VAE's own reconstruction, per-channel statistics
    vae, m, s = pipe.vae, torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1), torch.tensor([0.5, 2.0, 1.0, 0.8])
    with torch.no_grad():
        expected = (vae.encode(ref * 2 - 1).latent_dist.mean - m) * vae.config.scaling_factor / s.view(1, 4, 1, 1)
    torch.testing.assert_close(flow.autoencoder.encode(ref * 2 - 1), expected, rtol=1e-5, atol=1e-5)


def test_sd_pipelines_ignore_vae_latent_statistics_as_diffusers_does(sd, tmp_path):
    copy = _copy(sd[1], tmp_path)
    _edit_config(copy / "vae" / "config.json", latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 2.0, 1.0, 0.8])
    z = _noise((1, 4, 8, 8))
    assert torch.equal(flowdiff.from_diffusers(copy).autoencoder.decode(z),
                       flowdiff.from_diffusers(sd[1]).autoencoder.decode(z))


def test_one_negative_prompt_beside_per_sample_prompts_is_the_same_call_as_one_prompt_for_all(sd):
    """Guidance with the prompt spelt once (batch 1) or repeated per sample: the first paired both branches into
    one batched call, the second (one negative prompt, two prompts) ran two calls, 9e-6 apart."""
    flow = flowdiff.from_diffusers(sd[1])
    guided = flowdiff.classifier_free_guidance(flow, 5.0, unconditional_kwargs=flow.encode_negative_prompt())
    noise = _noise((2, 4, 8, 8))
    once = flowdiff.sample_like(guided, noise, steps=3, model_kwargs=flow.encode_prompt(["a cat"])).x
    repeated = flowdiff.sample_like(guided, noise, steps=3, model_kwargs=flow.encode_prompt(["a cat", "a cat"])).x
    assert torch.equal(once, repeated)
    calls = []
    net = guided.model.model.net
    hook = net.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        flowdiff.sample_like(guided, noise, steps=2, model_kwargs=flow.encode_prompt(["a cat", "dog"]))
    finally:
        hook.remove()
    assert calls == [4, 4]  # both branches, both samples, one network call per evaluation


def test_autoencoder_warns_on_images_far_outside_its_range(sd):
    """8-bit pixels (0 … 255) given to flow.autoencoder.encode made latents ~100× too large, with no word."""
    flow = flowdiff.from_diffusers(sd[1])
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255
    with pytest.warns(UserWarning, match=r"images span .*far outside the model's data range \[-1, 1\]"):
        flow.autoencoder.encode(pixels)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flow.autoencoder.encode(pixels / 127.5 - 1)


def test_a_text_encoder_folder_is_named_as_one(sd):
    """from_diffusers on a pipeline's text_encoder/ said "model class None is not supported"."""
    with pytest.raises(ValueError, match=r"text_encoder/config\.json: a transformers CLIPTextModel .*not a diffusers "
                                         r"denoiser; give the pipeline folder"):
        flowdiff.from_diffusers(sd[1] / "text_encoder")


def test_an_autoencoder_under_another_name_is_refused_not_left_out(dit, tmp_path):
    """A Kandinsky-style index (its VQ autoencoder as "movq", no "vae") loaded the denoiser alone: a latent model
    whose samples were latents, with no decoder and no word."""
    copy = _copy(dit[1], tmp_path)
    index = json.loads((copy / "model_index.json").read_text())
    index["movq"] = index.pop("vae")[:1] + ["VQModel"]
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model_index\.json: its autoencoder is 'movq' \(VQModel\)"):
        flowdiff.from_diffusers(copy)


def test_guiding_a_dit_without_its_null_class_names_unconditional_kwargs(dit):
    flow = flowdiff.from_diffusers(dit[1])
    guided = flowdiff.classifier_free_guidance(flow, 4.0)
    with pytest.raises(ValueError, match=r"unconditional_kwargs=\{'class_labels': null_labels\}\) \(its null class: "
                                         r"1000\)"):
        flowdiff.generate(guided, _noise((2, 4, 8, 8)), steps=2, model_kwargs={"class_labels": torch.tensor([1, 2])})


@pytest.mark.parametrize(("keyword", "value", "why"), [
    ("added_cond_kwargs", {"text_embeds": torch.zeros(2, 16), "time_ids": torch.zeros(2, 6)},
     "it has no addition_embed_type"),
    ("timestep_cond", torch.zeros(2, 4), "it has no time_cond_proj_dim"),
])
def test_keywords_a_unet_takes_and_drops_are_refused(sd, keyword, value, why):
    """A Stable Diffusion UNet accepts added_cond_kwargs (SDXL's) and timestep_cond (LCM's) though its config has no
    such embedding: the first were dropped silently, the second failed with "'NoneType' object is not callable"."""
    flow = flowdiff.from_diffusers(sd[1])
    kwargs = {**flow.encode_prompt(["a cat", "dog"]), keyword: value}
    with pytest.raises(ValueError, match=rf"model_kwargs has {keyword}, which this UNet2DConditionModel takes as an "
                                         rf"argument but has no use for \({why}"):
        flowdiff.generate(flow, _noise((2, 4, 8, 8)), steps=2, model_kwargs=kwargs)


def test_num_images_per_prompt_is_each_prompt_repeated_in_place(sd):
    """StableDiffusionPipeline(prompts, num_images_per_prompt=k) orders its samples prompt by prompt
    ([a, a, b, b]); flowdiff's spelling is encode_prompt with each prompt repeated in place, and equals it."""
    pipe, folder = sd
    flow = flowdiff.from_diffusers(folder)
    noise = _noise((4, 4, 8, 8), seed=5)
    with torch.no_grad():
        ref = pipe(["a cat", "dog"], negative_prompt=["x", "blurry"], num_images_per_prompt=2, guidance_scale=6.0,
                   num_inference_steps=3, output_type="latent", latents=noise.clone(), height=16, width=16).images
    uncond = flow.encode_prompt(["x", "x", "blurry", "blurry"])
    guided = flowdiff.classifier_free_guidance(flow, 6.0, unconditional_kwargs=uncond)
    cond = flow.encode_prompt(["a cat", "a cat", "dog", "dog"])
    ours = flowdiff.sample_like(guided, noise, steps=3, model_kwargs=cond)
    torch.testing.assert_close(ours.x, ref, rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def class_unet(tmp_path_factory):
    root = tmp_path_factory.mktemp("class_unet")
    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                          down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
                          num_class_embeds=10).save_pretrained(root / "unet")
    diffusers.DDIMScheduler(clip_sample=False).save_pretrained(root / "scheduler")
    return root / "unet"


def test_cli_class_label_reaches_a_class_conditional_unet(class_unet, tmp_path, capsys):
    """A UNet2DModel with num_class_embeds: --class-label 3 was refused ("takes no class labels"), and without a
    label the run failed inside the network."""
    import numpy as np
    from PIL import Image

    from flowdiff import cli

    args = ["sample", "--model", str(class_unet), "--num", "2", "--steps", "3", "--scale", "1"]
    assert cli.main([*args, "--out", str(tmp_path / "none.png")]) == 2
    assert "class-conditional with no null class (a UNet with num_class_embeds=10)" in capsys.readouterr().err
    assert cli.main([*args, "--class-label", "3", "--guidance", "2", "--out", str(tmp_path / "g.png")]) == 2
    assert "--guidance 2.0: model 'unet' has no null class" in capsys.readouterr().err
    assert cli.main([*args, "--class-label", "3", "--out", str(tmp_path / "three.png")]) == 0
    flow = flowdiff.from_diffusers(class_unet)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    x = flowdiff.generate(flow, noise, steps=3, model_kwargs={"class_labels": torch.tensor([3, 3])}).x
    cli.save_grid(x, tmp_path / "python.png")
    with Image.open(tmp_path / "three.png") as a, Image.open(tmp_path / "python.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
