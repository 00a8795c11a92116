"""Review R31 of S19 (a latent's state maker), S20 (sweep 17) and F8's reference from t = 1 on flow matching."""

import dataclasses
import math

import pytest
from safetensors import safe_open

from flowdiff import cli
from flowdiff.tools.reference import Reference

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from flowdiff.models import tiny_pipelines  # noqa: E402


def test_compare_solves_again_a_kept_flow_matching_reference_from_sigma_max(tmp_path, capsys):
    # flowdiff compare keeps its reference on disk under a key of model, noise and tolerance, not of the start: a
    # file kept before the reference started at t = 1 on flow matching (F8) started at a finite σ, and was reused
    # as this run's reference, its rows measured against another solution than a fresh run's
    path = str(tiny_pipelines.stable_diffusion_3(tmp_path / "pipe")[1])
    out = tmp_path / "out"
    args = ["compare", "--model", path, "--solver", "euler", "--grid", "trailing", "--nfe", "2", "--batch", "1",
            "--no-progress", "--out", str(out), "--overwrite"]
    assert cli.main(args) == 0
    fresh = capsys.readouterr().out
    kept = out / "reference.safetensors"
    ref = Reference.load(kept)
    assert ref.sigma_start == math.inf
    with safe_open(str(kept), framework="pt") as fh:
        key = fh.metadata()["key"]
    # the file as an earlier flowdiff wrote it: the same key, solved from a finite σ (another image)
    dataclasses.replace(ref, sigma_start=3.0, x=ref.x + 0.5).save(kept, key)
    assert cli.main(args) == 0
    again = capsys.readouterr().out
    assert "(kept in" not in again and "from σ=∞" in again
    assert Reference.load(kept).sigma_start == math.inf
    row = [line for line in fresh.splitlines() if line.startswith("| euler |")]
    assert row and row == [line for line in again.splitlines() if line.startswith("| euler |")]
    # and one kept from t = 1 is reused as before
    assert cli.main(args) == 0
    assert "(kept in" in capsys.readouterr().out
