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
// Experts without pairs get no task, so their weights are never touched. An id equal to E is
// "no expert here" (an expert-parallel rank's sentinel for a pair another rank serves): the pair
// is left out of every step and adds nothing to its token.
//
// Weights may be bf16 or fp32 and are addressed through element strides, so concatenated,
// interleaved and transposed layouts are views. For a (E, N, K) matrix (N outputs, K inputs):
// stride_k == 1 is the usual row-major form (dot products along K); stride_n == 1 is the
// transposed storage (columns contiguous: accumulate x[k] * W[k, n0:n0+lanes] along K).
// Bf16 weights are widened to fp32 in registers or in a small per-thread L1 tile, never copied
// whole.
//
// Vectors are GCC vector extensions of kLanes fp32 lanes: 16 where the build targets AVX-512
// (Inductor's flags for the CPU this runs on), else 8; the compiler emits AVX-512, AVX2 or SSE
// code from one source. LYNX_LANES / LYNX_GENERIC (prepended by moe_experts_cpu.py) force a
// lower path so every path is tested on any machine: LYNX_LANES 8 on an AVX-512 CPU is the AVX2
// path; LYNX_GENERIC uses no intrinsics at all (plain vector code, as on any other ISA).
//
// The matrix products (`matmul`) are dot products along K, register-blocked R weight rows x M
// token rows (R*M independent fp32 accumulators: enough to cover the FMA latency, which a
// 2 x 4 block did not), with the block shape chosen by the tokens the expert has:
//   1 token  -> 12 rows x 1 token     (weights streamed once, widened in registers)
//   2 tokens ->  6 rows x 2 tokens
//   3-5      ->  4 rows x 3 tokens, weights widened in registers
//   6+       -> bf16 weights are widened once per (4 rows x 1024 K) tile into an L1-resident
//               fp32 block (LYNX_PACK_MIN_ROWS), then 4 rows x 3 tokens blocks run over every
//               token of the expert, so each weight element is converted once, not once per block.
// Numerics on every path: bf16 weights and activations widened exactly to fp32, products summed
// in fp32 (fused multiply-add where the ISA has it), the same as the torch reference up to the
// order of the fp32 sums.
//
// bf16 models with bf16 weights stored along K take faster paths where the CPU has them (see
// LYNX_BF16DOT and LYNX_BRGEMM below): on AMX, experts with 2+ tokens (4+ where K > 1024) go to
// oneDNN's brgemm (matmul_brgemm), fewer to vdpbf16ps dot products (dot_block_bf16); on
// AVX512_BF16 all go to the dot products. Both multiply bf16 by bf16 exactly, accumulate in fp32.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX2__) && !LYNX_GENERIC
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef LYNX_GENERIC
#define LYNX_GENERIC 0
#endif
#ifndef LYNX_R1
#define LYNX_R1 12
#endif
#ifndef LYNX_PACK_MIN_ROWS
#define LYNX_PACK_MIN_ROWS 6  // fewer tokens reuse a tile too little to pay for widening it (measured)
#endif
// LYNX_BF16DOT: bf16 x bf16 dot products with AVX512_BF16's vdpbf16ps (two products per fp32 lane
// and instruction, no widening) for bf16 weights stored along K. Default: where the build targets
// AVX512_BF16 (Inductor's flags on such a CPU, AMX included). Forced on a CPU without it, the same
// code runs on an exact software form of the instruction, so the path is tested on any machine.
#ifndef LYNX_BF16DOT
#if defined(__AVX512BF16__) && !LYNX_GENERIC
#define LYNX_BF16DOT 1
#else
#define LYNX_BF16DOT 0
#endif
#endif
#if LYNX_BF16DOT && defined(__AVX512BF16__) && !LYNX_GENERIC
#define LYNX_BF16DOT_NATIVE 1
#else
#define LYNX_BF16DOT_NATIVE 0
#endif

