// Multi-key balanced partitioning of samples over ranks (e.g. LLM tokens and ViT tokens as two
// keys of one partition), and contiguous cuts of a long video's frames.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace glm5v::partition {

enum class Method { KarmarkarKarp, LongestProcessingTime };

Method parse_method(const std::string& name);

struct Problem {
  const double* costs;     // (n, m) row-major, >= 0
  int64_t n, m, k;
  const double* weights;   // (m,) or null: every key weighs 1
  const double* caps;      // (m,) or null: per-part limit on every key's raw load
  bool equal_size;         // part sizes (in samples) differ by at most one
  const int64_t* groups;   // (n,) or null: samples with one id stay in one part
};

// Assigns every sample a part in [0, k), minimising the largest weighted, mean-normalised load of
// any part on any key: a vector Karmarkar–Karp differencing (or LPT greedy) start, then move and
// swap refinement. Deterministic: ties go to the lower index. Throws std::invalid_argument when
// the caps or equal_size cannot be met.
std::vector<int32_t> balanced_partition(const Problem& problem, Method method);

// Contiguous cuts of frames (cost per frame) into k ranges minimising the largest range cost;
// returns the k + 1 boundaries (exact: binary search on the answer over the prefix sums).
std::vector<int64_t> partition_contiguous(const double* costs, int64_t n, int64_t k);

}  // namespace glm5v::partition
