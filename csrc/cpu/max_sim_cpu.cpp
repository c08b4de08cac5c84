// CPU kernels of max_sim: a BLAS GEMM per cache-sized block with a fused scale-and-max epilogue
// (the Nq*Ng*Lq*Lg score tensor never exists), and a backward that reads only the saved argmax.
// bfloat16 inputs run their block GEMMs on the bfloat16 operands with float32 accumulation and
// float32 scores (oneDNN's batch-reduce GEMM micro-kernel, through ATen's cpublas::brgemm: AMX
// tiles or AVX512-BF16) and an AVX-512 epilogue, where the CPU has native bfloat16 dot products
// and the installed torch provides that kernel; otherwise (and for float16, whose CPU GEMM is
// slower than converting) they are converted to float32.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

// cpublas::brgemm(M, N, K, lda, ldb, ldc, add_C, const BFloat16*, const BFloat16*, float*) with B
// in the VNNI layout [K/2][N][2]: used from torch 2.7 on (a conservative bound; torch 2.6 builds
// without it and keeps bfloat16 on float32). A torch whose kernel behaves otherwise fails the
// start-up self-check in bf16_gemm_available() and keeps float32 too.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 7)
#define TRANSMATCHER_FAST_BF16_BRGEMM 1
#include <ATen/native/CPUBlas.h>
#endif
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define TRANSMATCHER_FAST_X86_CPUID 1
#include <cpuid.h>
#endif

#include "../max_sim.h"

namespace transmatcher_fast {
namespace {

// One score block (rows = query locations, cols = gallery locations) of about 1 MiB in float32
// stays in a core's L2 between the GEMM that writes it and the epilogue that reads it.
constexpr int64_t kBlockElems = int64_t{1} << 18;
constexpr int64_t kBlockCols = 512;    // gallery locations per block (whole gallery images)
constexpr int64_t kMinBlockRows = 16;  // GEMMs thinner than this waste the BLAS kernel
// d score_embed is summed over per-block partial buffers. Their count depends on Nq only, so the
// summation order, and the result, do not depend on the number of threads.
constexpr int64_t kMaxScorePartials = 32;

// The max update rule of every backend: strictly greater wins, so the lowest index is kept among
// equal maxima; a NaN wins once and then stays (torch.max propagates the first NaN).
template <typename T>
inline bool beats(T value, T best) {
  return value > best || (value != value && best == best);
}

template <typename T>
inline void axpy(int64_t n, T alpha, const T* __restrict x, T* __restrict y) {
  for (int64_t k = 0; k < n; ++k) y[k] += alpha * x[k];
}

struct Shape {
  int64_t nq, lq, ng, lg, d;
};

Shape shape_of(const at::Tensor& query, const at::Tensor& gallery) {
  return {query.size(0), query.size(1), gallery.size(0), gallery.size(1), query.size(2)};
}

// The scale-and-max epilogue for one score row: query image i, location t, against gallery
// images [j0, j1). `scores` holds (j1 - j0) * lg values and is scaled in place.
template <typename T>
void reduce_row(const Shape& sh, int64_t i, int64_t t, int64_t j0, int64_t j1, T* scores,
                const T* gate_row, T* q_best, int32_t* q_index, T* g_best, int32_t* g_index) {
  const int32_t t32 = static_cast<int32_t>(t);
  for (int64_t j = j0; j < j1; ++j) {
    T* v = scores + (j - j0) * sh.lg;
    if (gate_row != nullptr) {
      for (int64_t s = 0; s < sh.lg; ++s) v[s] *= gate_row[s];
    }
    const int64_t pair = i * sh.ng + j;
    T* gb = g_best + pair * sh.lg;
    int32_t* gi = g_index + pair * sh.lg;
    if (t == 0) {
      for (int64_t s = 0; s < sh.lg; ++s) {
        gb[s] = v[s];
        gi[s] = 0;
      }
    } else {
      for (int64_t s = 0; s < sh.lg; ++s) {
        const bool wins = beats(v[s], gb[s]);
        gb[s] = wins ? v[s] : gb[s];
        gi[s] = wins ? t32 : gi[s];
      }
    }
    T best = v[0];
    int32_t best_s = 0;
    for (int64_t s = 1; s < sh.lg; ++s) {
      if (beats(v[s], best)) {
        best = v[s];
        best_s = static_cast<int32_t>(s);
      }
    }
    q_best[pair * sh.lq + t] = best;
    q_index[pair * sh.lq + t] = best_s;
  }
}

template <typename T>
void forward_impl(const at::Tensor& query, const at::Tensor& gallery, const T* gate_t,
                  T* q_best, int32_t* q_index, T* g_best, int32_t* g_index) {
  const Shape sh = shape_of(query, gallery);
  if (sh.nq == 0 || sh.ng == 0) return;
  const T* q = query.const_data_ptr<T>();
  const T* g = gallery.const_data_ptr<T>();
  const auto options = query.options();

  // Block geometry: whole gallery images along columns; whole query images along rows, or, when
  // one image has more locations than a block holds, consecutive row ranges of that image.
  const int64_t imgs_per_col_block = std::max<int64_t>(1, kBlockCols / sh.lg);
  const int64_t block_cols = imgs_per_col_block * sh.lg;
  const int64_t max_rows = std::max(kMinBlockRows, kBlockElems / block_cols);
  const int64_t imgs_per_row_block = std::max<int64_t>(1, max_rows / sh.lq);
  const int64_t step_rows = sh.lq <= max_rows ? imgs_per_row_block * sh.lq : max_rows;
  const int64_t row_blocks = (sh.nq + imgs_per_row_block - 1) / imgs_per_row_block;
  const int64_t col_blocks = (sh.ng + imgs_per_col_block - 1) / imgs_per_col_block;

  at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    // One score buffer per worker, reused for all of its blocks.
    at::Tensor buffer = at::empty({step_rows * block_cols}, options);
    T* scores = buffer.mutable_data_ptr<T>();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i0 = (task / col_blocks) * imgs_per_row_block;
      const int64_t i1 = std::min(sh.nq, i0 + imgs_per_row_block);
      const int64_t j0 = (task % col_blocks) * imgs_per_col_block;
      const int64_t j1 = std::min(sh.ng, j0 + imgs_per_col_block);
      const int64_t ncols = (j1 - j0) * sh.lg;
      const at::Tensor g_block =
          at::from_blob(const_cast<T*>(g + j0 * sh.lg * sh.d), {ncols, sh.d}, options);
      // Rows of the block in the flattened [nq*lq] query, processed in GEMM steps. Row ranges of
      // one pair are visited in increasing t, which the running g_best update relies on.
      for (int64_t r0 = i0 * sh.lq; r0 < i1 * sh.lq; r0 += step_rows) {
        const int64_t r1 = std::min(i1 * sh.lq, r0 + step_rows);
        const at::Tensor q_rows =
            at::from_blob(const_cast<T*>(q + r0 * sh.d), {r1 - r0, sh.d}, options);
        at::Tensor out = at::from_blob(scores, {r1 - r0, ncols}, options);
        at::mm_out(out, q_rows, g_block.t());
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t i = r / sh.lq, t = r % sh.lq;
          reduce_row(sh, i, t, j0, j1, scores + (r - r0) * ncols,
                     gate_t == nullptr ? nullptr : gate_t + t * sh.lg, q_best, q_index, g_best,
                     g_index);
        }
      }
    }
  });
}

