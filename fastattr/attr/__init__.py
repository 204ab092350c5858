"""Mirror of ``captum.attr`` for the methods fastattr implements."""

from fastattr.attr._integrated_gradients import IntegratedGradients

__all__ = [
    "IntegratedGradients",
]
