"""A reversible latent's state keeps the record of the solver and options that made it (``made_by``) through flowdiff:
``Latent.save``/``load``, ``Latent.to`` and the decode's solve, which refuses a state made by another configuration.

Before, flowdiff rebuilt the state from its tensors and time wherever it saved, loaded, moved or decoded a latent, so
only the type, time, shape and dtype were checked: a latent of ``reversible(base='euler', coupling=0.999)`` whose
options were changed (in memory, or by hand in its file) decoded with the other coupling to other images, without a
word.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

import flowdiff as fd
import solvers
from flowdiff.engine.latent import Latent
from flowdiff.models.analytic import Mixture

#: (solver, options, images' dtype): each records another maker (float32 images give reversible_heun its 2^-40 grid)
CONFIGS = [("reversible", {}, torch.float64), ("reversible", {"coupling": 0.99}, torch.float64),
           ("reversible", {"base": "heun"}, torch.float64), ("reversible_heun", {}, torch.float64),
           ("reversible_heun", {}, torch.float32)]
IDS = [f"{n}{o}-{str(d).removeprefix('torch.')}" for n, o, d in CONFIGS]
STEPS = 4


@pytest.fixture(scope="module")
def mixture():
    gen = torch.Generator().manual_seed(0)
    model = Mixture(torch.rand(6, 1, 4, 4, dtype=torch.float64, generator=gen) * 2 - 1, 0.3)
    return model.flow(), model.sample(2, generator=gen).clamp(-1, 1)


def _encode(mixture, name="reversible", opts=None, dtype=torch.float64) -> Latent:
    flow, x = mixture
    solver = solvers.get(name, **(opts or {})) if opts else name
    return fd.encode(flow, x.to(dtype), solver=solver, steps=STEPS).latent


def _unrecorded(latent: Latent) -> Latent:
    """``latent`` with its state's record dropped: what flowdiff decoded before it kept ``made_by``."""
    return dataclasses.replace(latent, solver_state=latent.solver_state._replace(made_by=None))


