"""Builds fastattr._C: the CPU kernels always, the CUDA kernels when torch and nvcc allow.

FASTATTR_CUDA=0 / FASTATTR_CUDA=1 force the CUDA kernels off / on.
TORCH_CUDA_ARCH_LIST overrides the default architectures (sm_80 and sm_90) used when no GPU
is visible.
"""

import glob
import os
import shutil
import sys

from setuptools import setup


def _has_toolkit(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h")
    )


def _find_cuda_home() -> "str | None":
    """The real toolkit root. nvcc on PATH may be a wrapper script outside the toolkit,
    which makes torch's own guess (the wrapper's grandparent) wrong and breaks the link."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:
            with open(nvcc, errors="ignore") as script:
                head = script.read(4096)
            # A wrapper such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`.
            for word in head.split():
                if word.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(word)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for root in candidates:
        if root and _has_toolkit(root):
            return os.path.realpath(root)
    return None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported, so resolve it first.
_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def _want_cuda() -> bool:
    forced = os.environ.get("FASTATTR_CUDA")
    available = torch.version.cuda is not None and _cuda_home is not None
    if forced == "0":
        return False
    if forced == "1":
        if not available:
            sys.exit(
                "FASTATTR_CUDA=1 but the CUDA kernels cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA toolkit={_cuda_home!r}"
            )
        return True
    return available


# The oldest torch pyproject.toml claims, the one `make test` tests (test-oldest-torch).
OLDEST_TORCH = (2, 13)
_torch_version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
if _torch_version < OLDEST_TORCH:
    oldest = ".".join(map(str, OLDEST_TORCH))
    sys.exit(f"fastattr needs torch {oldest} or newer, found {torch.__version__}")
_with_cuda = _want_cuda()

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
# at::parallel_for is header-inline OpenMP: without -fopenmp it silently runs on one thread.
openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
# No FMA contraction: the kernels then round exactly as their PyTorch twins do.
cxx_flags = ["-O3", "-ffp-contract=off", *openmp]
define_macros = []


def _arch_list() -> str:
    """What nvcc will target: TORCH_CUDA_ARCH_LIST, else the visible GPUs, else sm_80 and sm_90."""
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            capabilities = {
                torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())
            }
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(
                f"{major}.{minor}" for major, minor in sorted(capabilities)
            )
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    return os.environ["TORCH_CUDA_ARCH_LIST"]


if _with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    define_macros.append(("FASTATTR_WITH_CUDA", None))
    define_macros.append(("FASTATTR_CUDA_ARCH_LIST", f'"{_arch_list()}"'))
    extension = CUDAExtension(
        "fastattr._C",
        sources,
        define_macros=define_macros,
        extra_compile_args={
            "cxx": cxx_flags,
            # nvcc contracts a * b + c into an FMA by default; off, as for the C++ kernels.
            "nvcc": ["-O3", "--extended-lambda", "--fmad=false"],
        },
        extra_link_args=openmp,
        # The stable ABI lets one wheel serve every Python from 3.10 on (torch defines
        # Py_LIMITED_API=3.10 for such extensions).
        py_limited_api=True,
    )
else:
    extension = CppExtension(
        "fastattr._C",
        sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=openmp,
        py_limited_api=True,
    )

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
