#include "partition.h"

#include <algorithm>
#include <functional>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <queue>
#include <stdexcept>

namespace glm5v::partition {
namespace {

// Samples of one group move together: an item is a group, its vector the sum of its samples'.
struct Items {
  int64_t m = 0;
  std::vector<double> normalised, raw;  // (items, m)
  std::vector<int64_t> size;            // samples per item
  std::vector<std::vector<int64_t>> members;
  int64_t count() const { return static_cast<int64_t>(size.size()); }
  const double* vec(int64_t i) const { return &normalised[i * m]; }
  const double* raw_vec(int64_t i) const { return &raw[i * m]; }
  double key(int64_t i) const { return *std::max_element(vec(i), vec(i) + m); }
};

Items make_items(const Problem& p) {
  Items items;
  items.m = p.m;
  std::vector<double> total(p.m, 0.0);
  for (int64_t i = 0; i < p.n; ++i) {
    for (int64_t j = 0; j < p.m; ++j) total[j] += p.costs[i * p.m + j];
  }
  // Each key's load is measured against its mean per part, times its weight.
  std::vector<double> scale(p.m, 0.0);
  for (int64_t j = 0; j < p.m; ++j) {
    const double weight = p.weights ? p.weights[j] : 1.0;
    scale[j] = total[j] > 0 ? weight * static_cast<double>(p.k) / total[j] : 0.0;
  }
  std::vector<int64_t> item_of(p.n);
  if (p.groups) {
    std::vector<int64_t> order(p.n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return p.groups[a] < p.groups[b]; });
    // items numbered by the first sample of each group, so the numbering follows sample order
    std::vector<int64_t> first_of_item;
    for (size_t r = 0; r < order.size(); ++r) {
      if (r == 0 || p.groups[order[r]] != p.groups[order[r - 1]]) first_of_item.push_back(order[r]);
      item_of[order[r]] = static_cast<int64_t>(first_of_item.size()) - 1;
    }
    std::vector<int64_t> rank(first_of_item.size());
    std::iota(rank.begin(), rank.end(), 0);
    std::sort(rank.begin(), rank.end(), [&](int64_t a, int64_t b) { return first_of_item[a] < first_of_item[b]; });
    std::vector<int64_t> renumber(rank.size());
    for (size_t r = 0; r < rank.size(); ++r) renumber[rank[r]] = static_cast<int64_t>(r);
    for (int64_t i = 0; i < p.n; ++i) item_of[i] = renumber[item_of[i]];
  } else {
    std::iota(item_of.begin(), item_of.end(), 0);
  }
  const int64_t count = *std::max_element(item_of.begin(), item_of.end()) + 1;
  items.normalised.assign(count * p.m, 0.0);
  items.raw.assign(count * p.m, 0.0);
  items.size.assign(count, 0);
  items.members.resize(count);
  for (int64_t i = 0; i < p.n; ++i) {
    const int64_t t = item_of[i];
    items.size[t] += 1;
    items.members[t].push_back(i);
    for (int64_t j = 0; j < p.m; ++j) {
      items.raw[t * p.m + j] += p.costs[i * p.m + j];
      items.normalised[t * p.m + j] += p.costs[i * p.m + j] * scale[j];
    }
  }
  return items;
}

// Loads, sizes and contents of the k parts, and the rules a change must keep.
struct State {
  const Problem& problem;
  const Items& items;
  std::vector<double> load, raw;  // (k, m)
  std::vector<int64_t> size;
  std::vector<int32_t> part_of;   // per item
  int64_t floor_size, ceil_parts;  // equal_size: sizes floor_size or floor_size + 1 (ceil_parts of those)

  State(const Problem& p, const Items& it)
      : problem(p), items(it), load(p.k * it.m, 0.0), raw(p.k * it.m, 0.0), size(p.k, 0),
        part_of(it.count(), -1), floor_size(p.n / p.k), ceil_parts(p.n % p.k) {}

