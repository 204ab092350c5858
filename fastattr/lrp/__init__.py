"""Layer-wise relevance propagation (LRP, LayerLRP), its rules, and what rules are written with."""

from fastattr.lrp.lrp import LRP, LayerLRP
from fastattr.lrp.propagation import Relevance
from fastattr.lrp.rules import (
    Alpha1_Beta0_Rule,
    EpsilonRule,
    EpsilonSumRule,
    GammaRule,
    IdentityRule,
    ModifiedWeightRule,
    OpRule,
    PropagationRule,
    RatioRule,
)

__all__ = [
    "LRP",
    "Alpha1_Beta0_Rule",
    "EpsilonRule",
    "EpsilonSumRule",
    "GammaRule",
    "IdentityRule",
    "LayerLRP",
    "ModifiedWeightRule",
    "OpRule",
    "PropagationRule",
    "RatioRule",
    "Relevance",
]
