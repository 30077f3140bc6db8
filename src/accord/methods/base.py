"""The method plug-in interface: what is trained, how c_p is formed, what is written at the end.

A method is registered by name with :func:`register`; the loop only calls the hooks below.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import MethodOptions, _f

__all__ = ["Method", "register", "METHOD_REGISTRY", "get_method", "method_names", "method_options", "methods_with",
           "TextEncoderOptions"]

#: the methods, by name, in registration order: the one list the config, the CLI, the lab and the docs read
METHOD_REGISTRY: dict[str, type[Method]] = {}
#: modules of the built-in methods, imported (they register themselves) the first time the registry is read; they
#: import only torch at the top (diffusers, peft, transformers where used), so this stays light
METHOD_MODULES = ("lora", "dreambooth", "textual_inversion", "custom_diffusion", "visual_encoder", "ip_adapter",
                  "break_a_scene")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method under ``cls.name`` with its options dataclass ``cls.options`` (a subclass of
    :class:`accord.config.MethodOptions` of its own: the keys of ``method:`` besides ``name``)."""
    import dataclasses

    if not cls.name or cls.name in METHOD_REGISTRY:
        raise ValueError(f"method class {cls.__name__} needs a unique name (got {cls.name!r})")
    options = cls.options
    if not (dataclasses.is_dataclass(options) and issubclass(options, MethodOptions)) or options is MethodOptions:
        raise ValueError(f"method class {cls.__name__} needs options: a dataclass subclassing MethodOptions")
    if options.__dict__.get("method_name", cls.name) != cls.name:
        raise ValueError(f"{options.__name__} are already the options of {options.method_name}")
    options.method_name = cls.name
    METHOD_REGISTRY[cls.name] = cls
    return cls


def _import_builtins() -> None:
    import importlib

    for module in METHOD_MODULES:
        importlib.import_module(f"{__package__}.{module}")  # registers the class


def method_names() -> list[str]:
    """Every registered method's name (the built-in ones first, in their order)."""
    _import_builtins()
    builtin = [name for name in METHOD_MODULES if name in METHOD_REGISTRY]  # whichever a test or user imported first
    return builtin + [name for name in METHOD_REGISTRY if name not in builtin]


def method_options() -> dict[str, type[MethodOptions]]:
    """Each registered method's options class, by name."""
    return {name: METHOD_REGISTRY[name].options for name in method_names()}


def methods_with(flag: str) -> list[str]:
    """The registered methods whose options set the class flag ``flag`` (e.g. ``supports_masked_loss``), in
    :func:`method_names` order: what a one-line refusal lists as the methods that do take the key."""
    return [name for name, options in method_options().items() if getattr(options, flag)]


def get_method(name: str) -> type[Method]:
    if name not in METHOD_REGISTRY:
        _import_builtins()
    if name not in METHOD_REGISTRY:
        from ..errors import ConfigError

        raise ConfigError(f"method.name={name!r} is not known; choose one of {', '.join(method_names())}")
    return METHOD_REGISTRY[name]


@dataclass
class TextEncoderOptions(MethodOptions):
    """Options of methods that can also train the text encoders (lora, dreambooth)."""

    train_text_encoder: bool = _f(False, "also train the text encoder(s)")


