// Fused MoE expert compute for CPU: reads the weights of each expert present in the batch once.
//
// Letters in shape comments: T tokens, k slots per token, P = T*k (token, slot) pairs,
// E experts, H hidden size, I expert intermediate size, n_e pairs routed to expert e.
//
//   1. bucket the P pairs by expert (counting sort, stable in pair order) and gather each
//      pair's hidden row, widened to fp32, into xs (P, H) in bucket order;
//   2. gate/up: for every expert with n_e > 0 and every block of I rows, one task computes
//      gate and up for all n_e rows of the expert (weights streamed once, rows reused from
//      cache), then the activation                                  -> act (P, I) fp32;
//   3. down: for every expert with n_e > 0 and every block of H rows -> ys (P, H) fp32;
//   4. combine: out[t] = sum_j weight[t, j] * ys[pos(t, j)], slots in a fixed order
//      (deterministic), rounded to the output dtype.
// Experts without pairs get no task, so their weights are never touched.
//
// Weights may be bf16 or fp32 and are addressed through element strides, so concatenated,
// interleaved and transposed layouts are views. For a (E, N, K) matrix (N outputs, K inputs):
// stride_k == 1 is the usual row-major form (dot products along K); stride_n == 1 is the
// transposed storage (columns contiguous: accumulate x[k] * W[k, n0:n0+8] along K).
// Bf16 weights are widened to fp32 in registers, never copied.
//
// Vectors are GCC vector extensions (8 fp32 lanes): the compiler emits AVX2/AVX-512 or SSE
// code for whatever ISA the build flags allow, so one source serves every x86 machine.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

typedef float vf8 __attribute__((vector_size(32)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
typedef uint16_t vh8 __attribute__((vector_size(16)));

constexpr int kLanes = 8;
enum DType { kFloat32 = 0, kBFloat16 = 1 };
enum Activation { kSiluGated = 0, kGptOss = 1 };

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::isnan(f)) return 0x7FC0;
  bits += 0x7FFF + ((bits >> 16) & 1);
  return uint16_t(bits >> 16);
}

inline float round_to(float f, int dtype) {
  return dtype == kBFloat16 ? bf16_to_float(float_to_bf16(f)) : f;
}

inline vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vf8 load8(const uint16_t* p) {  // bf16 -> fp32: the bf16 bits are the fp32's high half
#ifdef __AVX2__
  // One widening load and a shift; the generic form below compiles to five instructions.
  __m256i bits = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  return reinterpret_cast<vf8>(_mm256_castsi256_ps(bits));
#else
  vh8 h;
  std::memcpy(&h, p, sizeof(h));
  vu8 bits = __builtin_convertvector(h, vu8) << 16;
  vf8 v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
#endif
}

// acc + a * b. Explicit, because Inductor's build flags turn off contraction (-ffp-contract=off).
inline vf8 fma8(vf8 a, vf8 b, vf8 acc) {
#ifdef __FMA__
  return reinterpret_cast<vf8>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                               reinterpret_cast<__m256>(acc)));
#else
  return acc + a * b;
#endif
}

inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return bf16_to_float(*p); }

inline float hsum(vf8 v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// A (E, N, K) weight view: element (e, n, k) at base + e*se + n*sn + k*sk.
struct Weight {
  const void* base;
  int64_t se, sn, sk;
};

// out[t][n] (t < rows, n in [n0, n1)) = sum_k x[t][k] * W[e][n][k], W row-major along K.
// Register block: R weight rows x M token rows of fp32 accumulators; every weight vector
// loaded is used M times, every x vector R times.
template <typename W, int R, int M>
inline void rows_block(const W* w, int64_t sn, const float* x, int64_t x_stride, int64_t K,
                       float* out, int64_t out_stride) {
  vf8 acc[R][M] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    vf8 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = load8(x + m * x_stride + k);
    for (int r = 0; r < R; ++r) {
      vf8 wv = load8(w + r * sn + k);
      for (int m = 0; m < M; ++m) acc[r][m] = fma8(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) {
      float s = hsum(acc[r][m]);
      for (int64_t kk = k; kk < K; ++kk) s += load1(w + r * sn + kk) * x[m * x_stride + kk];
      out[m * out_stride + r] = s;
    }
  }
}

template <typename W, int R>
inline void rows_tokens(const W* w, int64_t sn, const float* x, int64_t x_stride, int64_t rows,
                        int64_t K, float* out, int64_t out_stride) {
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4)
    rows_block<W, R, 4>(w, sn, x + m * x_stride, x_stride, K, out + m * out_stride, out_stride);
  switch (rows - m) {
    case 3: rows_block<W, R, 3>(w, sn, x + m * x_stride, x_stride, K, out + m * out_stride, out_stride); break;
    case 2: rows_block<W, R, 2>(w, sn, x + m * x_stride, x_stride, K, out + m * out_stride, out_stride); break;
    case 1: rows_block<W, R, 1>(w, sn, x + m * x_stride, x_stride, K, out + m * out_stride, out_stride); break;
  }
}