// LYNX_BRGEMM: the (weight rows x tokens) products of experts with enough tokens (brgemm_min_rows)
// go to oneDNN's batch-reduce GEMM through ATen (`at::native::cpublas::brgemm`, what
// Inductor's CPU GEMM templates call), which runs AMX tiles for bf16. 1 (the default build): where
// ATen says this CPU runs it (`could_pack(kBFloat16)`: AMX); 2 (forced): everywhere, and on a CPU
// without AMX the call's exact software form runs on the same packed operands, so the packing and
// tiling are tested on any machine (LYNX_BRGEMM_EMULATE runs that form on an AMX CPU too).
// 0: never (no ATen include).
#ifndef LYNX_BRGEMM
#if LYNX_GENERIC
#define LYNX_BRGEMM 0
#else
#define LYNX_BRGEMM 1
#endif
#endif
#ifndef LYNX_BRGEMM_EMULATE
#define LYNX_BRGEMM_EMULATE 0
#endif
#ifndef LYNX_BRGEMM_MIN_ROWS
#define LYNX_BRGEMM_MIN_ROWS 2  // one token: vdpbf16ps dot products measured 7-15% faster
#endif
#ifndef LYNX_BRGEMM_LONG_K_MIN_ROWS
#define LYNX_BRGEMM_LONG_K_MIN_ROWS 4  // products with K > LYNX_BRGEMM_SHORT_K (brgemm_min_rows)
#endif
#ifndef LYNX_BRGEMM_SHORT_K
#define LYNX_BRGEMM_SHORT_K 1024
#endif
#if LYNX_BRGEMM
#include <ATen/native/CPUBlas.h>
#endif

#ifndef LYNX_LANES
#ifdef __AVX512F__
#define LYNX_LANES 16
#else
#define LYNX_LANES 8
#endif
#endif

namespace {

constexpr int kLanes = LYNX_LANES;
typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef uint32_t vu __attribute__((vector_size(kLanes * 4)));
typedef uint16_t vh __attribute__((vector_size(kLanes * 2)));

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

inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vf loadv(const uint16_t* p) {  // bf16 -> fp32: the bf16 bits are the fp32's high half
#if defined(__AVX2__) && !LYNX_GENERIC && LYNX_LANES == 8
  // One widening load and a shift; the generic form compiles to more instructions on AVX2.
  __m256i bits = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  return reinterpret_cast<vf>(_mm256_castsi256_ps(bits));
#else
  vh h;
  std::memcpy(&h, p, sizeof(h));
  vu bits = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
#endif
}

inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// acc + a * b, fused where the ISA has FMA. Explicit, because Inductor's build flags turn off
// contraction (-ffp-contract=off) for generated kernels.
inline vf fmav(vf a, vf b, vf acc) {
#if defined(__AVX512F__) && !LYNX_GENERIC && LYNX_LANES == 16
  return reinterpret_cast<vf>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                              reinterpret_cast<__m512>(acc)));
#elif defined(__FMA__) && !LYNX_GENERIC && LYNX_LANES == 8
  return reinterpret_cast<vf>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                              reinterpret_cast<__m256>(acc)));
#else
  return acc + a * b;
#endif
}

inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return bf16_to_float(*p); }

inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// A (E, N, K) weight view: element (e, n, k) at base + e*se + n*sn + k*sk.
struct Weight {
  const void* base;
  int64_t se, sn, sk;
};

// out[m * out_stride + r] (+)= sum_k x[m][k] * w[r][k] for r < R, m < M, k < K; rows of w along K.
// R*M accumulators live in registers: R*M + M + 1 <= 16 vector registers (AVX2) for the shapes
// used: 12x1, 6x2, 4x3.
template <typename W, int R, int M>
inline void dot_block(const W* w, int64_t sn, const float* x, int64_t x_stride, int64_t K, float* out,
                      int64_t out_stride, bool accumulate) {
  vf acc[R][M] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    vf xv[M];
    for (int m = 0; m < M; ++m) xv[m] = loadv(x + m * x_stride + k);
    for (int r = 0; r < R; ++r) {
      const vf wv = loadv(w + r * sn + k);
      for (int m = 0; m < M; ++m) acc[r][m] = fmav(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) {
      float s = hsum(acc[r][m]);
      for (int64_t kk = k; kk < K; ++kk) s += load1(w + r * sn + kk) * x[m * x_stride + kk];
      float& o = out[m * out_stride + r];
      o = accumulate ? o + s : s;
    }
  }
}

