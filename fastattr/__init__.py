"""fastattr: Captum's attribution API on compiled C++/CUDA kernels.

Change ``from captum.attr import IntegratedGradients`` to
``from fastattr import IntegratedGradients``; the classes, arguments and numbers are
Captum's.
"""

from fastattr._backend import build_info, current_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "build_info",
    "current_backend",
    "use_backend",
]
