// Python module init of eagle_kernels._C. Importing it loads this shared library, whose static initialisers
// (TORCH_LIBRARY in ops.cpp, ops_cuda.cpp) register torch.ops.eagle_kernels.*; the module itself only says how
// it was built. Kept apart from the ops so this file needs pybind11 alone, not the torch headers.
#include <pybind11/pybind11.h>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "eagle_kernels native ops; call them as torch.ops.eagle_kernels.* or via eagle_kernels.tree_buffers";
#ifdef EAGLE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
