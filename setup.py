"""``pip install --no-build-isolation -e .`` (setup.py imports torch, so build in the environment that has it).

Builds the optional native extension ``eagle_kernels._C`` from ``csrc/``: CPU ops always, CUDA ops when torch is a
CUDA build and nvcc is found (no GPU is queried). A failed or skipped build leaves a working pure-Python install.
Environment: ``EAGLE_KERNELS_NO_NATIVE=1`` skips the build, ``EAGLE_KERNELS_CUDA_ARCH`` (default "8.0;9.0") picks
the GPU architectures, ``MAX_JOBS`` caps parallel compile jobs. See csrc/README.md.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_ext import build_ext

NATIVE_HELP = "eagle_kernels._C is optional; the reference ops are used without it. See csrc/README.md."


def _warn(msg):
    print(f"\n*** WARNING: {msg}\n*** {NATIVE_HELP}\n", flush=True)


def _native():
    """(ext_modules, cmdclass) for the extension, or ([], {}) when it is skipped."""
    if os.environ.get("EAGLE_KERNELS_NO_NATIVE") == "1":
        print("EAGLE_KERNELS_NO_NATIVE=1: skipping the native extension eagle_kernels._C", flush=True)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError as e:
        _warn(f"torch is not importable ({e}); install torch first and use --no-build-isolation")
        return [], {}

    sources = ["csrc/tree_buffers_core.cpp", "csrc/ops.cpp", "csrc/module.cpp"]
    cxx = ["-O3"]
    nvcc = ce.CUDA_HOME and shutil.which(os.path.join(ce.CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda and nvcc:
        # Set explicitly: with no arch list torch asks the visible GPUs, which must not happen at install time.
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("EAGLE_KERNELS_CUDA_ARCH", "8.0;9.0")
        ext = ce.CUDAExtension(
            "eagle_kernels._C",
            sources + ["csrc/tree_buffers.cu", "csrc/ops_cuda.cpp"],
            define_macros=[("EAGLE_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
        )
    else:
        ext = ce.CppExtension("eagle_kernels._C", sources, extra_compile_args=cxx)

    class BuildNative(ce.BuildExtension):
        """Torch's ninja build; a failure is reported and the install continues without the extension."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # any compiler/toolchain failure: the extension is optional
                _warn(f"building eagle_kernels._C failed: {type(e).__name__}: {e}")
                self.extensions = []
                self.distribution.ext_modules = []

    return [ext], {"build_ext": BuildNative.with_options(use_ninja=True)}


ext_modules, cmdclass = _native()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
