// Per-node tree-buffer construction shared by the CUDA kernel (one thread per node) and the C++ tests.
//
// No torch, no CUDA headers: nvcc compiles these as __host__ __device__ functions, g++ as plain inline
// functions, so the exact code the CUDA kernel runs per node is also unit-tested on the CPU (ctest).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define EAGLE_HD __host__ __device__ __forceinline__
#else
#define EAGLE_HD inline
#endif

namespace eagle {

// Fill every output entry that belongs to node `i` of one tree (`par` = that tree's parents row, length T):
//   mask_row[0..T)              true at i and at each ancestor of i
//   *depth                      number of edges from the root
//   *first_child, *next_sibling lowest-index child / next higher-index sibling, -1 when none
//   path_row[0..max_depth]      root-to-i node indices, -1 padded
// Nodes are independent: no output of node i is read back, so all nodes of all trees can run in parallel.
//
// Cost O(T + depth) per node. Input is NOT validated (the CUDA path must not sync the host to report an
// error), but the function is memory-safe for any input: the ancestor walk stops at a parent outside [0, a)
// (so it always ends, after at most i steps), and path entries deeper than max_depth are dropped. On an
// invalid tree the outputs are unspecified; the CPU op validates and raises instead.
EAGLE_HD void tree_node_buffers(const int64_t* par, int64_t T, int64_t max_depth, int64_t i, bool* mask_row,
                                int64_t* depth, int64_t* first_child, int64_t* next_sibling, int64_t* path_row) {
  // Depth: walk up to the root.
  int64_t d = 0;
  for (int64_t a = i; a > 0;) {
    const int64_t p = par[a];
    if (p < 0 || p >= a) break;
    a = p;
    ++d;
  }
  *depth = d;

  for (int64_t j = 0; j < T; ++j) mask_row[j] = false;
  for (int64_t k = 0; k <= max_depth; ++k) path_row[k] = -1;
  // Second walk: ancestor a sits at depth d - steps.
  int64_t a = i;
  for (int64_t k = d; k >= 0; --k) {
    mask_row[a] = true;
    if (k <= max_depth) path_row[k] = a;
    if (a == 0) break;
    const int64_t p = par[a];
    if (p < 0 || p >= a) break;
    a = p;
  }

  // Child links: only higher indices can be children or later siblings (topological order).
  const int64_t my_parent = i > 0 ? par[i] : -2;  // -2 matches no entry of a valid tree
  int64_t fc = -1, ns = -1;
  for (int64_t j = i + 1; j < T && (fc < 0 || ns < 0); ++j) {
    const int64_t p = par[j];
    if (fc < 0 && p == i) fc = j;
    if (ns < 0 && p == my_parent) ns = j;
  }
  *first_child = fc;
  *next_sibling = ns;
}

}  // namespace eagle
