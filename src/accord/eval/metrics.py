"""Personalization metrics: CLIP-T, CLIP-I, DINO-I, BLIP-T, Gram-D and Face-Sim (paper Sec. 4).

Every metric speaks one contract:

* ``score(images, ...) -> Tensor[n]`` — one value per generated image, no state;
* ``update(images, ...)`` — ``score`` and keep the values; ``compute()`` — their mean (NaNs
  skipped); ``reset()``.

Values do not depend on the batch size or on the order of the images (each image is scored on its
own; batching only groups the forward passes). Images are PIL images of any size.

=========  =========================================================  ====================  =====
metric     protocol                                                   default model         better
=========  =========================================================  ====================  =====
clip_t     100·cos(CLIP image emb., CLIP text emb.) of its prompt      open_clip ViT-B-32    ↑
           (Ruiz et al. 2023; no clamp at 0)                          ``openai``
clip_i     100·mean over references of cos(CLIP image embeddings)     same                  ↑
dino_i     100·mean over references of cos(DINO ViT-S/16 CLS);        timm                  ↑
           resize 256 bicubic, center-crop 224, ImageNet mean/std     ``vit_small_patch16_224.dino``
           (the DreamBooth protocol)
blip_t     100·ITC cosine of BLIP image/text projections               ``Salesforce/blip-    ↑
           (``BlipForImageTextRetrieval(use_itm_head=False)``)         itm-base-coco``
gram_d     scale·mean over references and layers of mean_ij(G−G')²,    torchvision VGG19     ↓
           G = F·Fᵀ/(C·H·W) at relu1_1, relu2_1, relu3_1, relu4_1,     IMAGENET1K_V1
           relu5_1 (Gatys et al. 2016); 256 px, ImageNet mean/std;
           ``scale`` = 1e6 by default (the paper's scale is unpublished)
face_sim   100·mean over reference faces of cos(ArcFace embeddings)   insightface           ↑
           of the largest face; NaN when no face is found             ``buffalo_l``
=========  =========================================================  ====================  =====

Subject masks (``masks=`` / ``reference_masks=`` per call, or a ``segmenter`` callable given to
the metric) apply to CLIP-I and DINO-I only; see :mod:`accord.eval.images`.

Each model is given either by id / local path (loaded once, see :mod:`accord.eval.models`) or as an
already built object (``clip=``, ``dino=``, ``blip=``, ``vgg=``, ``embedder=``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DataError, ModelLoadError
from .images import Mask, Segmenter, apply_masks
from .models import (
    DEFAULT_BLIP,
    DEFAULT_CLIP,
    DEFAULT_CLIP_PRETRAINED,
    DEFAULT_DINO,
    BlipBundle,
    ClipBundle,
    DinoBundle,
    load_blip,
    load_clip,
    load_dino,
    load_vgg19_features,
)

__all__ = [
    "METRICS",
    "BLIPTextScore",
    "CLIPImageSimilarity",
    "CLIPTextScore",
    "DINOSimilarity",
    "FaceSimilarity",
    "GramDistance",
    "Metric",
    "gram_matrix",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


class Metric:
    """Shared ``update``/``compute``/``reset`` around a stateless per-image ``score``."""

    name: str = ""
    higher_is_better: bool = True
    needs: str = "prompts"  # "prompts" or "references": what score() compares each image with

    def __init__(self, batch_size: int = 16, device: str | torch.device = "cpu", progress: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.device, self.progress = batch_size, torch.device(device), progress
        self._scores: list[torch.Tensor] = []

    def score(self, images: Sequence[Image.Image], *args, **kwargs) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def update(self, images: Sequence[Image.Image], *args, **kwargs) -> torch.Tensor:
        values = self.score(images, *args, **kwargs)
        self._scores.append(values.detach().cpu())
        return values

    def compute(self) -> float:
        if not self._scores:
            return float("nan")
        return float(torch.cat(self._scores).nanmean())

    def reset(self) -> None:
        self._scores.clear()

    def _embed(self, images: Sequence, encode: Callable[[Sequence], torch.Tensor], desc: str) -> torch.Tensor:
        n = (len(images) + self.batch_size - 1) // self.batch_size
        out = [encode(b) for b in _progress(_batches(list(images), self.batch_size), n, desc, self.progress)]
        return F.normalize(torch.cat(out).float(), dim=-1)


def _check_pairs(images: Sequence, other: Sequence, what: str) -> None:
    if len(images) != len(other):
        raise ValueError(f"{len(images)} images but {len(other)} {what}")


# --------------------------------------------------------------------------------------------- CLIP


class _Clip(Metric):
    def __init__(
        self,
        model: str = DEFAULT_CLIP,
        pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
        *,
        clip: ClipBundle | torch.nn.Module | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if clip is None:
            clip = load_clip(model, pretrained, str(self.device))
        elif not isinstance(clip, ClipBundle):
            clip = ClipBundle.wrap(clip)
        self.clip = clip

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised CLIP image embeddings, one row per image."""

        def encode(batch):
            pixels = torch.stack([self.clip.preprocess(im) for im in batch]).to(self.device)
            return self.clip.model.encode_image(pixels)

        return self._embed(images, encode, f"{self.name} images")

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised CLIP text embeddings, one row per text."""
        return self._embed(texts, lambda b: self.clip.model.encode_text(self.clip.tokenizer(list(b)).to(self.device)),
                           f"{self.name} texts")


class CLIPTextScore(_Clip):
    """CLIP-T: 100 · cos(image, its prompt) with CLIP ViT-B/32 (Ruiz et al. 2023)."""

    name = "clip_t"

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        _check_pairs(images, prompts, "prompts")
        return 100 * (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)


class _Fidelity(Metric):
    """Image ↔ references similarity, with optional subject masks on both sides."""

    needs = "references"

    def __init__(self, *args, segmenter: Segmenter | None = None, mask_fill=(255, 255, 255), **kwargs):
        super().__init__(*args, **kwargs)
        self.segmenter, self.mask_fill = segmenter, tuple(mask_fill)

    def score(
        self,
        images: Sequence[Image.Image],
        references: Sequence[Image.Image],
        masks: Sequence[Mask | None] | None = None,
        reference_masks: Sequence[Mask | None] | None = None,
    ) -> torch.Tensor:
        if not references:
            raise DataError(f"{self.name}: no reference images to compare with")
        gen = self.embed_images(apply_masks(images, masks, self.segmenter, self.mask_fill))
        ref = self.embed_images(apply_masks(references, reference_masks, self.segmenter, self.mask_fill))
        return 100 * (gen @ ref.T).mean(dim=1)


class CLIPImageSimilarity(_Fidelity, _Clip):
    """CLIP-I: 100 · mean over all (generated, reference) pairs of CLIP image-embedding cosines."""

    name = "clip_i"


# --------------------------------------------------------------------------------------------- DINO


def dino_transform():
    """Resize 256 (bicubic), center-crop 224, ImageNet mean/std: the DreamBooth DINO protocol."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class DINOSimilarity(_Fidelity):
    """DINO-I: 100 · mean pairwise cosine of DINO ViT-S/16 CLS features (Ruiz et al. 2023)."""

    name = "dino_i"

    def __init__(self, model: str = DEFAULT_DINO, *, dino: DinoBundle | torch.nn.Module | None = None, **kwargs):
        super().__init__(**kwargs)  # subclasses of _Fidelity implement embed_images()
        if dino is None:
            dino = load_dino(model, str(self.device))
        elif not isinstance(dino, DinoBundle):
            dino = DinoBundle(dino.eval(), transformers=hasattr(dino, "config") and hasattr(dino.config, "model_type"))
        self.dino, self.transform = dino, dino_transform()

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        def encode(batch):
            return self.dino.cls_features(torch.stack([self.transform(im) for im in batch]).to(self.device))

        return self._embed(images, encode, "dino_i images")


