"""Mirror of ``captum.attr`` for the methods fastattr implements."""

from fastattr.attr._integrated_gradients import IntegratedGradients
from fastattr.attr._layer_integrated_gradients import LayerIntegratedGradients
from fastattr.attr._neuron_integrated_gradients import NeuronIntegratedGradients
from fastattr.attr._noise_tunnel import NoiseTunnel
from fastattr.lrp import LRP, Alpha1_Beta0_Rule, EpsilonRule, GammaRule, IdentityRule, LayerLRP

__all__ = [
    "LRP",
    "Alpha1_Beta0_Rule",
    "EpsilonRule",
    "GammaRule",
    "IdentityRule",
    "IntegratedGradients",
    "LayerIntegratedGradients",
    "LayerLRP",
    "NeuronIntegratedGradients",
    "NoiseTunnel",
]