  double max_load(int64_t part) const {
    return *std::max_element(&load[part * items.m], &load[part * items.m] + items.m);
  }
  void add(int64_t item, int64_t part, double sign) {
    for (int64_t j = 0; j < items.m; ++j) {
      load[part * items.m + j] += sign * items.vec(item)[j];
      raw[part * items.m + j] += sign * items.raw_vec(item)[j];
    }
    size[part] += static_cast<int64_t>(sign) * items.size[item];
  }
  void assign(int64_t item, int64_t part) {
    add(item, part, 1.0);
    part_of[item] = static_cast<int32_t>(part);
  }
  bool within_caps(int64_t part, const double* plus, const double* minus) const {
    if (!problem.caps) return true;
    for (int64_t j = 0; j < items.m; ++j) {
      const double value = raw[part * items.m + j] + (plus ? plus[j] : 0.0) - (minus ? minus[j] : 0.0);
      if (value > problem.caps[j] * (1 + 1e-12)) return false;
    }
    return true;
  }
  bool sizes_ok() const {
    if (!problem.equal_size) return true;
    const auto [lo, hi] = std::minmax_element(size.begin(), size.end());
    return *hi - *lo <= 1;
  }
  double objective() const {
    double value = 0;
    for (int64_t p = 0; p < problem.k; ++p) value = std::max(value, max_load(p));
    return value;
  }
  bool caps_ok() const {
    for (int64_t p = 0; p < problem.k; ++p) {
      if (!within_caps(p, nullptr, nullptr)) return false;
    }
    return true;
  }
};

std::vector<int64_t> by_key_descending(const Items& items) {
  std::vector<int64_t> order(items.count());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return items.key(a) > items.key(b); });
  return order;
}

// Longest processing time first: each item, largest first, to the part where the resulting
// largest load is smallest, among the parts its caps and the size rule allow.
void lpt(State& s) {
  const int64_t k = s.problem.k, m = s.items.m;
  int64_t parts_at_ceil = 0;
  for (int64_t item : by_key_descending(s.items)) {
    int64_t best = -1;
    double best_value = std::numeric_limits<double>::infinity(), best_sum = 0;
    for (int64_t p = 0; p < k; ++p) {
      if (!s.within_caps(p, s.items.raw_vec(item), nullptr)) continue;
      if (s.problem.equal_size) {
        const int64_t after = s.size[p] + s.items.size[item];
        if (after > s.floor_size + 1 || (after == s.floor_size + 1 && parts_at_ceil >= s.ceil_parts)) continue;
      }
      double value = 0, sum = 0;
      for (int64_t j = 0; j < m; ++j) {
        const double l = s.load[p * m + j] + s.items.vec(item)[j];
        value = std::max(value, l);
        sum += l;
      }
      if (value < best_value || (value == best_value && sum < best_sum)) {
        best = p, best_value = value, best_sum = sum;
      }
    }
    if (best < 0) {
      throw std::invalid_argument("no part can take sample group " + std::to_string(s.items.members[item][0]) +
                                  ": the caps (or equal_size) cannot be met");
    }
    if (s.problem.equal_size && s.size[best] + s.items.size[item] == s.floor_size + 1) ++parts_at_ceil;
    s.assign(item, best);
  }
}

// Karmarkar–Karp largest differencing over k-way partial solutions with vector loads: the two
// partial solutions whose parts differ most are merged, heaviest part of one with lightest of the
// other, until one remains.
void karmarkar_karp(State& s) {
  const int64_t k = s.problem.k, m = s.items.m;
  struct Part {
    std::vector<double> load;
    std::vector<int64_t> items;
    double key() const { return *std::max_element(load.begin(), load.end()); }
  };
  struct Partial {
    std::vector<Part> parts;
    double spread;
  };
  std::vector<Partial> partials;
  auto finish = [&](Partial& partial) {
    double lo = std::numeric_limits<double>::infinity(), hi = -lo;
    for (const Part& part : partial.parts) lo = std::min(lo, part.key()), hi = std::max(hi, part.key());
    partial.spread = hi - lo;
  };
  auto new_partial = [&]() {
    Partial partial;
    partial.parts.assign(k, Part{std::vector<double>(m, 0.0), {}});
    return partial;
  };
  const std::vector<int64_t> order = by_key_descending(s.items);
  // equal_size: start from k items at a time, one per part, so part sizes stay equal.
  const int64_t chunk = s.problem.equal_size ? k : 1;
  for (size_t start = 0; start < order.size(); start += chunk) {
    Partial partial = new_partial();
    for (size_t r = start; r < std::min(order.size(), start + chunk); ++r) {
      Part& part = partial.parts[r - start];
      part.items.push_back(order[r]);
      for (int64_t j = 0; j < m; ++j) part.load[j] += s.items.vec(order[r])[j];
    }
    finish(partial);
    partials.push_back(std::move(partial));
  }
  auto later = [&](size_t a, size_t b) {  // max-heap on spread, ties to the earlier partial
    if (partials[a].spread != partials[b].spread) return partials[a].spread < partials[b].spread;
    return a > b;
  };
  std::priority_queue<size_t, std::vector<size_t>, decltype(later)> heap(later);
  for (size_t i = 0; i < partials.size(); ++i) heap.push(i);
  while (heap.size() > 1) {
    const size_t a = heap.top();
    heap.pop();
    const size_t b = heap.top();
    heap.pop();
    auto by_key = [](const Part& x, const Part& y) { return x.key() > y.key(); };
    std::stable_sort(partials[a].parts.begin(), partials[a].parts.end(), by_key);
    std::stable_sort(partials[b].parts.begin(), partials[b].parts.end(), by_key);
    // merge b into a in place: a's heaviest part with b's lightest, and so on
    for (int64_t p = 0; p < k; ++p) {
      Part& heavy = partials[a].parts[p];
      Part& light = partials[b].parts[k - 1 - p];
      for (int64_t j = 0; j < m; ++j) heavy.load[j] += light.load[j];
      heavy.items.insert(heavy.items.end(), light.items.begin(), light.items.end());
    }
    partials[b].parts.clear();
    finish(partials[a]);
    heap.push(a);
  }
  const Partial& result = partials[heap.top()];
  for (int64_t p = 0; p < k; ++p) {
    for (int64_t item : result.parts[p].items) s.assign(item, p);
  }
}

