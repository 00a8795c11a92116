"""A small class-conditional ε-network for 8×8 images: the model behind ``flowdiff.pretrained("digits")``.

A two-resolution U-Net (Ronneberger et al. 2015, in the form of Ho et al., "Denoising
Diffusion Probabilistic Models", 2020): residual blocks with group normalisation at 8×8
and 4×4, one skip connection per block, the timestep entering every block through a
sinusoidal embedding ("Attention Is All You Need") and an MLP. The class label is added to
the timestep embedding; label ``num_classes`` is the *null* class, trained with label
dropout so that the same weights are the unconditional model (Ho & Salimans,
"Classifier-Free Diffusion Guidance", 2021). ``class_labels=None`` means unconditional.

The call convention is flowdiff's ``model(x_t, t, **model_kwargs) -> ε``: x_t VP-scaled,
t a float timestep of shape (batch,) (fractional t is fine: the embedding is continuous).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of (fractional) timesteps t, shape (batch,) -> (batch, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift  # FiLM conditioning, as in improved DDPM's "scale-shift norm"
        h = self.conv2(nn.functional.silu(h))
        return self.skip(x) + h


class DigitsNet(nn.Module):
    """ε_θ(x_t, t, class_labels) on (batch, 1, 8, 8) images; see the module docstring.

    ``channels`` are the widths at 8×8 and 4×4; ``num_classes`` real classes plus the null
    class. Parameters are float32; inputs of another dtype are cast to the parameters'
    dtype and the output returned in the input's dtype (call ``.double()`` on the network
    for a float64 model).
    """

    def __init__(self, channels: Sequence[int] = (24, 48), num_classes: int = 10, emb_dim: int = 128,
                 in_channels: int = 1, groups: int = 8) -> None:
        super().__init__()
        c0, c1 = (int(c) for c in channels)
        self.config: dict[str, Any] = {"channels": [c0, c1], "num_classes": num_classes, "emb_dim": emb_dim,
                                       "in_channels": in_channels, "groups": groups}
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)
        self.emb_dim = emb_dim
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)
        self.down0 = _ResBlock(c0, c0, emb_dim, groups)
        self.downsample = nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.down1 = _ResBlock(c1, c1, emb_dim, groups)
        self.mid = _ResBlock(c1, c1, emb_dim, groups)
        self.up1 = _ResBlock(2 * c1, c1, emb_dim, groups)
        self.upsample = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c1, c0, 3, padding=1))
        self.up0 = _ResBlock(2 * c0, c0, emb_dim, groups)
        self.norm_out = nn.GroupNorm(groups, c0)
        self.conv_out = nn.Conv2d(c0, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One sample's shape, (in_channels, 8, 8): checked by the entry points before a solve
        (:meth:`flowdiff.ProbabilityFlow.check_input`)."""
        return (self.in_channels, 8, 8)

    @property
    def null_class(self) -> int:
        """The label that means "no class": the unconditional model."""
        return self.num_classes

    def forward(self, x_t: Tensor, t: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        if x_t.ndim != 4 or x_t.shape[1] != self.in_channels or x_t.shape[2:] != (8, 8):
            raise ValueError(f"x_t must have shape (batch, {self.in_channels}, 8, 8), got {tuple(x_t.shape)}")
        dtype = self.conv_in.weight.dtype
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        if class_labels is None:
            labels = torch.full((batch,), self.null_class, dtype=torch.long, device=x_t.device)
        else:
            labels = torch.as_tensor(class_labels, device=x_t.device)
            if labels.ndim == 0:
                labels = labels.expand(batch)
            if labels.shape != (batch,) or labels.is_floating_point():
                raise ValueError(f"class_labels must be integers of shape ({batch},) or a scalar, "
                                 f"got {labels.dtype} {tuple(labels.shape)}")
            labels = labels.long()
            bad = (labels < 0) | (labels > self.null_class)
            message = (f"class_labels must lie in [0, {self.num_classes - 1}], or be {self.null_class} (the null "
                       "class: unconditional)")
            if labels.device.type == "cpu":
                if bool(bad.any()):
                    raise ValueError(message)
            else:  # checked on the device: reading it on the host would stall every step of a solve
                torch._assert_async(~bad.any(), message)
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim).to(dtype)) + self.class_emb(labels)
        emb = nn.functional.silu(emb)
        h0 = self.down0(self.conv_in(x_t.to(dtype)), emb)
        h1 = self.down1(self.downsample(h0), emb)
        h = self.mid(h1, emb)
        h = self.up1(torch.cat([h, h1], dim=1), emb)
        h = self.up0(torch.cat([self.upsample(h), h0], dim=1), emb)
        out = self.conv_out(nn.functional.silu(self.norm_out(h)))
        return out.to(x_t.dtype)
