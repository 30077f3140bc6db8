"""IP-Adapter (Ye et al., 2023) trained with ACCORD, zero-shot (paper Tab. 5).

Decoupled image cross-attention: every cross-attention layer of the UNet gets diffusers'
``IPAdapterAttnProcessor2_0`` with trainable ``to_k_ip``/``to_v_ip`` (initialised from the layer's
``to_k``/``to_v``, as the original training script does), and the UNet's ``encoder_hid_proj`` is a
trainable ``ImageProjection`` (CLIP image embedding → 4 tokens). Both are set up by diffusers' own
loader (``UNet2DConditionModel._load_ip_adapter_weights``), so training runs the very modules that
``pipe.load_ip_adapter`` builds at inference. The CLIP image encoder (``method.image_encoder``) is frozen.

Data: an image–caption folder (:class:`accord.data.captioned.CaptionedImages`) or a Hugging Face ``datasets``
dataset streamed and sharded per process (``method.ip_dataset``: :class:`accord.data.streamed.StreamedCaptions`),
with IP-Adapter's CFG dropout (``method.image_dropout``/``text_dropout``/``both_dropout``; a dropped image is a
zero embedding, what the pipeline feeds its unconditional side).

ACCORD's conditions (c_p is the image): joint = caption + image; personal = image only (empty text);
general = caption with a zero image embedding; empty = empty text with a zero image embedding.
PDLoss's ``f_p`` is CLIP's text projection of the mean projected image token (as for visual_encoder),
against ``data.class_noun`` (e.g. "person") and the caption's phrases.

Output ``ip_adapter.safetensors`` in the original layout (``image_proj.proj/norm.*``,
``ip_adapter.{1,3,5,…}.to_k_ip/to_v_ip.weight``) and ``ip_adapter.json`` (``image_encoder_path``: the image
encoder it was trained with, which the run folder does not hold; the run's README has these lines)::

    image_encoder = CLIPVisionModelWithProjection.from_pretrained(IMAGE_ENCODER_PATH)  # + subfolder=... if recorded
    pipe = StableDiffusionPipeline.from_pretrained(BASE, image_encoder=image_encoder)
    pipe.load_ip_adapter("OUT", subfolder="", weight_name="ip_adapter.safetensors")
    pipe(prompt, ip_adapter_image=reference)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..config import _f
from ..errors import ConfigError
from .base import Method, register
from .image_encoder import ImageEncoderOptions, image_embeddings, load_image_encoder

__all__ = ["IPAdapter", "ip_adapter_state"]

IP_FILE = "ip_adapter.safetensors"
IP_CONFIG = "ip_adapter.json"
NUM_TOKENS = 4  # diffusers' loader reads a plain IP-Adapter's projection as 4 tokens


def _cross_attention_names(unet) -> list[tuple[int, str]]:
    """(key id, processor name) of each cross-attention layer, numbered as the original checkpoints are:
    1, 3, 5, … over ``unet.attn_processors`` (diffusers' ``_convert_ip_adapter_attn_to_diffusers``)."""
    out, key_id = [], 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        out.append((key_id, name))
        key_id += 2
    return out


def _module(root, dotted: str):
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def initial_state(unet, image_embed_dim: int) -> dict:
    """A fresh adapter in the original layout: random projection, ``to_k_ip``/``to_v_ip`` = ``to_k``/``to_v``."""
    d = unet.config.cross_attention_dim
    proj = torch.nn.Linear(image_embed_dim, NUM_TOKENS * d)
    image_proj = {"proj.weight": proj.weight.detach().clone(), "proj.bias": proj.bias.detach().clone(),
                  "norm.weight": torch.ones(d), "norm.bias": torch.zeros(d)}
    adapter = {}
    for key_id, name in _cross_attention_names(unet):
        attn = _module(unet, name[: -len(".processor")])
        adapter[f"{key_id}.to_k_ip.weight"] = attn.to_k.weight.detach().float().clone()
        adapter[f"{key_id}.to_v_ip.weight"] = attn.to_v.weight.detach().float().clone()
    return {"image_proj": image_proj, "ip_adapter": adapter}


def ip_adapter_state(unet) -> dict[str, torch.Tensor]:
    """The trained adapter of ``unet`` as the flat ``image_proj.*`` / ``ip_adapter.*`` dict ``load_ip_adapter``
    reads."""
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    out = {f"image_proj.{k.replace('image_embeds', 'proj')}": v for k, v in proj.state_dict().items()}
    processors = unet.attn_processors
    for key_id, name in _cross_attention_names(unet):
        proc = processors[name]
        out[f"ip_adapter.{key_id}.to_k_ip.weight"] = proc.to_k_ip[0].weight
        out[f"ip_adapter.{key_id}.to_v_ip.weight"] = proc.to_v_ip[0].weight
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


@dataclasses.dataclass
class IPAdapterOptions(ImageEncoderOptions):
    no_masked_loss = "trains on an image-caption set without masks"

    image_dropout: float = _f(0.05, "probability a sample's image is dropped (zero embedding; for CFG)")
    text_dropout: float = _f(0.05, "probability a sample's caption is dropped (empty prompt; for CFG)")
    both_dropout: float = _f(0.05, "probability both are dropped")
    ip_dataset: str | None = _f(
        None, "train on a Hugging Face datasets dataset, streamed (a hub id or local path for datasets.load_dataset; "
        "pip install 'accord[ip]') instead of the data.instance_dir folder; exact resume needs the same number of "
        "processes"
    )
    ip_dataset_split: str = _f("train", "with ip_dataset: the split to stream")
    ip_image_column: str = _f("image", "with ip_dataset: the image column")
    ip_caption_column: str = _f("text", "with ip_dataset: the caption column")
    ip_shuffle_buffer: int = _f(1000, "with ip_dataset: size of the seeded shuffle buffer (1: stream order)")

    def reads_instance_dir(self) -> bool:
        return not self.ip_dataset

    def validate(self, config) -> None:
        if config.data.instance_dirs:
            raise ConfigError("data.instance_dirs is not for ip_adapter (it reads one data.instance_dir or "
                              "method.ip_dataset); unset it")
        if self.ip_dataset and self.ip_shuffle_buffer < 1:
            raise ConfigError("method.ip_shuffle_buffer must be at least 1 (1: stream order)")
        if self.ip_dataset and config.train.cache_latents:
            raise ConfigError("train.cache_latents with method.ip_dataset: streamed samples are not revisited by "
                              "index; set train.cache_latents=false")
        super().validate(config)
        for key in ("image_dropout", "text_dropout", "both_dropout"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"method.{key}={getattr(self, key)} is not a probability; use 0..1")


@register
class IPAdapter(Method):
    name = "ip_adapter"
    options = IPAdapterOptions
    output_file = IP_FILE
    learns_personal_embedding = True  # the image projection (c_p) is trained: PDLoss applies
    reads_references = False  # an image–caption folder or a streamed dataset (build_dataset)

    def setup(self) -> None:
        super().setup()
        m = self.config.method
        self.encoder = load_image_encoder(m.image_encoder, m.image_encoder_subfolder)
        unet = self.backbone.denoiser
        unet._load_ip_adapter_weights([initial_state(unet, self.encoder.config.projection_dim)],
                                      low_cpu_mem_usage=False)
        self.adapter_modules = ([unet.encoder_hid_proj]
                                + [unet.attn_processors[n] for _, n in _cross_attention_names(unet)])
        for module in self.adapter_modules:
            module.to(self.backbone.device).requires_grad_(True)

    def build_dataset(self, config):
        from ..data.captioned import CaptionedImages

        m = config.method
        if m.ip_dataset:  # a Hugging Face datasets dataset, streamed and sharded per process
            from accelerate import PartialState

            from ..data.streamed import StreamedCaptions

            state = PartialState()
            return StreamedCaptions(m.ip_dataset, config.data.resolution, split=m.ip_dataset_split,
                                    image_column=m.ip_image_column, caption_column=m.ip_caption_column,
                                    seed=config.train.seed, buffer_size=m.ip_shuffle_buffer, rank=state.process_index,
                                    world=state.num_processes, image_dropout=m.image_dropout,
                                    text_dropout=m.text_dropout, both_dropout=m.both_dropout)
        return CaptionedImages(config.data.instance_dir, config.data.resolution, seed=config.train.seed,
                               image_dropout=m.image_dropout, text_dropout=m.text_dropout, both_dropout=m.both_dropout)

    def trainable_modules(self):
        return [self.backbone.denoiser]  # the adapter lives inside the UNet (DDP wraps it; only adapter params train)

    def reference_condition(self, batch):
        self.encoder.to(self.backbone.device)
        embeds = image_embeddings(self.encoder, batch["pixel_values"])
        if "drop_image" in batch:
            embeds = embeds * (~batch["drop_image"].bool()).to(embeds.device, embeds.dtype)[:, None]
        return embeds[:, None]  # [B, 1, E]: one image per sample

    def attach(self, cond, image):
        if image is None:  # without the image: a zero embedding, as the pipeline's unconditional side
            n = len(cond)
            image = torch.zeros(n, 1, self.encoder.config.projection_dim, device=cond.embeds.device)
        return dataclasses.replace(cond, image_embeds=image.to(cond.embeds.device, cond.embeds.dtype))

    def personal_features(self, image):
        from accelerate.utils import extract_model_from_parallel

        tokens = extract_model_from_parallel(self.backbone.denoiser).encoder_hid_proj([image])[0]  # [B, 1, 4, D]
        return self.backbone.projected_token_features(tokens.flatten(1, 2))

    def trainable_state(self):
        return {f"m0.{k}": v for k, v in ip_adapter_state(self.unwrapped_modules()[0]).items()}

    def load_trainable_state(self, state):
        unet = self.unwrapped_modules()[0]
        flat = {k[3:]: v for k, v in state.items() if k.startswith("m0.")}
        proj = unet.encoder_hid_proj.image_projection_layers[0]
        with torch.no_grad():
            for k, v in proj.state_dict(keep_vars=True).items():
                v.copy_(flat[f"image_proj.{k.replace('image_embeds', 'proj')}"])
            for key_id, name in _cross_attention_names(unet):
                proc = unet.attn_processors[name]
                proc.to_k_ip[0].weight.copy_(flat[f"ip_adapter.{key_id}.to_k_ip.weight"])
                proc.to_v_ip[0].weight.copy_(flat[f"ip_adapter.{key_id}.to_v_ip.weight"])

    def write_weights(self, output_dir: Path) -> list[Path]:
        from safetensors.torch import save_file

        output_dir = Path(output_dir)
        save_file(ip_adapter_state(self.unwrapped_modules()[0]), str(output_dir / IP_FILE))
        m = self.config.method
        info = {"image_encoder_path": self._encoder_path(), "image_encoder_subfolder": m.image_encoder_subfolder,
                "image_encoder": m.image_encoder}
        (output_dir / IP_CONFIG).write_text(json.dumps(info, indent=2))
        return [output_dir / IP_FILE, output_dir / IP_CONFIG]

    def _encoder_path(self) -> str:
        """``method.image_encoder``: absolute where it is a local folder, else the hub id."""
        source = self.config.method.image_encoder
        return str(Path(source).resolve()) if Path(source).exists() else source

    def loading_code(self, run: str, base: str) -> str:
        cls = self.backbone.pipeline_class.__name__
        sub = self.config.method.image_encoder_subfolder
        sub_arg = f", subfolder={sub!r}" if sub else ""
        return (f"from diffusers import {cls}\nfrom transformers import CLIPVisionModelWithProjection\n\n"
                f"# the image encoder this run trained with (ip_adapter.json: image_encoder_path)\n"
                f"image_encoder = CLIPVisionModelWithProjection.from_pretrained({self._encoder_path()!r}{sub_arg})\n"
                f"pipe = {cls}.from_pretrained({base!r}, image_encoder=image_encoder)\n"
                f"pipe.load_ip_adapter({run!r}, subfolder='', weight_name={IP_FILE!r})\n")

    def readme_notes(self) -> list[str]:
        return [f"- `{IP_FILE}`: the adapter in the original IP-Adapter layout (`load_ip_adapter`); generate with "
                "`pipe(prompt, ip_adapter_image=image)`",
                f"- `{IP_CONFIG}`: `image_encoder_path` (+ subfolder), the CLIP image encoder to pass as "
                "`image_encoder`"]

    @staticmethod
    def load_into(pipeline, output_dir: Path) -> None:
        """``pipe.load_ip_adapter(OUT, subfolder="", weight_name="ip_adapter.safetensors")``; a pipeline without an
        image encoder first gets the one named in ``ip_adapter.json``."""
        output_dir = Path(output_dir)
        if getattr(pipeline, "image_encoder", None) is None and (output_dir / IP_CONFIG).is_file():
            info = json.loads((output_dir / IP_CONFIG).read_text())
            source = info.get("image_encoder_path") or info["image_encoder"]
            pipeline.register_modules(image_encoder=load_image_encoder(source, info.get("image_encoder_subfolder")))
        pipeline.load_ip_adapter(str(output_dir), subfolder="", weight_name=IP_FILE)

    @staticmethod
    def unload_from(pipeline) -> bool:
        pipeline.unload_ip_adapter()
        return True
