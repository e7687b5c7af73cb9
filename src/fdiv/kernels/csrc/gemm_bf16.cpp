// bf16 x bf16 GEMMs with float32 sums for the fused linear loss (see fdiv/kernels/cpu_gemm.py):
//   logits:          C[m, n] = bias[n] + sum_k A[m, k] B[n, k]    A [M, K], B [N, K] bf16 rows, C float32
//   weight gradient: S[v, h] += sum_m G[m, v] X[m, h]             S = hi + lo, two bf16 [V, H] arrays
// Products of bf16 are exact in float32, so each result differs from the float64 product only by
// float32 accumulation. AVX512-BF16 only (vdpbf16ps: two bf16 products per float32 lane and
// instruction); elsewhere fdiv_bf16_gemm_supported() is 0 and the caller keeps its float32 GEMMs.
//
// One micro-kernel: MR = 12 rows of the left operand against a panel of NR = 32 columns laid out
// [K/2][32][2] (a k-pair is two vectors), 24 accumulators in registers over the whole K, left
// k-pairs broadcast as 32-bit words. Both GEMMs pack their panels as they go, in per-thread
// buffers that stay in L2, so no packed copy of a [V, H] weight is ever held:
// - logits: a thread packs one 32-row panel of B (a 32 x K/2 transpose of 32-bit pairs) and runs all
//   of A's rows against it (the pack reads B once, as the GEMM would, but is not overlapped with the
//   arithmetic: ~10 % of the time at 128 rows, ~1 % at 700; prefetching the next panel did not help);
// - weight gradient: the k axis is the rows m, so both operands need row pairs interleaved; X's
//   panels are packed once per call, and a thread packs VB = 96 columns of G at a time (its
//   left operand) and runs them against every X panel. The float32 tile is added to hi + lo and
//   split again: hi = bf16(s), lo = bf16(s - hi) (about 16 significant bits over both; hi is the
//   bf16 gradient, so the [V, H] float32 accumulator and a bf16 product are never allocated).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"

#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10)
#define FDIV_HAVE_BF16_GEMM 1
#include <immintrin.h>
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define BF16_INLINE __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) inline
#else
#define FDIV_HAVE_BF16_GEMM 0
#endif

namespace {

constexpr int64_t NR = 32;
constexpr int MR = 12;
constexpr int64_t VB = 96;          // weight gradient: G columns per packed block (8 micro-tiles)
constexpr int64_t PREFETCH = 1024;  // elements (16 k-pairs) ahead in the panel

#if FDIV_HAVE_BF16_GEMM

__mmask16 lanes(int64_t width) { return width >= 16 ? 0xFFFF : width <= 0 ? 0 : static_cast<__mmask16>((1u << width) - 1); }

// 16 x 16 transpose of 32-bit words: r[j] (row j) -> r[c] (column c).
BF16_INLINE void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // rows 4i..4i+3: u[4i + c] holds column c + 4L of them in 128-bit lane L
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i even0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), even1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    const __m512i odd0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD), odd1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_i32x4(even0, even1, 0x88);
    r[c + 8] = _mm512_shuffle_i32x4(even0, even1, 0xDD);
    r[c + 4] = _mm512_shuffle_i32x4(odd0, odd1, 0x88);
    r[c + 12] = _mm512_shuffle_i32x4(odd0, odd1, 0xDD);
  }
}

// rows [n0, n0 + width) of B [., K] (row stride ldb) -> panel[i][j] = B[n0 + j, 2i : 2i + 2] as one 32-bit
// word, zero past the last row and for the missing partner of an odd K.
BF16_TARGET void pack_b_panel(const uint16_t* b, int64_t ldb, int64_t width, int64_t k, uint32_t* panel) {
  const int64_t pairs = (k + 1) / 2, full = k / 2;
  int64_t i0 = 0;
  for (; i0 + 16 <= full; i0 += 16) {
    for (int half = 0; half < 2; ++half) {
      __m512i r[16];
      for (int j = 0; j < 16; ++j) {
        const int64_t row = half * 16 + j;
        r[j] = row < width ? _mm512_loadu_si512(b + row * ldb + 2 * i0) : _mm512_setzero_si512();
      }
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(panel + (i0 + i) * NR + half * 16, r[i]);
    }
  }
  for (int64_t i = i0; i < pairs; ++i)
    for (int64_t j = 0; j < NR; ++j) {
      uint32_t word = 0;
      if (j < width) {
        const uint16_t* src = b + j * ldb + 2 * i;
        word = src[0] | (2 * i + 1 < k ? static_cast<uint32_t>(src[1]) << 16 : 0u);
      }
      panel[i * NR + j] = word;
    }
}

