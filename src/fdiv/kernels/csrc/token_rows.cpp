// fdiv's CPU row kernel for the logits-level token loss (see fdiv/kernels/cpu_kernel.py).
//
// One row of [N, V] logits at a time, fp32 math whatever the input dtype, vectorised with
// ATen's Vectorized<float> (SLEEF exp / log / log1p / expm1 on AVX2 and AVX-512):
//   pass 1: the scaled rows z/T into a row workspace, their maxima and whether -inf occurs;
//   pass 2: e = exp(z/T - max) kept in the workspace, the two log-normalisers (the only exp
//           per element and row that p and q need: p = e / sum);
//   pass 3: a = log p, b = log q, p, q, the generator's pointwise forms and (only for a row
//           holding -inf) the zero-probability limits; the row value and the sums of the gradients
//           accumulated in double; grad_b and q kept in the workspace;
//   pass 4: the softmax chain rule (g - prob * sum g) * w / T, written in the input dtype.
// The forms mirror the Triton kernel's forms functions (fdiv/kernels/triton_kernel.py)
// term for term; `form` selects one by index (FORM_NAMES in cpu_kernel.py).

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t L = Vec::size();
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr float POS_INF = std::numeric_limits<float>::infinity();
constexpr int64_t FLUSH = 64;  // tiles per float accumulator before it is added to a double

enum Form {
  FORWARD_KL = 0, REVERSE_KL, JS, SKEW_FORWARD_KL, SKEW_REVERSE_KL, TV, HELLINGER,
  PEARSON_CHI2, NEYMAN_CHI2, JEFFREYS, TRIANGULAR, ALPHA
};

// For the family forms and their heavier helpers, forced into each family's loop: left to the compiler
// some stayed calls per tile, passing their vectors through memory.
#define FDIV_INLINE inline __attribute__((always_inline))

