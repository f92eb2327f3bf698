// CPU tree-buffer construction with input validation. Pure C++ (no torch): the torch binding (ops.cpp)
// and the CMake test binary both use it.
#pragma once

#include <cstdint>
#include <string>

namespace eagle {

enum class TreeStatus { kOk = 0, kBadRoot, kBadParent, kTooDeep };

struct TreeResult {
  TreeStatus status = TreeStatus::kOk;
  int64_t batch = -1;  // offending sequence
  int64_t node = -1;   // offending node
  int64_t value = 0;   // its parent (kBadRoot, kBadParent) or its depth (kTooDeep)
  bool ok() const { return status == TreeStatus::kOk; }
};

// Human-readable error, e.g. "parents[1, 3] = 5 must lie in [0, 3) (nodes are topologically ordered)".
std::string describe(const TreeResult& r, int64_t max_depth);

// Check that parents[b, 0] == -1 and 0 <= parents[b, i] < i for i >= 1. First violation wins (row-major).
TreeResult check_parents(const int64_t* parents, int64_t B, int64_t T);

// Same outputs as eagle_kernels.reference.build_tree_buffers, all contiguous row-major:
//   mask [B, T, T], depth / first_child / next_sibling [B, T], paths [B, T, max_depth + 1].
// Validates first (nothing is written on a bad tree); a tree deeper than max_depth returns kTooDeep with
// the outputs partly written. Sequential per tree: a node copies its parent's mask row and path, O(T^2).
TreeResult build_tree_buffers_cpu(const int64_t* parents, int64_t B, int64_t T, int64_t max_depth, bool* mask,
                                  int64_t* depth, int64_t* first_child, int64_t* next_sibling, int64_t* paths);

}  // namespace eagle
