"""An image–caption set for zero-shot training (IP-Adapter): a folder of images with ``.txt`` captions.

Each sample's c_p is its image (no trigger phrase), so ``personal`` is empty text and ``general`` is the
whole caption. Classifier-free-guidance dropout (IP-Adapter's recipe: image, text, or both dropped) is
drawn per (seed, epoch, index), so the trainer's (step, micro, rank) addressing makes a resumed run see
the same samples and the same drops. A Hugging Face ``datasets`` stream: :mod:`accord.data.streamed`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from ..errors import DataError
from .references import _check_folder, _read_sidecar, augmentation_generator, list_images

__all__ = ["CaptionedImages"]


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
        path: Path = self.paths[index]
        with Image.open(path) as im:
            img = im.convert("RGB")
        w, h = img.size
        scale = self.resolution / min(w, h)
        img = img.resize((max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale))), Image.BICUBIC)
        left, top = (img.width - self.resolution) // 2, (img.height - self.resolution) // 2
        img = img.crop((left, top, left + self.resolution, top + self.resolution))
        u = float(torch.rand((), generator=augmentation_generator(self.seed, self.epoch, index)))
        drop_image = u < self.image_dropout or self.image_dropout + self.text_dropout <= u < (
            self.image_dropout + self.text_dropout + self.both_dropout)
        drop_text = self.image_dropout <= u < self.image_dropout + self.text_dropout + self.both_dropout
        caption = "" if drop_text else self.captions[index]
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
