"""Reference folders, captions (``c_p`` / ``c_g``), image loading and class images for prior preservation."""

from .captions import default_caption, normalize_caption, split_caption
from .class_images import ClassImages, class_image_path, generate_class_images
from .images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    assign_bucket,
    load_mask,
    load_rgb,
    make_buckets,
    resize_and_crop,
)
from .references import (
    BucketBatchSampler,
    ReferenceDataset,
    ReferenceItem,
    augmentation_generator,
    collate_references,
    scan_references,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "BucketBatchSampler",
    "ClassImages",
    "ReferenceDataset",
    "ReferenceItem",
    "assign_bucket",
    "augmentation_generator",
    "class_image_path",
    "collate_references",
    "default_caption",
    "generate_class_images",
    "load_mask",
    "load_rgb",
    "make_buckets",
    "normalize_caption",
    "resize_and_crop",
    "scan_references",
    "split_caption",
]
