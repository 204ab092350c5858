"""Layer-wise relevance propagation (LRP, LayerLRP), its rules, and what rules are written with."""

from fastattr.lrp.lrp import LRP, LayerLRP
from fastattr.lrp.propagation import Relevance
from fastattr.lrp.rules import (
    Alpha1_Beta0_Rule,
    AlphaBetaRule,
    EpsilonRule,
    EpsilonSumRule,
    FlatRule,
    GammaRule,
    GeneralizedGammaRule,
    IdentityRule,
    ModifiedWeightRule,
    OpRule,
    PropagationRule,
    RatioRule,
    RecomputedRatioRule,
    RecomputingRule,
    WSquareRule,
    ZBoxRule,
    ZPlusRule,
)

__all__ = [
    "LRP",
    "AlphaBetaRule",
    "Alpha1_Beta0_Rule",
    "EpsilonRule",
    "EpsilonSumRule",
    "FlatRule",
    "GammaRule",
    "GeneralizedGammaRule",
    "IdentityRule",
    "LayerLRP",
    "ModifiedWeightRule",
    "OpRule",
    "PropagationRule",
    "RatioRule",
    "RecomputedRatioRule",
    "RecomputingRule",
    "Relevance",
    "WSquareRule",
    "ZBoxRule",
    "ZPlusRule",
]
