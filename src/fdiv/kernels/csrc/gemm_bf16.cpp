// bf16 x bf16 -> float32 GEMM for the fused linear loss (see fdiv/kernels/cpu_gemm.py):
//   C[m, n] = bias[n] + sum_k A[m, k] B[n, k],   A [M, K] and B [N, K] bf16 rows, C float32.
// Products of bf16 are exact in float32, so C differs from the float64 product only by float32
// accumulation: the logits a bf16 model would get from an upcast float32 GEMM, at the bf16 rate.
// AVX512-BF16 only (vdpbf16ps: two bf16 products per float32 lane and instruction); elsewhere
// fdiv_bf16_gemm_supported() is 0 and the caller keeps its float32 GEMM.
//
// B is packed once into panels of NR = 32 columns, [K/2][32][2] each (a k-pair of a panel is two
// vectors); a micro-tile of MR = 12 rows keeps 24 accumulators in registers over the whole K,
// broadcasting A's k-pairs from its rows; the panel is prefetched 16 k-pairs ahead (at ~120 rows
// it comes from memory once per 10 tiles: 218 -> 378 GFLOPS). Threads take contiguous runs of panels.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel.h"

#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10)
#define FDIV_HAVE_BF16_GEMM 1
#include <immintrin.h>
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define FDIV_HAVE_BF16_GEMM 0
#endif

namespace {

constexpr int64_t NR = 32;
constexpr int MR = 12;
constexpr int64_t PREFETCH = 1024;  // elements (16 k-pairs) ahead in the panel: its first tile streams it from memory

int64_t panel_elements(int64_t k) { return ((k + 1) / 2) * NR * 2; }

// B [n, k] (row stride ldb) -> panels: element (pair i, column j) of panel p holds B[32p + j, 2i : 2i + 2],
// zero past the last row and the last odd k.
void pack_panels(const uint16_t* b, int64_t ldb, int64_t n, int64_t k, uint16_t* out, int threads) {
  constexpr int64_t BLOCK = 16;  // k-pairs per step: 64 bytes of each of the panel's rows
  const int64_t pairs = (k + 1) / 2, panels = (n + NR - 1) / NR;
  fdiv_cpu::run_slices(threads, panels, [&](int64_t p0, int64_t p1) {
    uint32_t stage[NR][BLOCK];
    for (int64_t p = p0; p < p1; ++p) {
      uint32_t* dst = reinterpret_cast<uint32_t*>(out + p * panel_elements(k));
      const int64_t width = n - p * NR < NR ? n - p * NR : NR;
      for (int64_t i0 = 0; i0 < pairs; i0 += BLOCK) {
        const int64_t count = pairs - i0 < BLOCK ? pairs - i0 : BLOCK;
        for (int64_t j = 0; j < NR; ++j) {
          std::memset(stage[j], 0, sizeof(stage[j]));
          if (j >= width) continue;
          const uint16_t* src = b + (p * NR + j) * ldb + 2 * i0;
          const int64_t elements = std::min<int64_t>(2 * count, k - 2 * i0);  // the last odd k pairs with 0
          std::memcpy(stage[j], src, static_cast<size_t>(elements) * 2);
        }
        for (int64_t i = 0; i < count; ++i, dst += NR)
          for (int64_t j = 0; j < NR; ++j) dst[j] = stage[j][i];
      }
    }
  });
}

#if FDIV_HAVE_BF16_GEMM

// R rows of C, one panel's 32 columns (lanes past the last column masked off by m0, m1).
template <int R>
BF16_TARGET void micro_tile(const uint16_t* a, int64_t lda, const uint16_t* panel, int64_t k, float* c, int64_t ldc,
                            const float* bias, __mmask16 m0, __mmask16 m1) {
  __m512 acc0[R], acc1[R];
  const __m512 bias0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
  const __m512 bias1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    acc0[r] = bias0;
    acc1[r] = bias1;
  }
  const int64_t pairs = k / 2;
  const uint16_t* bp = panel;
  for (int64_t i = 0; i < pairs; ++i, bp += 2 * NR) {
    const __m512bh v0 = (__m512bh)_mm512_loadu_si512(bp);
    const __m512bh v1 = (__m512bh)_mm512_loadu_si512(bp + NR);
    _mm_prefetch(reinterpret_cast<const char*>(bp + PREFETCH), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(bp + PREFETCH + NR), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * i, 4);
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
      acc0[r] = _mm512_dpbf16_ps(acc0[r], x, v0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], x, v1);
    }
  }
  if (k & 1) {  // the unpaired last k: (a, 0) against the panel's zero-padded pair
    const __m512bh v0 = (__m512bh)_mm512_loadu_si512(bp);
    const __m512bh v1 = (__m512bh)_mm512_loadu_si512(bp + NR);
    for (int r = 0; r < R; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(a[r * lda + k - 1]));
      acc0[r] = _mm512_dpbf16_ps(acc0[r], x, v0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], x, v1);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, acc0[r]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc1[r]);
  }
}

