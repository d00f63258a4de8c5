"""AST student: a conventional conv network regressing the teacher's z from features + positional encoding."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flows.ast.positional import positional_encoding_2d


@dataclass(frozen=True)
class StudentConfig:
    channels: int  # feature channels (input and output)
    width: int = 256
    blocks: int = 4
    pos_channels: int = 32
    negative_slope: float = 0.01

    def __post_init__(self) -> None:
        if self.channels < 1 or self.width < 1 or self.blocks < 0:
            raise ValueError(f"invalid student config {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResidualBlock(nn.Module):
    """x + (conv3x3 -> BN -> LeakyReLU -> conv3x3 -> BN), then LeakyReLU."""

    def __init__(self, width: int, slope: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(slope),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )
        self.act = nn.LeakyReLU(slope)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.body(x))


class Student(nn.Module):
    """conv3x3 -> LeakyReLU -> K residual blocks -> conv3x3 back to the feature channels."""

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        self.config = config
        self.head = nn.Sequential(
            nn.Conv2d(config.channels + config.pos_channels, config.width, 3, padding=1),
            nn.LeakyReLU(config.negative_slope),
        )
        self.blocks = nn.Sequential(
            *[ResidualBlock(config.width, config.negative_slope) for _ in range(config.blocks)]
        )
        self.tail = nn.Conv2d(config.width, config.channels, 3, padding=1)

    def check_input(self, x: Tensor) -> None:
        c = self.config.channels
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != c or min(x.shape[2:]) < 1:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"student expects features of shape (B, {c}, H, W), received {shape}")

    def predict(self, x: Tensor) -> Tensor:
        """Features (B, C, H, W) -> the predicted teacher output (B, C, H, W)."""
        self.check_input(x)
        pe = positional_encoding_2d(
            self.config.pos_channels, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype
        )
        h = torch.cat([x, pe.unsqueeze(0).expand(x.shape[0], -1, -1, -1)], dim=1)
        return self.tail(self.blocks(self.head(h)))
