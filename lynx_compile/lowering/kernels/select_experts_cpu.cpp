// Batch-aware expert selection for one routing site, on CPU, in one call: the contract every
// policy keeps (policies/contract.py:select_experts) and the policies' preferences
// (policies/*.py), with the same results as that torch body, bit for bit, ties included.
//
// Letters: T tokens, E experts, k experts per token. Inputs: scores (T, E) (what the model's top-k
// ranks; -inf: ineligible), logits (T, E) (router logits), plain (T, k) int64 (the model's own
// torch.topk indices, computed by aten.topk beside this op so its tie order is torch's), live
// (T,) bool or undefined, num_routed (columns from it on are zero-compute experts, -1: none).
// Output: values (T, k) in scores' dtype, indices (T, k) int64.
//
// Why one C++ call: the matrices are tiny (T <= a few hundred, E <= 256) and the selection is a
// chain of reductions over alternating axes (per token, per expert, per token again), which the
// traced torch body turns into ~10 generated kernels, 5 stable sorts and 3 more top-ks per site.
// Here each step is a loop over a (T, E) array. No token's experts are ever fully sorted: the
// body's token order (a stable descending sort by score) is only ever read up to its first few
// places, so each is found by passes of "best remaining" (score, then lower index), O(k E).
//
// Registered as the CPU kernel of lynx::select_experts_cpu (schema in lowering/ops.py), so
// Inductor's generated code calls it through the dispatcher, without Python.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Batch {
  int64_t T = 0, E = 0, k = 0;
  std::vector<float> scores;     // (T, E)
  std::vector<float> logits;     // (T, E)
  std::vector<uint8_t> eligible; // (T, E) scores > -inf (NaN: false)
  std::vector<uint8_t> usable;   // (T,)
  std::vector<uint8_t> voters;   // (T,) usable and live

  float s(int64_t t, int64_t e) const { return scores[t * E + e]; }
  float z(int64_t t, int64_t e) const { return logits[t * E + e]; }
  bool eli(int64_t t, int64_t e) const { return eligible[t * E + e]; }
  bool voting(int64_t t, int64_t e) const { return voters[t] && eligible[t * E + e]; }
};

// Whether expert a comes before expert c in token t's order (a stable descending sort by score).
inline bool before(const Batch& b, int64_t t, int64_t a, int64_t c) {
  const float sa = b.s(t, a), sc = b.s(t, c);
  return sa > sc || (sa == sc && a < c);
}

// The first expert of token t's order among those `take(e)` accepts, or -1.
template <typename Take>
int64_t best_of(const Batch& b, int64_t t, Take take) {
  int64_t best = -1;
  for (int64_t e = 0; e < b.E; ++e)
    if (take(e) && (best < 0 || before(b, t, e, best))) best = e;
  return best;
}

std::vector<float> as_floats(const at::Tensor& x) {
  at::Tensor f = x.to(at::kFloat).contiguous();
  const float* p = f.data_ptr<float>();
  return std::vector<float>(p, p + f.numel());
}

Batch make_batch(const at::Tensor& scores, const at::Tensor& logits, int64_t k, const c10::optional<at::Tensor>& live) {
  Batch b;
  b.T = scores.size(0);
  b.E = scores.size(1);
  b.k = k;
  b.scores = as_floats(scores);
  b.logits = as_floats(logits);
  const int64_t T = b.T, E = b.E;
  b.eligible.assign(T * E, 0);
  b.usable.assign(T, 0);
  b.voters.assign(T, 0);
  std::vector<uint8_t> alive(T, 1);
  if (live.has_value() && live->defined()) {
    at::Tensor l = live->to(at::kBool).contiguous();
    const bool* p = l.data_ptr<bool>();
    for (int64_t t = 0; t < T; ++t) alive[t] = p[t];
  }
  for (int64_t t = 0; t < T; ++t) {
    int64_t count = 0;
    bool finite_scores = true, finite_logits = true;
    for (int64_t e = 0; e < E; ++e) {
      const float s = b.s(t, e);
      const bool eligible = s > kNegInf;  // NaN compares false
      b.eligible[t * E + e] = eligible;
      count += eligible;
      finite_scores &= std::isfinite(s) || s == kNegInf;
      finite_logits &= std::isfinite(b.z(t, e)) || !eligible;
    }
    b.usable[t] = count >= k && finite_scores && finite_logits;
    b.voters[t] = b.usable[t] && alive[t];
  }
  return b;
}