inline Vec where(const Vec& mask, const Vec& yes, const Vec& no) { return Vec::blendv(no, yes, mask); }
inline Vec vmax(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
inline Vec sign(const Vec& x) {
  const Vec zero(0.f);
  return where(x > zero, Vec(1.f), where(x < zero, Vec(-1.f), zero));
}
// Whether every lane of a comparison mask is set.
inline bool all_lanes(const Vec& mask) { return mask.zero_mask() == 0; }

// log x: SLEEF's 3.5-ulp version where ATen's vector type has one (ATen's log is the 1-ulp,
// double-float one, about twice the cost); the caller needs a few ulp.
inline Vec fast_log(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(Sleef_logf16_u35(x));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vec(Sleef_logf8_u35(x));
#else
  return x.log();
#endif
}

// e^x - 1 to a few ulp, cheaper than SLEEF's double-float expm1: a Taylor polynomial (to x^8 / 8!)
// where |x| < 1/2, e^x - 1 elsewhere (|e^x - 1| > 0.39 there: no cancellation), with ATen's 20-ulp
// exp (1.2e-6 relative; the kernel's rows and gradients against float64 did not move, and JS,
// Hellinger, alpha, triangular took 17-27 % less time than with the 1-ulp one).
inline Vec fast_expm1(const Vec& x) {
  static constexpr float c[8] = {1.f, 1.f / 2, 1.f / 6, 1.f / 24, 1.f / 120, 1.f / 720, 1.f / 5040, 1.f / 40320};
  Vec small = x.abs() < Vec(0.5f);
  Vec xs = where(small, x, Vec(0.f));
  Vec poly(c[7]);
  for (int i = 6; i >= 0; --i) poly = at::vec::fmadd(poly, xs, Vec(c[i]));
  if (all_lanes(small)) return xs * poly;
  return where(small, xs * poly, x.exp_u20() - Vec(1.f));
}

// log(1 + y) to a few ulp, cheaper than SLEEF's double-float log1p. `bounded` (the caller knows
// -1/2 <= y <= 1 in every lane): 2 atanh(s), s = y / (2 + y), as an odd series (to s^15, |s| <= 1/3).
// Otherwise log(u) + (y - (u - 1)) / u with u = 1 + y rounded: u - 1 is exact and the second term
// restores what the rounding of u lost (y itself where u == 1). Chosen per call, not per tile: a
// per-tile test mispredicted on mixed tiles and blending both cost skew KL 15 % of its time.
inline Vec fast_log1p(const Vec& y, bool bounded) {
  const Vec one(1.f);
  if (bounded) {
    static constexpr float c[8] = {2.f, 2.f / 3, 2.f / 5, 2.f / 7, 2.f / 9, 2.f / 11, 2.f / 13, 2.f / 15};
    Vec s = y / (Vec(2.f) + y);
    Vec s2 = s * s;
    Vec poly(c[7]);
    for (int i = 6; i >= 0; --i) poly = at::vec::fmadd(poly, s2, Vec(c[i]));
    return s * poly;
  }
  Vec u = one + y;
  return fast_log(u) + (y - (u - one)) / u;
}

// Whether any lane of x is below t.
inline bool any_below(const Vec& x, float t) { return !all_lanes(x >= Vec(t)); }
// Below this probability p / q or q / p may leave the float range: such tiles take log-space forms.
constexpr float DIRECT_MIN = 1e-30f;

// p - q = -sign(d) max(p, q) expm1(-|d|), d = a - b: relative precision of d, no cancellation.
inline Vec signed_gap(const Vec& d, const Vec& p, const Vec& q) {
  Vec big = where(d > Vec(0.f), p, q);
  return (sign(d) * big * fast_expm1(d.abs().neg())).neg();
}

// log|e^a - e^b| without forming e^a or e^b; -inf where a == b
inline Vec log_abs_diff_exp(const Vec& a, const Vec& b) {
  Vec gap = (a - b).abs().neg();
  return vmax(a, b) + (fast_expm1(gap).neg()).log();
}
// w expm1(c d) / c with w = e^log_w: one expm1 per lane. Where c d > 80 (expm1 would overflow
// before the product with a small w does) the same expm1 gives e^(log_w + c d) - 1 instead.
inline Vec weighted_expm1(const Vec& log_w, const Vec& w, const Vec& d, float c) {
  Vec x = d * Vec(c);
  Vec far = x > Vec(80.f);
  Vec m = fast_expm1(where(far, log_w + x, x));
  return where(far, m + Vec(1.f) - w, w * m) / Vec(c);
}

// (log m - a, log m - b) for m = w p + (1 - w) q: one log1p(y), y = weight * expm1(x), per lane, the
// branch whose argument is bounded by 1 (threshold = log(1 - w) - log w); x, y and the branch are
// kept for exp_neg_lb.
struct Mixture { Vec la, lb, x, y, q_dominates; };
inline Mixture mixture_offsets(const Vec& a, const Vec& b, float w, float one_minus_w, float threshold) {
  Vec d = a - b;
  Vec q_dominates = d <= Vec(threshold);
  Vec x = fast_expm1(where(q_dominates, d, d.neg()));
  Vec y = where(q_dominates, Vec(w), Vec(one_minus_w)) * x;
  Vec t = fast_log1p(y, w == 0.5f);  // y in (-max(w, 1 - w), |1 - 2w|]: inside [-1/2, 1] for w = 1/2 only
  return {where(q_dominates, t - d, t), where(q_dominates, t, t + d), x, y, q_dominates};
}
// e^(-lb) = q / m from the offsets' own x and y: 1 / (1 + y) where q dominates, else e^(-d) / (1 + y)
// with e^(-d) = 1 + x. No further exp.
inline Vec exp_neg_lb(const Mixture& m) {
  Vec inv = Vec(1.f) / (Vec(1.f) + m.y);
  return where(m.q_dominates, inv, (Vec(1.f) + m.x) * inv);
}

// w (e^x - 1 - x) >= 0 without cancellation, w_ex = w e^x given: a Taylor series where |x| < 1/2,
// else (w_ex - w) - w x. The cancellation-free row terms of the KL families (their values minus
// f'(1) (p - q), which sums to 0 over a row), as FDivergence._row_terms on the torch paths.
FDIV_INLINE Vec weighted_phi(const Vec& w, const Vec& x, const Vec& w_ex) {
  // 1/(k + 2)! for k = 0..7: the series of (e^x - 1 - x) / x^2, to float precision for |x| < 1/2
  static constexpr float c[8] = {1.f / 2, 1.f / 6, 1.f / 24, 1.f / 120, 1.f / 720, 1.f / 5040, 1.f / 40320,
                                 1.f / 362880};
  Vec small = x.abs() < Vec(0.5f);
  Vec xs = where(small, x, Vec(0.f));
  Vec series(c[7]);
  for (int i = 6; i >= 0; --i) series = at::vec::fmadd(series, xs, Vec(c[i]));
  return where(small, w * xs * xs * series, (w_ex - w) - w * x);
}

struct Consts { float c[6]; };

// KL(P || w P + (1 - w) Q) of one tile: the value -p la summed as the row term p phi(la) (p e^la = m),
// grad_a = -p la - grad_b, grad_b = c p e^(-lb) (c = -(1 - w)).
FDIV_INLINE void skew_forward_forms(const Vec& a, const Vec& b, const Vec& p, const Vec& q, float w, float one_minus_w,
                               float threshold, float c, Vec& value, Vec& ga, Vec& gb) {
  Mixture m = mixture_offsets(a, b, w, one_minus_w, threshold);
  gb = Vec(c) * p * exp_neg_lb(m);
  ga = (p * m.la).neg() - gb;
  value = weighted_phi(p, m.la, Vec(w) * p + Vec(one_minus_w) * q);
}

// (value, grad_a, grad_b) of one tile for finite a = log p, b = log q (p = e^a, q = e^b given).
template <int form>
FDIV_INLINE void forms(const Vec& a, const Vec& b, const Vec& p, const Vec& q, const Consts& k,
                  Vec& value, Vec& ga, Vec& gb) {
  const Vec half(0.5f), one(1.f), two(2.f);
  switch (form) {
    case FORWARD_KL: {
      // row term p (e^(b - a) - 1 - (b - a)) = p (a - b) - (p - q)
      Vec d = a - b;
      value = weighted_phi(p, d.neg(), q); ga = p * (d + one); gb = p.neg();
      break;
    }
    case REVERSE_KL: {
      Vec d = b - a;
      value = weighted_phi(q, d.neg(), p); ga = q.neg(); gb = q * (d + one);
      break;
    }
    case JS: {
      Mixture m = mixture_offsets(a, b, k.c[0], k.c[1], k.c[2]);
      ga = Vec(k.c[3]) * p * m.la;
      gb = Vec(k.c[4]) * q * m.lb;
      value = ga + gb;
      break;
    }
    case SKEW_FORWARD_KL:
      skew_forward_forms(a, b, p, q, k.c[0], k.c[1], k.c[2], k.c[3], value, ga, gb);
      break;
    case SKEW_REVERSE_KL:
      // KL(Q || alpha Q + (1 - alpha) P) is the forward form with the roles swapped: weight c1 = alpha
      // on q, the threshold negated, the gradients exchanged
      skew_forward_forms(b, a, q, p, k.c[1], k.c[0], -k.c[2], k.c[3], value, gb, ga);
      break;
    case TV: {
      Vec s = sign(a - b);
      value = half * (p - q).abs(); ga = half * p * s; gb = (half * q * s).neg();
      break;
    }
    case HELLINGER: {
      // sqrt p - sqrt q = -sign(a - b) sqrt(max(p, q)) expm1(-|a - b| / 2): one expm1, no cancellation
      // (the same values as the log-space forms of the torch / Triton paths, from p and q)
      Vec d = a - b;
      Vec big = where(d > Vec(0.f), p, q);
      Vec gap = (sign(d) * big.sqrt() * fast_expm1(half * d.abs().neg())).neg();
      value = half * gap * gap;
      ga = half * p.sqrt() * gap;
      gb = (half * q.sqrt() * gap).neg();
      break;
    }
    case PEARSON_CHI2: {
      // (p - q)^2 / q from the signed gap (one expm1); a tile where q < DIRECT_MIN (the ratio could
      // leave the float range) takes the log-space forms
      if (any_below(q, DIRECT_MIN)) {
        Vec log_gap = log_abs_diff_exp(a, b);
        value = (two * log_gap - b).exp();
        ga = two * sign(a - b) * (a + log_gap - b).exp();
        gb = q - (two * a - b).exp();
      } else {
        Vec diff = signed_gap(a - b, p, q);
        Vec r = diff / q;
        value = diff * r; ga = two * p * r; gb = (r * (p + q)).neg();
      }
      break;
    }
    case NEYMAN_CHI2: {
      if (any_below(p, DIRECT_MIN)) {
        Vec log_gap = log_abs_diff_exp(a, b);
        Vec ratio = (two * b - a).exp();
        value = (two * log_gap - a).exp(); ga = p - ratio; gb = two * (ratio - q);
      } else {
        Vec diff = signed_gap(a - b, p, q);
        Vec r = diff / p;
        value = diff * r; ga = r * (p + q); gb = (two * q * r).neg();
      }
      break;
    }
    case JEFFREYS: {
      Vec d = a - b;
      value = (p - q) * d; ga = p * (d + one) - q; gb = q * (one - d) - p;
      break;
    }
    case TRIANGULAR: {
      // p - q = -sign(a - b) max(p, q) expm1(-|a - b|): one expm1; (p - q)^2 / (p + q) and its
      // derivatives p (p - q)(p + 3q) / (p + q)^2, -q (p - q)(3p + q) / (p + q)^2; 0 where p + q underflows
      Vec d = a - b;
      Vec diff = signed_gap(d, p, q);
      Vec total = p + q;
      Vec empty = total == Vec(0.f);
      Vec safe = where(empty, Vec(1.f), total);
      Vec ratio = diff / safe;
      value = where(empty, Vec(0.f), diff * ratio);
      Vec three(3.f);
      ga = where(empty, Vec(0.f), p * ratio * (p + three * q) / safe);
      gb = where(empty, Vec(0.f), (q * ratio * (three * p + q) / safe).neg());
      break;
    }
    case ALPHA: {
      Vec d = a - b;
      ga = weighted_expm1(a, p, d, k.c[0]);
      gb = weighted_expm1(b, q, d, k.c[1]).neg();
      Vec inf(POS_INF);
      Vec overflow = (ga.abs() == inf) | (gb.abs() == inf);
      value = where(overflow, inf, ga + gb);
      break;
    }
    default:
      value = ga = gb = Vec(std::numeric_limits<float>::quiet_NaN());
  }
}

struct Params {
  int form, swap, standardize;
  float inv_temp, f0, fpinf, slope;
  // the KL families' values are row terms (value - s (p - q), s = row_term_slope in _forms.py):
  // standardisation subtracts value_slope = slope - s, the value limits at p = 0 / q = 0 take limit_shift
  float value_slope, limit_shift;
  Consts k;
};

// The template around the forms: zero-probability limits, standardisation, contract 2
// (an infinite value or gradient contributes 0 to the gradient). Mirrors triton's _row_forms.
// MASKED = false: no -inf in either row (the limits are skipped); GUARD = false: a family whose
// values and gradients are finite for finite inputs (contract 2 cannot trigger).
template <int form, bool MASKED, bool GUARD>
FDIV_INLINE void row_forms(const Params& P, const Vec& a, const Vec& b, const Vec& p, const Vec& q, Vec& value, Vec& ga,
                      Vec& gb) {
  const Vec ninf(NEG_INF), inf(POS_INF), zero(0.f);
  if (!MASKED) {
    if (P.swap) {
      forms<form>(b, a, q, p, P.k, value, gb, ga);
    } else {
      forms<form>(a, b, p, q, P.k, value, ga, gb);
    }
    if (P.standardize) {
      Vec slope(P.slope);
      value = value - Vec(P.value_slope) * (p - q);
      ga = ga - slope * p;
      gb = gb + slope * q;
    }
    if (GUARD) {
      Vec undefined = (value == inf) | (ga.abs() == inf) | (gb.abs() == inf);
      ga = where(undefined, zero, ga);
      gb = where(undefined, zero, gb);
    }
    return;
  }
  Vec p_zero = a == ninf;
  Vec q_zero = b == ninf;
  Vec any_zero = p_zero | q_zero;
  Vec a0 = where(any_zero, zero, a);
  Vec b0 = where(any_zero, zero, b);
  if (P.swap) {
    forms<form>(b0, a0, q, p, P.k, value, gb, ga);
  } else {
    forms<form>(a0, b0, p, q, P.k, value, ga, gb);
  }
  if (P.standardize) {
    Vec slope(P.slope);
    value = value - Vec(P.value_slope) * (p - q);
    ga = ga - slope * p;
    gb = gb + slope * q;
  }
  Vec at_p_zero = q * Vec(P.f0);
  at_p_zero = where(at_p_zero != at_p_zero, inf, at_p_zero);
  Vec at_q_zero = p * Vec(P.fpinf);
  at_q_zero = where(at_q_zero != at_q_zero, inf, at_q_zero);
  Vec only_p_zero = p_zero & (b != ninf);
  Vec only_q_zero = q_zero & (a != ninf);
  Vec both_zero = p_zero & q_zero;
  const Vec shift(P.limit_shift);  // the limits of the row terms (the gradients keep the plain limits)
  value = where(only_p_zero, at_p_zero + shift * q, where(only_q_zero, at_q_zero - shift * p, value));
  value = where(both_zero, zero, value);
  ga = where(only_q_zero, at_q_zero, ga);
  gb = where(only_p_zero, at_p_zero, gb);
  Vec undefined = both_zero | (value == inf) | (ga.abs() == inf) | (gb.abs() == inf);
  ga = where(undefined | only_p_zero, zero, ga);
  gb = where(undefined | only_q_zero, zero, gb);
}

// Calls visit(std::integral_constant<int, F>{}) for the runtime family id: the one place a
// family number becomes a template argument.
template <typename Visitor>
decltype(auto) with_form(int form, Visitor&& visit) {
  switch (form) {
    case FORWARD_KL: return visit(std::integral_constant<int, FORWARD_KL>{});
    case REVERSE_KL: return visit(std::integral_constant<int, REVERSE_KL>{});
    case JS: return visit(std::integral_constant<int, JS>{});
    case SKEW_FORWARD_KL: return visit(std::integral_constant<int, SKEW_FORWARD_KL>{});
    case SKEW_REVERSE_KL: return visit(std::integral_constant<int, SKEW_REVERSE_KL>{});
    case TV: return visit(std::integral_constant<int, TV>{});
    case HELLINGER: return visit(std::integral_constant<int, HELLINGER>{});
    case PEARSON_CHI2: return visit(std::integral_constant<int, PEARSON_CHI2>{});
    case NEYMAN_CHI2: return visit(std::integral_constant<int, NEYMAN_CHI2>{});
    case JEFFREYS: return visit(std::integral_constant<int, JEFFREYS>{});
    case TRIANGULAR: return visit(std::integral_constant<int, TRIANGULAR>{});
    default: return visit(std::integral_constant<int, ALPHA>{});
  }
}

// Calls visit(T{}) with the element type of a dtype code: 0 float32, 1 bfloat16, 2 float16.
template <typename Visitor>
decltype(auto) with_dtype(int dtype, Visitor&& visit) {
  switch (dtype) {
    case 0: return visit(float{});
    case 1: return visit(c10::BFloat16{});
    default: return visit(c10::Half{});
  }
}

void row_forms_masked(const Params& P, const Vec& a, const Vec& b, const Vec& p, const Vec& q, Vec& value, Vec& ga,
                      Vec& gb) {
  with_form(P.form, [&](auto f) { row_forms<decltype(f)::value, true, true>(P, a, b, p, q, value, ga, gb); });
}

// A row sum accumulated lane-wise in float and flushed into a double every FLUSH tiles.
struct RowSum {
  double total = 0.0;
  Vec acc = Vec(0.f);
  int64_t tiles = 0;
  void add(const Vec& v) {
    acc = acc + v;
    if (++tiles == FLUSH) flush();
  }
  void flush();
  double done() { flush(); return total; }
};

inline double hsum(const Vec& v) {
  float buf[L];
  v.store(buf);
  double s = 0.0;
  for (int64_t i = 0; i < L; ++i) s += buf[i];
  return s;
}

void RowSum::flush() {
  total += hsum(acc);
  acc = Vec(0.f);
  tiles = 0;
}

inline float hmax(const Vec& v) {
  float buf[L];
  v.store(buf);
  float m = buf[0];
  for (int64_t i = 1; i < L; ++i) m = std::max(m, buf[i]);
  return m;
}

// dtype codes: 0 float32, 1 bfloat16, 2 float16. Loads one row scaled by 1/T into dst (padding
// -inf) and returns its maximum; lo is its minimum (-inf where a real entry is -inf).
template <typename T>
float load_scaled(const T* src, float* dst, int64_t V, int64_t Vpad, float inv_temp, float& lo) {
  const Vec scale(inv_temp), ninf(NEG_INF);
  Vec mx(NEG_INF), mn(POS_INF);
  int64_t j = 0;
  for (; j + L <= V; j += L) {
    Vec x;
    if constexpr (std::is_same_v<T, float>) {
      x = Vec::loadu(src + j) * scale;
    } else {
      float tmp[L];
      for (int64_t i = 0; i < L; ++i) tmp[i] = static_cast<float>(src[j + i]);
      x = Vec::loadu(tmp) * scale;
    }
    x.store(dst + j);
    mx = vmax(mx, x);
    mn = at::vec::minimum(mn, x);
  }
  float m = hmax(mx);
  lo = -hmax(mn.neg());
  for (; j < V; ++j) {
    const float x = static_cast<float>(src[j]) * inv_temp;
    dst[j] = x;
    m = std::max(m, x);
    lo = std::min(lo, x);
  }
  for (; j < Vpad; ++j) dst[j] = NEG_INF;
  return m;
}

float load_row(const void* base, int dtype, int64_t offset, float* dst, int64_t V, int64_t Vpad, float inv_temp,
               float& lo) {
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return load_scaled(static_cast<const T*>(base) + offset, dst, V, Vpad, inv_temp, lo);
  });
}

