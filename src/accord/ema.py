"""An exponential moving average of the trained parameters (``train.ema_decay``), through diffusers' ``EMAModel``.

``EMAModel`` (without ``use_ema_warmup``) applies at update ``n`` (1-based) the decay ``min(ema_decay, n / (n + 9))``;
the first update (decay 0) copies the weights. So ``ema_decay=0.9999`` averages over about the last tenth of a run
shorter than ~90k steps. The loop updates it after every optimizer step that was taken (a step skipped for a
non-finite loss is not), saves its shadow tensors in each checkpoint (``ema.safetensors``, the update count in
``state.json``) and writes the outputs (final and each checkpoint's) from the averaged weights; the checkpoint's
``trainable.safetensors`` keeps the raw ones the optimizer continues from, so a resumed run is bitwise the
uninterrupted one on the CPU.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["Ema", "make_ema", "averaged"]


class Ema:
    """The EMA of ``params``; with ``on_cpu`` its copy and its update live in CPU memory."""

    def __init__(self, params, decay: float, on_cpu: bool = False):
        from diffusers.training_utils import EMAModel

        self.params, self.on_cpu = list(params), on_cpu
        self.model = EMAModel(self._source(), decay=decay)

    def _source(self) -> list[torch.Tensor]:
        """The parameters as ``EMAModel.step`` reads them: CPU copies (keeping ``requires_grad``, which marks the
        averaged ones) when the copy is kept on the CPU."""
        if not self.on_cpu:
            return self.params
        return [p if p.device.type == "cpu" else p.detach().to("cpu").requires_grad_(p.requires_grad)
                for p in self.params]

    def update(self) -> None:
        """After an optimizer step."""
        self.model.step(self._source())

    @property
    def decay(self) -> float | None:
        """The decay the last update applied."""
        return self.model.cur_decay_value

    @contextlib.contextmanager
    def applied(self):
        """Inside: the parameters hold the averaged weights; afterwards exactly the raw ones again."""
        self.model.store(self.params)
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)

    # -- checkpoints ------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {str(i): s.detach().cpu().contiguous() for i, s in enumerate(self.model.shadow_params)}

    def state(self) -> dict:
        return {"optimization_step": self.model.optimization_step, "decay": self.model.decay}

    def load(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Restore :meth:`state_tensors` / :meth:`state`; a count that does not match raises ``ValueError``."""
        shadow = self.model.shadow_params
        if len(tensors) != len(shadow) or not isinstance(state.get("optimization_step"), int):
            raise ValueError(f"holds {len(tensors)} EMA tensors for {len(shadow)} trained parameters")
        with torch.no_grad():
            for i, s in enumerate(shadow):
                s.copy_(tensors[str(i)].to(s.device, s.dtype))
        self.model.optimization_step = state["optimization_step"]


def make_ema(config, params) -> Ema | None:
    """``train.ema_decay``'s EMA of ``params``, or ``None`` when it is off."""
    t = config.train
    return Ema(params, t.ema_decay, on_cpu=t.ema_on_cpu) if t.ema_decay > 0 else None


def averaged(ema: Ema | None):
    """Inside: the trained parameters hold ``ema``'s averaged weights (nothing changes without one)."""
    return ema.applied() if ema is not None else contextlib.nullcontext()