// (E,) each expert's rank under `before` (a strict order on experts): 0 = first.
template <typename Before>
std::vector<int64_t> rank_of(int64_t E, Before before) {
  std::vector<int64_t> ranking(E);
  std::iota(ranking.begin(), ranking.end(), 0);
  std::sort(ranking.begin(), ranking.end(), before);
  std::vector<int64_t> position(E);
  for (int64_t i = 0; i < E; ++i) position[ranking[i]] = i;
  return position;
}

// policies/base.py:logit_gaps for token t, voting experts only: z[e] - max z (fp32), into `gap`.
void logit_gaps(const Batch& b, int64_t t, float* gap) {
  float top = kNegInf;
  for (int64_t e = 0; e < b.E; ++e)
    if (b.voting(t, e)) top = std::max(top, b.z(t, e));
  for (int64_t e = 0; e < b.E; ++e) gap[e] = b.voting(t, e) ? b.z(t, e) - top : kNegInf;
}

// policies/base.py:gap_evidence: the voters' summed gaps, in units of 2**-16 logits, floored per
// entry: exact integers.
void add_gap_evidence(const Batch& b, int64_t t, const float* gap, std::vector<int64_t>& evidence) {
  for (int64_t e = 0; e < b.E; ++e)
    if (b.voting(t, e)) evidence[e] += static_cast<int64_t>(std::floor(std::max(gap[e], -1e6f) * 65536.0f));
}

// policies/base.py:confident_voters: the second-best eligible logit trails the best by more
// than the gap (fp32, like the torch body; one eligible expert: always confident).
std::vector<uint8_t> confident_voters(const Batch& b, float gap) {
  std::vector<uint8_t> confident(b.T, 0);
  for (int64_t t = 0; t < b.T; ++t) {
    if (!b.voters[t]) continue;
    float first = kNegInf, second = kNegInf;
    for (int64_t e = 0; e < b.E; ++e) {
      if (!b.voting(t, e)) continue;
      const float z = b.z(t, e);
      if (z > first) {
        second = first;
        first = z;
      } else if (z > second) {
        second = z;
      }
    }
    confident[t] = (first - second) > gap;
  }
  return confident;
}

// --- the policies: which experts the voters prefer --------------------------------------------