template <typename T>
void store_chain(T* out, const float* g, const float* prob, double grad_sum, float scale, int64_t V) {
  const float s = static_cast<float>(grad_sum);
  if constexpr (std::is_same_v<T, float>) {
    const Vec vs(s), vscale(scale);
    int64_t j = 0;
    for (; j + L <= V; j += L) {
      ((Vec::loadu(g + j) - Vec::loadu(prob + j) * vs) * vscale).store(out + j);
    }
    for (; j < V; ++j) out[j] = (g[j] - prob[j] * s) * scale;
  } else {
    for (int64_t j = 0; j < V; ++j) out[j] = static_cast<T>((g[j] - prob[j] * s) * scale);
  }
}

void store_row(void* base, int dtype, int64_t offset, const float* g, const float* prob, double grad_sum, float scale,
               int64_t V) {
  with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    store_chain(static_cast<T*>(base) + offset, g, prob, grad_sum, scale, V);
  });
}

void zero_row(void* base, int dtype, int64_t offset, int64_t V) {
  const int64_t size = dtype == 0 ? 4 : 2;
  std::memset(static_cast<char*>(base) + offset * size, 0, static_cast<size_t>(V * size));
}

// (max, log sum exp(x - max)) of a padded row (padding -inf): log p = (x - max) - log_sum, in
// two roundings as log_softmax does (forming max + log_sum first would shift every entry of
// the row by the rounding of their sum). An all -inf row gives (-inf, NaN): not a distribution.
struct Normaliser { float max, log_sum, inv_sum; };

