// Element types, the accumulation type, and the per-element math shared by the kernels:
// loads and stores, the Welford merge, the activations and their derivatives, and the
// walk over a channel's rows. The formulas are docs/math.md's; the Triton kernels
// (bnkernels/backends/triton/kernels.py) compute the same ones in the same order.
#pragma once
#include "bnk_api.h"
#include "portable.cuh"

// Statistics accumulate in float32, float64 for float64 inputs.
template <typename T> struct AccOf { typedef float type; };
template <> struct AccOf<double> { typedef double type; };

BNK_DEVICE float to_acc(float v) { return v; }
BNK_DEVICE double to_acc(double v) { return v; }
BNK_DEVICE float to_acc(__half v) { return __half2float(v); }
BNK_DEVICE float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> BNK_DEVICE T from_acc(float v) { return v; }
template <> BNK_DEVICE __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> BNK_DEVICE __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T> BNK_DEVICE T from_acc(double v) { return v; }

// A per-channel vector's element i, whatever its dtype (AMP keeps float32 parameters
// beside float16 inputs; a .half() model keeps float16 running statistics).
template <typename Acc> BNK_DEVICE Acc load_channel(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case BNK_F16: return to_acc(static_cast<const __half*>(p)[i]);
    case BNK_BF16: return to_acc(static_cast<const __nv_bfloat16*>(p)[i]);
    case BNK_F64: return static_cast<Acc>(static_cast<const double*>(p)[i]);
    default: return static_cast<Acc>(static_cast<const float*>(p)[i]);
  }
}

// Stores v to element i of a per-channel vector of that dtype, rounding once.
template <typename Acc> BNK_DEVICE void store_channel(void* p, int dtype, int64_t i, Acc v) {
  switch (dtype) {
    case BNK_F16: static_cast<__half*>(p)[i] = from_acc<__half>(static_cast<float>(v)); break;
    case BNK_BF16:
      static_cast<__nv_bfloat16*>(p)[i] = from_acc<__nv_bfloat16>(static_cast<float>(v));
      break;
    case BNK_F64: static_cast<double*>(p)[i] = static_cast<double>(v); break;
    default: static_cast<float*>(p)[i] = static_cast<float>(v);
  }
}

// torch.lerp's formula, so the running statistics are those torch's update gives.
template <typename Acc> BNK_DEVICE Acc lerp_acc(Acc a, Acc b, Acc w) {
  return fabs(w) < Acc(0.5) ? a + w * (b - a) : b - (b - a) * (Acc(1) - w);
}

// sqrt, exp and erf of the accumulation type. Without -use_fast_math, sqrtf and the
// division below are correctly rounded, as the Triton kernels' sqrt_rn and division.
BNK_DEVICE float bnk_sqrt(float v) { return sqrtf(v); }
BNK_DEVICE double bnk_sqrt(double v) { return sqrt(v); }
BNK_DEVICE float bnk_exp(float v) { return expf(v); }
BNK_DEVICE double bnk_exp(double v) { return exp(v); }
BNK_DEVICE float bnk_erf(float v) { return erff(v); }
BNK_DEVICE double bnk_erf(double v) { return erf(v); }

// a / b inside the per-element loops. float32: a * rcp(b) (__fdividef, within 2 ulp), since
// the correctly rounded division branches to a slow-path subroutine whose call makes
// ptxas spill the loop's live offsets to local memory (seen on sm_80). float64: exact.
BNK_DEVICE float loop_div(float a, float b) {
#ifdef BNK_EMULATE
  return a * (1.0f / b);
#else
  return __fdividef(a, b);
#endif
}
BNK_DEVICE double loop_div(double a, double b) { return a / b; }

// Knuth's TwoSum: s = a + b rounded, and err, the exact a + b - s (no FMA can fuse it: it
// has no product). The statistics loop keeps K + mean, and the variance with its error,
// to twice the precision.
template <typename Acc> BNK_DEVICE Acc two_sum(Acc a, Acc b, Acc& err) {
  const Acc s = a + b, b_part = s - a;
  err = (a - (s - b_part)) + (b - b_part);
  return s;
}

template <typename Acc> BNK_DEVICE Acc inv_std(Acc var, double eps) {
  return Acc(1) / bnk_sqrt(var + static_cast<Acc>(eps));
}