// policies/affinity_binning.py. Returns the surviving set (E,).
std::vector<uint8_t> affinity_binning(const Batch& b, double alpha, int64_t beta, double confidence_gap) {
  const int64_t T = b.T, E = b.E;
  const int64_t levels = beta + 1;
  std::vector<int64_t> level(T * E, beta);   // -bin, in [0, beta]
  std::vector<int64_t> votes(levels * E, 0);  // (levels, E) voters' votes per bin level
  std::vector<int64_t> evidence(E, 0);
  std::vector<uint8_t> confident(T, 0);
  std::vector<int64_t> top1(T, 0);
  const float scale = -static_cast<float>(alpha);
  const float gap_bound = static_cast<float>(confidence_gap);
  for (int64_t t = 0; t < T; ++t) {  // one pass per voter: best logits, then gaps, bins, votes, evidence
    if (!b.voters[t]) continue;
    const float* z = &b.logits[t * E];
    const float* s = &b.scores[t * E];
    const uint8_t* eligible = &b.eligible[t * E];
    float first = kNegInf, second = kNegInf;  // policies/base.py:confident_voters: the top-2 logits
    int64_t best = 0;
    for (int64_t e = 0; e < E; ++e) {
      if (s[e] > s[best]) best = e;  // argmax of the scores: the first of the best
      if (!eligible[e]) continue;
      if (z[e] > first) {
        second = first;
        first = z[e];
      } else if (z[e] > second) {
        second = z[e];
      }
    }
    top1[t] = best;
    confident[t] = (first - second) > gap_bound;
    for (int64_t e = 0; e < E; ++e) {
      if (!eligible[e]) continue;
      const float gap = z[e] - first;  // policies/base.py:logit_gaps
      evidence[e] += static_cast<int64_t>(std::floor(std::max(gap, -1e6f) * 65536.0f));  // gap_evidence
      const float bin = std::floor(scale * gap);  // >= 0: floor(-alpha * gap)
      const int64_t l = static_cast<int64_t>(std::min(bin, static_cast<float>(beta)));
      level[t * E + e] = l;
      votes[l * E + e] += 1;
    }
  }
  const std::vector<int64_t> rank = rank_of(E, [&](int64_t a, int64_t c) {
    for (int64_t l = 0; l < levels; ++l)
      if (votes[l * E + a] != votes[l * E + c]) return votes[l * E + a] > votes[l * E + c];
    if (evidence[a] != evidence[c]) return evidence[a] > evidence[c];
    return a < c;
  });
  std::vector<int64_t> ranked(E);  // experts in rank order
  for (int64_t e = 0; e < E; ++e) ranked[rank[e]] = e;

  int64_t keep = b.k - 1;
  for (int64_t t = 0; t < T; ++t) {
    if (!b.voters[t]) continue;
    const uint8_t* eligible = &b.eligible[t * E];
    int64_t best_bin0 = E;
    for (int64_t e = 0; e < E; ++e)
      if (eligible[e] && level[t * E + e] == 0) best_bin0 = std::min(best_bin0, rank[e]);
    int64_t kth = 0;  // the rank of the token's k-th eligible expert in the batch's ranking
    for (int64_t r = 0, seen = 0; r < E; ++r) {
      if (eligible[ranked[r]] && ++seen == b.k) {
        kth = r;
        break;
      }
    }
    int64_t needed = std::max(kth, best_bin0);
    if (confident[t]) needed = std::max(needed, rank[top1[t]]);
    keep = std::max(keep, needed);
  }
  std::vector<uint8_t> survivors(E);
  for (int64_t e = 0; e < E; ++e) survivors[e] = rank[e] < keep + 1;
  return survivors;
}

