"""Mirror of ``captum.attr`` for the methods fastattr implements."""

from fastattr.attr._integrated_gradients import IntegratedGradients
from fastattr.attr._layer_integrated_gradients import LayerIntegratedGradients
from fastattr.attr._neuron_integrated_gradients import NeuronIntegratedGradients

__all__ = [
    "IntegratedGradients",
    "LayerIntegratedGradients",
    "NeuronIntegratedGradients",
]