def _rewrite(path, edit) -> None:
    """Write the latent file at ``path`` again with ``edit(metadata)`` applied to its (JSON-valued) metadata: a file
    edited by hand, or one written before an entry existed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has keys(), no iteration)
    edit(meta)
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})


def _header_metadata(path) -> dict:
    data = path.read_bytes()
    return json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]


@pytest.mark.parametrize(("name", "opts", "dtype"), CONFIGS, ids=IDS)
def test_a_saved_and_loaded_reversible_latent_keeps_its_maker_and_decodes_bit_for_bit(mixture, tmp_path, name, opts,
                                                                                       dtype):
    """Was: Latent.load rebuilt the state without its maker (made_by None)."""
    flow, x = mixture
    latent = _encode(mixture, name, opts, dtype)
    made = latent.solver_state.made_by
    assert made == solvers.get(latent.solver, **latent.solver_options).state_maker
    latent.save(tmp_path / "z.safetensors")
    back = Latent.load(tmp_path / "z.safetensors")
    assert back.solver_state.made_by == made
    assert json.loads(_header_metadata(tmp_path / "z.safetensors")["state_made_by"]) == made
    decoded = fd.decode(flow, back).x
    # the record changes no number: the decode of the in-memory latent, and the record-less one's (as before)
    assert torch.equal(decoded, fd.decode(flow, latent).x)
    assert torch.equal(decoded, fd.decode(flow, _unrecorded(back)).x)
    assert decoded.dtype == dtype
    assert (decoded - x.to(dtype)).abs().max() < (1e-10 if dtype == torch.float64 else 1e-6)


def test_the_files_metadata_stays_in_key_order(mixture, tmp_path):
    """The record is one more metadata entry: Latent.save still writes the header sorted, the same bytes each time."""
    latent = _encode(mixture, "reversible", {"coupling": 0.99})
    latent.save(tmp_path / "a.safetensors")
    latent.save(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    meta = _header_metadata(tmp_path / "a.safetensors")
    assert "state_made_by" in meta and list(meta) == sorted(meta)


def test_a_plain_latent_file_has_no_record(mixture, tmp_path):
    flow, x = mixture
    latent = fd.encode(flow, x, solver="heun", steps=STEPS).latent
    latent.save(tmp_path / "p.safetensors")
    assert "state_made_by" not in _header_metadata(tmp_path / "p.safetensors")


def test_a_moved_latent_keeps_its_maker(mixture, device):
    """Was: Latent.to rebuilt the state without its maker."""
    latent = _encode(mixture, "reversible", {"coupling": 0.99})
    moved = latent.to(device)
    assert moved.solver_state.z.device.type == device.type
    assert moved.solver_state.made_by == "reversible(base='euler', coupling=0.99)"
    assert moved.to("cpu").solver_state.made_by == latent.solver_state.made_by


def test_a_decode_whose_options_were_changed_is_refused_by_the_maker(mixture, tmp_path):
    """Was: the decode rebuilt the state without its maker, and undid the encode of coupling 0.999 with 0.5."""
    flow, x = mixture
    latent = _encode(mixture)
    made = "latent.solver_state was made by \"reversible(base='euler', coupling=0.999)\", not by solver 'reversible'"
    latent.save(tmp_path / "z.safetensors")
    for each in (latent, latent.to("cpu"), Latent.load(tmp_path / "z.safetensors")):
        each.solver_options = {"coupling": 0.5}  # changed after it was built (a dataclass field)
        with pytest.raises(ValueError, match=re.escape(made)):
            fd.decode(flow, each)
    # what it decoded to without the record: other images
    wrong = _unrecorded(_encode(mixture))
    wrong.solver_options = {"coupling": 0.5}
    assert (fd.decode(flow, wrong).x - x).abs().max() > 1e-3


def test_a_quantised_state_decoded_without_its_quantum_is_refused(mixture):
    flow, _ = mixture
    latent = _encode(mixture, "reversible_heun", {}, torch.float32)
    quantum = latent.solver_options["quantum"]
    latent.solver_options = {}
    with pytest.raises(ValueError, match=re.escape(f"made by 'reversible_heun(quantum={quantum!r})', not by solver "
                                                   "'reversible_heun'")):
        fd.decode(flow, latent)


def test_the_refusal_comes_before_any_evaluation(mixture):
    flow, x = mixture
    calls = []

    def counted(xbar, sigma):
        calls.append(sigma)
        return flow.sigma_field(xbar, sigma)

    counting = fd.ProbabilityFlow.from_sigma_field(counted, flow.schedule)
    latent = fd.encode(counting, x, solver="reversible", steps=STEPS).latent
    latent.solver_options = {"base": "heun"}
    calls.clear()
    with pytest.raises(ValueError, match=r"^latent\.solver_state was made by"):
        fd.decode(counting, latent)
    assert calls == []


@pytest.mark.parametrize(("entry", "value"), [("solver_options", json.dumps({"coupling": 0.5})),
                                              ("solver_options", json.dumps({"base": "heun", "coupling": 0.99})),
                                              ("state_made_by", "reversible(base='euler', coupling=0.5)")])
def test_a_hand_edited_file_whose_record_disagrees_is_refused(mixture, tmp_path, entry, value):
    """Was: a file whose options were edited loaded, and decoded with the edited coupling or base method."""
    latent = _encode(mixture, "reversible", {"coupling": 0.99})
    path = tmp_path / "edited.safetensors"
    latent.save(path)
    _rewrite(path, lambda meta: meta.__setitem__(entry, value))
    with pytest.raises(ValueError, match=r"latent file .*edited\.safetensors.*'state_made_by'") as info:
        Latent.load(path)
    message = str(info.value)
    assert "Latent.solver_state.made_by" in message
    made = value if entry == "state_made_by" else latent.solver_state.made_by
    assert repr(made) in message


@pytest.mark.parametrize("value", [3, None, ["reversible"]])
def test_a_record_that_is_not_a_string_is_refused(mixture, tmp_path, value):
    path = tmp_path / "bad.safetensors"
    _encode(mixture).save(path)
    _rewrite(path, lambda meta: meta.__setitem__("state_made_by", value))
    with pytest.raises(ValueError, match=r"metadata entry 'state_made_by' must be a string"):
        Latent.load(path)


def test_a_record_without_a_state_is_refused(mixture, tmp_path):
    flow, x = mixture
    path = tmp_path / "plain.safetensors"
    fd.encode(flow, x, solver="euler", steps=STEPS).latent.save(path)
    _rewrite(path, lambda meta: meta.__setitem__("state_made_by", "euler"))
    with pytest.raises(ValueError, match=r"'state_made_by' \('euler'\) records the maker of a reversible state, but "
                                         r"the file holds no state"):
        Latent.load(path)


@pytest.mark.parametrize(("name", "opts", "dtype"), CONFIGS, ids=IDS)
def test_a_file_written_before_the_record_still_decodes(mixture, tmp_path, name, opts, dtype):
    """A file without the entry (as every file written before it) loads with no record and decodes as it did, its
    state checked by its type, time, shape and dtype."""
    flow, _ = mixture
    latent = _encode(mixture, name, opts, dtype)
    path = tmp_path / "old.safetensors"
    latent.save(path)
    _rewrite(path, lambda meta: meta.pop("state_made_by"))
    assert "state_made_by" not in _header_metadata(path)
    old = Latent.load(path)
    assert old.solver_state.made_by is None
    assert torch.equal(fd.decode(flow, old).x, fd.decode(flow, latent).x)


def test_a_latent_built_with_a_record_of_another_maker_is_refused(mixture):
    latent = _encode(mixture)
    with pytest.raises(ValueError, match=r"^Latent\.solver_state\.made_by .* is \"reversible\(base='euler', "
                                         r"coupling=0\.999\)\", but solver='reversible' with solver_options="
                                         r"\{'coupling': 0\.5\} makes \"reversible\(base='euler', coupling=0\.5\)\""):
        dataclasses.replace(latent, solver_options={"coupling": 0.5})
    with pytest.raises(ValueError, match=r"^Latent\.solver_state\.made_by .* 'reversible_heun'"):
        dataclasses.replace(latent, solver="reversible_heun")
    with pytest.raises(TypeError, match=r"^Latent\.solver_state\.made_by must be a str"):
        dataclasses.replace(latent, solver_state=latent.solver_state._replace(made_by=1))
    dataclasses.replace(latent, solver_state=latent.solver_state._replace(made_by=None))  # no record: taken


def test_an_encode_whose_solver_a_latent_cannot_record_is_refused(mixture):
    """Was: solvers.Reversible(coupling=0.5), built directly, encoded a latent recorded as 'reversible' with no
    options, which decoded with coupling 0.999 to other images."""
    flow, x = mixture
    with pytest.raises(ValueError, match=re.escape("build it as solvers.get('reversible', ...) with the options of "
                                                   "\"reversible(base='euler', coupling=0.5)\"")):
        fd.encode(flow, x, solver=solvers.Reversible(coupling=0.5), steps=STEPS)
    with pytest.raises(ValueError, match=re.escape("recorded as 'reversible_heun(quantum=0.25)'")):
        fd.encode(flow, x, solver=solvers.ReversibleHeun(quantum=0.25), steps=STEPS)
    latent = fd.encode(flow, x, solver=solvers.get("reversible", coupling=0.5), steps=STEPS).latent
    assert latent.solver_options == {"coupling": 0.5}
    assert (fd.decode(flow, latent).x - x).abs().max() < 1e-10


@pytest.mark.parametrize(("name", "opts", "dtype"), CONFIGS[:2], ids=IDS[:2])
def test_a_folder_runs_per_image_latent_keeps_its_maker_and_decodes_as_its_row(mixture, name, opts, dtype):
    """``flowdiff encode --data`` cuts each batch's latent into one latent per image (``_one``), which rebuilt the
    state from its tensors and dropped its record: those files were checked by type, time and shape only."""
    from flowdiff.cli._dataset import _one

    flow, _ = mixture
    latent = _encode(mixture, name, opts, dtype)
    whole = fd.decode(flow, latent).x
    for i in range(latent.x.shape[0]):
        one = _one(latent, i, {})
        assert one.solver_state.made_by == latent.solver_state.made_by is not None
        # (a batch of one reduces in another order than the batch: equal to rounding, not bit for bit)
        torch.testing.assert_close(fd.decode(flow, one).x, whole[i:i + 1], rtol=0, atol=1e-12)