// ---- bfloat16 forward: block GEMMs on bfloat16 operands, float32 accumulation and scores --------
//
// Only taken on x86 CPUs with bfloat16 dot products, which all have AVX-512: the epilogue is
// written with AVX-512 intrinsics (compiled for that target only, whatever the build flags).

#if defined(TRANSMATCHER_FAST_BF16_BRGEMM) && defined(TRANSMATCHER_FAST_X86_CPUID)
#define TRANSMATCHER_FAST_BF16_PATH 1
#include <immintrin.h>
#include <unistd.h>
#define TMF_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
// GCC 12's AVX-512 headers warn about their own _mm*_undefined_* placeholders (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

// Rows per bf16 GEMM call and gallery columns per block: the packed gallery block (cols x D
// bfloat16), the query rows and the float32 score block stay in a core's L2. Multiples of 16
// and 32 are what the AMX tiles (16 rows x 64 bytes) take without tails when L is.
constexpr int64_t kBf16BlockCols = 384;
constexpr int64_t kBf16BlockRows = 192;

// Which instructions run the bfloat16 block GEMMs, with oneDNN's names for them:
// "avx512_core_amx" (AMX tiles), "avx512_core_bf16" (AVX512-BF16 dot products), or "" when
// bfloat16 inputs are converted to float32 (no bfloat16 dot products, or no micro-kernel).
enum class Bf16Isa { none, avx512_bf16, amx };

// What the CPU offers: AVX-512 usable (checked with the OS state by the compiler's runtime), and
// AVX512_BF16 or AMX-BF16. Without bfloat16 dot products the micro-kernel would emulate them
// and float32 is the faster path.
[[maybe_unused]] bool cpu_has_bf16_dot() {
#ifdef TRANSMATCHER_FAST_BF16_PATH
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512dq") || !__builtin_cpu_supports("avx512vl")) {
    return false;
  }
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5))) return true;  // AVX512_BF16
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 22))) return true;  // AMX-BF16
#endif
  return false;
}

#ifdef TRANSMATCHER_FAST_BF16_PATH
// C[m, n] = A[m, K] (row-major, lda) x B[K, n] (VNNI layout [K/2][ldb][2]), float32, overwritten.
inline void brgemm_bf16(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                        const at::BFloat16* a, const at::BFloat16* b, float* c) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, /*add_C=*/false, a, b, c);
}

TMF_AVX512 inline __mmask16 tail_mask(int64_t lanes) {
  return static_cast<__mmask16>((1u << lanes) - 1u);
}

