#include "tree_buffers_core.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace eagle {

std::string describe(const TreeResult& r, int64_t max_depth) {
  const std::string at = "[" + std::to_string(r.batch) + ", " + std::to_string(r.node) + "]";
  switch (r.status) {
    case TreeStatus::kOk:
      return "ok";
    case TreeStatus::kBadRoot:
      return "parents" + at + " = " + std::to_string(r.value) + ", but parents[:, 0] must be -1 (node 0 is the root)";
    case TreeStatus::kBadParent:
      return "parents" + at + " = " + std::to_string(r.value) + " must lie in [0, " + std::to_string(r.node) +
             ") (nodes are topologically ordered)";
    case TreeStatus::kTooDeep:
      return "tree of sequence " + std::to_string(r.batch) + " has depth " + std::to_string(r.value) +
             " > max_depth " + std::to_string(max_depth) + " (node " + std::to_string(r.node) + ")";
  }
  return "unknown tree error";
}

TreeResult check_parents(const int64_t* parents, int64_t B, int64_t T) {
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* par = parents + b * T;
    if (par[0] != -1) return {TreeStatus::kBadRoot, b, 0, par[0]};
    for (int64_t i = 1; i < T; ++i) {
      if (par[i] < 0 || par[i] >= i) return {TreeStatus::kBadParent, b, i, par[i]};
    }
  }
  return {};
}

TreeResult build_tree_buffers_cpu(const int64_t* parents, int64_t B, int64_t T, int64_t max_depth, bool* mask,
                                  int64_t* depth, int64_t* first_child, int64_t* next_sibling, int64_t* paths) {
  TreeResult r = check_parents(parents, B, T);
  if (!r.ok()) return r;
  const int64_t W = max_depth + 1;
  std::vector<int64_t> last_child(static_cast<size_t>(T));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* par = parents + b * T;
    bool* m = mask + b * T * T;
    int64_t* dep = depth + b * T;
    int64_t* fc = first_child + b * T;
    int64_t* ns = next_sibling + b * T;
    int64_t* pa = paths + b * T * W;
    std::fill(m, m + T * T, false);
    std::fill(fc, fc + T, int64_t{-1});
    std::fill(ns, ns + T, int64_t{-1});
    std::fill(pa, pa + T * W, int64_t{-1});
    std::fill(last_child.begin(), last_child.end(), int64_t{-1});
    m[0] = true;
    dep[0] = 0;
    pa[0] = 0;
    for (int64_t i = 1; i < T; ++i) {
      const int64_t p = par[i];
      const int64_t d = dep[p] + 1;
      if (d > max_depth) return {TreeStatus::kTooDeep, b, i, d};
      dep[i] = d;
      // Parent rows are complete (p < i): copy the ancestor set and the path prefix, then add self.
      std::memcpy(m + i * T, m + p * T, static_cast<size_t>(p + 1) * sizeof(bool));
      m[i * T + i] = true;
      std::memcpy(pa + i * W, pa + p * W, static_cast<size_t>(d) * sizeof(int64_t));
      pa[i * W + d] = i;
      if (last_child[p] < 0) {
        fc[p] = i;
      } else {
        ns[last_child[p]] = i;
      }
      last_child[p] = i;
    }
  }
  return {};
}

}  // namespace eagle