// Pass 2: e = exp(x - max) into `e` (so that p = e / sum needs no second exp), and the normaliser.
Normaliser row_normaliser(const float* x, float* e, int64_t Vpad, float mx) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (!std::isfinite(mx)) {
    std::fill(e, e + Vpad, nan);
    return {mx, nan, nan};
  }
  const Vec shift(mx);
  RowSum sum;
  for (int64_t j = 0; j < Vpad; j += L) {
    Vec ej = (Vec::loadu(x + j) - shift).exp();
    ej.store(e + j);
    sum.add(ej);
  }
  const double total = sum.done();
  return {mx, static_cast<float>(std::log(total)), static_cast<float>(1.0 / total)};
}

struct Job {
  const void* S; const void* T; void* GS; void* GT; float* rows; const float* W;
  float* ranges;  // null, or per row (max, min) of the scaled student then teacher logits (every row)
  int64_t n, V, stride_s, stride_t, stride_gs, stride_gt;
  int dtype_s, dtype_t, dtype_gs, dtype_gt, student_grad, teacher_grad, guard;
  Params P;
};

struct Sums { double value, b, a; };

// Pass 3 over one row: forms, sums; grad_b and q replace xs and es (grad_a and p replace xt and et).
template <int form, bool MASKED, bool GUARD, bool TGRAD>
Sums forms_pass(const Params& P, float* xs, float* xt, float* es, float* et, int64_t Vpad, const Normaliser& ns,
                const Normaliser& nt) {
  const Vec max_s(ns.max), log_sum_s(ns.log_sum), max_t(nt.max), log_sum_t(nt.log_sum);
  const Vec inv_s(ns.inv_sum), inv_t(nt.inv_sum);
  RowSum value_sum, sum_b, sum_a;
  for (int64_t j = 0; j < Vpad; j += L) {
    Vec a = (Vec::loadu(xt + j) - max_t) - log_sum_t;
    Vec b = (Vec::loadu(xs + j) - max_s) - log_sum_s;
    Vec p = Vec::loadu(et + j) * inv_t;
    Vec q = Vec::loadu(es + j) * inv_s;
    Vec value, ga, gb;
    row_forms<form, MASKED, GUARD>(P, a, b, p, q, value, ga, gb);
    if (!MASKED && j + L > Vpad - L) {  // the padded tail of the last tile (a = b = -inf) counts 0
      // (the unmasked forms never see -inf otherwise; padding lanes are exactly where p = q = 0)
      Vec pad = (p == Vec(0.f)) & (q == Vec(0.f)) & (a == Vec(NEG_INF));
      value = where(pad, Vec(0.f), value);
      ga = where(pad, Vec(0.f), ga);
      gb = where(pad, Vec(0.f), gb);
    }
    value_sum.add(value);
    sum_b.add(gb);
    gb.store(xs + j);
    q.store(es + j);
    if (TGRAD) {
      sum_a.add(ga);
      ga.store(xt + j);
      p.store(et + j);
    }
  }
  return Sums{value_sum.done(), sum_b.done(), sum_a.done()};
}