// Moves and swaps between the most loaded part and the least loaded ones while they lower the
// most loaded part's largest load; every change keeps the caps and the size rule.
void refine(State& s) {
  const int64_t k = s.problem.k, m = s.items.m;
  constexpr int64_t kPartners = 4;
  // A change must lower the largest load by this fraction, and the search stops this close to the
  // lower bound (the heaviest key's weight: every key's mean load is its weight; or the heaviest
  // item): finer gains cost rounds and buy nothing.
  constexpr double kMinGain = 1e-7, kCloseEnough = 1e-5;
  double bound = 0;
  for (int64_t j = 0; j < m; ++j) bound = std::max(bound, s.problem.weights ? s.problem.weights[j] : 1.0);
  for (int64_t item = 0; item < s.items.count(); ++item) bound = std::max(bound, s.items.key(item));
  std::vector<std::vector<int64_t>> contents(k);
  for (int64_t item = 0; item < s.items.count(); ++item) contents[s.part_of[item]].push_back(item);
  std::vector<double> after_p(m), after_q(m);
  auto peak = [&](const std::vector<double>& v) { return *std::max_element(v.begin(), v.end()); };
  const int64_t max_rounds = 16 * k + s.items.count();
  for (int64_t round = 0; round < max_rounds; ++round) {
    std::vector<int64_t> parts(k);
    std::iota(parts.begin(), parts.end(), 0);
    std::stable_sort(parts.begin(), parts.end(), [&](int64_t a, int64_t b) { return s.max_load(a) > s.max_load(b); });
    const int64_t p = parts[0];
    const double current = s.max_load(p);
    if (current <= bound * (1 + kCloseEnough)) return;
    double best = current * (1 - kMinGain);
    int64_t best_q = -1, best_a = -1, best_b = -1;  // best_b < 0: a move
    for (int64_t r = std::max<int64_t>(1, k - kPartners); r < k; ++r) {
      const int64_t q = parts[r];
      for (int64_t a : contents[p]) {
        const double* va = s.items.vec(a);
        const bool size_ok = !s.problem.equal_size;  // moves change sizes; with equal_size only swaps
        if (size_ok && s.within_caps(q, s.items.raw_vec(a), nullptr)) {
          for (int64_t j = 0; j < m; ++j) {
            after_p[j] = s.load[p * m + j] - va[j];
            after_q[j] = s.load[q * m + j] + va[j];
          }
          const double value = std::max(peak(after_p), peak(after_q));
          if (value < best) best = value, best_q = q, best_a = a, best_b = -1;
        }
        for (int64_t b : contents[q]) {
          if (s.problem.equal_size && s.items.size[a] != s.items.size[b]) continue;
          const double* vb = s.items.vec(b);
          for (int64_t j = 0; j < m; ++j) {
            after_p[j] = s.load[p * m + j] - va[j] + vb[j];
            after_q[j] = s.load[q * m + j] + va[j] - vb[j];
          }
          const double value = std::max(peak(after_p), peak(after_q));
          if (value < best && s.within_caps(q, s.items.raw_vec(a), s.items.raw_vec(b)) &&
              s.within_caps(p, s.items.raw_vec(b), s.items.raw_vec(a))) {
            best = value, best_q = q, best_a = a, best_b = b;
          }
        }
      }
    }
    if (best_q < 0) return;
    auto move = [&](int64_t item, int64_t from, int64_t to) {
      s.add(item, from, -1.0);
      s.assign(item, to);
      auto& list = contents[from];
      list.erase(std::find(list.begin(), list.end(), item));
      contents[to].push_back(item);
    };
    move(best_a, p, best_q);
    if (best_b >= 0) move(best_b, best_q, p);
  }
}

