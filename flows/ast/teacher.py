"""AST teacher: a normalizing flow over the feature map, built from FrEIA invertible modules.

Each of N blocks is a fixed random channel permutation (``FrEIA.modules.PermuteRandom``; the permutation is a
non-trainable parameter, so it lives in the state_dict) followed by a conditional GLOW-style affine coupling
whose subnets are conv3x3 -> ReLU -> conv3x3 (replicate padding, output gain initialised to 0, so a fresh flow
is the identity), conditioned on the 2-D positional encoding. Scales are soft-clamped with
α·0.636·atan(s/α). Every block acts on channels position by position (the subnets only look at the other
half), so log|det J| splits into one term per position: ``forward_z`` returns that map.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, cast

import FrEIA.modules as Fm
import numpy as np
import torch
from torch import Tensor, nn

from flows.ast.positional import positional_encoding_2d


@dataclass(frozen=True)
class TeacherConfig:
    channels: int  # feature channels
    coupling_blocks: int = 4
    hidden: int = 256
    pos_channels: int = 32
    clamp: float = 3.0
    permutation_seed: int = 0

    def __post_init__(self) -> None:
        if self.channels < 2:
            raise ValueError(f"the teacher needs at least 2 feature channels, got {self.channels}")
        if self.coupling_blocks < 1 or self.hidden < 1 or self.clamp <= 0:
            raise ValueError(f"invalid teacher config {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SubNet(nn.Module):
    """conv3x3 -> ReLU -> conv3x3 with a learnable output gain initialised to 0."""

    def __init__(self, channels_in: int, channels_out: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels_in, hidden, 3, padding=1, padding_mode="replicate"),
            nn.ReLU(),
            nn.Conv2d(hidden, channels_out, 3, padding=1, padding_mode="replicate"),
        )
        self.gain = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) * self.gain


class ConditionalAffineCoupling(Fm.InvertibleModule):
    """GLOW coupling of two channel halves, both transformed; each subnet sees the other half and the
    condition.

    ``couple`` returns the output and log|det J| per position (B, H, W); FrEIA's ``forward`` sums it
    per sample.
    """

    def __init__(
        self,
        dims_in: list[tuple[int, ...]],
        dims_c: list[tuple[int, ...]],
        hidden: int,
        clamp: float,
    ) -> None:
        super().__init__(dims_in, dims_c)
        channels = dims_in[0][0]
        cond = dims_c[0][0]
        self.split = (channels // 2, channels - channels // 2)
        self.clamp = clamp
        self.subnet1 = SubNet(self.split[1] + cond, 2 * self.split[0], hidden)  # sees x2 -> (s1, t1)
        self.subnet2 = SubNet(self.split[0] + cond, 2 * self.split[1], hidden)  # sees y1 -> (s2, t2)

    def _soft_clamp(self, s: Tensor) -> Tensor:
        return self.clamp * 0.636 * torch.atan(s / self.clamp)

    def _scale_shift(self, net: nn.Module, other: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        s, t = net(torch.cat([other, cond], dim=1)).chunk(2, dim=1)
        return self._soft_clamp(s), t

    def couple(self, x: Tensor, cond: Tensor, rev: bool = False) -> tuple[Tensor, Tensor]:
        a, b = torch.split(x, list(self.split), dim=1)
        if not rev:
            s1, t1 = self._scale_shift(self.subnet1, b, cond)
            y1 = a * torch.exp(s1) + t1
            s2, t2 = self._scale_shift(self.subnet2, y1, cond)
            y2 = b * torch.exp(s2) + t2
            return torch.cat([y1, y2], dim=1), s1.sum(1) + s2.sum(1)
        s2, t2 = self._scale_shift(self.subnet2, a, cond)
        x2 = (b - t2) * torch.exp(-s2)
        s1, t1 = self._scale_shift(self.subnet1, x2, cond)
        x1 = (a - t1) * torch.exp(-s1)
        return torch.cat([x1, x2], dim=1), -(s1.sum(1) + s2.sum(1))

    def forward(
        self, x: list[Tensor], c: list[Tensor] | None = None, rev: bool = False, jac: bool = True
    ) -> tuple[tuple[Tensor], Tensor]:
        if not c:
            raise ValueError("ConditionalAffineCoupling needs the positional encoding as its condition")
        y, log_det = self.couple(x[0], c[0], rev=rev)
        return (y,), log_det.flatten(1).sum(1)

    def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return input_dims


class Teacher(nn.Module):
    """Normalizing flow over features (B, C, H, W), any H, W; z has x's shape and is standard normal."""

    def __init__(self, config: TeacherConfig) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        # FrEIA modules take nominal dims; nothing here depends on H, W
        dims: list[tuple[int, ...]] = [(c, 1, 1)]
        dims_c: list[tuple[int, ...]] = [(config.pos_channels, 1, 1)]
        self.permutations = nn.ModuleList()
        self.couplings = nn.ModuleList()
        # PermuteRandom reseeds numpy's global RNG: keep the caller's RNG state untouched
        saved = np.random.get_state()
        try:
            for block in range(config.coupling_blocks):
                self.permutations.append(Fm.PermuteRandom(dims, seed=config.permutation_seed + block))
                self.couplings.append(ConditionalAffineCoupling(dims, dims_c, config.hidden, config.clamp))
        finally:
            np.random.set_state(saved)

    def _blocks(self) -> list[tuple[nn.Module, ConditionalAffineCoupling]]:
        return [
            (perm, cast(ConditionalAffineCoupling, coupling))
            for perm, coupling in zip(self.permutations, self.couplings, strict=True)
        ]

    def check_input(self, x: Tensor, what: str = "features") -> None:
        c = self.config.channels
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != c or min(x.shape[2:]) < 1:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"teacher expects {what} of shape (B, {c}, H, W), received {shape}")

    def condition(self, x: Tensor) -> Tensor:
        """The positional encoding for x's spatial size, broadcast over the batch."""
        pe = positional_encoding_2d(
            self.config.pos_channels, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype
        )
        return pe.unsqueeze(0).expand(x.shape[0], -1, -1, -1)

    def forward_z(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x -> (z, log|det ∂z/∂x| per position, shape (B, H, W))."""
        self.check_input(x)
        cond = self.condition(x)
        log_det = x.new_zeros(x.shape[0], x.shape[2], x.shape[3])
        for perm, coupling in self._blocks():
            (x,), _ = perm([x])
            x, ld = coupling.couple(x, cond)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z -> (x, log|det ∂x/∂z| per position, shape (B, H, W))."""
        self.check_input(z, "latents")
        cond = self.condition(z)
        log_det = z.new_zeros(z.shape[0], z.shape[2], z.shape[3])
        for perm, coupling in reversed(self._blocks()):
            z, ld = coupling.couple(z, cond, rev=True)
            (z,), _ = perm([z], rev=True)
            log_det = log_det + ld
        return z, log_det

    def nll_map(self, x: Tensor) -> Tensor:
        """Per position: 0.5·Σ_c z² − log|det J| (the NLL without its constant), shape (B, H, W)."""
        z, log_det = self.forward_z(x)
        return 0.5 * z.pow(2).sum(1) - log_det

    def loss(self, x: Tensor) -> Tensor:
        """Training loss: the mean NLL per position, divided by the channel count."""
        return self.nll_map(x).mean() / self.config.channels