// Every lane set to the maximum (minimum) over all 16 lanes: four butterfly steps.
TMF_AVX512 inline __m512 all_max_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_shuffle_f32x4(x, x, 0x4E));  // swap 256-bit halves
  x = _mm512_max_ps(x, _mm512_shuffle_f32x4(x, x, 0xB1));  // swap 128-bit quarters
  x = _mm512_max_ps(x, _mm512_permute_ps(x, 0x4E));        // swap pairs
  return _mm512_max_ps(x, _mm512_permute_ps(x, 0xB1));     // swap neighbours
}

TMF_AVX512 inline int32_t min_epi32(__m512i x) {
  x = _mm512_min_epi32(x, _mm512_shuffle_i32x4(x, x, 0x4E));
  x = _mm512_min_epi32(x, _mm512_shuffle_i32x4(x, x, 0xB1));
  x = _mm512_min_epi32(x, _mm512_shuffle_epi32(x, _MM_PERM_BADC));
  x = _mm512_min_epi32(x, _mm512_shuffle_epi32(x, _MM_PERM_CDAB));
  return _mm_cvtsi128_si32(_mm512_castsi512_si128(x));
}

// The lanes where `value` beats `best` (the rule of beats() above): value > best, or value is NaN
// while best is not. NLE_UQ is "greater, or either is NaN"; masking it with "best is a number"
// removes the case of a NaN best, which must stay.
TMF_AVX512 inline __mmask16 beats16(__mmask16 lanes, __m512 value, __m512 best) {
  const __mmask16 best_is_number = _mm512_mask_cmp_ps_mask(lanes, best, best, _CMP_ORD_Q);
  return _mm512_mask_cmp_ps_mask(best_is_number, value, best, _CMP_NLE_UQ);
}

// Transposes a 16 x 16 tile of 32-bit words (pairs of bfloat16): row c of the tile (16 words from
// src + c * src_ld) becomes column c of the output (word c of the row from dst + p * dst_ld, for
// p = 0..15). Strides in bfloat16 units, any 2-byte alignment. Four rounds of shuffles: 32-bit
// and 64-bit interleaves inside 128-bit lanes, then two rounds of 128-bit lane shuffles.
TMF_AVX512 inline void transpose16x16_words(const uint16_t* src, int64_t src_ld, uint16_t* dst,
                                            int64_t dst_ld) {
  __m512i r[16], a[16];
  for (int c = 0; c < 16; ++c) r[c] = _mm512_loadu_si512(src + c * src_ld);
  for (int k = 0; k < 16; k += 2) {
    a[k] = _mm512_unpacklo_epi32(r[k], r[k + 1]);
    a[k + 1] = _mm512_unpackhi_epi32(r[k], r[k + 1]);
  }
  // r[4k + m], 128-bit lane L: rows 4k..4k+3 of column 4L + m.
  for (int k = 0; k < 16; k += 4) {
    r[k] = _mm512_unpacklo_epi64(a[k], a[k + 2]);
    r[k + 1] = _mm512_unpackhi_epi64(a[k], a[k + 2]);
    r[k + 2] = _mm512_unpacklo_epi64(a[k + 1], a[k + 3]);
    r[k + 3] = _mm512_unpackhi_epi64(a[k + 1], a[k + 3]);
  }
  for (int m = 0; m < 4; ++m) {
    const __m512i lo_a = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x44);   // lanes 0, 1 of both
    const __m512i hi_a = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xEE);   // lanes 2, 3 of both
    const __m512i lo_b = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x44);
    const __m512i hi_b = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xEE);
    _mm512_storeu_si512(dst + m * dst_ld, _mm512_shuffle_i32x4(lo_a, lo_b, 0x88));
    _mm512_storeu_si512(dst + (4 + m) * dst_ld, _mm512_shuffle_i32x4(lo_a, lo_b, 0xDD));
    _mm512_storeu_si512(dst + (8 + m) * dst_ld, _mm512_shuffle_i32x4(hi_a, hi_b, 0x88));
    _mm512_storeu_si512(dst + (12 + m) * dst_ld, _mm512_shuffle_i32x4(hi_a, hi_b, 0xDD));
  }
}

// Packs columns [c0, c0 + n) of a row-major [cols, d] bfloat16 matrix into the VNNI layout
// [d2/2][n][2] (d2 = d rounded up to even; the padding is zero). A VNNI word is the pair of
// features (2p, 2p+1) of one column, so this is a transpose of 32-bit words: 16 x 16 tiles
// with vector shuffles, and word by word at the edges (and the odd last feature).
TMF_AVX512 void pack_vnni(const uint16_t* src, int64_t c0, int64_t n, int64_t d, int64_t d2,
                          uint16_t* dst) {
  const int64_t pairs = d2 / 2, full_pairs = d / 2;
  const int64_t n16 = n - n % 16, p16 = full_pairs - full_pairs % 16;
  for (int64_t cb = 0; cb < n16; cb += 16) {
    for (int64_t pb = 0; pb < p16; pb += 16) {
      transpose16x16_words(src + (c0 + cb) * d + 2 * pb, d, dst + 2 * (pb * n + cb), 2 * n);
    }
  }
  auto word = [&](int64_t c, int64_t p) {
    const uint16_t* row = src + (c0 + c) * d;
    const uint16_t pair[2] = {row[2 * p], p < full_pairs ? row[2 * p + 1] : uint16_t{0}};
    std::memcpy(dst + 2 * (p * n + c), pair, sizeof(pair));
  };
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t p = c < n16 ? p16 : 0; p < pairs; ++p) word(c, p);
  }
}

