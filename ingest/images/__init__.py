"""Image data sets on disk (the MVTec AD layout): reading, validation and resizing."""

from ingest.images.mvtec import (
    ImageItem,
    ImageRejected,
    MvtecDataset,
    MvtecLayoutError,
    decode_image,
    read_image,
    read_mask,
    resize_image,
    resize_mask,
)

__all__ = [
    "ImageItem",
    "ImageRejected",
    "MvtecDataset",
    "MvtecLayoutError",
    "decode_image",
    "read_image",
    "read_mask",
    "resize_image",
    "resize_mask",
]
