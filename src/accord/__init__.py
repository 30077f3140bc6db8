"""accord: decouple a personal concept from the other concepts of its pictures while fine-tuning a
text-to-image diffusion model (ACCORD's DDLoss and PDLoss, Liu et al.)."""

__version__ = "0.1.0"

from .losses import dd_loss, dependence_shift, pd_loss  # noqa: E402

__all__ = ["__version__", "dd_loss", "dependence_shift", "pd_loss"]
