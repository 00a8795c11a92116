"""Conditioning that is one value repeated per sample has one fingerprint at any batch size (T2).

A tuned grid, learned solver or learned encoder made with class 3 repeated over 8 calibration samples was refused
(or not found by ``stored_grid``) for 4 samples of class 3: ``flow_fingerprint`` hashed the labels with their batch.
Labels that differ between samples are still their own conditioning, at their own batch; unconditional fingerprints
are those of the shipped files; files written under the old rule load at the batch they were made for."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import flowdiff
from flowdiff.engine.fingerprint import _module_digest, _update, accepted_fingerprints, flow_fingerprint
from flowdiff.engine.grids import make_sigmas
from flowdiff.tools import tuning
from flowdiff.tools.roundtrip_fit import LearnedEncoder

HAS_DIGITS = (Path(flowdiff.__file__).parent / "weights" / "digits.safetensors").is_file()
pytestmark = pytest.mark.skipif(not HAS_DIGITS, reason="the shipped digits weights are not installed")


def labels(*values):
    return {"class_labels": torch.tensor(values, dtype=torch.long)}


def repeated(label, batch):
    return {"class_labels": torch.full((batch,), label, dtype=torch.long)}


def old_fingerprint(flow, model_kwargs):
    """flow_fingerprint as written before this change: every model_kwargs tensor digested with its whole shape."""
    h = hashlib.blake2b(digest_size=16)
    h.update(_module_digest(flow.model))
    h.update(flow.schedule.alphas_cumprod.tobytes())
    h.update(f"{type(flow.model).__name__}|{flow.prediction_type}".encode())
    if model_kwargs:
        h.update(b"|kwargs")
        _update(h, dict(model_kwargs))
    return h.hexdigest()


@pytest.fixture(scope="module")
def flow():
    return flowdiff.pretrained("digits")


def grid_for(flow, model_kwargs, fingerprint=None):
    """A tuned grid for euler at NFE 6 recorded as tune records it: the fingerprint of the flow and conditioning."""
    return tuning.TunedGrid(make_sigmas(flow.schedule, "logsnr", 6), "euler", {}, 6,
                            fingerprint or flow_fingerprint(flow, model_kwargs),
                            options={"calibration_batch": 8})


def learned_for(flow, model_kwargs, fingerprint=None):
    """A learned solver as learn_solver records it, without R13's calibration_batch (the mechanism, not a retry)."""
    return flowdiff.LearnedSolver(solver="unipc", solver_options={}, nfe=5,
                                  sigmas=make_sigmas(flow.schedule, "logsnr", 5), coefficients=(),
                                  fingerprint=fingerprint or flow_fingerprint(flow, model_kwargs), kept=True,
                                  learn=("shifts",), shifts=tuple(0.01 * (-1) ** i for i in range(5)))


def encoder_for(flow, model_kwargs):
    return LearnedEncoder(solver="euler", solver_options={}, nfe=4, sigmas=make_sigmas(flow.schedule, "logsnr", 4),
                          shifts=(0.0,) * 4, decode_shifts=(), fingerprint=flow_fingerprint(flow, model_kwargs),
                          kept=False)


def test_the_fingerprint_of_a_repeated_label_does_not_depend_on_the_batch(flow):
    assert flow_fingerprint(flow, repeated(3, 8)) == flow_fingerprint(flow, repeated(3, 4)) \
        == flow_fingerprint(flow, repeated(3, 1)) == flow_fingerprint(flow, {"class_labels": torch.tensor(3)})
    assert flow_fingerprint(flow, repeated(3, 8)) != flow_fingerprint(flow, repeated(4, 8))
    assert flow_fingerprint(flow, labels(*range(8))) != flow_fingerprint(flow, labels(*range(4)))
    assert flow_fingerprint(flow, labels(3, 3, 3, 4)) != flow_fingerprint(flow, repeated(3, 4))
    # the dtype is part of the conditioning, as before
    assert flow_fingerprint(flow, repeated(3, 4)) != flow_fingerprint(
        flow, {"class_labels": torch.full((4,), 3, dtype=torch.int32)})


@pytest.mark.parametrize("make", [grid_for, learned_for, encoder_for], ids=["tuned", "learned", "encoder"])
def test_a_record_made_at_batch_8_with_a_repeated_label_serves_batch_4_and_refuses_another(flow, make, tmp_path):
    record = make(flow, repeated(3, 8))
    for batch in (4, 1, 8, 16):
        record.check(flow, repeated(3, batch))
    for other in (repeated(4, 4), labels(3, 3, 3, 4), None):
        with pytest.raises(ValueError, match="fingerprint"):
            record.check(flow, other)


def test_a_record_made_on_labels_that_differ_refuses_another_batch_and_one_label(flow):
    record = grid_for(flow, labels(*range(8)))
    record.check(flow, labels(*range(8)))
    for other in (labels(*range(4)), repeated(3, 8), labels(*range(8))["class_labels"].flip(0)):
        kwargs = other if isinstance(other, dict) else {"class_labels": other}
        with pytest.raises(ValueError, match="fingerprint"):
            record.check(flow, kwargs)