std::vector<int32_t> expand(const Problem& problem, const Items& items, const State& state) {
  std::vector<int32_t> part(problem.n);
  for (int64_t item = 0; item < items.count(); ++item) {
    for (int64_t sample : items.members[item]) part[sample] = state.part_of[item];
  }
  return part;
}

// Small problems are solved exactly: depth-first over assignments, parts opened in order (so
// relabelings are not revisited), pruned when a part's largest load already reaches the best.
constexpr int64_t kExhaustiveItems = 10;

bool exhaustive(State& s) {
  const int64_t k = s.problem.k, count = s.items.count();
  std::vector<int32_t> best_parts;
  double best = std::numeric_limits<double>::infinity();
  const std::vector<int64_t> order = by_key_descending(s.items);
  std::function<void(int64_t, int64_t, double)> visit = [&](int64_t depth, int64_t used, double peak) {
    if (peak >= best * (1 - 1e-12)) return;
    if (depth == count) {
      if (s.sizes_ok()) best = peak, best_parts = s.part_of;
      return;
    }
    const int64_t item = order[depth];
    for (int64_t p = 0; p < std::min(k, used + 1); ++p) {
      if (!s.within_caps(p, s.items.raw_vec(item), nullptr)) continue;
      s.assign(item, p);
      visit(depth + 1, std::max(used, p + 1), std::max(peak, s.max_load(p)));
      s.add(item, p, -1.0);
      s.part_of[item] = -1;
    }
  };
  visit(0, 0, 0.0);
  if (best_parts.empty()) return false;
  for (int64_t item = 0; item < count; ++item) s.assign(item, best_parts[item]);
  return true;
}

}  // namespace

Method parse_method(const std::string& name) {
  if (name == "kk") return Method::KarmarkarKarp;
  if (name == "lpt") return Method::LongestProcessingTime;
  throw std::invalid_argument("method must be 'kk' or 'lpt', got '" + name + "'");
}

std::vector<int32_t> balanced_partition(const Problem& problem, Method method) {
  const Items items = make_items(problem);
  if (items.count() <= kExhaustiveItems) {
    State exact(problem, items);
    if (!exhaustive(exact)) {
      throw std::invalid_argument("no assignment meets the caps (and equal_size) for these samples");
    }
    return expand(problem, items, exact);
  }
  // Start from the greedy, and for "kk" from differencing too when it does better: differencing
  // is strongest on one key, the greedy holds up better on several.
  std::optional<State> start;
  start.emplace(problem, items);
  lpt(*start);
  if (method == Method::KarmarkarKarp) {
    State differenced(problem, items);
    karmarkar_karp(differenced);
    // Differencing sees neither caps nor group sizes; it is kept only where it meets them.
    if (differenced.caps_ok() && differenced.sizes_ok() && differenced.objective() < start->objective()) {
      start.emplace(std::move(differenced));
    }
  }
  State& state = *start;
  refine(state);
  if (!state.sizes_ok()) {
    throw std::invalid_argument("equal_size cannot be met with these groups: part sizes differ by more than one");
  }
  return expand(problem, items, state);
}

std::vector<int64_t> partition_contiguous(const double* costs, int64_t n, int64_t k) {
  // Largest range cost when cuts are made greedily under a limit; feasible when <= k ranges.
  auto ranges_needed = [&](double limit) {
    int64_t ranges = 1;
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (sum + costs[i] > limit) ++ranges, sum = 0;
      sum += costs[i];
    }
    return ranges;
  };
  double lo = 0, hi = 0;
  for (int64_t i = 0; i < n; ++i) lo = std::max(lo, costs[i]), hi += costs[i];
  for (int iteration = 0; iteration < 200 && hi - lo > 1e-12 * std::max(1.0, hi); ++iteration) {
    const double mid = (lo + hi) / 2;
    (ranges_needed(mid) <= k ? hi : lo) = mid;
  }
  // Cut under the limit, but early enough that every later range still gets a frame when it can.
  std::vector<int64_t> bounds{0};
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t ranges_left = k - static_cast<int64_t>(bounds.size()) + 1;
    const bool must_cut = n - i <= ranges_left - 1 && i > bounds.back();
    if ((sum + costs[i] > hi && i > bounds.back()) || must_cut) {
      bounds.push_back(i);
      sum = 0;
    }
    sum += costs[i];
  }
  while (static_cast<int64_t>(bounds.size()) < k + 1) bounds.push_back(n);
  return bounds;
}

}  // namespace glm5v::partition