// policies/gate_mass_budget.py. Returns the surviving set (E,).
std::vector<uint8_t> gate_mass_budget(const Batch& b, int64_t budget, double confidence_gap,
                                      const at::Tensor& logits) {
  const int64_t T = b.T, E = b.E;
  std::vector<int64_t> evidence(E, 0);
  std::vector<float> gap(E);
  std::vector<uint8_t> voting(T * E, 0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e) voting[t * E + e] = b.voting(t, e);
    if (!b.voters[t]) continue;
    logit_gaps(b, t, gap.data());
    add_gap_evidence(b, t, gap.data(), evidence);
  }
  // The batch's gate mass in float64, op for op as gate_mass_budget.batch_gate_mass. Small
  // batches loop here; larger ones use ATen's own kernels (its vectorized exp: a libm exp per
  // element costs ~100 ns on AVX-512 machines). Either way the sums are rounded to 2**-24 units,
  // far coarser than their rounding differences.
  std::vector<int64_t> units(E);
  if (T * E <= 1024) {
    std::vector<double> mass(E, 0.0), weight(E);
    for (int64_t t = 0; t < T; ++t) {
      if (!b.voters[t]) continue;
      double top = -std::numeric_limits<double>::infinity();
      for (int64_t e = 0; e < E; ++e)
        if (voting[t * E + e]) top = std::max(top, static_cast<double>(b.z(t, e)));
      double total = 0.0;
      for (int64_t e = 0; e < E; ++e) {
        weight[e] = voting[t * E + e] ? std::exp(static_cast<double>(b.z(t, e)) - top) : 0.0;
        total += weight[e];
      }
      for (int64_t e = 0; e < E; ++e) mass[e] += weight[e] / (total > 0 ? total : 1.0);
    }
    for (int64_t e = 0; e < E; ++e) units[e] = static_cast<int64_t>(std::nearbyint(mass[e] * 16777216.0));
  } else {
    const at::Tensor mask = at::from_blob(voting.data(), {T, E}, at::kByte).to(at::kBool);
    at::Tensor z = logits.to(at::kDouble).masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity());
    at::Tensor z_max = z.amax({-1}, true);
    z_max = at::where(z_max.isfinite(), z_max, at::zeros_like(z_max));
    const at::Tensor weights = (z - z_max).exp();
    const at::Tensor total = weights.sum({-1}, true);
    const at::Tensor probability = weights / at::where(total > 0, total, at::ones_like(total));
    const at::Tensor mass = (probability.sum({0}) * 16777216.0).round().to(at::kLong).contiguous();  // 2**24
    std::copy(mass.data_ptr<int64_t>(), mass.data_ptr<int64_t>() + E, units.begin());
  }
  const std::vector<int64_t> rank = rank_of(E, [&](int64_t a, int64_t c) {
    if (units[a] != units[c]) return units[a] > units[c];
    if (evidence[a] != evidence[c]) return evidence[a] > evidence[c];
    return a < c;
  });
  std::vector<uint8_t> kept(E);
  for (int64_t e = 0; e < E; ++e) kept[e] = rank[e] < budget;
  const std::vector<uint8_t> confident = confident_voters(b, static_cast<float>(confidence_gap));
  for (int64_t t = 0; t < T; ++t)
    if (confident[t]) kept[best_of(b, t, [](int64_t) { return true; })] = 1;  // its top-1
  std::vector<uint8_t> added(E, 0);
  for (int64_t t = 0; t < T; ++t) {
    if (!b.voters[t]) continue;
    int64_t have = 0;
    for (int64_t e = 0; e < E; ++e) have += b.eli(t, e) && kept[e];
    int64_t missing = std::max<int64_t>(b.k - have, 0);
    std::vector<uint8_t> mine(E, 0);  // this token's own additions, in its order
    for (; missing > 0; --missing) {
      const int64_t e = best_of(b, t, [&](int64_t x) { return b.eli(t, x) && !kept[x] && !mine[x]; });
      if (e < 0) break;
      mine[e] = 1;
      added[e] = 1;
    }
  }
  for (int64_t e = 0; e < E; ++e) kept[e] |= added[e];
  return kept;
}

// policies/protected_mass.py: each voter keeps its top experts, in its order, up to keep_mass of
// their router probability (integer units of 2**-24, as token_probability_units); `kept` (T, E)
// and `loaded` (E,) are the policy's two tiers.
void protected_mass(const Batch& b, double keep_mass, std::vector<uint8_t>& kept, std::vector<uint8_t>& loaded) {
  const int64_t T = b.T, E = b.E, k = b.k;
  kept.assign(T * E, 0);
  loaded.assign(E, 0);
  std::vector<double> weight(E);
  std::vector<int64_t> own(k), units(k);
  std::vector<int64_t> candidates;
  candidates.reserve(E);
  for (int64_t t = 0; t < T; ++t) {
    if (!b.usable[t]) continue;  // only usable rows read their tiers
    candidates.resize(E);  // the token's own top-k, in its order (ineligible experts last: -inf scores)
    std::iota(candidates.begin(), candidates.end(), int64_t{0});
    std::partial_sort(candidates.begin(), candidates.begin() + k, candidates.end(),
                      [&](int64_t a, int64_t c) { return before(b, t, a, c); });
    double top = -std::numeric_limits<double>::infinity(), total = 0.0;
    if (b.voters[t]) {
      for (int64_t e = 0; e < E; ++e)
        if (b.eli(t, e)) top = std::max(top, static_cast<double>(b.z(t, e)));
      for (int64_t e = 0; e < E; ++e) {
        weight[e] = b.eli(t, e) ? std::exp(static_cast<double>(b.z(t, e)) - top) : 0.0;
        total += weight[e];
      }
    }
    int64_t sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = candidates[j];
      units[j] = b.voters[t] ? static_cast<int64_t>(std::nearbyint(weight[e] / (total > 0 ? total : 1.0) * 16777216.0))
                             : 0;
      sum += units[j];
    }
    const double need = std::ceil(static_cast<double>(sum) * keep_mass);
    int64_t ahead = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = candidates[j];
      if ((j == 0 || keep_mass >= 1.0 || static_cast<double>(ahead) < need) && b.eli(t, e)) {
        kept[t * E + e] = 1;
        if (b.voters[t]) loaded[e] = 1;
      }
      ahead += units[j];
    }
  }
}

