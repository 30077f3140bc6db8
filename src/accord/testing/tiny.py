"""Tiny, randomly initialised model families that build offline from configs.

They stand in for Stable Diffusion 1.x, SDXL, FLUX and SD3 wherever pretrained weights cannot be had
(tests, CI, the offline demo). Each assembles into the matching stock diffusers pipeline, and
:func:`save_tiny_pipeline` writes it with ``save_pretrained`` so that the real loading paths
(``from_pretrained`` on a local folder) are exercised too.

The tokenizer is the real CLIP BPE tokenizer, built from the vocabulary open_clip ships; the FLUX
and SD3 stand-ins use it for their T5 encoders as well (a real T5 SentencePiece model is not available offline).
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import torch

__all__ = [
    "KINDS",
    "build_pipeline",
    "clip_tokenizer",
    "save_tiny_pipeline",
    "tiny_flux_components",
    "tiny_sd3_components",
    "tiny_sd_components",
    "tiny_sdxl_components",
]

KINDS = ("sd", "sd-v", "sdxl", "flux", "sd3")


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The 49,408-token CLIP BPE vocabulary, in OpenAI's id order (same as the hub's vocab.json)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def clip_tokenizer(model_max_length: int = 77):
    """A real ``transformers.CLIPTokenizer`` (note: ``vocab_file=`` would silently give 2 tokens in transformers 5)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], model_max_length=model_max_length)
    if len(tok) != 49408:  # pragma: no cover - guards the trap above
        raise RuntimeError(f"CLIP tokenizer built with {len(tok)} tokens instead of 49408")
    return tok


def _clip_text_config(hidden: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )


def _vae(latent_channels: int = 4, blocks: tuple[int, ...] = (16, 32), **kwargs):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=list(blocks),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(blocks),
        up_block_types=["UpDecoderBlock2D"] * len(blocks),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=min(16, blocks[0]),
        sample_size=32,
        **kwargs,
    )


def tiny_sd_components(prediction_type: str = "epsilon", seed: int = 0) -> dict:
    """SD 1.x/2.x-like: ``UNet2DConditionModel`` + ``AutoencoderKL`` + ``CLIPTextModel`` + DDPM schedule."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": _vae(),
        "text_encoder": CLIPTextModel(_clip_text_config()),
        "tokenizer": clip_tokenizer(),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def tiny_sdxl_components(seed: int = 0) -> dict:
    """SDXL-like: two text encoders (the second with projection), ``text_time`` added conditions."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=16,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    tok = clip_tokenizer()
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": _vae(),
        "text_encoder": CLIPTextModel(_clip_text_config()),
        "text_encoder_2": CLIPTextModelWithProjection(_clip_text_config()),
        "tokenizer": tok,
        "tokenizer_2": clip_tokenizer(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def _tiny_t5(d_model: int):
    """A 2-layer T5 encoder over the CLIP vocabulary (the stand-in tokenizer of the T5 slot)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=49408, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0))


def tiny_flux_components(seed: int = 0) -> dict:
    """FLUX-like: ``FluxTransformer2DModel``, CLIP (pooled) + T5 (sequence), flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    t5 = _tiny_t5(d_model=32)
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": _vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035),
        "text_encoder": CLIPTextModel(_clip_text_config()),
        "text_encoder_2": t5,
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": clip_tokenizer(model_max_length=512),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sd3_components(seed: int = 0) -> dict:
    """SD3-like (after diffusers' own SD3 pipeline tests): ``SD3Transformer2DModel`` with 2×2 patches,
    CLIP-L + CLIP-G (both with projection; pooled = both concatenated) + T5, flow matching with shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,  # T5 width; the two 32-wide CLIP states side by side are padded to it
        pooled_projection_dim=64,  # 32 + 32 projected CLIP outputs
        pos_embed_max_size=16,
    )
    t5 = _tiny_t5(d_model=64)
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": _vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035),
        "text_encoder": CLIPTextModelWithProjection(_clip_text_config()),
        "text_encoder_2": CLIPTextModelWithProjection(_clip_text_config()),
        "text_encoder_3": t5,
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": clip_tokenizer(),
        "tokenizer_3": clip_tokenizer(model_max_length=256),
        "image_encoder": None,
        "feature_extractor": None,
    }


def build_pipeline(kind: str, seed: int = 0):
    """A stock diffusers pipeline around tiny random components: ``sd``, ``sd-v``, ``sdxl``, ``flux`` or ``sd3``."""
    import inspect

    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind in ("sd", "sd-v"):
        cls, parts = StableDiffusionPipeline, tiny_sd_components("v_prediction" if kind == "sd-v" else "epsilon", seed)
        parts["requires_safety_checker"] = False
    elif kind == "sdxl":
        cls, parts = StableDiffusionXLPipeline, tiny_sdxl_components(seed)
    elif kind == "flux":
        cls, parts = FluxPipeline, tiny_flux_components(seed)
    elif kind == "sd3":
        cls, parts = StableDiffusion3Pipeline, tiny_sd3_components(seed)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(KINDS)}")
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in parts.items() if k in accepted})


def save_tiny_pipeline(kind: str, path: str | Path, seed: int = 0) -> Path:
    """Write a tiny pipeline as a local diffusers folder (safetensors) and return its path."""
    path = Path(path)
    build_pipeline(kind, seed).save_pretrained(path, safe_serialization=True)
    return path


def tiny_image_encoder(projection_dim: int = 32, seed: int = 0):
    """A tiny ``CLIPVisionModelWithProjection`` (32-px input, 4×4 patches of 8 px) for image-encoder methods."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=32, patch_size=8, projection_dim=projection_dim)
    return CLIPVisionModelWithProjection(config).eval()


def save_tiny_image_encoder(path: str | Path, projection_dim: int = 32, seed: int = 0) -> Path:
    path = Path(path)
    tiny_image_encoder(projection_dim, seed).save_pretrained(path)
    return path