using FormsPass = Sums (*)(const Params&, float*, float*, float*, float*, int64_t, const Normaliser&,
                           const Normaliser&);

template <int form>
FormsPass pick(bool masked, bool guard, bool tgrad) {
  if (masked) return tgrad ? forms_pass<form, true, true, true> : forms_pass<form, true, true, false>;
  if (guard) return tgrad ? forms_pass<form, false, true, true> : forms_pass<form, false, true, false>;
  return tgrad ? forms_pass<form, false, false, true> : forms_pass<form, false, false, false>;
}

FormsPass pick_forms(int form, bool masked, bool guard, bool tgrad) {
  return with_form(form, [&](auto f) { return pick<decltype(f)::value>(masked, guard, tgrad); });
}

#if FDIV_PART != 2  // the dense rows (one of two parallel builds; both when FDIV_PART is unset)
void run_rows(const Job& J, int64_t begin, int64_t end) {
  const int64_t V = J.V;
  const int64_t Vpad = (V + L - 1) / L * L;
  const bool tgrad = J.teacher_grad != 0, sgrad = J.student_grad != 0;
  std::vector<float> work(static_cast<size_t>(Vpad) * 4);
  float* xs = work.data();  // scaled student row, then grad_b
  float* xt = xs + Vpad;    // scaled teacher row, then grad_a
  float* es = xt + Vpad;    // exp(student - max), then q
  float* et = es + Vpad;    // exp(teacher - max), then p
  const FormsPass plain = pick_forms(J.P.form, false, J.guard != 0, tgrad);
  const FormsPass masked = pick_forms(J.P.form, true, true, tgrad);
  for (int64_t i = begin; i < end; ++i) {
    const float w = J.W[i];
    if (w == 0.f) {
      J.rows[i] = 0.f;
      if (J.ranges) {  // the input check covers uncounted rows too: their extremes without the forms
        float* r = J.ranges + 4 * i;
        r[0] = load_row(J.S, J.dtype_s, i * J.stride_s, xs, V, Vpad, J.P.inv_temp, r[1]);
        r[2] = load_row(J.T, J.dtype_t, i * J.stride_t, xt, V, Vpad, J.P.inv_temp, r[3]);
      }
      if (sgrad) zero_row(J.GS, J.dtype_gs, i * J.stride_gs, V);
      if (tgrad) zero_row(J.GT, J.dtype_gt, i * J.stride_gt, V);
      continue;
    }
    float min_s, min_t;
    const float max_s = load_row(J.S, J.dtype_s, i * J.stride_s, xs, V, Vpad, J.P.inv_temp, min_s);
    const float max_t = load_row(J.T, J.dtype_t, i * J.stride_t, xt, V, Vpad, J.P.inv_temp, min_t);
    if (J.ranges) {
      float* r = J.ranges + 4 * i;
      r[0] = max_s; r[1] = min_s; r[2] = max_t; r[3] = min_t;
    }
    const bool inf_s = min_s == NEG_INF, inf_t = min_t == NEG_INF;
    const Normaliser ns = row_normaliser(xs, es, Vpad, max_s), nt = row_normaliser(xt, et, Vpad, max_t);
    const FormsPass pass = (inf_s || inf_t) ? masked : plain;
    const Sums sums = pass(J.P, xs, xt, es, et, Vpad, ns, nt);
    const float row = static_cast<float>(sums.value);
    J.rows[i] = row < 0.f ? 0.f : row;  // the lower bound 0 (contract 3); NaN stays NaN
    const float scale = J.P.inv_temp * w;
    if (sgrad) store_row(J.GS, J.dtype_gs, i * J.stride_gs, xs, es, sums.b, scale, V);
    if (tgrad) store_row(J.GT, J.dtype_gt, i * J.stride_gt, xt, et, sums.a, scale, V);
  }
}

