"""``pip install --no-build-isolation -e .`` (setup.py imports torch, so build in the environment that has it).

Builds the optional native extension ``eagle_kernels._C`` from ``csrc/``: CPU ops always, CUDA ops when torch is a
CUDA build and nvcc is found (no GPU is queried). When the CUDA compile fails (e.g. an nvcc without the CUDA
runtime headers), the CPU-only extension is built from the same sources without the ``.cu`` files. A failed or
skipped build leaves a working pure-Python install. The outcome and its reason go to
``eagle_kernels/_native_build.json`` (shown by ``python -m eagle_runtime env``).
Environment: ``EAGLE_KERNELS_NO_NATIVE=1`` skips the build, ``EAGLE_KERNELS_CUDA_ARCH`` (default "8.0;9.0") picks
the GPU architectures, ``MAX_JOBS`` caps parallel compile jobs. See csrc/README.md.
"""

import json
import os
import shutil
import tempfile

from setuptools import setup

NATIVE_HELP = "eagle_kernels._C is optional; the reference ops are used without it. See csrc/README.md."
BUILD_INFO = "_native_build.json"  # beside the built extension (git-ignored)
CPU_SOURCES = ["csrc/tree_buffers_core.cpp", "csrc/ops.cpp", "csrc/module.cpp"]
CUDA_SOURCES = ["csrc/tree_buffers.cu", "csrc/ops_cuda.cpp"]
CXX_FLAGS = ["-O3"]


def _warn(msg):
    print(f"\n*** WARNING: {msg}\n*** {NATIVE_HELP}\n", flush=True)


def _first_line(e: BaseException) -> str:
    """A one-line reason: the exception type and its first non-empty line (compiler logs are long)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def write_build_info(directory: str, built: bool, cuda: bool, reason: str) -> None:
    """Record the build outcome atomically (temp file in the same directory, then rename)."""
    import torch

    os.makedirs(directory, exist_ok=True)
    info = {"built": built, "cuda": cuda, "reason": reason, "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    fd, tmp = tempfile.mkstemp(prefix=".native_build.", dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, os.path.join(directory, BUILD_INFO))


def cpu_extension():
    from torch.utils import cpp_extension as ce

    return ce.CppExtension("eagle_kernels._C", list(CPU_SOURCES), extra_compile_args=list(CXX_FLAGS))


def to_cpu_only(ext) -> None:
    """Turn a CUDAExtension into the CPU-only one in place (build_ext already holds the object)."""
    cpu = cpu_extension()
    for attr in ("sources", "include_dirs", "library_dirs", "libraries", "define_macros", "extra_compile_args",
                 "extra_link_args", "runtime_library_dirs", "language"):
        setattr(ext, attr, getattr(cpu, attr))


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

    nvcc = ce.CUDA_HOME and shutil.which(os.path.join(ce.CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda and nvcc:
        # Set explicitly: with no arch list torch asks the visible GPUs, which must not happen at install time.
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("EAGLE_KERNELS_CUDA_ARCH", "8.0;9.0")
        ext = ce.CUDAExtension(
            "eagle_kernels._C",
            CPU_SOURCES + CUDA_SOURCES,
            define_macros=[("EAGLE_WITH_CUDA", None)],
            extra_compile_args={"cxx": list(CXX_FLAGS), "nvcc": ["-O3"]},
        )
        cpu_note = ""
        if not any(os.path.isfile(os.path.join(d, "cuda_runtime.h")) for d in ext.include_dirs):
            # Seen with an nvcc installed without the CUDA runtime headers: every CUDA compile would fail after
            # a minute; build the CPU part right away and say why.
            ext = cpu_extension()
            cpu_note = f"CUDA compile skipped: no cuda_runtime.h in the CUDA include path {ce.CUDA_HOME}/include"
    else:
        ext = cpu_extension()
        cpu_note = "torch is a CPU build" if not torch.version.cuda else f"no nvcc under CUDA_HOME={ce.CUDA_HOME}"

    class BuildNative(ce.BuildExtension):
        """Torch's ninja build. A failed CUDA compile falls back to the CPU-only extension; any other failure is
        reported and the install continues without the extension. The outcome goes to ``_native_build.json``."""

        def run(self):
            where = os.path.dirname(self.get_ext_fullpath(ext.name))
            with_cuda = any(s.endswith(".cu") for s in ext.sources)
            try:
                super().run()
                write_build_info(where, True, with_cuda, "built with CUDA" if with_cuda else f"CPU only: {cpu_note}")
                return
            except Exception as e:  # any compiler/toolchain failure: the extension is optional
                first = _first_line(e)
            if with_cuda:
                _warn(f"the CUDA build of eagle_kernels._C failed ({first}); building the CPU-only extension")
                to_cpu_only(ext)
                self.compiler = None  # run() made a compiler object from the option; let it make a fresh one
                try:
                    super().run()
                    write_build_info(where, True, False, f"CPU only: CUDA compile failed: {first}")
                    print("eagle_kernels._C: built (CPU only; the CUDA compile failed)", flush=True)
                    return
                except Exception as e:  # noqa: BLE001 - same as above
                    first = f"CUDA compile failed, then the CPU compile failed: {_first_line(e)}"
            _warn(f"building eagle_kernels._C failed: {first}")
            write_build_info(where, False, False, first)
            self.extensions = []
            self.distribution.ext_modules = []

    return [ext], {"build_ext": BuildNative.with_options(use_ninja=True)}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its helpers
    ext_modules, cmdclass = _native()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
