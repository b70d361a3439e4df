"""Image files in, training tensors out: decoding upright RGB, cover-resizing crops, the [-1, 1] tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

_EXIF_ORIENTATION = 0x0112


def probe_image(path: Path) -> tuple[int, int]:
    """Decode the image once (JPEG at 1/8 scale) so corrupt files fail at setup; returns its upright (w, h)."""
    with Image.open(path) as img:
        size = img.size
        if img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # rotated by 90°: width and height swap
            size = size[::-1]
        img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
    return size


def load_rgb(path: Path) -> Image.Image:
    """The upright RGB image: EXIF orientation applied, transparency composited on white."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return img.convert("RGB")


def square_crop(img: Image.Image, size: int, offset: tuple[float, float] = (0.5, 0.5)) -> Image.Image:
    """Resize the shorter side to ``size`` and crop a square; offset (0..1, 0..1) places it (0.5 = centre)."""
    return cover_crop(img, (size, size), offset)


def letterbox(img: Image.Image, size: int) -> Image.Image:
    """The whole image in a ``size``×``size`` square: padded with black to a centred square (the odd pixel of
    padding right or below), then resized (bicubic) — how the paper fits its dataset images to the encoder."""
    w, h = img.size
    side = max(w, h)
    square = Image.new("RGB", (side, side))
    square.paste(img.convert("RGB"), ((side - w) // 2, (side - h) // 2))
    return square if side == size else square.resize((size, size), Image.Resampling.BICUBIC)


def crop_box(image_size: tuple[int, int], size: tuple[int, int], offset: tuple[float, float] = (0.5, 0.5)
             ) -> tuple[float, float, float, float]:
    """The (left, top, width, height) in an image of ``image_size`` (w, h) that `cover_crop` turns into ``size``."""
    w, h = image_size
    if size[0] * h >= size[1] * w:  # the target is relatively wider: keep the full width
        box_w, box_h = float(w), w * size[1] / size[0]
    else:
        box_w, box_h = h * size[0] / size[1], float(h)
    return (w - box_w) * offset[0], (h - box_h) * offset[1], box_w, box_h


def cover_crop(img: Image.Image, size: tuple[int, int], offset: tuple[float, float] = (0.5, 0.5)) -> Image.Image:
    """Resize to cover ``size`` (w, h) and crop it out; offset (0..1, 0..1) places the crop (0.5 = centre)."""
    left, top, box_w, box_h = crop_box(img.size, size, offset)
    # Cropping in source coordinates inside resize avoids resampling pixels that are then thrown away.
    return img.resize(size, Image.Resampling.LANCZOS, box=(left, top, left + box_w, top + box_h), reducing_gap=3.0)


def size_conditioning(image_size: tuple[int, int], size: tuple[int, int], offset: tuple[float, float] = (0.5, 0.5),
                      flip: bool = False) -> torch.Tensor:
    """SDXL's micro-conditioning of an image of ``image_size`` (w, h) trained at ``size`` (w, h) through
    `cover_crop`: original height and width, crop top and left, target height and width (float32 ``[6]``).

    As diffusers' ``train_text_to_image_sdxl.py`` computes it (the SDXL paper's c_size and c_crop): the file's
    size, and the crop's corner in the image resized to cover the target, rounded; a mirrored image's in the
    mirrored image (the resized width less the crop's right edge).
    """
    w, h = image_size
    left, top, box_w, _ = crop_box(image_size, size, offset)
    scale = size[0] / box_w
    if flip:
        left = w - left - box_w
    return torch.tensor([h, w, round(top * scale), round(left * scale), size[1], size[0]], dtype=torch.float32)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 HWC RGB → float32 CHW in [-1, 1]."""
    array = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float().div_(127.5).sub_(1.0)
