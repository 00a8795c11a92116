"""A latent file's bytes depend only on the latent: two identical encodes write identical files."""

from __future__ import annotations

import json

import torch

import flowdiff
from flowdiff.engine.latent import Latent
from flowdiff.models.analytic import Gaussian


def _header(data: bytes) -> bytes:
    return data[8:8 + int.from_bytes(data[:8], "little")]


def test_the_same_latent_saved_again_writes_the_same_bytes(tmp_path):
    """safetensors keeps a file's metadata in a hash map whose order changes from one save to the next: identical
    runs wrote latent files whose headers differed (the tensors were equal), so a byte compare of two runs' outputs
    failed where nothing differed."""
    schedule = flowdiff.Schedule.linear()
    flow = flowdiff.ProbabilityFlow(Gaussian(torch.tensor([0.5, -0.3, 0.1]), torch.tensor([0.4, 2.0, 0.1]), schedule),
                                    schedule)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    latent = flowdiff.encode(flow, x, steps=3, solver="heun").latent
    files = []
    for k in range(6):
        latent.save(tmp_path / f"z{k}.safetensors")
        files.append((tmp_path / f"z{k}.safetensors").read_bytes())
    assert all(f == files[0] for f in files[1:])
    meta = json.loads(_header(files[0]))["__metadata__"]
    assert list(meta) == sorted(meta) and len(meta) >= 8
    back = Latent.load(tmp_path / "z5.safetensors")
    assert torch.equal(back.x, latent.x) and back.solver == latent.solver
    assert torch.equal(flowdiff.decode(flow, back).x, flowdiff.decode(flow, latent).x)
