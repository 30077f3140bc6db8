"""The two ACCORD losses as pure tensor functions (no trainer, no model classes needed)."""

from .dd import dd_loss, dependence_shift
from .parameterization import Parameterization, UnsupportedSchedulerError
from .pd import image_features, pd_loss, text_features

__all__ = [
    "Parameterization",
    "UnsupportedSchedulerError",
    "dd_loss",
    "dependence_shift",
    "image_features",
    "pd_loss",
    "text_features",
]