// The running row maximum of each lane: its value and location, and the locations of the next
// step's lanes.
struct LaneMax {
  __m512 best;
  __m512i best_s;
  __m512i s_vec;
};

// One step of 16 locations (the lanes in m) from s0.
template <bool kFirstRow, bool kGated>
TMF_AVX512 inline void row_step(int64_t s0, __mmask16 m, const float* v_row, const float* gate_row,
                                float* gb, int32_t* gi, __m512i t_vec, LaneMax& lanes) {
  __m512 v = _mm512_maskz_loadu_ps(m, v_row + s0);
  if (kGated) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, gate_row + s0));
  if (kFirstRow) {
    _mm512_mask_storeu_ps(gb + s0, m, v);
    _mm512_mask_storeu_epi32(gi + s0, m, _mm512_setzero_si512());
  } else {
    const __mmask16 w = beats16(m, v, _mm512_maskz_loadu_ps(m, gb + s0));
    _mm512_mask_storeu_ps(gb + s0, w, v);
    _mm512_mask_storeu_epi32(gi + s0, w, t_vec);
  }
  const __mmask16 w = beats16(m, v, lanes.best);
  lanes.best = _mm512_mask_mov_ps(lanes.best, w, v);
  lanes.best_s = _mm512_mask_mov_epi32(lanes.best_s, w, lanes.s_vec);
  lanes.s_vec = _mm512_add_epi32(lanes.s_vec, _mm512_set1_epi32(16));
}

// One score row of one (query, gallery) pair: query location t against the pair's lg gallery
// locations, scaled by the gate row. Updates the pair's running g_best (elementwise over s; on
// the first row it is written) and writes the row's maximum and its location with beats()'s
// rules: the first NaN, else the lowest index among equal maxima. Each lane keeps a running
// (value, location) over its own locations, scanned in increasing s from (-inf, its first
// location), which gives what the sequential scan from v[0] gives for that lane; one reduction
// across lanes ends it.
template <bool kFirstRow, bool kGated>
TMF_AVX512 inline void reduce_pair_row(int64_t lg, const float* v_row, const float* gate_row,
                                       float* gb, int32_t* gi, int32_t t, float* q_best,
                                       int32_t* q_index) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i t_vec = _mm512_set1_epi32(t);
  LaneMax lanes{_mm512_set1_ps(-std::numeric_limits<float>::infinity()), lane, lane};
  int64_t s0 = 0;
  for (; s0 + 16 <= lg; s0 += 16) {
    row_step<kFirstRow, kGated>(s0, 0xFFFF, v_row, gate_row, gb, gi, t_vec, lanes);
  }
  if (s0 < lg) {
    row_step<kFirstRow, kGated>(s0, tail_mask(lg - s0), v_row, gate_row, gb, gi, t_vec, lanes);
  }
  const __m512 best = lanes.best;
  const __m512i best_s = lanes.best_s;
  // Lanes without any location (lg < 16) are left out.
  const __mmask16 valid = lg >= 16 ? __mmask16(0xFFFF) : tail_mask(lg);
  // The winning lanes: those holding a NaN if any, else those equal to the maximum (no NaN left
  // then); the lowest location among them.
  __mmask16 winners = _mm512_mask_cmp_ps_mask(valid, best, best, _CMP_UNORD_Q);
  if (winners == 0) winners = _mm512_mask_cmp_ps_mask(valid, best, all_max_ps(best), _CMP_EQ_OQ);
  if ((winners & (winners - 1)) == 0) {
    // One winning lane, the usual case: its location and value as they are.
    *q_index = _mm_cvtsi128_si32(_mm512_castsi512_si128(_mm512_maskz_compress_epi32(winners,
                                                                                   best_s)));
    *q_best = _mm512_cvtss_f32(_mm512_maskz_compress_ps(winners, best));
    return;
  }
  const int32_t s_best = min_epi32(
      _mm512_mask_mov_epi32(_mm512_set1_epi32(std::numeric_limits<int32_t>::max()), winners,
                            best_s));
  // The value at that location, recomputed as the vector lane did (the same one product).
  *q_best = kGated ? v_row[s_best] * gate_row[s_best] : v_row[s_best];
  *q_index = s_best;
}

