"""An image–caption set for zero-shot training (IP-Adapter): a folder of images with ``.txt`` captions.

Each sample's c_p is its image (no trigger phrase), so ``personal`` is empty text and ``general`` is the
whole caption. Classifier-free-guidance dropout (IP-Adapter's recipe: image, text, or both dropped) is
drawn per (seed, epoch, index), so the trainer's (step, micro, rank) addressing makes a resumed run see
the same samples and the same drops. A Hugging Face ``datasets`` stream: :mod:`accord.data.streamed`.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from ..errors import DataError
from .references import _check_folder, _read_sidecar, augmentation_generator, list_images

__all__ = ["CaptionedImages", "center_square", "cfg_sample"]


class CaptionedImages(torch.utils.data.Dataset):
    def __init__(self, folder, resolution: int, *, seed: int = 0, image_dropout: float = 0.05,
                 text_dropout: float = 0.05, both_dropout: float = 0.05):
        folder = _check_folder(folder, "image-caption folder")
        self.paths = list_images(folder)
        if not self.paths:
            raise DataError(f"image-caption folder {folder} has no images; put images with .txt captions there")
        self.captions = [(_read_sidecar(p.with_suffix(".txt")) if p.with_suffix(".txt").is_file() else None) or ""
                         for p in self.paths]
        self.resolution, self.seed, self.epoch = resolution, seed, 0
        self.image_dropout, self.text_dropout, self.both_dropout = image_dropout, text_dropout, both_dropout

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        with Image.open(self.paths[index]) as im:
            img = im.convert("RGB")
        u = float(torch.rand((), generator=augmentation_generator(self.seed, self.epoch, index)))
        return cfg_sample(img, self.captions[index], index, u,
                          (self.image_dropout, self.text_dropout, self.both_dropout), self.resolution)


def center_square(img: Image.Image, resolution: int) -> tuple[Image.Image, float, int, int]:
    """Resize the short side to ``resolution`` and crop the center square; returns (image, scale, top, left)."""
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution)), scale, top, left


def cfg_sample(img: Image.Image, caption, index: int, u: float, dropouts: tuple[float, float, float],
               resolution: int) -> dict:
    """One training sample: center square, and IP-Adapter's CFG dropout decided by one uniform draw ``u``
    (``[0, p_image)`` drops the image, ``[p_image, p_image + p_text)`` the caption, the next ``p_both`` both)."""
    p_image, p_text, p_both = dropouts
    h, w = img.height, img.width
    img, scale, top, left = center_square(img, resolution)
    drop_image = u < p_image or p_image + p_text <= u < p_image + p_text + p_both
    drop_text = p_image <= u < p_image + p_text + p_both
    caption = "" if drop_text or caption is None else str(caption)
    return {
        "pixel_values": pil_to_tensor(img).float().div(127.5).sub(1.0),
        "caption": caption,
        "personal": "",
        "general": caption,
        "index": index,
        "drop_image": drop_image,
        "original_size": torch.tensor([h, w]),
        "crop_top_left": torch.tensor([round(top / scale), round(left / scale)]),
    }
