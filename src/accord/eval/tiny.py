"""Tiny random-weight stand-ins for the metric and captioning models, built offline from configs.

They share the real architectures' code paths (open_clip, timm ViT, transformers BLIP, torchvision
VGG19 features) so tests and the offline demo exercise the same loading and scoring as real
models; their numbers mean nothing. :func:`save_tiny_metric_models` writes them in the local
formats the loaders accept, so ``accord eval --clip-model DIR --dino-model DIR ...`` runs offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = [
    "save_tiny_captioner",
    "save_tiny_metric_models",
    "tiny_blip",
    "tiny_blip_captioner",
    "tiny_clip",
    "tiny_dino",
    "tiny_vgg19_features",
]

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_DINO_ARGS = {"depth": 2, "embed_dim": 48, "num_heads": 2}
_WORDS = (
    "a an the of in on with and photo picture dog cat sks backpack toy bowl red blue green white black "
    "jungle snow beach city street floor grass water background wearing hat top shiny wet , . 1"
).split()


def tiny_clip(seed: int = 0):
    """A :class:`ClipBundle` around a 2-layer open_clip CLIP at 64 px (CLIP BPE tokenizer)."""
    import open_clip

    from .models import ClipBundle

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    model.visual.preprocess_cfg = {"size": (64, 64), "interpolation": "bicubic", "resize_mode": "shortest"}
    return ClipBundle.wrap(model)


def tiny_dino(seed: int = 0):
    """A 2-layer ViT-S/16-shaped timm model (CLS output, no head)."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **TINY_DINO_ARGS).eval()


def _bert_tokenizer(folder: Path):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(dict.fromkeys(specials + _WORDS + letters)) + "\n")
    return BertTokenizer(str(vocab), bos_token="[DEC]")


def _blip_parts(folder: Path):
    from transformers import BlipConfig, BlipImageProcessor, BlipProcessor

    tok = _bert_tokenizer(folder)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=128, encoder_hidden_size=32, bos_token_id=tok.bos_token_id,
            sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                           image_size=32, patch_size=8),
        projection_dim=16,
        image_text_hidden_size=16,
    )  # fmt: skip
    return config, processor


def tiny_blip(folder: str | Path, seed: int = 0):
    """A :class:`BlipBundle`: tiny ``BlipForImageTextRetrieval`` + processor (vocabulary written to ``folder``)."""
    from transformers import BlipForImageTextRetrieval

    from .models import BlipBundle

    config, processor = _blip_parts(Path(folder))
    torch.manual_seed(seed)
    return BlipBundle(BlipForImageTextRetrieval(config).eval(), processor)


def tiny_blip_captioner(folder: str | Path, seed: int = 0):
    """(model, processor): a tiny ``BlipForConditionalGeneration``; it writes gibberish, quickly."""
    from transformers import BlipForConditionalGeneration

    config, processor = _blip_parts(Path(folder))
    torch.manual_seed(seed)
    return BlipForConditionalGeneration(config).eval(), processor


def save_tiny_captioner(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny BLIP captioner as a local transformers folder (model + processor)."""
    folder = Path(folder)
    model, processor = tiny_blip_captioner(folder / "_vocab", seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def tiny_vgg19_features(seed: int = 0) -> torch.nn.Module:
    """torchvision's VGG19 ``features`` stack with random weights (no 100M-parameter classifier)."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(seed)
    return make_layers(cfgs["E"]).eval()


def save_tiny_metric_models(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write tiny CLIP, DINO, BLIP and VGG19 in the loaders' local formats; returns name -> path."""
    import timm
    from safetensors.torch import save_file

    root = Path(root)
    paths = {k: root / k for k in ("clip", "dino", "blip")}
    paths["vgg"] = root / "vgg19_features.safetensors"

    clip = tiny_clip(seed)
    paths["clip"].mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": dict(clip.model.visual.preprocess_cfg)}
    (paths["clip"] / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file(clip.model.state_dict(), str(paths["clip"] / "open_clip_model.safetensors"))

    timm.models.save_for_hf(tiny_dino(seed), str(paths["dino"]), model_args=TINY_DINO_ARGS, safe_serialization=True)

    blip = tiny_blip(root / "_blip_vocab", seed)
    blip.model.save_pretrained(paths["blip"])
    blip.processor.save_pretrained(paths["blip"])

    save_file({k: v.contiguous() for k, v in tiny_vgg19_features(seed).state_dict().items()}, str(paths["vgg"]))
    return paths