// The last rows < MR: the micro-tile of exactly that height.
template <int R>
BF16_TARGET void tile(const uint16_t* a, int64_t lda, const uint16_t* panel, int64_t k, float* c, int64_t ldc,
                      const float* bias, __mmask16 m0, __mmask16 m1, int rows) {
  if (rows == R) return micro_tile<R>(a, lda, panel, k, c, ldc, bias, m0, m1);
  if constexpr (R > 1) tile<R - 1>(a, lda, panel, k, c, ldc, bias, m0, m1, rows);
}

BF16_TARGET void gemm(const uint16_t* a, int64_t lda, const uint16_t* packed, int64_t m, int64_t n, int64_t k,
                      const float* bias, float* c, int64_t ldc, int threads) {
  const int64_t panels = (n + NR - 1) / NR;
  fdiv_cpu::run_slices(threads, panels, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t col = p * NR, width = n - col < NR ? n - col : NR;
      const __mmask16 m0 = width >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << width) - 1);
      const __mmask16 m1 = width >= 32 ? 0xFFFF : width <= 16 ? 0 : static_cast<__mmask16>((1u << (width - 16)) - 1);
      const uint16_t* panel = packed + p * panel_elements(k);
      for (int64_t row = 0; row < m; row += MR) {
        const int rows = m - row < MR ? static_cast<int>(m - row) : MR;
        tile<MR>(a + row * lda, lda, panel, k, c + row * ldc + col, ldc, bias ? bias + col : nullptr, m0, m1, rows);
      }
    }
  });
}

#endif

}  // namespace

extern "C" {

// 1 where this library has the kernel and the CPU runs AVX512-BF16.
int fdiv_bf16_gemm_supported() {
#if FDIV_HAVE_BF16_GEMM
  return __builtin_cpu_supports("avx512bf16") ? 1 : 0;
#else
  return 0;
#endif
}

// acc[i] (+)= x[i] for bf16 x and float32 acc, n contiguous elements (overwrite: acc = x). torch's
// mixed-dtype add_ converts x into a fresh float32 tensor first (a [V, H] allocation and pass).
void fdiv_bf16_add_to_float(float* acc, const void* x_, int64_t n, int overwrite, int threads) {
  const auto* x = static_cast<const uint16_t*>(x_);
  constexpr int64_t GRAIN = 1 << 16;
  fdiv_cpu::run_slices(std::min<int64_t>(threads, (n + GRAIN - 1) / GRAIN), n, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const uint32_t bits = static_cast<uint32_t>(x[i]) << 16;  // bf16 is float32's upper half
      float value;
      std::memcpy(&value, &bits, 4);
      acc[i] = overwrite ? value : acc[i] + value;
    }
  });
}

// bf16 elements of B [n, k] packed.
int64_t fdiv_bf16_packed_elements(int64_t n, int64_t k) { return ((n + NR - 1) / NR) * panel_elements(k); }

void fdiv_bf16_pack(const void* b, int64_t ldb, int64_t n, int64_t k, void* out, int threads) {
  pack_panels(static_cast<const uint16_t*>(b), ldb, n, k, static_cast<uint16_t*>(out), threads);
}

// C [m, n] (float32, row stride ldc) = A [m, k] (bf16, row stride lda) @ B^T + bias (float32 [n] or null),
// B packed by fdiv_bf16_pack. Call only where fdiv_bf16_gemm_supported().
void fdiv_bf16_gemm(const void* a, int64_t lda, const void* packed, int64_t m, int64_t n, int64_t k,
                    const float* bias, float* c, int64_t ldc, int threads) {
#if FDIV_HAVE_BF16_GEMM
  gemm(static_cast<const uint16_t*>(a), lda, static_cast<const uint16_t*>(packed), m, n, k, bias, c, ldc, threads);
#endif
}

}  // extern "C"
