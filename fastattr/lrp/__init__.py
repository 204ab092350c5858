"""Layer-wise relevance propagation (LRP, LayerLRP) and its rules."""

from fastattr.lrp.lrp import LRP, LayerLRP
from fastattr.lrp.rules import (
    Alpha1_Beta0_Rule,
    EpsilonRule,
    GammaRule,
    IdentityRule,
    PropagationRule,
)

__all__ = [
    "LRP",
    "Alpha1_Beta0_Rule",
    "EpsilonRule",
    "GammaRule",
    "IdentityRule",
    "LayerLRP",
    "PropagationRule",
]
