"""A small counting network, and ensembles of it, for the tests of torch.func transforms around flowdiff's solves."""

from __future__ import annotations

import torch


class TinyNet(torch.nn.Module):
    """ε(x, t) = tanh(W x + b)·(1 + t/1000) on 4-dim float64 states; counts its calls. ``std=None``: torch's default
    initialisation after ``torch.manual_seed(seed)``; else W drawn N(0, std²) from a generator seeded ``seed``."""

    def __init__(self, seed: int, std: float | None = None) -> None:
        super().__init__()
        if std is None:
            torch.manual_seed(seed)
        self.lin = torch.nn.Linear(4, 4).double()
        if std is not None:
            torch.nn.init.normal_(self.lin.weight, std=std, generator=torch.Generator().manual_seed(seed))
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return torch.tanh(self.lin(x)) * (1 + t.reshape(-1, 1) / 1000)