# --------------------------------------------------------------------------------------------- BLIP


class BLIPTextScore(Metric):
    """BLIP-T: 100 · ITC cosine of BLIP's projected image and text features (no ITM head)."""

    name = "blip_t"

    def __init__(self, model: str = DEFAULT_BLIP, *, blip: BlipBundle | None = None, **kwargs):
        super().__init__(**kwargs)
        self.blip = blip if blip is not None else load_blip(model, str(self.device))

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        _check_pairs(images, prompts, "prompts")
        out = []
        pairs = list(zip(images, prompts))
        n = (len(pairs) + self.batch_size - 1) // self.batch_size
        for batch in _progress(_batches(pairs, self.batch_size), n, "blip_t", self.progress):
            ims, texts = zip(*batch)
            inputs = self.blip.processor(images=list(ims), text=list(texts), padding=True,
                                         return_tensors="pt").to(self.device)
            sim = self.blip.model(**inputs, use_itm_head=False, return_dict=True).itm_score
            out.append(sim.diagonal().float())
        return 100 * torch.cat(out).cpu()


# ------------------------------------------------------------------------------------------- Gram-D

# Indices of the ReLU outputs in torchvision's vgg19().features.
VGG19_RELU = {
    "relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8,
    "relu3_1": 11, "relu3_2": 13, "relu3_3": 15, "relu3_4": 17,
    "relu4_1": 20, "relu4_2": 22, "relu4_3": 24, "relu4_4": 26,
    "relu5_1": 29, "relu5_2": 31, "relu5_3": 33, "relu5_4": 35,
}  # fmt: skip
GRAM_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """G = F·Fᵀ / (C·H·W) for features (B, C, H, W) → (B, C, C) (Gatys et al. 2016, Eq. 3, normalised)."""
    b, c, h, w = features.shape
    f = features.reshape(b, c, h * w).float()
    return f @ f.transpose(1, 2) / (c * h * w)