// The scale-and-max epilogue of one float32 score block: rows r0..r1 of the flattened query
// (query image r / lq, location r % lq) against gallery images j0..j1 (columns (j - j0) * lg + s).
TMF_AVX512 void reduce_block_avx512(const Shape& sh, int64_t r0, int64_t r1, int64_t j0,
                                    int64_t j1, const float* scores, int64_t ncols,
                                    const float* gate_t, float* q_best, int32_t* q_index,
                                    float* g_best, int32_t* g_index) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = r / sh.lq, t = r % sh.lq;
    const float* gate_row = gate_t == nullptr ? nullptr : gate_t + t * sh.lg;
    for (int64_t j = j0; j < j1; ++j) {
      const float* v_row = scores + (r - r0) * ncols + (j - j0) * sh.lg;
      const int64_t pair = i * sh.ng + j;
      float* gb = g_best + pair * sh.lg;
      int32_t* gi = g_index + pair * sh.lg;
      float* qb = q_best + pair * sh.lq + t;
      int32_t* qi = q_index + pair * sh.lq + t;
      const auto t32 = static_cast<int32_t>(t);
      if (t == 0 && gate_row != nullptr) {
        reduce_pair_row<true, true>(sh.lg, v_row, gate_row, gb, gi, t32, qb, qi);
      } else if (t == 0) {
        reduce_pair_row<true, false>(sh.lg, v_row, gate_row, gb, gi, t32, qb, qi);
      } else if (gate_row != nullptr) {
        reduce_pair_row<false, true>(sh.lg, v_row, gate_row, gb, gi, t32, qb, qi);
      } else {
        reduce_pair_row<false, false>(sh.lg, v_row, gate_row, gb, gi, t32, qb, qi);
      }
    }
  }
}
#pragma GCC diagnostic pop
#endif

// Once per process: which instructions the bfloat16 block GEMMs run on, after checking that the
// CPU has bfloat16 dot products, the installed torch has the micro-kernel, and the micro-kernel
// gives the exact product of a small integer-valued problem in this layout (a torch whose brgemm
// falls back to a plain GEMM, or throws, leaves bfloat16 on float32: Bf16Isa::none).
// oneDNN uses AMX where the CPU and the OS allow it; ATen's cpublas::could_pack(BFloat16) says
// whether it does (true from oneDNN's avx512_core_amx ISA up).
Bf16Isa bf16_gemm_isa() {
#ifdef TRANSMATCHER_FAST_BF16_PATH
  static const Bf16Isa isa = [] {
    if (!cpu_has_bf16_dot()) return Bf16Isa::none;
    try {
      constexpr int64_t m = 5, n = 19, k = 6;
      at::BFloat16 a[m * k], b_rows[n * k], b_vnni[n * k];
      float c[m * n], expected[m * n];
      for (int64_t i = 0; i < m * k; ++i) a[i] = static_cast<float>(i % 7 - 3);
      for (int64_t i = 0; i < n * k; ++i) b_rows[i] = static_cast<float>(i % 5 - 2);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          float sum = 0;
          for (int64_t p = 0; p < k; ++p) sum += float(a[i * k + p]) * float(b_rows[j * k + p]);
          expected[i * n + j] = sum;
        }
      }
      pack_vnni(reinterpret_cast<const uint16_t*>(b_rows), 0, n, k, k,
                reinterpret_cast<uint16_t*>(b_vnni));
      brgemm_bf16(m, n, k, k, n, n, a, b_vnni, c);
      at::native::cpublas::brgemm_release();
      if (std::memcmp(c, expected, sizeof(c)) != 0) return Bf16Isa::none;
      return at::native::cpublas::could_pack(at::kBFloat16) ? Bf16Isa::amx : Bf16Isa::avx512_bf16;
    } catch (...) {
      return Bf16Isa::none;
    }
  }();
  return isa;
#else
  return Bf16Isa::none;
#endif
}

bool bf16_gemm_available() { return bf16_gemm_isa() != Bf16Isa::none; }

#ifdef TRANSMATCHER_FAST_BF16_PATH
// Twice the rows per GEMM call where that still fits the L2 of a core (2 MiB on Xeons with
// AMX, for L 192 and D 512: fewer passes over the packed gallery, about 8 % faster there), else
// kBf16BlockRows (Zen 4 has 1 MiB).
int64_t bf16_block_rows(int64_t cols, int64_t d2) {
#ifdef _SC_LEVEL2_CACHE_SIZE
  static const int64_t l2_bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
#else
  constexpr int64_t l2_bytes = 0;
#endif
  const int64_t rows = 2 * kBf16BlockRows;
  const int64_t bytes = (rows + cols) * d2 * int64_t{sizeof(uint16_t)} + rows * cols * 4;
  return bytes <= l2_bytes ? rows : kBf16BlockRows;
}