// policies/moved_mass.py: each voter's top-k weights (its router probability renormalized over
// its top-k, float64, in integer units of 2**-24) summed per expert (load) and squared (harm);
// the least harmful experts are dropped while their summed load stays within max_moved of the
// total, k experts at least kept. ranks > 1: the drop order takes from the fullest of `ranks`
// contiguous expert shards first (moved_mass.py:fullest_rank_first).
// Returns the surviving set (E,).
std::vector<uint8_t> moved_mass(const Batch& b, double max_moved, int64_t ranks) {
  const int64_t T = b.T, E = b.E, k = b.k;
  std::vector<int64_t> load(E, 0), harm(E, 0), evidence(E, 0);
  std::vector<float> gap(E);
  std::vector<int64_t> candidates;
  candidates.reserve(E);
  for (int64_t t = 0; t < T; ++t) {
    if (!b.voters[t]) continue;
    logit_gaps(b, t, gap.data());
    add_gap_evidence(b, t, gap.data(), evidence);
    // The token's top-k, in its order; ineligible experts (-inf scores) come last and weigh 0 (a
    // voter may have fewer than k eligible in a policy's view: zero-compute columns left out).
    candidates.resize(E);
    std::iota(candidates.begin(), candidates.end(), int64_t{0});
    double top = -std::numeric_limits<double>::infinity();
    for (int64_t e = 0; e < E; ++e)
      if (b.eli(t, e)) top = std::max(top, static_cast<double>(b.z(t, e)));
    std::partial_sort(candidates.begin(), candidates.begin() + k, candidates.end(),
                      [&](int64_t a, int64_t c) { return before(b, t, a, c); });
    auto weight = [&](int64_t e) { return b.eli(t, e) ? std::exp(static_cast<double>(b.z(t, e)) - top) : 0.0; };
    double total = 0.0;
    for (int64_t j = 0; j < k; ++j) total += weight(candidates[j]);
    for (int64_t j = 0; j < k; ++j) {
      const double w = weight(candidates[j]);
      const int64_t units = static_cast<int64_t>(std::nearbyint(w / (total > 0 ? total : 1.0) * 16777216.0));
      load[candidates[j]] += units;
      harm[candidates[j]] += (units * units) >> 24;  // floor(units**2 / 2**24): units >= 0
    }
  }
  const std::vector<int64_t> harm_rank = rank_of(E, [&](int64_t a, int64_t c) {
    if (harm[a] != harm[c]) return harm[a] > harm[c];
    if (evidence[a] != evidence[c]) return evidence[a] > evidence[c];
    return a < c;
  });
  std::vector<int64_t> rank = harm_rank;
  if (ranks > 1) {
    // depth: an expert's place (1 = most harmful) among the routed experts of its own shard;
    // unrouted experts last; keep order by depth, ties by harm rank.
    std::vector<int64_t> by_harm(E), depth(E, E + 1), in_shard(ranks, 0);
    for (int64_t e = 0; e < E; ++e) by_harm[harm_rank[e]] = e;
    for (int64_t i = 0; i < E; ++i) {
      const int64_t e = by_harm[i];
      if (load[e] > 0) depth[e] = ++in_shard[e / (E / ranks)];  // contiguous shards: shards.py
    }
    rank = rank_of(E, [&](int64_t a, int64_t c) {
      if (depth[a] != depth[c]) return depth[a] < depth[c];
      return harm_rank[a] < harm_rank[c];
    });
  }
  std::vector<int64_t> by_rank(E);
  int64_t sum = 0;
  for (int64_t e = 0; e < E; ++e) {
    by_rank[rank[e]] = load[e];
    sum += load[e];
  }
  const double allowed = std::floor(static_cast<double>(sum) * max_moved);
  std::vector<int64_t> dropped_from(E + 1, 0);  // the load of every expert from rank r on
  for (int64_t r = E - 1; r >= 0; --r) dropped_from[r] = dropped_from[r + 1] + by_rank[r];
  std::vector<uint8_t> survivors(E);
  for (int64_t e = 0; e < E; ++e)
    survivors[e] = !(rank[e] >= k && static_cast<double>(dropped_from[rank[e]]) <= allowed);
  return survivors;
}