// Every token row against R weight rows: blocks of M tokens, then the remainder.
template <typename W, int R, int M>
inline void dot_rows(const W* w, int64_t sn, const float* x, int64_t x_stride, int64_t rows, int64_t K,
                     float* out, int64_t out_stride, bool accumulate) {
  int64_t m = 0;
  for (; m + M <= rows; m += M)
    dot_block<W, R, M>(w, sn, x + m * x_stride, x_stride, K, out + m * out_stride, out_stride, accumulate);
  if constexpr (M > 1) {
    switch (rows - m) {
      case 2: dot_block<W, R, 2>(w, sn, x + m * x_stride, x_stride, K, out + m * out_stride, out_stride, accumulate); break;
      case 1: dot_block<W, R, 1>(w, sn, x + m * x_stride, x_stride, K, out + m * out_stride, out_stride, accumulate); break;
    }
  }
}

// Any weight rows count: blocks of R rows, then single rows.
template <typename W, int R, int M>
inline void dot_all(const W* w, int64_t sn, int64_t count, const float* x, int64_t x_stride, int64_t rows,
                    int64_t K, float* out, int64_t out_stride, bool accumulate) {
  int64_t n = 0;
  for (; n + R <= count; n += R)
    dot_rows<W, R, M>(w + n * sn, sn, x, x_stride, rows, K, out + n, out_stride, accumulate);
  for (; n < count; ++n) dot_rows<W, 1, M>(w + n * sn, sn, x, x_stride, rows, K, out + n, out_stride, accumulate);
}

// --- bf16 x bf16 dot products (LYNX_BF16DOT) -----------------------------------------------------

constexpr int kPairs = 16;  // fp32 lanes of one vdpbf16ps: 32 bf16 = 16 pairs along K

struct PairAcc {  // 16 fp32 accumulators, each summing products of pairs of K
#if LYNX_BF16DOT_NATIVE
  __m512 v = _mm512_setzero_ps();
#else
  float v[kPairs] = {};
#endif
};

// acc[i] += a[2i + 1] * b[2i + 1] + a[2i] * b[2i] over 32 bf16 of a and b: vdpbf16ps, or its exact
// software form (bf16 x bf16 products are exact in fp32; the odd pair is added first, as the
// instruction does; denormals are not flushed here).
inline void dot_pairs(PairAcc& acc, const uint16_t* a, const uint16_t* b) {
#if LYNX_BF16DOT_NATIVE
  acc.v = _mm512_dpbf16_ps(acc.v, (__m512bh)_mm512_loadu_si512(a), (__m512bh)_mm512_loadu_si512(b));
#else
  for (int i = 0; i < kPairs; ++i) {
    acc.v[i] = acc.v[i] + bf16_to_float(a[2 * i + 1]) * bf16_to_float(b[2 * i + 1]);
    acc.v[i] = acc.v[i] + bf16_to_float(a[2 * i]) * bf16_to_float(b[2 * i]);
  }
#endif
}

inline float hsum(const PairAcc& acc) {
#if LYNX_BF16DOT_NATIVE
  return _mm512_reduce_add_ps(acc.v);
#else
  float s = 0.f;
  for (int i = 0; i < kPairs; ++i) s += acc.v[i];
  return s;
#endif
}

// out[m * out_stride + r] = sum_k x[m][k] * w[r][k] for r < R, m < M; w and x bf16 along K.
template <int R, int M>
inline void dot_block_bf16(const uint16_t* w, int64_t sn, const uint16_t* x, int64_t x_stride, int64_t K,
                           float* out, int64_t out_stride) {
  PairAcc acc[R][M];
  int64_t k = 0;
  for (; k + 2 * kPairs <= K; k += 2 * kPairs)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) dot_pairs(acc[r][m], w + r * sn + k, x + m * x_stride + k);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      float s = hsum(acc[r][m]);
      for (int64_t kk = k; kk < K; ++kk) s += bf16_to_float(w[r * sn + kk]) * bf16_to_float(x[m * x_stride + kk]);
      out[m * out_stride + r] = s;
    }
}

template <int R, int M>
inline void dot_all_bf16(const uint16_t* w, int64_t sn, int64_t count, const uint16_t* x, int64_t x_stride,
                         int64_t rows, int64_t K, float* out, int64_t out_stride) {
  for (int64_t n = 0; n < count; n += R) {
    const bool full = n + R <= count;
    for (int64_t m = 0; m < rows; m += M) {
      const bool tokens = m + M <= rows;
      if (full && tokens) {
        dot_block_bf16<R, M>(w + n * sn, sn, x + m * x_stride, x_stride, K, out + m * out_stride + n, out_stride);
      } else {  // ragged edges: one weight row and one token at a time
        for (int64_t r = n; r < (full ? n + R : count); ++r)
          for (int64_t mm = m; mm < (tokens ? m + M : rows); ++mm)
            dot_block_bf16<1, 1>(w + r * sn, sn, x + mm * x_stride, x_stride, K, out + mm * out_stride + r, out_stride);
      }
    }
  }
}