void forward_bf16(const at::Tensor& query, const at::Tensor& gallery, const float* gate_t,
                  float* q_best, int32_t* q_index, float* g_best, int32_t* g_index) {
  const Shape sh = shape_of(query, gallery);
  if (sh.nq == 0 || sh.ng == 0) return;
  const int64_t d2 = sh.d + (sh.d & 1);  // the micro-kernel reduces over pairs of features
  // Query rows with an even leading dimension (a zero feature appended when D is odd).
  const at::Tensor q_even = sh.d == d2 ? query : at::constant_pad_nd(query, {0, 1}, 0);
  const auto* q = q_even.const_data_ptr<at::BFloat16>();

  // Block geometry: whole gallery images along columns; whole query images along rows, or row
  // ranges of one image when it is longer than a GEMM step.
  const int64_t imgs_per_col_block = std::max<int64_t>(1, kBf16BlockCols / sh.lg);
  const int64_t block_cols = imgs_per_col_block * sh.lg;
  const int64_t max_rows = bf16_block_rows(block_cols, d2);
  const int64_t imgs_per_row_block = std::max<int64_t>(1, max_rows / sh.lq);
  const int64_t step_rows = sh.lq <= max_rows ? imgs_per_row_block * sh.lq : max_rows;
  const int64_t row_blocks = (sh.nq + imgs_per_row_block - 1) / imgs_per_row_block;
  const int64_t col_blocks = (sh.ng + imgs_per_col_block - 1) / imgs_per_col_block;

  // The gallery, packed once: column block b at b * block_cols * d2, as [d2/2][cols of b][2].
  at::Tensor packed = at::empty({col_blocks * block_cols * d2}, gallery.options());
  auto* packed_base = reinterpret_cast<uint16_t*>(packed.mutable_data_ptr<at::BFloat16>());
  const auto* g_raw = reinterpret_cast<const uint16_t*>(gallery.const_data_ptr<at::BFloat16>());
  auto cols_of = [&](int64_t b) {
    return (std::min(sh.ng, (b + 1) * imgs_per_col_block) - b * imgs_per_col_block) * sh.lg;
  };
  at::parallel_for(0, col_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      pack_vnni(g_raw, b * block_cols, cols_of(b), sh.d, d2, packed_base + b * block_cols * d2);
    }
  });
  const auto* packed_g = reinterpret_cast<const at::BFloat16*>(packed_base);

  // Column blocks vary fastest, so consecutive tasks of one worker reuse its query rows.
  at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({step_rows * block_cols}, query.options().dtype(at::kFloat));
    float* scores = buffer.mutable_data_ptr<float>();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i0 = (task / col_blocks) * imgs_per_row_block;
      const int64_t i1 = std::min(sh.nq, i0 + imgs_per_row_block);
      const int64_t b = task % col_blocks;
      const int64_t j0 = b * imgs_per_col_block;
      const int64_t j1 = std::min(sh.ng, j0 + imgs_per_col_block);
      const int64_t ncols = cols_of(b);
      const at::BFloat16* g_block = packed_g + b * block_cols * d2;
      // Row ranges of one pair are visited in increasing t, which the running g_best relies on.
      for (int64_t r0 = i0 * sh.lq; r0 < i1 * sh.lq; r0 += step_rows) {
        const int64_t r1 = std::min(i1 * sh.lq, r0 + step_rows);
        brgemm_bf16(r1 - r0, ncols, d2, d2, ncols, ncols, q + r0 * d2, g_block, scores);
        reduce_block_avx512(sh, r0, r1, j0, j1, scores, ncols, gate_t, q_best, q_index, g_best,
                            g_index);
      }
    }
    at::native::cpublas::brgemm_release();
  });
}
#endif

// What the forward saved, and the upstream gradients: enough to route every output's gradient.
template <typename T>
struct Routing {
  Shape sh;
  const T* grad_q_best;  // [nq, ng, lq] or null
  const T* grad_g_best;  // [nq, ng, lg] or null
  const T* q_best;
  const T* g_best;
  const int32_t* q_index;
  const int32_t* g_index;

  // Calls fn(s, t, w, best) for every output element of one (query, gallery) pair: its upstream
  // gradient w, its value best = S[s, t], and the location pair (s, t) its max came from.
  template <typename Fn>
  void for_each(int64_t pair, Fn&& fn) const {
    if (grad_q_best != nullptr) {
      for (int64_t t = 0, k = pair * sh.lq; t < sh.lq; ++t, ++k) {
        fn(int64_t{q_index[k]}, t, grad_q_best[k], q_best[k]);
      }
    }
    if (grad_g_best != nullptr) {
      for (int64_t s = 0, k = pair * sh.lg; s < sh.lg; ++s, ++k) {
        fn(s, int64_t{g_index[k]}, grad_g_best[k], g_best[k]);
      }
    }
  }
};

