"""Baselines for AST on the same frozen features, each giving a map per image like AST does.

- `teacher_nll_map`: the teacher's own negative log-likelihood per position (the paper's ablation: the
  student-teacher distance should beat it).
- `FeatureNN`: distance of each position's feature vector to its nearest neighbour among all positions
  of the training images (a memory bank of normal patches, PatchCore without its coreset), optionally
  a seeded random subset of at most `max_bank` vectors to bound memory and time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flows.ast.teacher import Teacher


def teacher_nll_map(teacher: Teacher, features: Tensor) -> Tensor:
    """Per-position NLL divided by the channel count, (B, h, w)."""
    return teacher.nll_map(features) / teacher.config.channels


class FeatureNN:
    """Nearest-neighbour ℓ2 distance of each feature vector to a bank of normal feature vectors."""

    def __init__(self, max_bank: int = 65536, seed: int = 0) -> None:
        if max_bank < 1:
            raise ValueError(f"max_bank must be >= 1, got {max_bank}")
        self.max_bank = max_bank
        self.seed = seed
        self.bank: Tensor | None = None

    def fit(self, features: Tensor) -> FeatureNN:
        if features.dim() != 4 or len(features) < 1:
            raise ValueError(f"expected training features (N, C, h, w), received {tuple(features.shape)}")
        flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).float()
        if len(flat) > self.max_bank:
            generator = torch.Generator().manual_seed(self.seed)
            flat = flat[torch.randperm(len(flat), generator=generator)[: self.max_bank]]
        self.bank = flat.contiguous()
        return self

    @torch.no_grad()
    def map(self, features: Tensor, *, chunk: int = 4096) -> Tensor:
        """(B, C, h, w) -> (B, h, w) nearest-neighbour distances."""
        if self.bank is None:
            raise RuntimeError("FeatureNN.map before fit")
        if features.dim() != 4 or features.shape[1] != self.bank.shape[1]:
            raise ValueError(
                f"expected features (B, {self.bank.shape[1]}, h, w), received {tuple(features.shape)}"
            )
        b, c, h, w = features.shape
        bank = self.bank.to(features.device)
        queries = features.permute(0, 2, 3, 1).reshape(-1, c).float()
        out = torch.empty(len(queries), device=features.device)
        for start in range(0, len(queries), chunk):
            q = queries[start : start + chunk]
            # cdist's matrix-product form finds the neighbour fast but loses digits in the distance:
            # recompute the distance to the neighbour it found exactly
            nearest = torch.cdist(q, bank).argmin(1)
            out[start : start + chunk] = (q - bank[nearest]).norm(dim=1)
        return out.view(b, h, w)
