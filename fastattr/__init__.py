"""fastattr: Captum's attribution API on compiled C++/CUDA kernels.

Change ``from captum.attr import IntegratedGradients`` to
``from fastattr import IntegratedGradients``; the classes, arguments and numbers are
Captum's.
"""

from fastattr._backend import build_info, current_backend, use_backend
from fastattr.attr import (
    LRP,
    Alpha1_Beta0_Rule,
    EpsilonRule,
    GammaRule,
    IdentityRule,
    IntegratedGradients,
    LayerIntegratedGradients,
    LayerLRP,
    NeuronIntegratedGradients,
    NoiseTunnel,
)
from fastattr.data import AttributionStore, attribute_dataset, open_store
from fastattr.lrp import (
    AlphaBetaRule,
    FlatRule,
    GeneralizedGammaRule,
    WSquareRule,
    ZBoxRule,
    ZPlusRule,
)

__version__ = "0.1.0"

__all__ = [
    "LRP",
    "AlphaBetaRule",
    "Alpha1_Beta0_Rule",
    "AttributionStore",
    "EpsilonRule",
    "FlatRule",
    "GammaRule",
    "GeneralizedGammaRule",
    "IdentityRule",
    "IntegratedGradients",
    "LayerIntegratedGradients",
    "LayerLRP",
    "NeuronIntegratedGradients",
    "NoiseTunnel",
    "__version__",
    "attribute_dataset",
    "build_info",
    "current_backend",
    "open_store",
    "use_backend",
    "WSquareRule",
    "ZBoxRule",
    "ZPlusRule",
]