#endif

#if FDIV_PART != 1  // the top-k and vocabulary-parallel rows
// ---- sparse top-k teacher, tail bucket: k + 1 outcomes (the top-k ids and the rest).
struct TopkJob {
  const void* S; const int64_t* idx; const float* A; const float* a_tail; void* GS; float* rows; const float* W;
  int64_t n, V, K, stride_s, stride_gs;
  int dtype_s, drop_noise_tail;
  float noise;
  Params P;
};

template <typename T>
void store_scaled(T* out, const float* e, float c, int64_t V) {
  if constexpr (std::is_same_v<T, float>) {
    const Vec vc(c);
    int64_t j = 0;
    for (; j + L <= V; j += L) (Vec::loadu(e + j) * vc).store(out + j);
    for (; j < V; ++j) out[j] = e[j] * c;
  } else {
    for (int64_t j = 0; j < V; ++j) out[j] = static_cast<T>(e[j] * c);
  }
}

void run_topk_rows(const TopkJob& J, int64_t begin, int64_t end) {
  const int64_t V = J.V, K = J.K;
  const int64_t Vpad = (V + L - 1) / L * L;
  const int64_t Kpad = (K + 1 + L - 1) / L * L;  // the k outcomes and the tail, padded
  std::vector<float> work(static_cast<size_t>(Vpad) * 2 + static_cast<size_t>(Kpad) * 4);
  float* x = work.data();   // scaled student row
  float* e = x + Vpad;      // exp(x - max): zeroed at the top-k ids, then the tail's share
  float* av = e + Vpad;     // teacher log-probabilities of the k + 1 outcomes
  float* bv = av + Kpad;    // student log-probabilities of the k + 1 outcomes
  float* qv = bv + Kpad;
  float* gv = qv + Kpad;    // d value / d b of each outcome
  for (int64_t i = begin; i < end; ++i) {
    const float w = J.W[i];
    const int64_t so = i * J.stride_gs;
    if (w == 0.f) {
      J.rows[i] = 0.f;
      zero_row(J.GS, J.dtype_s, so, V);
      continue;
    }
    float lo;
    const float mx = load_row(J.S, J.dtype_s, i * J.stride_s, x, V, Vpad, J.P.inv_temp, lo);
    const bool has_neg_inf = lo == NEG_INF;
    const Normaliser nz = row_normaliser(x, e, Vpad, mx);
    const int64_t* ids = J.idx + i * K;
    const float* a = J.A + i * K;
    bool ids_ok = true;
    for (int64_t k = 0; k < K; ++k) ids_ok = ids_ok && ids[k] >= 0 && ids[k] < V;
    if (!ids_ok) {  // unchecked ids out of range: NaN, never a read or write outside the row
      J.rows[i] = std::numeric_limits<float>::quiet_NaN();
      zero_row(J.GS, J.dtype_s, so, V);
      continue;
    }
    // the top-k outcomes; their e leaves the tail sum (summed directly: no cancellation)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t id = ids[k];
      av[k] = a[k];
      bv[k] = (x[id] - nz.max) - nz.log_sum;
      qv[k] = e[id] * nz.inv_sum;
      e[id] = 0.f;
    }
    RowSum tail_sum;
    for (int64_t j = 0; j < Vpad; j += L) tail_sum.add(Vec::loadu(e + j));
    const double tail_e = tail_sum.done();
    // the tail's log-mass; if it underflows relative to the row max, redo it relative to its own max
    float share_scale;  // grad_v = e_v * (g_tail * share_scale - q_scale * S) / T for v outside the top-k
    float q_scale;
    float b_tail;
    if (tail_e > 1e-30 || !std::isfinite(nz.max)) {
      b_tail = static_cast<float>(std::log(tail_e)) - nz.log_sum;
      share_scale = static_cast<float>(1.0 / tail_e);
      q_scale = nz.inv_sum;
    } else {  // the outside mass underflows relative to the row max: redo it relative to its own max
      std::vector<char> top(static_cast<size_t>(V), 0);
      for (int64_t k = 0; k < K; ++k) top[ids[k]] = 1;
      float m_out = NEG_INF;
      for (int64_t j = 0; j < V; ++j) if (!top[j]) m_out = std::max(m_out, x[j]);
      double sum_out = 0.0;
      for (int64_t j = 0; j < V; ++j) {
        const float v = (top[j] || m_out == NEG_INF) ? 0.f : std::exp(x[j] - m_out);
        e[j] = v;
        sum_out += v;
      }
      if (sum_out > 0.0) {
        b_tail = (m_out - nz.max) + static_cast<float>(std::log(sum_out)) - nz.log_sum;
        share_scale = static_cast<float>(1.0 / sum_out);
        q_scale = std::exp(m_out - nz.max) * nz.inv_sum;  // may underflow to 0: q_v is then 0
      } else {  // no outside entry with positive probability: an empty student tail
        b_tail = NEG_INF;
        share_scale = 0.f;
        q_scale = 0.f;
      }
    }
    float a_tail = J.a_tail[i];
    if (J.drop_noise_tail && b_tail == NEG_INF && a_tail <= J.noise) a_tail = NEG_INF;
    av[K] = a_tail;
    bv[K] = b_tail;
    qv[K] = std::exp(b_tail);
    for (int64_t k = K + 1; k < Kpad; ++k) { av[k] = NEG_INF; bv[k] = NEG_INF; qv[k] = 0.f; }
    double value_sum = 0.0, grad_sum = 0.0;
    for (int64_t k = 0; k < Kpad; k += L) {
      Vec va = Vec::loadu(av + k), vb = Vec::loadu(bv + k);
      Vec vp = va.exp(), vq = Vec::loadu(qv + k);
      Vec value, ga, gb;
      row_forms_masked(J.P, va, vb, vp, vq, value, ga, gb);
      gb.store(gv + k);
      value_sum += hsum(value);
      grad_sum += hsum(gb);
    }
    const float row = static_cast<float>(value_sum);
    J.rows[i] = row < 0.f ? 0.f : row;
    const float scale = J.P.inv_temp * w;
    const float S = static_cast<float>(grad_sum);
    const float c = (gv[K] * share_scale - q_scale * S) * scale;
    with_dtype(J.dtype_s, [&](auto t) {
      using T = decltype(t);
      T* out = static_cast<T*>(J.GS) + so;
      store_scaled(out, e, c, V);
      for (int64_t k = 0; k < K; ++k) out[ids[k]] = static_cast<T>((gv[k] - qv[k] * S) * scale);
    });
  }
}