// A partial of the forward statistics: n values whose mean is that of x - k, their biased
// variance (var, not M2 = n * var: for |x| near 1e19, M2 overflows float32 where var does
// not) and their plain sum. Merges run in double: partials' shifts differ by up to the
// data's range, and float32 merges would round at its scale.
struct Moments {
  double k, mean, var, n, sum;
};

// Chan, Golub & LeVeque: fold b into a. d = (k_b - k_a) + (mean_b - mean_a); the merged
// mean is kept relative to whichever shift it is smaller against, so that a shift that is
// an outlier does not become every later merge's. An empty partial is skipped, never
// multiplied by its zero weight (inf * 0 would be NaN).
BNK_DEVICE void moments_merge(Moments& a, const Moments& b) {
  if (b.n == 0) return;
  if (a.n == 0) {
    a = b;
    return;
  }
  const double n = a.n + b.n, w_b = b.n / n, w_a = 1.0 - w_b;
  const double d = (b.k - a.k) + (b.mean - a.mean);
  const double mean_ka = a.mean + d * w_b, mean_kb = b.mean - d * w_a;
  if (fabs(mean_kb) < fabs(mean_ka)) {
    a.k = b.k;
    a.mean = mean_kb;
  } else {
    a.mean = mean_ka;
  }
  a.var = w_a * a.var + w_b * b.var + (d * w_a) * (d * w_b);
  a.n = n;
  a.sum += b.sum;
}

// The channel's mean: k + mean, or, where that is not finite (an inf or NaN in x, which
// Welford's running mean turns into NaN), the plain sum / n, torch's inf or NaN.
BNK_DEVICE double moments_mean(const Moments& m) {
  const double shifted = m.k + m.mean;
  return fabs(shifted) < INFINITY ? shifted : m.sum / m.n;
}

// act(z) for the BNK_ACT_* codes (gelu: the erf form). relu keeps NaN, as torch.relu.
template <typename Acc> BNK_DEVICE Acc activate(Acc z, int activation) {
  switch (activation) {
    case BNK_ACT_RELU: return z < Acc(0) ? Acc(0) : z;
    case BNK_ACT_SILU: return z * loop_div(Acc(1), Acc(1) + bnk_exp(-z));
    case BNK_ACT_GELU: return Acc(0.5) * z * (Acc(1) + bnk_erf(z * Acc(0.7071067811865476)));
    default: return z;
  }
}

// dL/dz = g * act'(z) (relu: torch's rule, g where z > 0).
template <typename Acc> BNK_DEVICE Acc activation_grad(Acc g, Acc z, int activation) {
  switch (activation) {
    case BNK_ACT_RELU: return z > Acc(0) ? g : Acc(0);
    case BNK_ACT_SILU: {
      const Acc s = loop_div(Acc(1), Acc(1) + bnk_exp(-z));
      return g * (s * (Acc(1) + z * (Acc(1) - s)));
    }
    case BNK_ACT_GELU: {
      const Acc cdf = Acc(0.5) * (Acc(1) + bnk_erf(z * Acc(0.7071067811865476)));
      const Acc pdf = bnk_exp(Acc(-0.5) * z * z) * Acc(0.3989422804014327);  // 1/sqrt(2 pi)
      return g * (cdf + z * pdf);
    }
    default: return g;
  }
}

// Walks the rows r = r0, r0 + step, ... of a channel (r = n * S + s) keeping (n, s), so
// that no element pays a division; offsets are int64 whatever the size.
struct RowWalk {
  int64_t n, s, S, dn, ds;
  BNK_DEVICE RowWalk(int64_t r0, int64_t step, int64_t S_) : S(S_) {
    n = r0 / S;
    s = r0 - n * S;
    dn = step / S;
    ds = step - dn * S;
  }
  BNK_DEVICE int64_t offset(const BnkTensor& t, int64_t c) const {
    return n * t.sn + c * t.sc + s * t.ss;
  }
  BNK_DEVICE void next() {
    n += dn;
    s += ds;
    if (s >= S) {
      s -= S;
      ++n;
    }
  }
};

template <typename T> BNK_DEVICE typename AccOf<T>::type load_at(const BnkTensor& t, int64_t i) {
  return to_acc(static_cast<const T*>(t.ptr)[i]);
}

template <typename T, typename Acc> BNK_DEVICE void store_at(const BnkTensor& t, int64_t i, Acc v) {
  static_cast<T*>(t.ptr)[i] = from_acc<T>(v);
}