// Row pair (r0, r1) of a bf16 matrix (r1 null past its last row), columns [0, cols), cols <= 32 ->
// dst[j] = r0[j] | r1[j] << 16 for j < 32 (zero past cols).
BF16_INLINE void interleave_rows(const uint16_t* r0, const uint16_t* r1, int64_t cols, uint32_t* dst) {
  alignas(64) static const uint16_t low_index[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                     8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t high_index[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                      24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __mmask32 mask = cols >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1u << cols) - 1);
  const __m512i x0 = _mm512_maskz_loadu_epi16(mask, r0);
  const __m512i x1 = r1 ? _mm512_maskz_loadu_epi16(mask, r1) : _mm512_setzero_si512();
  _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(x0, _mm512_load_si512(low_index), x1));
  _mm512_storeu_si512(dst + 16, _mm512_permutex2var_epi16(x0, _mm512_load_si512(high_index), x1));
}

// Columns [0, cols) (cols <= 32) of a bf16 matrix [m, .] (row stride ld) as row pairs: dst[i * stride + j] =
// M[2i, j] | M[2i + 1, j] << 16 for i < ceil(m / 2), j < 32 (zero past cols and past the last row).
BF16_TARGET void pack_row_pairs(const uint16_t* src, int64_t ld, int64_t m, int64_t cols, uint32_t* dst, int64_t stride) {
  for (int64_t i = 0; 2 * i < m; ++i)
    interleave_rows(src + 2 * i * ld, 2 * i + 1 < m ? src + (2 * i + 1) * ld : nullptr, cols, dst + i * stride);
}

// Part `part` of `parts` of the cache lines of rows [0, rows) x `bytes` (row stride ld bytes) into L2: the
// next block's operand, fetched while the current one computes.
inline void prefetch_part(const char* base, int64_t ld, int64_t rows, int64_t bytes, int64_t part, int64_t parts) {
  const int64_t per_row = (bytes + 63) / 64, lines = rows * per_row;
  const int64_t l0 = lines * part / parts, l1 = lines * (part + 1) / parts;
  for (int64_t l = l0; l < l1; ++l) _mm_prefetch(base + (l / per_row) * ld + (l % per_row) * 64, _MM_HINT_T1);
}

// Accumulators of R rows x 32 columns: sum over k of A(r, k) B(k, :), A(r, pair i) the 32-bit word at
// a + r * a_row + i * a_pair (uint16 elements), B the panel [k/2][32][2]. An odd k pairs A's last
// element with the panel's zero-padded last pair.
template <int R>
BF16_INLINE void accumulate(const uint16_t* a, int64_t a_row, int64_t a_pair, const uint16_t* panel, int64_t k,
                            __m512 acc0[R], __m512 acc1[R]) {
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  const int64_t pairs = k / 2;
  const uint16_t* bp = panel;
  const uint16_t* ap = a;
  for (int64_t i = 0; i < pairs; ++i, bp += 2 * NR, ap += a_pair) {
    const __m512bh v0 = (__m512bh)_mm512_loadu_si512(bp);
    const __m512bh v1 = (__m512bh)_mm512_loadu_si512(bp + NR);
    _mm_prefetch(reinterpret_cast<const char*>(bp + PREFETCH), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(bp + PREFETCH + NR), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, ap + r * a_row, 4);
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
      acc0[r] = _mm512_dpbf16_ps(acc0[r], x, v0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], x, v1);
    }
  }
  if (k & 1) {
    const __m512bh v0 = (__m512bh)_mm512_loadu_si512(bp);
    const __m512bh v1 = (__m512bh)_mm512_loadu_si512(bp + NR);
    for (int r = 0; r < R; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(ap[r * a_row]));
      acc0[r] = _mm512_dpbf16_ps(acc0[r], x, v0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], x, v1);
    }
  }
}