// ---- vocabulary-parallel shards: the template split at its three all-reduces (the caller reduces
// across ranks between the phases). Rows are [n, V_r] shards; normalisers are global.
struct ShardJob {
  const void* S; const void* T; float* GS; float* GT;  // GS / GT: float32 [n, V_r] buffers
  int64_t n, V, stride_s, stride_t;
  int dtype_s, dtype_t, student_grad, teacher_grad, masked, guard;
  const float* max;      // [2, n] global maxima (phases 2-4)
  const float* log_sum;  // [2, n] global log sum exp(x - max) (phases 3-4)
  const float* sums;     // [2, n] global sum grad_b, sum grad_a (phase 4)
  float* out;            // phase 1: [2, n] local maxima; 2: [2, n] local sums of exp; 3: [3, n] partial sums
  Params P;              // phase 4 scales by P.inv_temp (the row weights are applied by the caller)
};

template <int form, bool MASKED, bool GUARD>
void shard_forms_row(const ShardJob& J, int64_t i, float* xs, float* xt, int64_t Vpad) {
  const Vec max_s(J.max[i]), max_t(J.max[J.n + i]), ls_s(J.log_sum[i]), ls_t(J.log_sum[J.n + i]);
  RowSum value_sum, sum_b, sum_a;
  float* gs = J.student_grad ? J.GS + i * J.V : nullptr;
  float* gt = J.teacher_grad ? J.GT + i * J.V : nullptr;
  for (int64_t j = 0; j < Vpad; j += L) {
    Vec a = (Vec::loadu(xt + j) - max_t) - ls_t;
    Vec b = (Vec::loadu(xs + j) - max_s) - ls_s;
    Vec p = a.exp(), q = b.exp();
    Vec value, ga, gb;
    row_forms<form, MASKED, GUARD>(J.P, a, b, p, q, value, ga, gb);
    const int64_t count = std::min<int64_t>(L, J.V - j);
    if (count < L) {  // padding lanes (a = b = -inf) count 0
      value = Vec::set(Vec(0.f), value, count);
      ga = Vec::set(Vec(0.f), ga, count);
      gb = Vec::set(Vec(0.f), gb, count);
    }
    value_sum.add(value);
    sum_b.add(gb);
    sum_a.add(ga);
    if (gs) gb.store(gs + j, static_cast<int>(count));
    if (gt) ga.store(gt + j, static_cast<int>(count));
  }
  J.out[i] = static_cast<float>(value_sum.done());
  J.out[J.n + i] = static_cast<float>(sum_b.done());
  J.out[2 * J.n + i] = static_cast<float>(sum_a.done());
}

using ShardFormsRow = void (*)(const ShardJob&, int64_t, float*, float*, int64_t);

template <int form>
ShardFormsRow pick_shard(bool masked, bool guard) {
  if (masked) return shard_forms_row<form, true, true>;
  if (guard) return shard_forms_row<form, false, true>;
  return shard_forms_row<form, false, false>;
}

ShardFormsRow pick_shard_forms(int form, bool masked, bool guard) {
  return with_form(form, [&](auto f) { return pick_shard<decltype(f)::value>(masked, guard); });
}

// chain rule in place: g <- (g - exp((x - max) - log_sum) * S) * scale
void shard_chain_row(float* g, const float* x, int64_t V, float mx, float ls, float S, float scale) {
  const Vec vmx(mx), vls(ls), vS(S), vscale(scale);
  int64_t j = 0;
  for (; j + L <= V; j += L) {
    Vec prob = ((Vec::loadu(x + j) - vmx) - vls).exp();
    ((Vec::loadu(g + j) - prob * vS) * vscale).store(g + j);
  }
  for (; j < V; ++j) g[j] = (g[j] - std::exp((x[j] - mx) - ls) * S) * scale;
}