// out (rows, n1 - n0) = x (rows, K) @ W[e][n0:n1, :]^T for bf16 W stored along K and bf16 x.
void matmul_bf16_pairs(const Weight& weight, int64_t e, int64_t n0, int64_t n1, const uint16_t* x, int64_t x_stride,
                       int64_t rows, int64_t K, float* out, int64_t out_stride) {
  const uint16_t* w = static_cast<const uint16_t*>(weight.base) + e * weight.se + n0 * weight.sn;
  const int64_t count = n1 - n0;
  if (rows == 1) return dot_all_bf16<12, 1>(w, weight.sn, count, x, x_stride, rows, K, out, out_stride);
  if (rows == 2) return dot_all_bf16<6, 2>(w, weight.sn, count, x, x_stride, rows, K, out, out_stride);
  dot_all_bf16<4, 3>(w, weight.sn, count, x, x_stride, rows, K, out, out_stride);
}

// --- oneDNN batch-reduce GEMM (LYNX_BRGEMM) ------------------------------------------------------
// Roles swapped so the weights are read in place, never packed: C (count, n) = W[e][n0:n1, :] . x^T,
// with the expert's weight rows as brgemm's A (count, K), row-major along K at lda = sn, and its n
// token rows as B (K, n) in VNNI layout (pairs of K adjacent, what AMX's bf16 tiles take):
// element (k, m) at vnni_index(k, m, n). B is packed once per expert when its rows are gathered
// (n*K bf16, a few KB). Products of bf16 are exact in fp32; oneDNN accumulates in fp32.

inline int64_t vnni_index(int64_t k, int64_t m, int64_t n) { return ((k >> 1) * n + m) * 2 + (k & 1); }

// Whether to call oneDNN: where it packs bf16 for AMX. ATen also runs the VNNI bf16 brgemm on
// AVX-512 without AMX, but there it measured 1.0-1.5x slower than the vdpbf16ps dot products
// (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 on an AMX machine, 2026-12-02), so those keep them.
bool brgemm_native() {
#if LYNX_BRGEMM && !LYNX_BRGEMM_EMULATE
  static const bool native = at::native::cpublas::could_pack(at::kBFloat16);
  return native;
#else
  return false;
#endif
}

// The fewest tokens an expert needs for brgemm to beat the dot products, by the product's K.
// Measured (op alone, bf16, H = 1024 and 2048 blocks): with K <= 1024, brgemm wins from 2 tokens;
// with K = 2048 (OLMoE's gate/up), the dot products still win at 2-3 tokens (1.1-1.2x).
int64_t brgemm_min_rows(int64_t K) {
  return K <= LYNX_BRGEMM_SHORT_K ? LYNX_BRGEMM_MIN_ROWS : LYNX_BRGEMM_LONG_K_MIN_ROWS;
}

// C[r * n + m] = sum_k A[r * lda + k] * B[vnni_index(k, m, n)]: the call's exact software form.
void brgemm_reference(int64_t count, int64_t n, int64_t K, int64_t lda, const uint16_t* a, const uint16_t* b,
                      float* c) {
  for (int64_t r = 0; r < count; ++r)
    for (int64_t m = 0; m < n; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += bf16_to_float(a[r * lda + k]) * bf16_to_float(b[vnni_index(k, m, n)]);
      c[r * n + m] = s;
    }
}

// out (rows, n1 - n0) = x (rows, K) @ W[e][n0:n1, :]^T for bf16 W along K, x packed by vnni_index.
void matmul_brgemm(const Weight& weight, int64_t e, int64_t n0, int64_t n1, const uint16_t* x_vnni, int64_t rows,
                   int64_t K, float* out, int64_t out_stride, std::vector<float>& c) {
  const uint16_t* w = static_cast<const uint16_t*>(weight.base) + e * weight.se + n0 * weight.sn;
  const int64_t count = n1 - n0;
  c.resize(count * rows);  // (count, rows): the product transposed
#if LYNX_BRGEMM
  if (brgemm_native()) {
    // One call per task: splitting its rows into 16-256-row calls measured no faster (oneDNN blocks them).
    at::native::cpublas::brgemm(count, rows, K, weight.sn, rows, rows, /*add_C=*/false,
                                reinterpret_cast<const at::BFloat16*>(w),
                                reinterpret_cast<const at::BFloat16*>(x_vnni), c.data(), /*is_vnni=*/true);
  } else
#endif
    brgemm_reference(count, rows, K, weight.sn, w, x_vnni, c.data());
  for (int64_t r = 0; r < count; ++r)
    for (int64_t m = 0; m < rows; ++m) out[m * out_stride + r] = c[r * rows + m];
}