// Logits epilogue: c[r] (float32, row stride ldc) = acc + bias, lanes past the last column masked.
struct StoreFloat {
  float* c;
  int64_t ldc;
  const float* bias;
  __mmask16 m0, m1;
  BF16_INLINE void prefetch(int) const {}
  BF16_INLINE void operator()(int r, __m512 acc0, __m512 acc1) const {
    if (bias) {
      acc0 = _mm512_add_ps(acc0, _mm512_maskz_loadu_ps(m0, bias));
      acc1 = _mm512_add_ps(acc1, _mm512_maskz_loadu_ps(m1, bias + 16));
    }
    _mm512_mask_storeu_ps(c + r * ldc, m0, acc0);
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc1);
  }
};

BF16_INLINE __m512 widen(__m256i bf16) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16)); }

// Weight-gradient epilogue: s = acc (+ hi + lo unless first); hi = bf16(s), lo = bf16(s - hi).
struct AddSplit {
  uint16_t* hi;
  uint16_t* lo;
  int64_t ld;
  bool first;
  __mmask16 m0, m1;
  BF16_INLINE void half(uint16_t* h, uint16_t* l, __mmask16 m, __m512 acc) const {
    __m512 s = acc;
    if (!first) s = _mm512_add_ps(widen(_mm256_maskz_loadu_epi16(m, h)), _mm512_add_ps(widen(_mm256_maskz_loadu_epi16(m, l)), acc));
    const __m256i high = (__m256i)_mm512_cvtneps_pbh(s);
    const __m256i low = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(s, widen(high)));
    _mm256_mask_storeu_epi16(h, m, high);
    _mm256_mask_storeu_epi16(l, m, low);
  }
  BF16_INLINE void prefetch(int r) const {  // this tile's rows of hi and lo, read after the k loop
    _mm_prefetch(reinterpret_cast<const char*>(hi + r * ld), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(lo + r * ld), _MM_HINT_T0);
  }
  BF16_INLINE void operator()(int r, __m512 acc0, __m512 acc1) const {
    half(hi + r * ld, lo + r * ld, m0, acc0);
    half(hi + r * ld + 16, lo + r * ld + 16, m1, acc1);
  }
};

template <int R, class Epilogue>
BF16_INLINE void micro_tile(const uint16_t* a, int64_t a_row, int64_t a_pair, const uint16_t* panel, int64_t k,
                            const Epilogue& out) {
  __m512 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) out.prefetch(r);
  accumulate<R>(a, a_row, a_pair, panel, k, acc0, acc1);
  for (int r = 0; r < R; ++r) out(r, acc0[r], acc1[r]);
}

// The last rows < MR: the micro-tile of exactly that height.
template <int R, class Epilogue>
BF16_TARGET void tile(const uint16_t* a, int64_t a_row, int64_t a_pair, const uint16_t* panel, int64_t k,
                      const Epilogue& out, int rows) {
  if (rows == R) return micro_tile<R>(a, a_row, a_pair, panel, k, out);
  if constexpr (R > 1) tile<R - 1>(a, a_row, a_pair, panel, k, out, rows);
}

BF16_TARGET void logits_gemm(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, int64_t m, int64_t n,
                             int64_t k, const float* bias, float* c, int64_t ldc, int threads) {
  const int64_t panels = (n + NR - 1) / NR;
  fdiv_cpu::run_slices(threads, panels, [&](int64_t p0, int64_t p1) {
    std::vector<uint32_t> panel(static_cast<size_t>((k + 1) / 2 * NR));
    const auto* bp = reinterpret_cast<const uint16_t*>(panel.data());
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t col = p * NR, width = std::min(NR, n - col);
      pack_b_panel(b + col * ldb, ldb, width, k, panel.data());
      const StoreFloat out{nullptr, ldc, bias ? bias + col : nullptr, lanes(width), lanes(width - 16)};
      const int64_t tiles = (m + MR - 1) / MR, next = std::min(NR, n - col - NR);
      for (int64_t row = 0; row < m; row += MR) {
        if (next > 0)
          prefetch_part(reinterpret_cast<const char*>(b + (col + NR) * ldb), 2 * ldb, next, 2 * k, row / MR, tiles);
        StoreFloat at = out;
        at.c = c + row * ldc + col;
        tile<MR>(a + row * lda, lda, 2, bp, k, at, static_cast<int>(std::min<int64_t>(MR, m - row)));
      }
    }
  });
}

