"""The shipped digits model: loads offline, generates, reproduces its recorded quality; the data split; bad files."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

import flowdiff
from flowdiff.models.pretrained import digits_data, load_config, load_network, pretrained
from flowdiff.tools.quality import sample_quality

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "flowdiff" / "weights"



def _bench():
    spec = importlib.util.spec_from_file_location("bench_models", ROOT / "benchmarks" / "bench_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recorded(setting, solver, nfe, scale):
    record = json.loads((WEIGHTS / "digits_quality.json").read_text())
    for row in record["settings"]:
        if (row["setting"], row["solver"], row["nfe"], row["scale"]) == (setting, solver, nfe, scale):
            return row
    raise LookupError((setting, solver, nfe, scale))


def test_loads_offline_and_generates_finite_images_of_the_right_shape():
    flow = pretrained("digits")
    assert isinstance(flow, flowdiff.ProbabilityFlow)
    assert flow.prediction_type == "epsilon" and flow.schedule.num_train_timesteps == 1000
    n_params = sum(p.numel() for p in flow.model.parameters())
    assert n_params == load_config("digits")["training"]["parameters"] < 500_000
    assert (WEIGHTS / "digits.safetensors").stat().st_size < 4 * 2**20
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = flowdiff.generate(flow, noise, solver="euler", steps=10).x
        x64 = flowdiff.generate(flow, noise.double(), solver="euler", steps=10).x
        xc = flowdiff.generate(flow, noise, solver="euler", steps=10,
                               model_kwargs={"class_labels": torch.arange(6)}).x
    assert x.shape == (6, 1, 8, 8) and x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    assert x64.dtype == torch.float64
    torch.testing.assert_close(x64.float(), x, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(x, xc)  # labels reach the network; no labels = the null class
    assert flowdiff.models.pretrained.digits_data is digits_data


@pytest.mark.parametrize("setting, scale", [("unconditional", None), ("conditional", 1.0)])
def test_quality_reproduces_the_recorded_figures(setting, scale):
    """bench_models.py's figures (500 samples) reproduced on 150 samples of the same seeded noise.

    Tolerances are about four standard errors at n = 150: confidence and accuracy ±0.08,
    digit score ±0.8, NN ratio ±0.12."""
    bench = _bench()
    recorded = _recorded(setting, "heun", 19, scale)
    noise, labels = bench.noise_and_labels(recorded["n"], recorded["seed"])
    noise, labels = noise[:150], labels[:150]
    with torch.no_grad():
        res = bench.sample(pretrained("digits"), noise, labels, "heun", 19, scale)
    assert res.stats.nfe == 19
    q = sample_quality(res.x, None if scale is None else labels)
    assert abs(q["confidence"] - recorded["confidence"]) < 0.08
    assert abs(q["digit_score"] - recorded["digit_score"]) < 0.8
    assert abs(q["nn_ratio"] - recorded["nn_ratio"]) < 0.12
    if scale is not None:
        assert abs(q["accuracy"] - recorded["accuracy"]) < 0.08


def test_quality_measure_separates_real_digits_from_noise_and_copies():
    test, train = digits_data("test"), digits_data("train")
    real = sample_quality(test.images, test.labels)
    assert real["nn_ratio"] == 1.0 and real["accuracy"] > 0.9 and real["digit_score"] > 7
    copies = sample_quality(train.images[:200])
    assert copies["nn_distance"] < 1e-6  # memorised samples sit on the training set
    noisy = sample_quality(test.images + 0.5 * torch.randn(test.images.shape, generator=torch.Generator()
                                                           .manual_seed(0)))
    assert noisy["nn_ratio"] > 1.3 and noisy["confidence"] < real["confidence"]
    junk = sample_quality(torch.rand(200, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert junk["nn_ratio"] > 2 and junk["digit_score"] < real["digit_score"]
    with pytest.raises(ValueError, match="images must have shape"):
        sample_quality(torch.zeros(5, 1, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        sample_quality(torch.full((3, 64), float("nan")))
    with pytest.raises(ValueError, match="labels must be 3 integers"):
        sample_quality(torch.zeros(3, 64), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        sample_quality([[0.0] * 64] * 3)


def test_digits_split_is_seeded_stratified_and_disjoint():
    train, test, every = digits_data("train"), digits_data("test"), digits_data("all")
    assert train.images.shape[0] + test.images.shape[0] == every.images.shape[0] == 1797
    assert train.images.shape[1:] == (1, 8, 8) and float(every.images.min()) == -1 and float(every.images.max()) == 1
    counts, test_counts = torch.bincount(every.labels), torch.bincount(test.labels)
    assert bool((test_counts == torch.ceil(0.2 * counts)).all())
    train_set = {tuple(x.flatten().tolist()) for x in train.images}
    leaked = sum(tuple(x.flatten().tolist()) in train_set for x in test.images)
    # the UCI digits contain a few exact duplicate images; an index-disjoint split may repeat those only
    assert leaked <= 3
    assert torch.equal(digits_data("test").images, test.images)
    assert load_config("digits")["data"]["num_train_images"] == train.images.shape[0]
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        digits_data("valid")


def test_training_is_reproducible(tmp_path):
    """Two short runs of the training script with the same seed write identical weights."""
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "training" / "train_digits.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    for out in ("a", "b"):
        train.main(["--steps", "3", "--batch", "8", "--out", str(tmp_path / out)])
    a, b = (load_config("digits", tmp_path / d)["sha256"] for d in ("a", "b"))
    assert a == b
    flow = pretrained("digits", directory=tmp_path / "a")
    assert flow.model.config == load_config("digits")["net"]


def _copy(tmp_path):
    for name in ("digits.safetensors", "digits.json"):
        shutil.copy(WEIGHTS / name, tmp_path / name)
    return tmp_path


def test_bad_names_and_files(tmp_path):
    with pytest.raises(ValueError, match="unknown pretrained model 'cifar'.*digits"):
        pretrained("cifar")
    with pytest.raises(FileNotFoundError, match="digits.json"):
        pretrained("digits", directory=tmp_path)
    d = _copy(tmp_path)
    weights = d / "digits.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="digits.safetensors is corrupt"):
        pretrained("digits", directory=d)
    weights.write_bytes(b"not safetensors")
    config = json.loads((d / "digits.json").read_text())
    config.pop("sha256")
    (d / "digits.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="could not be read as safetensors"):
        pretrained("digits", directory=d)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="digits.safetensors is missing"):
        pretrained("digits", directory=d)
    (d / "digits.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        pretrained("digits", directory=d)


def test_architecture_mismatch_and_bad_labels(tmp_path):
    d = _copy(tmp_path)
    config = json.loads((d / "digits.json").read_text())
    config["net"]["channels"] = [16, 32]
    (d / "digits.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match the architecture"):
        load_network("digits", directory=d)
    net = load_network("digits")
    x, t = torch.zeros(2, 1, 8, 8), torch.zeros(2)
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 9\]"):
        net(x, t, class_labels=torch.tensor([3, 11]))
    with pytest.raises(ValueError, match="class_labels must be integers"):
        net(x, t, class_labels=torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"x_t must have shape \(batch, 1, 8, 8\)"):
        net(torch.zeros(2, 1, 16, 16), t)


def test_generate_encode_decode_on_a_device(device):
    """The shipped network on ``device``: in float64 its images are the CPU's to rounding (float64, so that the
    GPU's TF32 convolutions do not enter), they stay on the device, and in float32 an exact (reversible) encode
    decodes back to the images within float32 rounding."""
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cpu64, dev64 = pretrained("digits"), pretrained("digits", device=device)
        cpu64.model.double()
        dev64.model.double()
        ref = flowdiff.generate(cpu64, noise.double(), solver="dpmpp_2m", nfe=10).x
        got = flowdiff.generate(dev64, noise.double().to(device), solver="dpmpp_2m", nfe=10).x
        flow = pretrained("digits", device=device)
        gen = flowdiff.generate(flow, noise.to(device), solver="dpmpp_2m", nfe=10)
        enc = flowdiff.encode(flow, gen.x, solver="reversible_heun", steps=10)
        dec = flowdiff.decode(flow, enc.latent)
    assert got.device == gen.x.device == enc.x.device == dec.x.device == noise.to(device).device
    assert gen.stats.nfe == 10 and dec.stats.nfe == enc.stats.nfe - 1
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-10, atol=1e-10)
    assert (dec.x - gen.x).abs().max().item() <= 16 * torch.finfo(torch.float32).eps