def test_stored_grid_finds_a_grid_tuned_at_another_batch_of_the_same_label(flow, tmp_path):
    flowdiff.save_grids([grid_for(flow, repeated(3, 8))], tmp_path / "c.tuned.json")
    found = tuning.stored_grid(flow, "euler", 6, model_kwargs=repeated(3, 4), directory=tmp_path)
    assert found is not None and found.source == str(tmp_path / "c.tuned.json")
    assert tuning.stored_grid(flow, "euler", 6, model_kwargs=repeated(4, 4), directory=tmp_path) is None
    assert tuning.stored_grid(flow, "euler", 6, model_kwargs=labels(3, 3, 3, 4), directory=tmp_path) is None


def test_the_cli_samples_with_a_grid_tuned_at_another_batch_and_refuses_another_label(flow, tmp_path, capsys,
                                                                                    monkeypatch):
    from _cli_runs import run_in

    folder = tmp_path / "stored"
    flowdiff.save_grids([grid_for(flow, repeated(3, 8))], folder / "c.tuned.json")
    monkeypatch.setattr(tuning, "STORED_DIR", folder)
    base = ["sample", "--grid", "tuned", "--solver", "euler", "--nfe", 6, "--num", 4]
    code, out, err = run_in(capsys, base + ["--class-label", 3, "--out", "a.png"], tmp_path)
    assert code == 0, err
    code, out, err = run_in(capsys, base + ["--class-label", 4, "--out", "b.png"], tmp_path)
    assert code != 0 and "no tuned grid is stored" in err


def test_a_grid_and_a_solver_fitted_on_a_scalar_label_serve_the_clis_label_per_sample(flow, tmp_path, capsys,
                                                                                     monkeypatch):
    """tune and learn_solver take a class label as a 0-d tensor (broadcast over the calibration batch); the CLI's
    --class-label gives one per sample: the same conditioning, one fingerprint."""
    from _cli_runs import run_in

    from flowdiff.tools.learned import learn_solver

    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    scalar = {"class_labels": torch.tensor(3)}
    grid = flowdiff.tune(flow, noise, solver="euler", nfe=6, max_evals=4, model_kwargs=scalar, method="search",
                         progress=False, reference_tol=1e-4)
    # the label repeated per sample is the same conditioning: the same grid (tune's held-out halves slice it)
    per_sample = flowdiff.tune(flow, noise, solver="euler", nfe=6, max_evals=4, model_kwargs=repeated(3, 4),
                               method="search", progress=False, reference_tol=1e-4)
    assert np.array_equal(per_sample.sigmas, grid.sigmas) and per_sample.fingerprint == grid.fingerprint
    flowdiff.save_grids([grid], tmp_path / "stored" / "c.tuned.json")
    monkeypatch.setattr(tuning, "STORED_DIR", tmp_path / "stored")
    code, out, err = run_in(capsys, ["sample", "--grid", "tuned", "--solver", "euler", "--nfe", 6, "--num", 3,
                                     "--class-label", 3, "--out", "a.png"], tmp_path)
    assert code == 0, err
    learned = learn_solver(flow, noise, solver="euler", nfe=4, iterations=1, model_kwargs=scalar, reference_tol=1e-4)
    learned.check(flow, repeated(3, 3))
    with pytest.raises(ValueError, match="fingerprint"):
        learned.check(flow, repeated(2, 3))


def test_the_cli_samples_with_a_learned_solver_fitted_at_another_batch(flow, tmp_path, capsys):
    from _cli_runs import run_in

    path = learned_for(flow, repeated(3, 8)).save(tmp_path / "class3.json")
    code, out, err = run_in(capsys, ["sample", "--learned", path, "--class-label", 3, "--num", 2, "--out", "a.png"],
                            tmp_path)
    assert code == 0, err
    code, out, err = run_in(capsys, ["sample", "--learned", path, "--class-label", 5, "--num", 2, "--out", "b.png"],
                            tmp_path)
    assert code != 0 and "--learned" in err and "fingerprint" in err


def test_the_unconditional_fingerprint_is_the_old_one_and_the_shipped_files_still_load(flow):
    assert flow_fingerprint(flow) == flow_fingerprint(flow, {}) == old_fingerprint(flow, None)
    assert accepted_fingerprints(flow) == (old_fingerprint(flow, None),)
    shipped = flowdiff.load_grids(tuning.STORED_DIR / "digits.tuned.json")
    assert shipped and all(g.fingerprint == flow_fingerprint(flow) for g in shipped)
    assert tuning.stored_grid(flow, shipped[0].solver, shipped[0].nfe, shipped[0].solver_options) is not None


def test_per_sample_labels_that_differ_keep_their_old_fingerprint(flow):
    differ = labels(*range(8))
    assert flow_fingerprint(flow, differ) == old_fingerprint(flow, differ)
    assert accepted_fingerprints(flow, differ) == (old_fingerprint(flow, differ),)


