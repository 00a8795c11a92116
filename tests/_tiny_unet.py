"""The tests' tiny diffusers UNet (one channel, 8×8, seeded): built here once instead of in each file."""

from __future__ import annotations

import torch


def tiny_unet(diffusers, seed: int = 0):
    """A seeded ``diffusers.UNet2DModel`` small enough for a test, in eval mode."""
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, norm_num_groups=4).eval()