void run_shard(const ShardJob& J, int phase, int64_t begin, int64_t end) {
  const int64_t V = J.V;
  const int64_t Vpad = (V + L - 1) / L * L;
  std::vector<float> work(static_cast<size_t>(Vpad) * 2);
  float* xs = work.data();
  float* xt = xs + Vpad;
  const ShardFormsRow forms_row = phase == 3 ? pick_shard_forms(J.P.form, J.masked != 0, J.guard != 0) : nullptr;
  for (int64_t i = begin; i < end; ++i) {
    float min_s, min_t;
    const float mxs = load_row(J.S, J.dtype_s, i * J.stride_s, xs, V, Vpad, J.P.inv_temp, min_s);
    const float mxt = load_row(J.T, J.dtype_t, i * J.stride_t, xt, V, Vpad, J.P.inv_temp, min_t);
    const bool inf_s = min_s == NEG_INF, inf_t = min_t == NEG_INF;
    if (phase == 1) {
      J.out[i] = mxs;
      J.out[J.n + i] = mxt;
    } else if (phase == 2) {
      for (int side = 0; side < 2; ++side) {
        const float* x = side == 0 ? xs : xt;
        const float m = J.max[side * J.n + i];
        const Vec shift(m == NEG_INF ? 0.f : m);
        RowSum sum;
        for (int64_t j = 0; j < Vpad; j += L) sum.add((Vec::loadu(x + j) - shift).exp());
        J.out[side * J.n + i] = static_cast<float>(sum.done());
      }
    } else if (phase == 3) {
      forms_row(J, i, xs, xt, Vpad);
    } else {
      if (J.student_grad)
        shard_chain_row(J.GS + i * V, xs, V, J.max[i], J.log_sum[i], J.sums[i], J.P.inv_temp);
      if (J.teacher_grad)
        shard_chain_row(J.GT + i * V, xt, V, J.max[J.n + i], J.log_sum[J.n + i], J.sums[J.n + i], J.P.inv_temp);
    }
  }
}

#endif

// Threads for n rows of V entries: at most one per row and per 2^16 entries (a thread costs ~20 us).
int64_t worker_count(int threads, int64_t n, int64_t V) {
  const int64_t by_work = std::max<int64_t>(1, (n * std::max<int64_t>(V, 1)) >> 16);
  return std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(threads), n, by_work}));
}

// run(begin, end) over contiguous slices of the n rows, one per worker.
template <typename Run>
void parallel_rows(int threads, int64_t n, int64_t V, Run run) {
  fdiv_cpu::run_slices(worker_count(threads, n, V), n, run);
}

// The family and its scalars as the Python driver passes them: (1/T, f(0), f'(inf), slope, c0..c5).
Params make_params(int form, int swap, int standardize, const float* scalars) {
  Params P{};
  P.form = form; P.swap = swap; P.standardize = standardize;
  P.inv_temp = scalars[0]; P.f0 = scalars[1]; P.fpinf = scalars[2]; P.slope = scalars[3];
  for (int i = 0; i < 6; ++i) P.k.c[i] = scalars[4 + i];
  const float row_slope = scalars[10];  // fdiv/kernels/_forms.py: row_term_slope
  P.value_slope = standardize ? P.slope - row_slope : 0.f;
  P.limit_shift = standardize ? 0.f : row_slope;  // a wrapper's f(0), f'(inf) are standardised already
  return P;
}

}  // namespace

extern "C" {

#if FDIV_PART != 2
// Returns the lane count of the vector type this library was built for (a load-time check).
int64_t fdiv_vector_lanes() { return L; }

void fdiv_token_rows(const void* S, const void* T, void* GS, void* GT, float* rows, const float* W, float* ranges,
                     int64_t n, int64_t V, int64_t stride_s, int64_t stride_t, int64_t stride_gs, int64_t stride_gt,
                     int dtype_s, int dtype_t, int dtype_gs, int dtype_gt, int student_grad, int teacher_grad,
                     int form, int swap, int standardize, int guard, const float* scalars, int threads) {
  const Job J{S, T, GS, GT, rows, W, ranges, n, V, stride_s, stride_t, stride_gs, stride_gt, dtype_s, dtype_t,
              dtype_gs, dtype_gt, student_grad, teacher_grad, guard, make_params(form, swap, standardize, scalars)};
  parallel_rows(threads, n, V, [&J](int64_t b, int64_t e) { run_rows(J, b, e); });
}
#endif
#if FDIV_PART != 1

void fdiv_topk_rows(const void* S, const int64_t* idx, const float* A, const float* a_tail, void* GS, float* rows,
                    const float* W, int64_t n, int64_t V, int64_t K, int64_t stride_s, int64_t stride_gs, int dtype_s,
                    int form, int swap, int standardize, int drop_noise_tail, float noise, const float* scalars,
                    int threads) {
  const TopkJob J{S, idx, A, a_tail, GS, rows, W, n, V, K, stride_s, stride_gs, dtype_s, drop_noise_tail, noise,
                  make_params(form, swap, standardize, scalars)};
  parallel_rows(threads, n, V, [&J](int64_t b, int64_t e) { run_topk_rows(J, b, e); });
}

void fdiv_shard_phase(int phase, const void* S, const void* T, float* GS, float* GT, int64_t n, int64_t V,
                      int64_t stride_s, int64_t stride_t, int dtype_s, int dtype_t, int student_grad,
                      int teacher_grad, int masked, int form, int swap, int standardize, int guard,
                      const float* scalars, const float* max, const float* log_sum, const float* sums, float* out,
                      int threads) {
  const ShardJob J{S, T, GS, GT, n, V, stride_s, stride_t, dtype_s, dtype_t, student_grad, teacher_grad, masked,
                   guard, max, log_sum, sums, out, make_params(form, swap, standardize, scalars)};
  parallel_rows(threads, n, V, [&J, phase](int64_t b, int64_t e) { run_shard(J, phase, b, e); });
}

#endif
}  // extern "C"