// --- the contract --------------------------------------------------------------------------------

// tier of (t, e): the first level whose mask holds it; `levels` (T, E) masks, most preferred
// first, the last one `eligible`. Each token takes its k best experts tier by tier, by its own
// order inside a tier, then sorted by score (stable), like a top-k.
// Whether the token's plain top-k (torch.topk's indices) are exactly the first k of its order,
// i.e. no tie at the k-th place made torch pick another expert than the order would. Then a pick
// whose first tier holds all of them takes exactly them (the fast path of `pick`).
bool plain_is_order_prefix(const Batch& b, int64_t t, const int64_t* plain) {
  int64_t worst = plain[0];
  for (int64_t j = 1; j < b.k; ++j)
    if (before(b, t, worst, plain[j])) worst = plain[j];
  for (int64_t e = 0; e < b.E; ++e) {
    if (!before(b, t, e, worst)) continue;
    if (std::find(plain, plain + b.k, e) == plain + b.k) return false;  // a better expert left out
  }
  return true;
}

void pick(const Batch& b, int64_t t, const std::vector<const std::vector<uint8_t>*>& levels, bool per_token0,
          int64_t* out, std::vector<int64_t>& candidates, const int64_t* plain, bool plain_prefix) {
  const int64_t E = b.E;
  const uint8_t* eligible = &b.eligible[t * E];
  const uint8_t* first = levels[0]->data() + (per_token0 ? t * E : 0);
  if (plain_prefix && std::all_of(plain, plain + b.k, [&](int64_t e) { return first[e] && eligible[e]; })) {
    std::copy(plain, plain + b.k, out);  // the first tier holds the token's own top-k: exactly those
    std::sort(out, out + b.k, [&](int64_t a, int64_t c) { return before(b, t, a, c); });
    return;
  }
  int64_t taken = 0;
  uint64_t seen_low = 0;  // experts already taken (the E < 64 case: a bit set; else the linear check)
  auto taken_before = [&](int64_t e) {
    if (E <= 64) return ((seen_low >> e) & 1u) != 0;
    return std::find(out, out + taken, e) != out + taken;
  };
  for (size_t level = 0; level < levels.size() && taken < b.k; ++level) {
    const uint8_t* mask = levels[level]->data() + ((per_token0 && level == 0) ? t * E : 0);
    candidates.clear();
    for (int64_t e = 0; e < E; ++e)
      if (eligible[e] && mask[e] && !taken_before(e)) candidates.push_back(e);
    const int64_t want = std::min<int64_t>(b.k - taken, static_cast<int64_t>(candidates.size()));
    // the `want` first of the token's order among them: (score desc, index asc)
    std::partial_sort(candidates.begin(), candidates.begin() + want, candidates.end(),
                      [&](int64_t a, int64_t c) { return before(b, t, a, c); });
    for (int64_t i = 0; i < want; ++i) {
      const int64_t e = candidates[i];
      out[taken++] = e;
      if (E <= 64) seen_low |= uint64_t{1} << e;
    }
  }
  std::stable_sort(out, out + b.k, [&](int64_t a, int64_t c) { return b.s(t, a) > b.s(t, c); });
}