class GramDistance(Metric):
    """Gram-D: scale · mean over references and layers of the mean squared Gram difference (lower = closer style)."""

    name = "gram_d"
    higher_is_better = False
    needs = "references"

    def __init__(
        self,
        weights: str | None = "IMAGENET1K_V1",
        *,
        vgg: torch.nn.Module | None = None,
        layers: Sequence[str] = GRAM_LAYERS,
        image_size: int = 256,
        scale: float = 1e6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        unknown = [name for name in layers if name not in VGG19_RELU]
        if unknown:
            raise ValueError(f"unknown VGG19 layers {unknown}; choose from {', '.join(VGG19_RELU)}")
        features = vgg if vgg is not None else load_vgg19_features(weights, str(self.device))
        if hasattr(features, "features"):  # a whole torchvision VGG was passed
            features = features.features
        self.layers, self.scale = tuple(layers), scale
        self.features = features[: max(VGG19_RELU[name] for name in layers) + 1].eval()
        from torchvision import transforms as T

        self.transform = T.Compose(
            [
                T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(image_size),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    @torch.no_grad()
    def grams(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """Per layer, the (N, C, C) Gram matrices of the images."""
        wanted = {VGG19_RELU[name]: i for i, name in enumerate(self.layers)}
        per_layer: list[list[torch.Tensor]] = [[] for _ in self.layers]
        n = (len(images) + self.batch_size - 1) // self.batch_size
        for batch in _progress(_batches(list(images), self.batch_size), n, "gram_d", self.progress):
            x = torch.stack([self.transform(im) for im in batch]).to(self.device)
            for index, module in enumerate(self.features):
                x = module(x)
                if index in wanted:
                    per_layer[wanted[index]].append(gram_matrix(x).cpu())
        return [torch.cat(g) for g in per_layer]

    def score(self, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> torch.Tensor:
        if not references:
            raise DataError("gram_d: no style reference images to compare with")
        gen, ref = self.grams(images), self.grams(references)
        # (N, R) mean squared difference per layer, then mean over layers and references
        per_layer = [((g[:, None] - r[None]) ** 2).mean(dim=(-1, -2)) for g, r in zip(gen, ref)]
        return self.scale * torch.stack(per_layer).mean(dim=0).mean(dim=1)


# ----------------------------------------------------------------------------------------- Face-Sim

FACE_MISSING = "Face-Sim needs insightface, which is not installed; install it with: pip install 'accord[face]'"


class FaceSimilarity(Metric):
    """Face-Sim: 100 · mean cosine of ArcFace embeddings between generated and reference faces.

    ``embedder(image) -> 1-D embedding or None`` (no face) can be injected; by default insightface's
    ``FaceAnalysis(name=model)`` gives the embedding of the largest detected face.
    """

    name = "face_sim"
    needs = "references"

    def __init__(
        self,
        model: str = "buffalo_l",
        *,
        root: str | None = None,
        embedder: Callable[[Image.Image], object] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.embedder = embedder if embedder is not None else _insightface_embedder(model, root)

    def _embeddings(self, images: Sequence[Image.Image]) -> list[torch.Tensor | None]:
        out = []
        for im in images:
            e = self.embedder(im)
            out.append(None if e is None else F.normalize(torch.as_tensor(e, dtype=torch.float32).flatten(), dim=0))
        return out

    def score(self, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> torch.Tensor:
        ref = [e for e in self._embeddings(references) if e is not None]
        if not ref:
            raise DataError("face_sim: no face found in any reference image; use face photos or drop face_sim")
        ref_m = torch.stack(ref)
        values = [float("nan") if e is None else float(100 * (ref_m @ e).mean()) for e in self._embeddings(images)]
        return torch.tensor(values)


def _insightface_embedder(model: str, root: str | None):
    try:
        from insightface.app import FaceAnalysis
    except ImportError:
        raise ModelLoadError(FACE_MISSING) from None
    import numpy as np

    try:
        app = FaceAnalysis(name=model, root=root or "~/.insightface", allowed_modules=["detection", "recognition"])
        app.prepare(ctx_id=-1)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelLoadError(
            f"cannot load insightface model pack {model!r} ({first}); "
            f"put it under ROOT/models/{model} and pass --face-root ROOT"
        ) from None

    def embed(image: Image.Image):
        faces = app.get(np.asarray(image.convert("RGB"))[:, :, ::-1])  # insightface wants BGR
        if not faces:
            return None
        face = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        return face.normed_embedding

    return embed


METRICS: dict[str, type[Metric]] = {
    cls.name: cls
    for cls in (CLIPTextScore, CLIPImageSimilarity, DINOSimilarity, BLIPTextScore, GramDistance, FaceSimilarity)
}