template <typename T>
void backward_impl(const Routing<T>& route, const T* q, const T* g, const T* gate /* [lg, lq] */,
                   T* grad_q, T* grad_g, T* grad_e, const at::TensorOptions& options) {
  const Shape& sh = route.sh;
  const int64_t lq = sh.lq, lg = sh.lg, d = sh.d;
  auto sig_at = [&](int64_t s, int64_t t) { return gate == nullptr ? T(1) : gate[s * lq + t]; };
  // Every output element routes its gradient w to one location pair (s, t):
  //   d query[i,t]   += w * sig[s,t] * gallery[j,s]
  //   d gallery[j,s] += w * sig[s,t] * query[i,t]
  //   d E[s,t]       += w * best * (1 - sig[s,t])     (best = S[s,t], no recomputation)
  // Pass 1 owns query images (d query, partial d E); pass 2 owns gallery images (d gallery).
  if (grad_q != nullptr || grad_e != nullptr) {
    const int64_t parts = std::min(sh.nq, kMaxScorePartials);
    at::Tensor partials;
    T* part_base = nullptr;
    if (grad_e != nullptr && parts > 0) {
      partials = at::zeros({parts, lg * lq}, options);
      part_base = partials.mutable_data_ptr<T>();
    }
    at::parallel_for(0, parts, 1, [&](int64_t p_begin, int64_t p_end) {
      for (int64_t p = p_begin; p < p_end; ++p) {
        T* part = part_base == nullptr ? nullptr : part_base + p * lg * lq;
        for (int64_t i = p * sh.nq / parts; i < (p + 1) * sh.nq / parts; ++i) {
          T* dq = grad_q == nullptr ? nullptr : grad_q + i * lq * d;
          if (dq != nullptr) std::fill(dq, dq + lq * d, T(0));
          for (int64_t j = 0; j < sh.ng; ++j) {
            const T* g_img = g + j * lg * d;
            route.for_each(i * sh.ng + j, [&](int64_t s, int64_t t, T w, T best) {
              const T sig = sig_at(s, t);
              if (dq != nullptr) axpy(d, w * sig, g_img + s * d, dq + t * d);
              if (part != nullptr) part[s * lq + t] += w * best * (T(1) - sig);
            });
          }
        }
      }
    });
    if (grad_e != nullptr) {
      at::parallel_for(0, lg * lq, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          T sum = 0;
          for (int64_t p = 0; p < parts; ++p) sum += part_base[p * lg * lq + k];
          grad_e[k] = sum;
        }
      });
    }
  }
  if (grad_g != nullptr) {
    at::parallel_for(0, sh.ng, 1, [&](int64_t j_begin, int64_t j_end) {
      for (int64_t j = j_begin; j < j_end; ++j) {
        T* dg = grad_g + j * lg * d;
        std::fill(dg, dg + lg * d, T(0));
        for (int64_t i = 0; i < sh.nq; ++i) {
          const T* q_img = q + i * lq * d;
          route.for_each(i * sh.ng + j, [&](int64_t s, int64_t t, T w, T /*best*/) {
            axpy(d, w * sig_at(s, t), q_img + t * d, dg + s * d);
          });
        }
      }
    });
  }
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->mutable_data_ptr<T>() : nullptr;
}

// sigmoid(E) once per call, in the compute dtype.
std::optional<at::Tensor> gate_of(const std::optional<at::Tensor>& score_embed,
                                  at::ScalarType dtype) {
  if (!score_embed.has_value()) return std::nullopt;
  return at::sigmoid(score_embed->to(dtype)).contiguous();
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "max_sim cpu kernel: ", name, " must be a CPU tensor");
}

// The dtype the kernels compute and write in: float32 for 16-bit inputs, else the input dtype.
at::ScalarType compute_dtype_of(at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              "max_sim cpu kernel: float32, float64, bfloat16 or float16 inputs expected, got ",
              dtype);
  return dtype == at::kBFloat16 || dtype == at::kHalf ? at::kFloat : dtype;
}

// query and gallery in the compute dtype (one conversion when they are the same tensor).
std::pair<at::Tensor, at::Tensor> in_compute_dtype(const at::Tensor& query,
                                                   const at::Tensor& gallery,
                                                   at::ScalarType dtype) {
  if (query.scalar_type() == dtype) return {query, gallery};
  at::Tensor q = query.to(dtype);
  return {q, gallery.is_same(query) ? q : gallery.to(dtype)};
}

void max_sim_forward_cpu(const at::Tensor& query, const at::Tensor& gallery,
                         const std::optional<at::Tensor>& score_embed, at::Tensor q_best,
                         at::Tensor g_best, at::Tensor q_index, at::Tensor g_index,
                         bool /*allow_tf32: no tensor cores here*/,
                         int64_t /*query_group: a CUDA launch order*/) {
  check_kernel_inputs(query, gallery, score_embed);
  check_cpu(query, "query");
  check_cpu(gallery, "gallery");
  const auto dtype = compute_dtype_of(query.scalar_type());
  const Shape sh = shape_of(query, gallery);
  check_output(q_best, {sh.nq, sh.ng, sh.lq}, dtype, "q_best");
  check_output(g_best, {sh.nq, sh.ng, sh.lg}, dtype, "g_best");
  check_output(q_index, {sh.nq, sh.ng, sh.lq}, at::kInt, "q_index");
  check_output(g_index, {sh.nq, sh.ng, sh.lg}, at::kInt, "g_index");
  TORCH_CHECK(sh.lq > 0 && sh.lg > 0, "max_sim cpu kernel: images need at least one location");
  // The epilogue walks gallery locations for each query location: gate transposed to [lq, lg].
  const auto gate = gate_of(score_embed, dtype);
  const auto gate_t =
      gate.has_value() ? std::optional<at::Tensor>(gate->t().contiguous()) : std::nullopt;
#ifdef TRANSMATCHER_FAST_BF16_PATH
  if (query.scalar_type() == at::kBFloat16 && bf16_gemm_available()) {
    forward_bf16(query, gallery, ptr_or_null<float>(gate_t), q_best.mutable_data_ptr<float>(),
                 q_index.mutable_data_ptr<int32_t>(), g_best.mutable_data_ptr<float>(),
                 g_index.mutable_data_ptr<int32_t>());
    return;
  }
#endif
  const auto inputs = in_compute_dtype(query, gallery, dtype);
  const at::Tensor &q = inputs.first, &g = inputs.second;
  AT_DISPATCH_FLOATING_TYPES(dtype, "max_sim_forward_cpu", [&] {
    forward_impl<scalar_t>(q, g, ptr_or_null<scalar_t>(gate_t),
                           q_best.mutable_data_ptr<scalar_t>(), q_index.mutable_data_ptr<int32_t>(),
                           g_best.mutable_data_ptr<scalar_t>(), g_index.mutable_data_ptr<int32_t>());
  });
}