// The real experts (below `routed`) the voters use: zero-compute ones are loaded by nobody.
int64_t distinct_experts(const Batch& b, const std::vector<int64_t>& indices, int64_t routed) {
  std::vector<uint8_t> used(b.E, 0);
  for (int64_t t = 0; t < b.T; ++t)
    if (b.voters[t])
      for (int64_t j = 0; j < b.k; ++j) used[indices[t * b.k + j]] = 1;
  return std::accumulate(used.begin(), used.begin() + routed, int64_t{0});
}

// contract.py:policy_view: what a policy reads when columns from `routed` on do no work: their
// scores -inf (so neither eligible to its vote nor in its token order); usable rows and voters
// stay the contract's.
Batch policy_view(const Batch& b, int64_t routed) {
  Batch view = b;
  for (int64_t t = 0; t < b.T; ++t)
    for (int64_t e = routed; e < b.E; ++e) {
      view.scores[t * b.E + e] = kNegInf;
      view.eligible[t * b.E + e] = 0;
    }
  return view;
}

std::tuple<at::Tensor, at::Tensor> select_experts_cpu(const at::Tensor& scores, const at::Tensor& logits,
                                                     const at::Tensor& plain_indices, int64_t k,
                                                     c10::string_view policy, at::ArrayRef<double> params,
                                                     c10::SymInt decode_token_bound,
                                                     const c10::optional<at::Tensor>& live, int64_t num_routed) {
  TORCH_CHECK(scores.dim() == 2 && logits.sizes() == scores.sizes(), "select_experts_cpu: scores and logits (T, E)");
  TORCH_CHECK(plain_indices.dim() == 2 && plain_indices.size(0) == scores.size(0) && plain_indices.size(1) == k,
              "select_experts_cpu: plain_indices (T, k)");
  const int64_t T = scores.size(0), E = scores.size(1);
  TORCH_CHECK(num_routed >= -1 && num_routed <= E, "select_experts_cpu: num_routed outside [-1, E]");
  const int64_t routed = num_routed < 0 ? E : num_routed;  // columns from here on: zero-compute experts
  at::Tensor plain = plain_indices.to(at::kLong).contiguous();
  const int64_t bound = decode_token_bound.expect_int();
  at::Tensor indices = plain.clone();
  if (bound == -1 || T <= bound) {  // a decode batch (selection.py:is_decode); else the plain top-k
    Batch b = make_batch(scores, logits, k, live);
    const Batch viewed = routed < E ? policy_view(b, routed) : Batch();
    const Batch& pb = routed < E ? viewed : b;  // what the policy reads
    const std::string name(policy);
    std::vector<uint8_t> survivors, tokens_kept, loaded;
    std::vector<const std::vector<uint8_t>*> levels;
    bool per_token0 = false;
    if (name == "affinity_binning") {
      TORCH_CHECK(params.size() == 3, "affinity_binning takes alpha, beta, confidence_gap");
      survivors = affinity_binning(pb, params[0], static_cast<int64_t>(params[1]), params[2]);
    } else if (name == "gate_mass_budget") {
      TORCH_CHECK(params.size() == 2, "gate_mass_budget takes expert_budget, confidence_gap");
      survivors = gate_mass_budget(pb, static_cast<int64_t>(params[0]), params[1], logits);
    } else if (name == "opportunistic") {
      TORCH_CHECK(params.size() == 1, "opportunistic takes keep_top");
      const int64_t keep_top = static_cast<int64_t>(params[0]);
      TORCH_CHECK(keep_top >= 1 && keep_top <= k, "opportunistic: keep_top must be an integer in [1, k]");
      tokens_kept.assign(T * E, 0);
      loaded.assign(E, 0);
      for (int64_t t = 0; t < T; ++t) {
        if (!pb.usable[t]) continue;  // only usable rows read their tiers
        std::vector<uint8_t> seen(E, 0);
        for (int64_t j = 0; j < keep_top; ++j) {  // its first keep_top experts, in the policy's order
          const int64_t e = best_of(pb, t, [&](int64_t x) { return !seen[x]; });
          seen[e] = 1;
          tokens_kept[t * E + e] = pb.eli(t, e);
          if (pb.eli(t, e) && pb.voters[t]) loaded[e] = 1;
        }
      }
      levels = {&tokens_kept, &loaded};
      per_token0 = true;
    } else if (name == "protected_mass") {
      TORCH_CHECK(params.size() == 1, "protected_mass takes keep_mass");
      TORCH_CHECK(params[0] > 0 && params[0] <= 1, "protected_mass: keep_mass must be a float in (0, 1]");
      protected_mass(pb, params[0], tokens_kept, loaded);
      levels = {&tokens_kept, &loaded};
      per_token0 = true;
    } else if (name == "moved_mass") {
      TORCH_CHECK(params.size() == 2, "moved_mass takes max_moved, ranks");
      TORCH_CHECK(params[0] >= 0 && params[0] < 1, "moved_mass: max_moved must be a float in [0, 1)");
      const int64_t ranks = static_cast<int64_t>(params[1]);
      TORCH_CHECK(ranks >= 1 && E % ranks == 0, "moved_mass: ranks must be an integer >= 1 dividing E");
      survivors = moved_mass(pb, params[0], ranks);
    } else if (name == "none") {
      survivors.assign(E, 1);
    } else {
      TORCH_CHECK(false, "select_experts_cpu: unknown policy ", name);
    }
    if (levels.empty()) levels = {&survivors};
    if (routed < E) {  // zero-compute experts join the most preferred tier, for every token
      std::vector<uint8_t>& first = levels[0] == &survivors ? survivors : tokens_kept;
      const int64_t rows = levels[0] == &survivors ? 1 : T;
      for (int64_t t = 0; t < rows; ++t)
        for (int64_t e = routed; e < E; ++e) first[t * E + e] = 1;
    }
    const std::vector<uint8_t> everything(E, 1);  // the last tier: any eligible expert
    std::vector<const std::vector<uint8_t>*> tiers = levels;
    tiers.push_back(&everything);

    std::vector<int64_t> chosen;  // pick's scratch
    chosen.reserve(E);
    const std::vector<int64_t> plain_vector(plain.data_ptr<int64_t>(), plain.data_ptr<int64_t>() + T * k);
    std::vector<uint8_t> plain_prefix(T, 0);
    for (int64_t t = 0; t < T; ++t)
      if (b.usable[t]) plain_prefix[t] = plain_is_order_prefix(b, t, &plain_vector[t * k]);
    std::vector<int64_t> picked(plain_vector);
    for (int64_t t = 0; t < T; ++t)
      if (b.usable[t]) pick(b, t, tiers, per_token0, &picked[t * k], chosen, &plain_vector[t * k], plain_prefix[t]);
    const bool grows = distinct_experts(b, picked, routed) > distinct_experts(b, plain_vector, routed);
    const std::vector<int64_t>& voter_indices = grows ? plain_vector : picked;

    int64_t* out = indices.data_ptr<int64_t>();
    const bool has_live = live.has_value() && live->defined();
    std::vector<uint8_t> voter_load(E, 0);
    for (int64_t e = routed; e < E; ++e) voter_load[e] = 1;  // zero-compute experts: loaded by nobody, free to all
    if (has_live)
      for (int64_t t = 0; t < T; ++t)
        if (b.voters[t])
          for (int64_t j = 0; j < k; ++j) voter_load[voter_indices[t * k + j]] = 1;
    const std::vector<const std::vector<uint8_t>*> dead_tiers = {&voter_load, &everything};
    for (int64_t t = 0; t < T; ++t) {
      if (b.voters[t]) {
        std::copy(&voter_indices[t * k], &voter_indices[t * k] + k, out + t * k);
      } else if (has_live && b.usable[t]) {  // a dead row: the voters' experts, then its own
        pick(b, t, dead_tiers, false, out + t * k, chosen, &plain_vector[t * k], plain_prefix[t]);
      }  // else: not usable, the plain top-k (already there)
    }
  }
  at::Tensor values = scores.gather(1, indices);
  return std::make_tuple(values, indices);
}

}  // namespace

TORCH_LIBRARY_IMPL(lynx, CPU, m) {
  m.impl("select_experts_cpu", &select_experts_cpu);
}
