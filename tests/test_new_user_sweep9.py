"""New-user sweep 9: diffusers pipelines, guidance and latent models, as the README shows them.

A user builds tiny random Stable-Diffusion-like and DiT pipelines, saves them, loads them back with
``flowdiff.from_diffusers`` and samples, encodes and guides with them. Each test here failed on main
before its fix (or pins a documented difference from diffusers, measured against the pipeline itself).
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