def test_a_file_saved_under_the_old_rule_loads_at_its_batch_and_says_to_fit_again_at_another(flow, tmp_path):
    old = old_fingerprint(flow, repeated(3, 8))
    assert old != flow_fingerprint(flow, repeated(3, 8))
    path = learned_for(flow, None, fingerprint=old).save(tmp_path / "old.json")
    flowdiff.LearnedSolver.load(path, flow, repeated(3, 8))
    with pytest.raises(ValueError, match="only at the batch it was made with.*fit it again"):
        flowdiff.LearnedSolver.load(path, flow, repeated(3, 4))
    with pytest.raises(ValueError, match="fingerprint"):
        flowdiff.LearnedSolver.load(path, flow, repeated(4, 8))
    grid = grid_for(flow, None, fingerprint=old)
    grid.check(flow, repeated(3, 8))
    flowdiff.save_grids([grid], tmp_path / "old.tuned.json")
    assert tuning.stored_grid(flow, "euler", 6, model_kwargs=repeated(3, 8), directory=tmp_path) is not None
    assert tuning.stored_grid(flow, "euler", 6, model_kwargs=repeated(3, 4), directory=tmp_path) is None


def test_a_latent_encoded_with_a_repeated_label_decodes_under_the_old_and_the_new_fingerprint(flow):
    x = flowdiff.digits_data("test").images[:2]
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32) if not isinstance(x, torch.Tensor) else x
    latent = flowdiff.encode(flow, x, steps=2, model_kwargs=repeated(3, 2)).latent
    latent.check_model(flow, repeated(3, 2))
    latent.fingerprint = old_fingerprint(flow, repeated(3, 2))
    latent.check_model(flow, repeated(3, 2))
    with pytest.raises(ValueError, match="fingerprint"):
        latent.check_model(flow, repeated(4, 2))


def test_the_old_rule_is_the_old_code(flow):
    """accepted_fingerprints' second digest is the one the code before this change computed."""
    from flowdiff.engine.fingerprint import _digest

    for kwargs in (repeated(3, 8), labels(*range(8)), {"class_labels": torch.tensor(3)}):
        assert _digest(flow, kwargs, repeated=False) == old_fingerprint(flow, kwargs)
        assert accepted_fingerprints(flow, kwargs)[-1] == old_fingerprint(flow, kwargs)


def test_prompt_latents_written_under_the_old_rule_still_decode(tmp_path, capsys):
    """A prompt's embeddings (batch 1) are one sample repeated: their fingerprint changed, and latents whose record
    holds the old one decode as before; a record of another conditioning is still refused."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from PIL import Image

    from flowdiff import cli
    from flowdiff.engine.fingerprint import _digest
    from flowdiff.engine.latent import Latent
    from flowdiff.models.tiny_pipelines import stable_diffusion as build_sd

    sd_dir = str(build_sd(tmp_path / "sd")[1])
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(image)
    latents = str(tmp_path / "a.latent")
    common = ["--model", sd_dir, "--solver", "reversible_heun", "--steps", "2"]
    assert cli.main(["encode", str(image), *common, "--prompt", "a cat", "--guidance", "3", "--out", latents]) == 0
    capsys.readouterr()
    latent = Latent.load(latents)
    loaded = cli.load_model(sd_dir)
    flow = loaded.flow
    cond = flow.encode_prompt(["a cat"])
    kwargs = {"cond": cond, "guidance": 3.0, "uncond": flow.encode_prompt([""])}
    assert latent.info["prompt"]["fingerprint"] == flow_fingerprint(flow, kwargs)
    old = _digest(flow, kwargs, repeated=False)
    assert old != flow_fingerprint(flow, kwargs)
    latent.info["prompt"]["fingerprint"] = old
    latent.save(latents)
    assert cli.main(["decode", latents, "--model", sd_dir, "--out", str(tmp_path / "dec")]) == 0, \
        capsys.readouterr().err
    latent.info["prompt"]["fingerprint"] = _digest(flow, {**kwargs, "guidance": 2.0}, repeated=False)
    latent.save(latents)
    assert cli.main(["decode", latents, "--model", sd_dir, "--out", str(tmp_path / "dec2")]) == 1
    assert "another model or conditioning" in capsys.readouterr().err


def test_tune_holds_out_half_of_a_batch_with_its_own_labels(flow):
    """tune's held-out halves ran with the whole batch's per-sample labels (a shape error, reported as every
    candidate failing); each half now runs with its own samples' labels, and the grid is for those labels."""
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    grid = flowdiff.tune(flow, noise, solver="euler", nfe=5, max_evals=3, model_kwargs=labels(0, 1, 2, 3),
                         method="search", progress=False, reference_tol=1e-4)
    assert grid.options["validate"] is True and np.isfinite(grid.calibration_error)
    grid.check(flow, labels(0, 1, 2, 3))
    with pytest.raises(ValueError, match="fingerprint"):
        grid.check(flow, labels(0, 2))
