"""2-D sinusoidal positional encoding (as in the AST reference code): half the channels encode x, half y."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def positional_encoding_2d(
    channels: int,
    height: int,
    width: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Deterministic encoding of shape (channels, height, width); channels must be a multiple of 4.

    Channels [0, C/2) hold sin/cos pairs of the column index, [C/2, C) of the row index, at frequencies
    10000^(-2k/(C/2)).
    """
    if channels <= 0 or channels % 4:
        raise ValueError(f"positional encoding needs a positive multiple of 4 channels, got {channels}")
    if height <= 0 or width <= 0:
        raise ValueError(f"positional encoding needs a positive height and width, got {height}x{width}")
    half = channels // 2
    div = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * -(math.log(10000.0) / half))
    pos_w = torch.arange(width, dtype=torch.float64)[:, None] * div[None, :]  # (W, half/2)
    pos_h = torch.arange(height, dtype=torch.float64)[:, None] * div[None, :]  # (H, half/2)
    pe = torch.zeros(channels, height, width, dtype=torch.float64)
    pe[0:half:2] = torch.sin(pos_w).T[:, None, :].expand(-1, height, -1)
    pe[1:half:2] = torch.cos(pos_w).T[:, None, :].expand(-1, height, -1)
    pe[half::2] = torch.sin(pos_h).T[:, :, None].expand(-1, -1, width)
    pe[half + 1 :: 2] = torch.cos(pos_h).T[:, :, None].expand(-1, -1, width)
    return pe.to(device=device, dtype=dtype)