// Transposed storage: W[e] element (n, k) at n*1 + k*sk. Accumulate 8 outputs per vector.
template <typename W, int M>
inline void cols_block(const W* w, int64_t sk, const float* x, int64_t x_stride, int64_t K, int64_t width,
                       float* out, int64_t out_stride) {
  if (width == kLanes) {
    vf8 acc[M] = {};
    for (int64_t k = 0; k < K; ++k) {
      vf8 wv = load8(w + k * sk);
      for (int m = 0; m < M; ++m) acc[m] = fma8(wv, vf8{} + x[m * x_stride + k], acc[m]);
    }
    for (int m = 0; m < M; ++m) std::memcpy(out + m * out_stride, &acc[m], sizeof(vf8));
    return;
  }
  for (int m = 0; m < M; ++m)  // ragged last columns
    for (int64_t n = 0; n < width; ++n) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += load1(w + n + k * sk) * x[m * x_stride + k];
      out[m * out_stride + n] = s;
    }
}

// out (rows, n1 - n0) = x (rows, K) @ W[e][n0:n1, :]^T, any supported layout.
// Register blocks fit in 16 vector registers (AVX2): one token row -> 8 weight rows at a time;
// more -> 2 weight rows x 4 token rows (8 accumulators, 4 x vectors, 1 weight vector).
template <typename W>
void matmul_rows(const Weight& weight, int64_t e, int64_t n0, int64_t n1, const float* x, int64_t x_stride,
                 int64_t rows, int64_t K, float* out, int64_t out_stride) {
  const W* w = static_cast<const W*>(weight.base) + e * weight.se + n0 * weight.sn;
  int64_t count = n1 - n0;
  if (weight.sk == 1) {
    int64_t n = 0;
    if (rows == 1)
      for (; n + 8 <= count; n += 8) rows_block<W, 8, 1>(w + n * weight.sn, weight.sn, x, x_stride, K, out + n, out_stride);
    for (; n + 2 <= count; n += 2) rows_tokens<W, 2>(w + n * weight.sn, weight.sn, x, x_stride, rows, K, out + n, out_stride);
    for (; n < count; ++n) rows_tokens<W, 1>(w + n * weight.sn, weight.sn, x, x_stride, rows, K, out + n, out_stride);
    return;
  }
  // transposed (sn == 1)
  for (int64_t n = 0; n < count; n += kLanes) {
    int64_t width = count - n < kLanes ? count - n : kLanes;
    int64_t m = 0;
    for (; m + 4 <= rows; m += 4)
      cols_block<W, 4>(w + n, weight.sk, x + m * x_stride, x_stride, K, width, out + m * out_stride + n, out_stride);
    for (; m < rows; ++m)
      cols_block<W, 1>(w + n, weight.sk, x + m * x_stride, x_stride, K, width, out + m * out_stride + n, out_stride);
  }
}

void matmul(int dtype, const Weight& weight, int64_t e, int64_t n0, int64_t n1, const float* x, int64_t x_stride,
            int64_t rows, int64_t K, float* out, int64_t out_stride) {
  if (dtype == kBFloat16)
    matmul_rows<uint16_t>(weight, e, n0, n1, x, x_stride, rows, K, out, out_stride);
  else
    matmul_rows<float>(weight, e, n0, n1, x, x_stride, rows, K, out, out_stride);
}

inline float activate(float g, float u, int activation, float alpha, float limit) {
  if (activation == kGptOss) {
    g = g < limit ? g : limit;
    u = u < -limit ? -limit : (u > limit ? limit : u);
    return (u + 1.f) * (g / (1.f + std::exp(-alpha * g)));
  }
  return g / (1.f + std::exp(-g)) * u;
}

// A (expert, row range) unit of work in steps 2 and 3.
struct Task {
  int64_t expert, n0, n1;
};

std::vector<Task> make_tasks(const std::vector<int64_t>& counts, int64_t rows, int64_t block) {
  std::vector<Task> tasks;
  for (int64_t e = 0; e < int64_t(counts.size()); ++e)
    if (counts[e] > 0)
      for (int64_t n0 = 0; n0 < rows; n0 += block) tasks.push_back({e, n0, n0 + block < rows ? n0 + block : rows});
  return tasks;
}

// Rows per task: a multiple of the register block, small enough to give every thread work.
int64_t task_rows(int64_t rows, int64_t active_experts, int threads) {
  int64_t want_tasks = 8 * int64_t(threads);
  int64_t per_expert = (want_tasks + active_experts - 1) / active_experts;
  int64_t block = (rows + per_expert - 1) / per_expert;
  block = (block + 7) / 8 * 8;
  return block < 8 ? 8 : block;
}

}  // namespace