class Method:
    """Base class. ``setup`` freezes the backbone and makes trainable what the method trains."""

    name: str = ""
    #: the dataclass of the ``method:`` keys besides ``name`` (``config.method`` is one of these)
    options: type[MethodOptions] = MethodOptions
    #: c_p itself is learned (a token embedding): PDLoss applies.
    learns_personal_embedding: bool = False
    #: the text encoders carry gradient (learned tokens or text-encoder training).
    trains_text: bool = False
    #: the file ``save`` writes that marks a folder as this method's output (found by ``accord.inference``).
    output_file: str = ""
    #: model families (``Backbone.family``) the method trains
    families: tuple[str, ...] = ("sd", "sdxl")
    #: trains on ``data.instance_dir`` read by :func:`accord.data.references.scan_references` (not its own dataset)
    reads_references: bool = True

    def __init__(self, config, backbone):
        if backbone.family not in self.families:
            from ..errors import ConfigError

            raise ConfigError(f"method {self.name} supports {', '.join(self.families)}; use lora for flux/sd3")
        backbone.check_config(config)
        self.config = config
        self.backbone = backbone
        self._check_masks()

    def _check_masks(self) -> None:
        """Masks are never ignored in silence: masked loss without any mask is an error, masks without
        masked loss a warning that says how to use them (read from metadata.jsonl, no image decoded)."""
        from ..data.references import METADATA_FILE, declared_masks
        from ..errors import DataError

        d = self.config.data
        if not self.options.supports_masked_loss or not d.instance_dir or not Path(d.instance_dir).is_dir():
            return
        if not d.masked_loss:
            if not (Path(d.instance_dir) / METADATA_FILE).is_file():
                return
            try:
                masks = declared_masks(d.instance_dir)
            except DataError:  # scan_references names the problem when the data is read
                return
            if masks:
                import warnings

                warnings.warn(f"{len(masks)} reference image(s) in {d.instance_dir} have a \"mask\" in {METADATA_FILE} "
                              "but data.masked_loss is off, so the loss covers whole images; set data.masked_loss=true "
                              "to train on the masked area", UserWarning, stacklevel=3)
            return
        if not declared_masks(d.instance_dir, d.mask_dir):
            where = f"data.mask_dir={d.mask_dir} has no file named like an image" if d.mask_dir else \
                f"no line of {METADATA_FILE} has a \"mask\""
            raise DataError(f"data.masked_loss is on but no reference image in {d.instance_dir} has a mask ({where}); "
                            "add masks (\"mask\" in metadata.jsonl or same-name files in data.mask_dir) or set "
                            "data.masked_loss=false")

    # -- training ---------------------------------------------------------------------------------
    def setup(self) -> None:
        for module in self.backbone.frozen_modules():
            module.requires_grad_(False)
        self.backbone.prompt_transform = self.transform_prompt

    def transform_prompt(self, prompt: str) -> str:
        """Rewrite a prompt before tokenization (the backbone applies it to every prompt it encodes)."""
        return prompt

    def trainable_modules(self) -> list[torch.nn.Module]:
        """Modules holding trainable parameters (wrapped by accelerate for DDP)."""
        raise NotImplementedError

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.trainable_modules() for p in m.parameters() if p.requires_grad]

    def param_groups(self) -> list:
        """What the optimizer gets: :meth:`parameters`, or param-group dicts with their own learning rates
        (``train.text_encoder_lr``, ``train.embedding_lr``: :func:`accord.optim.lr_groups`)."""
        from ..optim import lr_groups

        return lr_groups(self.config, self.parameters(), self.backbone)

    def before_optimizer_step(self, step: int, optimizer) -> None:
        """Hook before gradient clipping and the optimizer step of ``step`` (0-based): phase schedules."""

    # -- image conditions (image-encoder methods: c_p is the reference image) ----------------------
    def reference_condition(self, batch: dict):
        """What the reference images of ``batch`` add to the joint and personal conditions (``[B, ...]``,
        row-indexable, with gradient where trained), or ``None`` for text-only methods (the default)."""
        return None

    def attach(self, cond, image):
        """``cond`` with ``image`` (rows of :meth:`reference_condition`) added; ``image=None`` is the
        condition without the image (general, empty). Text-only methods leave ``cond`` as it is."""
        return cond

    def personal_features(self, image) -> torch.Tensor | None:
        """PDLoss's ``f_p`` from ``image``; ``None``: the c_p phrase's projected text features."""
        return None

    def build_dataset(self, config):
        """The training set where a method does not train on a reference folder (``None``: the default)."""
        return None

    def rebind(self, prepared: list[torch.nn.Module]) -> None:
        """Use accelerate's wrapped ``trainable_modules`` (same order) where the method calls them itself."""

    def after_optimizer_step(self) -> None:
        """Hook after each optimizer step (textual inversion restores the rows it does not learn)."""

    # -- loss hooks (no-ops by default; the step calls them, :mod:`accord.step`) ------------------
    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        """Rewrite a collated batch before the step (Break-A-Scene picks subjects and writes the prompts)."""
        return batch

    def loss_mask(self, batch: dict) -> torch.Tensor | None:
        """``[B, 1, H, W]`` pixel weights of the instance diffusion loss, or ``None`` for the whole image.

        With ``data.masked_loss`` the per-image masks (metadata.jsonl ``mask`` or ``data.mask_dir``) weigh it: 1
        inside, ``data.unmasked_weight`` outside (kohya's masked loss, with a floor); images without a mask
        carry an all-ones mask and train on the whole image. Each sample's ``loss_weight`` (its folder's
        ``data.instance_dirs`` weight), where the batch has one, multiplies that."""
        d = self.config.data
        weights = None
        if d.masked_loss and "mask" in batch:
            weights = d.unmasked_weight + (1.0 - d.unmasked_weight) * batch["mask"].float()
        if "loss_weight" in batch:
            h, w = batch["pixel_values"].shape[-2:]
            folder = batch["loss_weight"].float().view(-1, 1, 1, 1).expand(-1, 1, h, w)
            weights = folder if weights is None else weights * folder
        return weights

    def dd_conditions(self, batch: dict) -> list[tuple[int, str, str]]:
        """DDLoss terms ``(row, c_p, c_g)``; a row may appear more than once (one term per subject)."""
        return [(i, p, g) for i, (p, g) in enumerate(zip(batch["personal"], batch["general"])) if g]

    @contextlib.contextmanager
    def base_model(self):
        """Predictions of the base model inside (the superclass anchor of ``accord.dd_variant``): peft adapters
        (LoRA, Break-A-Scene) are switched off; DreamBooth keeps a frozen copy (``method.frozen_anchor``); the
        other methods that change weights in place (Custom Diffusion, IP-Adapter's layers) predict with their
        current weights, used with stop-gradient. Textual Inversion's weights are the base ones."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for module in self.unwrapped_modules() for m in module.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    def capture(self):
        """Context around the forward pass that holds the joint prediction (rows ``[:n_instance]`` first)."""
        return contextlib.nullcontext()

    def extra_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Weighted method losses added to the diffusion loss (after the :meth:`capture` forward); name -> scalar."""
        return {}

    # -- checkpoints ------------------------------------------------------------------------------
    def unwrapped_modules(self) -> list[torch.nn.Module]:
        """``trainable_modules`` without accelerate's DDP/compile wrappers (for saving)."""
        from accelerate.utils import extract_model_from_parallel

        return [extract_model_from_parallel(m) for m in self.trainable_modules()]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors, for resumable checkpoints (saved as safetensors)."""
        state = {}
        for i, module in enumerate(self.unwrapped_modules()):
            state.update(named_trainable_state(module, f"m{i}"))
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        for i, module in enumerate(self.unwrapped_modules()):
            load_named_state(module, f"m{i}", state)

    # -- outputs ----------------------------------------------------------------------------------
    #: files whose header also gets ``ss_network_dim``/``ss_network_alpha`` (LoRA files)
    lora_files: tuple[str, ...] = ()

    def save(self, output_dir: Path) -> list[Path]:
        """Write the result (:meth:`write_weights`), stamp each safetensors file with the run's training
        metadata (:mod:`accord.export.metadata`) and write ``README.md`` with the loading lines; return the
        written weight paths."""
        from ..export.metadata import network_metadata, stamp, tag_frequency, training_metadata
        from ..export.readme import write_readme

        output_dir = Path(output_dir)
        written = self.write_weights(output_dir)
        if not hasattr(self, "_tags"):  # the reference captions do not change during a run
            self._tags = tag_frequency(self.config) if self.reads_references else {}
        common = training_metadata(self.config, self.backbone, self._tags)
        for path in written:
            if path.suffix == ".safetensors":
                stamp(path, {**common, **(network_metadata(self.config) if path.name in self.lora_files else {})})
        write_readme(self, output_dir)
        return written

    def write_weights(self, output_dir: Path) -> list[Path]:
        """Write the result in the formats stock tools load; return the written paths."""
        raise NotImplementedError

    def loading_code(self, run: str, base: str) -> str:
        """Python lines that load this run's outputs (folder ``run``) into a stock pipeline of ``base``."""
        return (f"from accord.inference import load_trained\n\npipe = load_trained({run!r})  # base model: {base}\n")

    def readme_notes(self) -> list[str]:
        """Markdown lines for the run README's "Files" section: what each output file loads in."""
        return []

    @staticmethod
    def load_into(pipeline, output_dir: Path) -> None:
        """Load this method's outputs from ``output_dir`` into a stock pipeline of the base model."""
        raise NotImplementedError

    @staticmethod
    def unload_from(pipeline) -> bool:
        """Undo :meth:`load_into`, leaving the base model; ``False`` where the method cannot (reload it)."""
        return False


def named_trainable_state(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{n}": p.detach().cpu().clone().contiguous()
            for n, p in module.named_parameters() if p.requires_grad}


def load_named_state(module: torch.nn.Module, prefix: str, state: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            if key.startswith(prefix + "."):
                name = key[len(prefix) + 1 :]
                if name not in params:
                    from ..errors import AccordError

                    raise AccordError(f"checkpoint tensor {key} has no matching parameter; was it made by another "
                                      "method?")
                params[name].copy_(value.to(params[name].device, params[name].dtype))
