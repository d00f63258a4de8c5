"""AST bundle: teacher + student over features of a known channel count; maps and image scores."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.ast.student import Student, StudentConfig
from flows.ast.teacher import Teacher, TeacherConfig


@dataclass(frozen=True)
class ASTConfig:
    channels: int  # feature channels of the extractor's chosen block
    pos_channels: int = 32
    coupling_blocks: int = 4
    teacher_hidden: int = 256
    clamp: float = 3.0
    permutation_seed: int = 0
    student_blocks: int = 4
    student_width: int = 256

    def teacher_config(self) -> TeacherConfig:
        return TeacherConfig(
            channels=self.channels,
            coupling_blocks=self.coupling_blocks,
            hidden=self.teacher_hidden,
            pos_channels=self.pos_channels,
            clamp=self.clamp,
            permutation_seed=self.permutation_seed,
        )

    def student_config(self) -> StudentConfig:
        return StudentConfig(
            channels=self.channels,
            width=self.student_width,
            blocks=self.student_blocks,
            pos_channels=self.pos_channels,
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def distance_map(teacher_out: Tensor, student_out: Tensor) -> Tensor:
    """Channel mean of the squared difference per position: (B, C, H, W) x2 -> (B, H, W)."""
    if teacher_out.dim() != 4 or teacher_out.shape != student_out.shape:
        raise ValueError(
            "expected teacher and student outputs of one shape (B, C, H, W), received "
            f"{tuple(teacher_out.shape)} and {tuple(student_out.shape)}"
        )
    return (teacher_out - student_out).pow(2).mean(1)


def _check_map(amap: Tensor) -> None:
    if not isinstance(amap, Tensor) or amap.dim() != 3:
        shape = tuple(amap.shape) if isinstance(amap, Tensor) else type(amap).__name__
        raise ValueError(f"expected an anomaly map of shape (B, H, W), received {shape}")


def _gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    radius = max(1, math.ceil(4 * sigma))
    coords = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = maps.unsqueeze(1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def upsample(
    amap: Tensor,
    size: tuple[int, int],
    *,
    mode: Literal["bilinear", "bicubic"] = "bilinear",
    sigma: float | None = None,
) -> Tensor:
    """(B, h, w) -> (B, H, W) by interpolation, optionally Gaussian-smoothed (sigma in output pixels).

    Bicubic can undershoot; the result is clipped at 0 so a map stays a non-negative distance.
    """
    _check_map(amap)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"expected size (height, width), received {size}")
    out = F.interpolate(amap.unsqueeze(1), size=tuple(size), mode=mode, align_corners=False).squeeze(1)
    if sigma is not None and sigma > 0:
        if min(out.shape[1:]) <= math.ceil(4 * sigma):
            raise ValueError(f"sigma {sigma} is too large for a map of size {tuple(out.shape[1:])}")
        out = _gaussian_blur(out, sigma)
    return out.clamp_min(0)


def image_score(amap: Tensor, reduce: Literal["mean", "max"] = "mean") -> Tensor:
    """One score per image from a map (B, H, W): its mean or its max."""
    _check_map(amap)
    if reduce == "mean":
        return amap.flatten(1).mean(1)
    if reduce == "max":
        return amap.flatten(1).amax(1)
    raise ValueError(f"reduce must be 'mean' or 'max', received {reduce!r}")


class AST(nn.Module):
    """Teacher (flow) and student over features (B, C, H, W).

    ``anomaly_map`` is their distance per position.
    """

    def __init__(self, config: ASTConfig) -> None:
        super().__init__()
        self.config = config
        self.teacher = Teacher(config.teacher_config())
        self.student = Student(config.student_config())

    @property
    def channels(self) -> int:
        return self.config.channels

    def anomaly_map(self, features: Tensor) -> Tensor:
        """Channel mean of (teacher z − student output)² per position, shape (B, H, W)."""
        z, _ = self.teacher.forward_z(features)
        return distance_map(z, self.student.predict(features))

    def student_loss(self, features: Tensor) -> Tensor:
        """Student regression loss: mean over positions of the squared ℓ2 distance to the teacher's z."""
        with torch.no_grad():
            z, _ = self.teacher.forward_z(features)
        return (z - self.student.predict(features)).pow(2).sum(1).mean()