extern "C" int lynx_moe_experts(
    const void* hidden, int hidden_dtype,  // (T, H) contiguous; also the output dtype
    const float* pair_weights,            // (T, k) contiguous fp32
    const int64_t* topk_ids,              // (T, k) contiguous, in [0, E)
    int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
    int weight_dtype,
    const void* w_gate, int64_t g_se, int64_t g_sn, int64_t g_sk,  // (E, I, H)
    const void* w_up, int64_t u_se, int64_t u_sn, int64_t u_sk,    // (E, I, H)
    const void* w_down, int64_t d_se, int64_t d_sn, int64_t d_sk,  // (E, H, I)
    const float* b_gate, const float* b_up,  // (E, I) contiguous fp32 or null
    const float* b_down,                     // (E, H) contiguous fp32 or null
    int activation, float alpha, float limit,
    void* out,  // (T, H) contiguous, hidden_dtype
    int threads) {
  const int64_t P = T * k;
  for (int64_t p = 0; p < P; ++p)
    if (topk_ids[p] < 0 || topk_ids[p] >= E) return 1;  // caller raises, naming the bad id

  // 1. bucket pairs by expert; pos[p] = row of pair p in bucket order.
  std::vector<int64_t> counts(E, 0), start(E + 1, 0), pos(P);
  for (int64_t p = 0; p < P; ++p) ++counts[topk_ids[p]];
  for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + counts[e];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < P; ++p) pos[p] = fill[topk_ids[p]]++;
  }
  int64_t active = 0;
  for (int64_t e = 0; e < E; ++e) active += counts[e] > 0;

  std::vector<float> xs(P * H), act(P * I), ys(P * H);
  const Weight gate{w_gate, g_se, g_sn, g_sk}, up{w_up, u_se, u_sn, u_sk}, down{w_down, d_se, d_sn, d_sk};
  const std::vector<Task> gate_up_tasks = make_tasks(counts, I, task_rows(I, active, threads));
  const std::vector<Task> down_tasks = make_tasks(counts, H, task_rows(H, active, threads));

#pragma omp parallel num_threads(threads)
  {
#pragma omp for
    for (int64_t p = 0; p < P; ++p) {
      float* row = xs.data() + pos[p] * H;
      const int64_t t = p / k;
      for (int64_t h = 0; h < H; ++h)
        row[h] = hidden_dtype == kBFloat16 ? load1(static_cast<const uint16_t*>(hidden) + t * H + h)
                                           : static_cast<const float*>(hidden)[t * H + h];
    }

    // 2. gate/up + activation, one (expert, I-block) per task.
    std::vector<float> g, u;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < int64_t(gate_up_tasks.size()); ++i) {
      const Task& task = gate_up_tasks[i];
      const int64_t rows = counts[task.expert], width = task.n1 - task.n0;
      const float* x = xs.data() + start[task.expert] * H;
      g.assign(rows * width, 0.f);
      u.assign(rows * width, 0.f);
      matmul(weight_dtype, gate, task.expert, task.n0, task.n1, x, H, rows, H, g.data(), width);
      matmul(weight_dtype, up, task.expert, task.n0, task.n1, x, H, rows, H, u.data(), width);
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t n = 0; n < width; ++n) {
          float gv = g[m * width + n], uv = u[m * width + n];
          if (b_gate) gv += b_gate[task.expert * I + task.n0 + n];
          if (b_up) uv += b_up[task.expert * I + task.n0 + n];
          // Round where a bf16 model rounds (projection outputs, activation output).
          gv = round_to(gv, hidden_dtype);
          uv = round_to(uv, hidden_dtype);
          act[(start[task.expert] + m) * I + task.n0 + n] = round_to(activate(gv, uv, activation, alpha, limit), hidden_dtype);
        }
    }

    // 3. down projection, one (expert, H-block) per task.
    std::vector<float> y;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < int64_t(down_tasks.size()); ++i) {
      const Task& task = down_tasks[i];
      const int64_t rows = counts[task.expert], width = task.n1 - task.n0;
      y.assign(rows * width, 0.f);
      matmul(weight_dtype, down, task.expert, task.n0, task.n1, act.data() + start[task.expert] * I, I, rows, I,
             y.data(), width);
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t n = 0; n < width; ++n) {
          float v = y[m * width + n];
          if (b_down) v += b_down[task.expert * H + task.n0 + n];
          ys[(start[task.expert] + m) * H + task.n0 + n] = v;
        }
    }

    // 4. combine the k slots of each token in slot order.
#pragma omp for
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        float s = 0.f;
        for (int64_t j = 0; j < k; ++j) s += pair_weights[t * k + j] * ys[pos[t * k + j] * H + h];
        if (hidden_dtype == kBFloat16)
          static_cast<uint16_t*>(out)[t * H + h] = float_to_bf16(s);
        else
          static_cast<float*>(out)[t * H + h] = s;
      }
    }
  }
  return 0;
}