constexpr int64_t kPackRows = 4, kPackK = 1024;  // a 16 KB fp32 tile: fits L1 beside 3 token rows

// Transposed storage: W[e] element (n, k) at n*1 + k*sk. Accumulate kLanes outputs per vector.
template <typename W, int M>
inline void cols_block(const W* w, int64_t sk, const float* x, int64_t x_stride, int64_t K, int64_t width,
                       float* out, int64_t out_stride) {
  if (width == kLanes) {
    vf acc[M] = {};
    for (int64_t k = 0; k < K; ++k) {
      const vf wv = loadv(w + k * sk);
      for (int m = 0; m < M; ++m) acc[m] = fmav(wv, vf{} + x[m * x_stride + k], acc[m]);
    }
    for (int m = 0; m < M; ++m) storev(out + m * out_stride, acc[m]);
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
template <typename W>
void matmul_rows(const Weight& weight, int64_t e, int64_t n0, int64_t n1, const float* x, int64_t x_stride,
                 int64_t rows, int64_t K, float* out, int64_t out_stride, float* pack) {
  const W* w = static_cast<const W*>(weight.base) + e * weight.se + n0 * weight.sn;
  const int64_t count = n1 - n0;
  if (weight.sk == 1) {
    if (rows == 1) return dot_all<W, LYNX_R1, 1>(w, weight.sn, count, x, x_stride, rows, K, out, out_stride, false);
    if (rows == 2) return dot_all<W, 6, 2>(w, weight.sn, count, x, x_stride, rows, K, out, out_stride, false);
    if (sizeof(W) == 4 || rows < LYNX_PACK_MIN_ROWS) {  // fp32: nothing to widen; few tokens: little reuse
      return dot_all<W, 4, 3>(w, weight.sn, count, x, x_stride, rows, K, out, out_stride, false);
    } else {
      // bf16, LYNX_PACK_MIN_ROWS+ tokens: widen a (4 rows x kPackK) tile once, reuse it for every token.
      for (int64_t n = 0; n < count; n += kPackRows) {
        const int64_t tile_rows = count - n < kPackRows ? count - n : kPackRows;
        for (int64_t k0 = 0; k0 < K; k0 += kPackK) {
          const int64_t depth = K - k0 < kPackK ? K - k0 : kPackK;
          for (int64_t r = 0; r < tile_rows; ++r) {
            const W* src = w + (n + r) * weight.sn + k0;
            float* dst = pack + r * kPackK;
            int64_t k = 0;
            for (; k + kLanes <= depth; k += kLanes) storev(dst + k, loadv(src + k));
            for (; k < depth; ++k) dst[k] = load1(src + k);
          }
          if (tile_rows == kPackRows)
            dot_rows<float, kPackRows, 3>(pack, kPackK, x + k0, x_stride, rows, depth, out + n, out_stride, k0 > 0);
          else
            dot_all<float, 1, 3>(pack, kPackK, tile_rows, x + k0, x_stride, rows, depth, out + n, out_stride, k0 > 0);
        }
      }
      return;
    }
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
            int64_t rows, int64_t K, float* out, int64_t out_stride, float* pack) {
  if (dtype == kBFloat16)
    matmul_rows<uint16_t>(weight, e, n0, n1, x, x_stride, rows, K, out, out_stride, pack);
  else
    matmul_rows<float>(weight, e, n0, n1, x, x_stride, rows, K, out, out_stride, pack);
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
  block = (block + 11) / 12 * 12;  // a multiple of every register block's row count (12, 6, 4)
  return block < 12 ? 12 : block;
}

}  // namespace

extern "C" int lynx_moe_experts(
    const void* hidden, int hidden_dtype,  // (T, H) contiguous; also the output dtype
    const float* pair_weights,            // (T, k) contiguous fp32
    const int64_t* topk_ids,              // (T, k) contiguous, in [0, E]; E = no expert
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
    if (topk_ids[p] < 0 || topk_ids[p] > E) return 1;  // caller raises, naming the bad id

  // 1. bucket pairs by expert; pos[p] = row of pair p in bucket order, -1 for a sentinel pair.
  std::vector<int64_t> counts(E, 0), start(E + 1, 0), pos(P);
  for (int64_t p = 0; p < P; ++p)
    if (topk_ids[p] < E) ++counts[topk_ids[p]];
  for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + counts[e];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < P; ++p) pos[p] = topk_ids[p] < E ? fill[topk_ids[p]]++ : -1;
  }
  int64_t active = 0;
  for (int64_t e = 0; e < E; ++e) active += counts[e] > 0;
  if (active == 0) {  // no (token, slot) pair (T = 0 or k = 0): the sum over no experts is zero
    std::memset(out, 0, T * H * (hidden_dtype == kBFloat16 ? 2 : 4));
    return 0;
  }

  // Scratch, written before it is read: no zero-filling.
  std::unique_ptr<float[]> xs_buffer(new float[P * H]), act_buffer(new float[P * I]), ys_buffer(new float[P * H]);
  float* const xs = xs_buffer.get();
  float* const act = act_buffer.get();
  float* const ys = ys_buffer.get();
  const Weight gate{w_gate, g_se, g_sn, g_sk}, up{w_up, u_se, u_sn, u_sk}, down{w_down, d_se, d_sn, d_sk};
  // bf16 pair dot products: bf16 weights along K and a bf16 model; its rows kept as bf16 bits too
  // (exact: the hidden state and the rounded activations are bf16 values).
  const bool pairs = LYNX_BF16DOT && weight_dtype == kBFloat16 && hidden_dtype == kBFloat16;
  const bool gate_up_pairs = pairs && g_sk == 1 && u_sk == 1, down_pairs = pairs && d_sk == 1;
  // Experts with enough tokens go to brgemm; their bf16 rows are stored packed (vnni_index) in
  // the same place of xs16 / act16 where row-major rows would be. VNNI pairs need an even K.
  const bool brgemm_on = LYNX_BRGEMM && pairs && (LYNX_BRGEMM == 2 || brgemm_native());
  auto gate_up_packed = [&](int64_t e) {
    return brgemm_on && gate_up_pairs && H % 2 == 0 && counts[e] >= brgemm_min_rows(H);
  };
  auto down_packed = [&](int64_t e) {
    return brgemm_on && down_pairs && I % 2 == 0 && counts[e] >= brgemm_min_rows(I);
  };
  std::unique_ptr<uint16_t[]> xs16_buffer(gate_up_pairs ? new uint16_t[P * H] : nullptr);
  std::unique_ptr<uint16_t[]> act16_buffer(down_pairs ? new uint16_t[P * I] : nullptr);
  uint16_t* const xs16 = xs16_buffer.get();
  uint16_t* const act16 = act16_buffer.get();
  const std::vector<Task> gate_up_tasks = make_tasks(counts, I, task_rows(I, active, threads));
  const std::vector<Task> down_tasks = make_tasks(counts, H, task_rows(H, active, threads));

#pragma omp parallel num_threads(threads)
  {
    std::unique_ptr<float[]> pack(new float[kPackRows * kPackK]);  // this thread's weight tile
#pragma omp for
    for (int64_t p = 0; p < P; ++p) {
      if (pos[p] < 0) continue;  // a sentinel pair: no row
      float* row = xs + pos[p] * H;
      const int64_t t = p / k;
      if (!gate_up_pairs)  // the fp32 rows are only read by the widening paths
        for (int64_t h = 0; h < H; ++h)
          row[h] = hidden_dtype == kBFloat16 ? load1(static_cast<const uint16_t*>(hidden) + t * H + h)
                                             : static_cast<const float*>(hidden)[t * H + h];
      if (xs16) {
        const uint16_t* src = static_cast<const uint16_t*>(hidden) + t * H;
        const int64_t e = topk_ids[p];
        if (gate_up_packed(e)) {
          uint16_t* dst = xs16 + start[e] * H;
          for (int64_t h = 0; h < H; ++h) dst[vnni_index(h, pos[p] - start[e], counts[e])] = src[h];
        } else {
          std::memcpy(xs16 + pos[p] * H, src, H * sizeof(uint16_t));
        }
      }
    }

    // 2. gate/up + activation, one (expert, I-block) per task.
    std::vector<float> g, u, c;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < int64_t(gate_up_tasks.size()); ++i) {
      const Task& task = gate_up_tasks[i];
      const int64_t rows = counts[task.expert], width = task.n1 - task.n0;
      const float* x = xs + start[task.expert] * H;
      g.assign(rows * width, 0.f);
      u.assign(rows * width, 0.f);
      if (gate_up_packed(task.expert)) {
        const uint16_t* x_vnni = xs16 + start[task.expert] * H;
        matmul_brgemm(gate, task.expert, task.n0, task.n1, x_vnni, rows, H, g.data(), width, c);
        matmul_brgemm(up, task.expert, task.n0, task.n1, x_vnni, rows, H, u.data(), width, c);
      } else if (gate_up_pairs) {
        const uint16_t* x16 = xs16 + start[task.expert] * H;
        matmul_bf16_pairs(gate, task.expert, task.n0, task.n1, x16, H, rows, H, g.data(), width);
        matmul_bf16_pairs(up, task.expert, task.n0, task.n1, x16, H, rows, H, u.data(), width);
      } else {
        matmul(weight_dtype, gate, task.expert, task.n0, task.n1, x, H, rows, H, g.data(), width, pack.get());
        matmul(weight_dtype, up, task.expert, task.n0, task.n1, x, H, rows, H, u.data(), width, pack.get());
      }
      const bool act_packed = down_packed(task.expert);  // act16 laid out for brgemm (vnni_index)
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t n = 0; n < width; ++n) {
          float gv = g[m * width + n], uv = u[m * width + n];
          if (b_gate) gv += b_gate[task.expert * I + task.n0 + n];
          if (b_up) uv += b_up[task.expert * I + task.n0 + n];
          // Round where a bf16 model rounds (projection outputs, activation output).
          gv = round_to(gv, hidden_dtype);
          uv = round_to(uv, hidden_dtype);
          const float a = round_to(activate(gv, uv, activation, alpha, limit), hidden_dtype);
          act[(start[task.expert] + m) * I + task.n0 + n] = a;
          if (act16)
            act16[act_packed ? start[task.expert] * I + vnni_index(task.n0 + n, m, rows)
                             : (start[task.expert] + m) * I + task.n0 + n] = float_to_bf16(a);
        }
    }

    // 3. down projection, one (expert, H-block) per task.
    std::vector<float> y;  // c: brgemm's transposed product, reused from step 2
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < int64_t(down_tasks.size()); ++i) {
      const Task& task = down_tasks[i];
      const int64_t rows = counts[task.expert], width = task.n1 - task.n0;
      y.assign(rows * width, 0.f);
      if (down_packed(task.expert))
        matmul_brgemm(down, task.expert, task.n0, task.n1, act16 + start[task.expert] * I, rows, I, y.data(), width,
                      c);
      else if (down_pairs)
        matmul_bf16_pairs(down, task.expert, task.n0, task.n1, act16 + start[task.expert] * I, I, rows, I, y.data(),
                          width);
      else
        matmul(weight_dtype, down, task.expert, task.n0, task.n1, act + start[task.expert] * I, I, rows, I,
               y.data(), width, pack.get());
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t n = 0; n < width; ++n) {
          float v = y[m * width + n];
          if (b_down) v += b_down[task.expert * H + task.n0 + n];
          ys[(start[task.expert] + m) * H + task.n0 + n] = v;
        }
    }

#if LYNX_BRGEMM
    if (brgemm_on && brgemm_native()) at::native::cpublas::brgemm_release(/*is_vnni=*/true);  // AMX tiles
#endif

    // 4. combine the k slots of each token in slot order.
#pragma omp for
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        float s = 0.f;
        for (int64_t j = 0; j < k; ++j)
          if (pos[t * k + j] >= 0) s += pair_weights[t * k + j] * ys[pos[t * k + j] * H + h];
        if (hidden_dtype == kBFloat16)
          static_cast<uint16_t*>(out)[t * H + h] = float_to_bf16(s);
        else
          static_cast<float*>(out)[t * H + h] = s;
      }
    }
  }
  return 0;
}
