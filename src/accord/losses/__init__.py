"""The two ACCORD losses, and the comparators SuDe and ClassDiffusion, as pure tensor functions
(no trainer, no model classes needed)."""

from .attention import cross_attention_mask_loss
from .classdiffusion import classdiffusion_loss
from .dd import SCALES, dd_loss, dependence_shift, dependence_terms
from .dd_variants import VARIANTS, dd_variant_loss
from .parameterization import Parameterization, UnsupportedSchedulerError
from .pd import image_features, pd_loss, text_features
from .sude import sude_loss

__all__ = [
    "Parameterization",
    "SCALES",
    "UnsupportedSchedulerError",
    "VARIANTS",
    "classdiffusion_loss",
    "cross_attention_mask_loss",
    "dd_loss",
    "dd_variant_loss",
    "dependence_shift",
    "dependence_terms",
    "image_features",
    "pd_loss",
    "sude_loss",
    "text_features",
]