void max_sim_backward_cpu(const std::optional<at::Tensor>& grad_q_best,
                          const std::optional<at::Tensor>& grad_g_best, const at::Tensor& query,
                          const at::Tensor& gallery, const std::optional<at::Tensor>& score_embed,
                          const at::Tensor& q_best, const at::Tensor& g_best,
                          const at::Tensor& q_index, const at::Tensor& g_index,
                          const std::optional<at::Tensor>& grad_query,
                          const std::optional<at::Tensor>& grad_gallery,
                          const std::optional<at::Tensor>& grad_score_embed) {
  check_kernel_inputs(query, gallery, score_embed);
  check_cpu(query, "query");
  // 16-bit inputs: the gradients are computed and written in float32 (O(Nq*Ng*L*D) work).
  const auto dtype = compute_dtype_of(query.scalar_type());
  const auto inputs = in_compute_dtype(query, gallery, dtype);
  const at::Tensor &q = inputs.first, &g = inputs.second;
  const Shape sh = shape_of(query, gallery);
  check_output(q_best, {sh.nq, sh.ng, sh.lq}, dtype, "q_best");
  check_output(g_best, {sh.nq, sh.ng, sh.lg}, dtype, "g_best");
  check_output(q_index, {sh.nq, sh.ng, sh.lq}, at::kInt, "q_index");
  check_output(g_index, {sh.nq, sh.ng, sh.lg}, at::kInt, "g_index");
  if (grad_q_best.has_value()) check_output(*grad_q_best, q_best.sizes(), dtype, "grad_q_best");
  if (grad_g_best.has_value()) check_output(*grad_g_best, g_best.sizes(), dtype, "grad_g_best");
  if (grad_query.has_value()) check_output(*grad_query, query.sizes(), dtype, "grad_query");
  if (grad_gallery.has_value())
    check_output(*grad_gallery, gallery.sizes(), dtype, "grad_gallery");
  if (grad_score_embed.has_value()) {
    TORCH_CHECK(score_embed.has_value(),
                "max_sim cpu kernel: grad_score_embed given without score_embed");
    check_output(*grad_score_embed, {sh.lg, sh.lq}, dtype, "grad_score_embed");
  }
  const auto gate = gate_of(score_embed, dtype);
  AT_DISPATCH_FLOATING_TYPES(dtype, "max_sim_backward_cpu", [&] {
    const Routing<scalar_t> route{sh,
                                  ptr_or_null<scalar_t>(grad_q_best),
                                  ptr_or_null<scalar_t>(grad_g_best),
                                  q_best.const_data_ptr<scalar_t>(),
                                  g_best.const_data_ptr<scalar_t>(),
                                  q_index.const_data_ptr<int32_t>(),
                                  g_index.const_data_ptr<int32_t>()};
    backward_impl<scalar_t>(route, q.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                            ptr_or_null<scalar_t>(gate),
                            mutable_ptr_or_null<scalar_t>(grad_query),
                            mutable_ptr_or_null<scalar_t>(grad_gallery),
                            mutable_ptr_or_null<scalar_t>(grad_score_embed), q.options());
  });
}

// Whether bfloat16 inputs run their block GEMMs in bfloat16 here (else they run in float32):
// what tests and benchmarks record, so that a silent fallback shows.
bool cpu_bf16_gemm_available() { return bf16_gemm_available(); }

// Which instructions those bfloat16 GEMMs run on, in oneDNN's names: "avx512_core_amx",
// "avx512_core_bf16", or "" when they run in float32.
std::string cpu_bf16_gemm_isa() {
  switch (bf16_gemm_isa()) {
    case Bf16Isa::amx:
      return "avx512_core_amx";
    case Bf16Isa::avx512_bf16:
      return "avx512_core_bf16";
    default:
      return "";
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(transmatcher_fast_C, m) {
  m.def("cpu_bf16_gemm_available() -> bool", &cpu_bf16_gemm_available);
  m.def("cpu_bf16_gemm_isa() -> str", &cpu_bf16_gemm_isa);
}

TORCH_LIBRARY_IMPL(transmatcher_fast_C, CPU, m) {
  m.impl("max_sim_forward", &max_sim_forward_cpu);
  m.impl("max_sim_backward", &max_sim_backward_cpu);
}

}  // namespace transmatcher_fast
