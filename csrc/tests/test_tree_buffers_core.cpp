// Tests of the torch-free tree-buffer code against hand-computed expectations. Every tree is checked through
// both implementations: the sequential CPU core (build_tree_buffers_cpu, behind the CPU op) and the per-node
// function the CUDA kernel runs in each thread (tree_node_buffers), here called node by node on the host.
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "tree_buffers_core.h"
#include "tree_buffers_node.h"

namespace {

int g_failures = 0;

#define EXPECT(cond, ...)                                                  \
  do {                                                                     \
    if (!(cond)) {                                                         \
      ++g_failures;                                                        \
      std::fprintf(stderr, "%s:%d: EXPECT(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                   \
      std::fprintf(stderr, "\n");                                          \
    }                                                                      \
  } while (0)

using I64 = std::vector<int64_t>;

struct Buffers {
  std::vector<char> mask;  // [B, T, T] as 0/1 (vector<bool> has no data())
  I64 depth, first_child, next_sibling, paths;
};

struct Case {
  std::string name;
  int64_t B, T, max_depth;
  I64 parents;
  Buffers want;
};

// Expected buffers of one tree, computed from explicit ancestor lists (independent of both implementations).
Buffers expect_tree(const I64& par, int64_t max_depth) {
  const int64_t T = static_cast<int64_t>(par.size()), W = max_depth + 1;
  Buffers e{std::vector<char>(T * T, 0), I64(T, 0), I64(T, -1), I64(T, -1), I64(T * W, -1)};
  for (int64_t i = 0; i < T; ++i) {
    I64 chain{i};  // i, parent, ..., root
    while (chain.back() != 0) chain.push_back(par[chain.back()]);
    const int64_t d = static_cast<int64_t>(chain.size()) - 1;
    e.depth[i] = d;
    for (int64_t k = 0; k <= d; ++k) {
      e.mask[i * T + chain[k]] = 1;
      e.paths[i * W + (d - k)] = chain[k];
    }
    for (int64_t j = T - 1; j > i; --j) {
      if (par[j] == i) e.first_child[i] = j;
      if (i > 0 && par[j] == par[i]) e.next_sibling[i] = j;
    }
  }
  return e;
}

void append(Buffers& dst, const Buffers& src) {
  dst.mask.insert(dst.mask.end(), src.mask.begin(), src.mask.end());
  dst.depth.insert(dst.depth.end(), src.depth.begin(), src.depth.end());
  dst.first_child.insert(dst.first_child.end(), src.first_child.begin(), src.first_child.end());
  dst.next_sibling.insert(dst.next_sibling.end(), src.next_sibling.begin(), src.next_sibling.end());
  dst.paths.insert(dst.paths.end(), src.paths.begin(), src.paths.end());
}

Buffers alloc(int64_t B, int64_t T, int64_t max_depth) {
  // Garbage fill: both implementations must write every entry.
  return {std::vector<char>(B * T * T, 7), I64(B * T, 99), I64(B * T, 99), I64(B * T, 99),
          I64(B * T * (max_depth + 1), 99)};
}

bool* as_bool(std::vector<char>& v) { return reinterpret_cast<bool*>(v.data()); }

void compare(const std::string& what, const Buffers& got, const Buffers& want) {
  bool mask_ok = got.mask.size() == want.mask.size();
  for (size_t k = 0; mask_ok && k < want.mask.size(); ++k) mask_ok = (got.mask[k] != 0) == (want.mask[k] != 0);
  EXPECT(mask_ok, "%s: mask differs", what.c_str());
  EXPECT(got.depth == want.depth, "%s: depth differs", what.c_str());
  EXPECT(got.first_child == want.first_child, "%s: first_child differs", what.c_str());
  EXPECT(got.next_sibling == want.next_sibling, "%s: next_sibling differs", what.c_str());
  EXPECT(got.paths == want.paths, "%s: paths differ", what.c_str());
}

void run_case(const Case& c) {
  Buffers cpu = alloc(c.B, c.T, c.max_depth);
  const eagle::TreeResult r =
      eagle::build_tree_buffers_cpu(c.parents.data(), c.B, c.T, c.max_depth, as_bool(cpu.mask), cpu.depth.data(),
                                    cpu.first_child.data(), cpu.next_sibling.data(), cpu.paths.data());
  EXPECT(r.ok(), "%s: unexpected error: %s", c.name.c_str(), eagle::describe(r, c.max_depth).c_str());
  compare(c.name + " [cpu core]", cpu, c.want);

  Buffers node = alloc(c.B, c.T, c.max_depth);
  const int64_t W = c.max_depth + 1;
  for (int64_t e = 0; e < c.B * c.T; ++e) {  // what the CUDA grid does, one iteration per thread
    const int64_t b = e / c.T, i = e % c.T;
    eagle::tree_node_buffers(c.parents.data() + b * c.T, c.T, c.max_depth, i, as_bool(node.mask) + e * c.T,
                             &node.depth[e], &node.first_child[e], &node.next_sibling[e], &node.paths[e * W]);
  }
  compare(c.name + " [cuda per-node]", node, c.want);
}

I64 chain(int64_t T) {
  I64 p(T);
  for (int64_t i = 0; i < T; ++i) p[i] = i - 1;
  return p;
}

I64 star(int64_t T) {
  I64 p(T, 0);
  p[0] = -1;
  return p;
}

void test_literal_cases() {
  // The reference docstring's example: root 0 with children 1, 2; node 3 under 1.
  run_case({"docstring example", 1, 4, 2, {-1, 0, 0, 1},
            {{1, 0, 0, 0, /**/ 1, 1, 0, 0, /**/ 1, 0, 1, 0, /**/ 1, 1, 0, 1},
             {0, 1, 1, 2},
             {1, 3, -1, -1},
             {-1, 2, -1, -1},
             {0, -1, -1, /**/ 0, 1, -1, /**/ 0, 2, -1, /**/ 0, 1, 3}}});
  run_case({"single node", 1, 1, 0, {-1}, {{1}, {0}, {-1}, {-1}, {0}}});
  run_case({"single node, wide paths", 1, 1, 2, {-1}, {{1}, {0}, {-1}, {-1}, {0, -1, -1}}});
  run_case({"chain of 4", 1, 4, 3, chain(4),
            {{1, 0, 0, 0, /**/ 1, 1, 0, 0, /**/ 1, 1, 1, 0, /**/ 1, 1, 1, 1},
             {0, 1, 2, 3},
             {1, 2, 3, -1},
             {-1, -1, -1, -1},
             {0, -1, -1, -1, /**/ 0, 1, -1, -1, /**/ 0, 1, 2, -1, /**/ 0, 1, 2, 3}}});
  run_case({"star of 4", 1, 4, 1, star(4),
            {{1, 0, 0, 0, /**/ 1, 1, 0, 0, /**/ 1, 0, 1, 0, /**/ 1, 0, 0, 1},
             {0, 1, 1, 1},
             {1, -1, -1, -1},
             {-1, 2, 3, -1},
             {0, -1, /**/ 0, 1, /**/ 0, 2, /**/ 0, 3}}});
  // Batch of 2: the example tree and a chain, paths width 4 (max_depth 3 > both depths).
  run_case({"batch of 2", 2, 4, 3, {-1, 0, 0, 1, /**/ -1, 0, 1, 2},
            {{1, 0, 0, 0, 1, 1, 0, 0, 1, 0, 1, 0, 1, 1, 0, 1, /**/ 1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1},
             {0, 1, 1, 2, /**/ 0, 1, 2, 3},
             {1, 3, -1, -1, /**/ 1, 2, 3, -1},
             {-1, 2, -1, -1, /**/ -1, -1, -1, -1},
             {0, -1, -1, -1, 0, 1, -1, -1, 0, 2, -1, -1, 0, 1, 3, -1,
              /**/ 0, -1, -1, -1, 0, 1, -1, -1, 0, 1, 2, -1, 0, 1, 2, 3}}});
}

void test_generated_cases() {
  run_case({"deep chain of 300", 1, 300, 299, chain(300), expect_tree(chain(300), 299)});
  run_case({"wide star of 500", 1, 500, 1, star(500), expect_tree(star(500), 1)});
  // The EAGLE-1 static tree (mc_sim_7b_63: 25 drafted nodes + root, depth 5) and a batch of 3 mixed trees.
  const I64 eagle1 = {-1, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 5, 5, 5, 6, 6, 7, 7, 8, 13, 13, 13, 21, 21};
  run_case({"eagle-1 static tree", 1, 26, 5, eagle1, expect_tree(eagle1, 5)});
  I64 mixed;
  Buffers want;
  const int64_t T = 26;
  for (const I64& p : {eagle1, chain(T), star(T)}) {
    mixed.insert(mixed.end(), p.begin(), p.end());
    append(want, expect_tree(p, T - 1));
  }
  run_case({"batch of 3 mixed", 3, T, T - 1, mixed, want});
}

void test_errors() {
  auto run = [](const I64& par, int64_t B, int64_t T, int64_t max_depth) {
    Buffers out = alloc(B, T, max_depth);
    return eagle::build_tree_buffers_cpu(par.data(), B, T, max_depth, as_bool(out.mask), out.depth.data(),
                                         out.first_child.data(), out.next_sibling.data(), out.paths.data());
  };
  eagle::TreeResult r = run({-1, 0, 0, 1, /**/ 0, 0, 0, 1}, 2, 4, 3);
  EXPECT(r.status == eagle::TreeStatus::kBadRoot && r.batch == 1 && r.node == 0, "bad root not reported");
  r = run({-1, 0, 2, 1}, 1, 4, 3);
  EXPECT(r.status == eagle::TreeStatus::kBadParent && r.node == 2 && r.value == 2, "self parent not reported");
  EXPECT(eagle::describe(r, 3) == "parents[0, 2] = 2 must lie in [0, 2) (nodes are topologically ordered)",
         "message: %s", eagle::describe(r, 3).c_str());
  r = run({-1, 0, -1}, 1, 3, 2);
  EXPECT(r.status == eagle::TreeStatus::kBadParent && r.node == 2 && r.value == -1, "second root not reported");
  r = run({-1, 0, 1, 2}, 1, 4, 2);
  EXPECT(r.status == eagle::TreeStatus::kTooDeep && r.node == 3 && r.value == 3, "too deep not reported");
  EXPECT(eagle::describe(r, 2) == "tree of sequence 0 has depth 3 > max_depth 2 (node 3)", "message: %s",
         eagle::describe(r, 2).c_str());

  // The per-node (CUDA) function does not validate but must stay in bounds and terminate on garbage.
  const I64 bad = {5, 3, 7, -4, 2, 1000};
  const int64_t T = 6, W = 2;
  std::vector<char> mask(T * T);
  I64 depth(T), fc(T), ns(T), paths(T * W);
  for (int64_t i = 0; i < T; ++i) {
    eagle::tree_node_buffers(bad.data(), T, W - 1, i, as_bool(mask) + i * T, &depth[i], &fc[i], &ns[i], &paths[i * W]);
    EXPECT(depth[i] >= 0 && depth[i] <= i, "garbage tree: depth[%lld] = %lld", (long long)i, (long long)depth[i]);
  }
}

}  // namespace

int main() {
  test_literal_cases();
  test_generated_cases();
  test_errors();
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all tree-buffer core checks passed\n");
  return 0;
}