BF16_TARGET void weight_grad_gemm(const uint16_t* g, int64_t ldg, const uint16_t* x, int64_t ldx, int64_t m,
                                  int64_t v, int64_t h, uint16_t* hi, uint16_t* lo, int64_t ldo, bool first,
                                  int threads) {
  const int64_t pairs = (m + 1) / 2, x_panels = (h + NR - 1) / NR;
  // X [m, h] -> panels over h: x_packed[panel][i][j] = X[2i, 32 panel + j] | X[2i + 1, .] << 16
  std::vector<uint32_t> x_packed(static_cast<size_t>(x_panels * pairs * NR));
  fdiv_cpu::run_slices(threads, x_panels, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      pack_row_pairs(x + p * NR, ldx, m, std::min(NR, h - p * NR), x_packed.data() + p * pairs * NR, NR);
  });
  const int64_t blocks = (v + VB - 1) / VB;
  fdiv_cpu::run_slices(threads, blocks, [&](int64_t b0, int64_t b1) {
    std::vector<uint32_t> block(static_cast<size_t>(pairs * VB));  // G^T [VB, m] as [pairs][VB] words
    const auto* ap = reinterpret_cast<const uint16_t*>(block.data());
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t v0 = blk * VB, width = std::min(VB, v - v0);
      for (int64_t j = 0; j < width; j += NR)
        pack_row_pairs(g + v0 + j, ldg, m, std::min(NR, width - j), block.data() + j, VB);
      const int64_t next = std::min(VB, v - v0 - VB), tiles = x_panels * ((width + MR - 1) / MR);
      int64_t t = 0;
      for (int64_t p = 0; p < x_panels; ++p) {
        const int64_t col = p * NR, cols = std::min(NR, h - col);
        const auto* panel = reinterpret_cast<const uint16_t*>(x_packed.data() + p * pairs * NR);
        for (int64_t r = 0; r < width; r += MR, ++t) {
          if (blk + 1 < b1 && next > 0)
            prefetch_part(reinterpret_cast<const char*>(g + v0 + VB), 2 * ldg, m, 2 * next, t, tiles);
          const AddSplit out{hi + (v0 + r) * ldo + col, lo + (v0 + r) * ldo + col, ldo, first, lanes(cols),
                             lanes(cols - 16)};
          tile<MR>(ap + 2 * r, 2, 2 * VB, panel, 2 * pairs, out, static_cast<int>(std::min<int64_t>(MR, width - r)));
        }
      }
    }
  });
}

#endif

}  // namespace

extern "C" {

// 1 where this library has the kernels and the CPU runs AVX512-BF16.
int fdiv_bf16_gemm_supported() {
#if FDIV_HAVE_BF16_GEMM
  return __builtin_cpu_supports("avx512bf16") ? 1 : 0;
#else
  return 0;
#endif
}

// C [m, n] (float32, row stride ldc) = A [m, k] @ B [n, k]^T + bias (float32 [n] or null); A and B bf16 with
// unit column stride. Call only where fdiv_bf16_gemm_supported().
void fdiv_bf16_gemm(const void* a, int64_t lda, const void* b, int64_t ldb, int64_t m, int64_t n, int64_t k,
                    const float* bias, float* c, int64_t ldc, int threads) {
#if FDIV_HAVE_BF16_GEMM
  logits_gemm(static_cast<const uint16_t*>(a), lda, static_cast<const uint16_t*>(b), ldb, m, n, k, bias, c, ldc,
              threads);
#endif
}

// hi + lo [v, h] (bf16 each, row stride ldo) += G [m, v]^T @ X [m, h] (bf16, unit column strides), or = when
// first (hi, lo then only written). Call only where fdiv_bf16_gemm_supported().
void fdiv_bf16_weight_grad(const void* g, int64_t ldg, const void* x, int64_t ldx, int64_t m, int64_t v, int64_t h,
                           void* hi, void* lo, int64_t ldo, int first, int threads) {
#if FDIV_HAVE_BF16_GEMM
  weight_grad_gemm(static_cast<const uint16_t*>(g), ldg, static_cast<const uint16_t*>(x), ldx, m, v, h,
                   static_cast<uint16_t*>(hi), static_cast<uint16_t*>(lo), ldo, first != 0, threads);
#endif
}

}  // extern "C"
