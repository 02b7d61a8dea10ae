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

// a / b for b >= 1, in the kernels wherever the correctly rounded quotient is not needed:
// that division branches to a slow-path subroutine, whose call makes ptxas keep the
// caller's live values across it (spills, seen on sm_80). float32: __fdividef (within 2
// ulp). float64: a times 1/b from float32's reciprocal (~22 bits) after two Newton steps
// (to about an ulp).
BNK_DEVICE float loop_div(float a, float b) {
#ifdef BNK_EMULATE
  return a * (1.0f / b);
#else
  return __fdividef(a, b);
#endif
}
BNK_DEVICE double loop_div(double a, double b) {
#ifdef BNK_EMULATE
  return a / b;
#else
  double r = static_cast<double>(__fdividef(1.0f, static_cast<float>(b)));
  r = r * (2.0 - b * r);
  r = r * (2.0 - b * r);
  return a * r;
#endif
}

// Knuth's TwoSum: s = a + b rounded, and err, the exact a + b - s (no FMA can fuse it: it
// has no product). The statistics loop keeps K + mean, and the variance with its error,
// to twice the precision.
template <typename Acc> BNK_DEVICE Acc two_sum(Acc a, Acc b, Acc& err) {
  const Acc s = a + b, b_part = s - a;
  err = (a - (s - b_part)) + (b - b_part);
  return s;
}

// 1 / sqrt(var + eps), correctly rounded: float32 in one rounding (__frsqrt_rn, which has
// no slow-path call; the emulation build rounds twice, sqrt then the division).
BNK_DEVICE float inv_std(float var, double eps) {
#ifdef BNK_EMULATE
  return 1.0f / sqrtf(var + static_cast<float>(eps));
#else
  return __frsqrt_rn(var + static_cast<float>(eps));
#endif
}
BNK_DEVICE double inv_std(double var, double eps) { return 1.0 / sqrt(var + eps); }

// A partial of the forward statistics: n values whose mean is that of x - k, their biased
// variance (var, not M2 = n * var: for |x| near 1e19, M2 overflows float32 where var does
// not) and their plain sum. Pooled in double (bn_kernels.cuh's block_pool and merge):
// partials' origins differ by up to the data's range, and float32 would round at its scale.
struct Moments {
  double k, mean, var, n, sum;
};

// The channel's mean: k + mean, or, where that is not finite (an inf or NaN in x, which
// Welford's running mean turns into NaN), the plain sum / n, torch's inf or NaN.
BNK_DEVICE double moments_mean(const Moments& m) {
  const double shifted = m.k + m.mean;
  return fabs(shifted) < INFINITY ? shifted : loop_div(m.sum, m.n);
}

// act(z) for a BNK_ACT_* code known at compile time (gelu: the erf form). relu keeps NaN,
// as torch.relu.
template <int ACT, typename Acc> BNK_DEVICE Acc activate(Acc z) {
  if constexpr (ACT == BNK_ACT_RELU) {
    return z < Acc(0) ? Acc(0) : z;
  } else if constexpr (ACT == BNK_ACT_SILU) {
    return z * loop_div(Acc(1), Acc(1) + bnk_exp(-z));
  } else if constexpr (ACT == BNK_ACT_GELU) {
    return Acc(0.5) * z * (Acc(1) + bnk_erf(z * Acc(0.7071067811865476)));
  } else {
    return z;
  }
}

// dL/dz = g * act'(z) (relu: torch's rule, g where z > 0).
template <int ACT, typename Acc> BNK_DEVICE Acc activation_grad(Acc g, Acc z) {
  if constexpr (ACT == BNK_ACT_RELU) {
    return z > Acc(0) ? g : Acc(0);
  } else if constexpr (ACT == BNK_ACT_SILU) {
    const Acc s = loop_div(Acc(1), Acc(1) + bnk_exp(-z));
    return g * (s * (Acc(1) + z * (Acc(1) - s)));
  } else if constexpr (ACT == BNK_ACT_GELU) {
    const Acc cdf = Acc(0.5) * (Acc(1) + bnk_erf(z * Acc(0.7071067811865476)));
    const Acc pdf = bnk_exp(Acc(-0.5) * z * z) * Acc(0.3989422804014327);  // 1/sqrt(2 pi)
    return g * (cdf + z * pdf);
  } else {
    return g;
  }
}

// A Welford state (docs/math.md): its running mean as K + mean (re-centred by TwoSum), its
// variance as var + err, its count n and the plain sum of its values.
template <typename Acc> struct State {
  Acc k, mean, var, err, n, sum;
};

// One step of a Welford state (docs/math.md): it takes m values whose own mean is g and
// variance q (of x - K), a share w = m / n of its values after the step (Chan's combine):
//   d = g - mean;  mean += d * w
//   (var, err) = TwoSum(var, (w * q + (d * w) * (g - mean) - var * w) + err)
//   (where that sum is not finite, an overflow or a NaN: var = var * (1 - w) + t, err = 0)
//   (K, mean) = TwoSum(K, mean)
// Its terms are bounded by a squared half-range: no overflow before the data's own.
template <typename Acc> BNK_DEVICE void state_step(State<Acc>& st, Acc g, Acc q, Acc m, Acc sum_x) {
  st.n += m;
  const Acc w = loop_div(m, st.n);
  const Acc d = g - st.mean, dw = d * w, stepped = st.mean + dw;
  const Acc t = w * q + dw * (g - stepped);
  Acc e;
  const Acc summed = two_sum(st.var, (t - st.var * w) + st.err, e);
  const bool finite = fabs(summed) < Acc(INFINITY);
  st.var = finite ? summed : st.var * (Acc(1) - w) + t;
  st.err = finite ? e : Acc(0);
  st.k = two_sum(st.k, stepped, st.mean);
  st.sum += sum_x;
}

// 1 / a power of two near sqrt(M): the scale h of take_values' squares, (v - g) * h,
// which keeps their sum from overflowing before q would (|x| up to ~1.8e19).
template <int M> constexpr double SQUARE_SCALE = M >= 32 ? 0.125 : (M >= 8 ? 0.25 : 0.5);

// The state takes M values x (M a power of two: every 1/M exact): their own mean g and
// variance q, exactly from them, then state_step:
//   g = sum v / M,  q = sum ((v - g) * h)^2 / (M * h^2),  v = x - K
template <int M, typename Acc> BNK_DEVICE void take_values(State<Acc>& st, const Acc* x) {
  const Acc h = static_cast<Acc>(SQUARE_SCALE<M>);
  Acc v[M], sum_v = 0, sum_x = 0;
  BNK_UNROLL
  for (int j = 0; j < M; ++j) {
    v[j] = x[j] - st.k;
    sum_v += v[j];
    sum_x += x[j];
  }
  const Acc g = sum_v * Acc(1.0 / M), gh = g * h;
  Acc q = 0;
  BNK_UNROLL
  for (int j = 0; j < M; ++j) {
    const Acc dev = v[j] * h - gh;  // (v - g) * h, one rounding: v * h and g * h are exact
    q += dev * dev;
  }
  state_step(st, g, q * Acc(1.0 / (M * SQUARE_SCALE<M> * SQUARE_SCALE<M>)), Acc(M), sum_x);
}

// take_values for the values at positions [lo, hi) of each of G rows of VEC (a channel
// block's vector part: hi - lo values a row, inv = 1 / their number, G * (hi - lo)).
template <int G, int VEC, typename Acc>
BNK_DEVICE void take_part(State<Acc>& st, const Acc (&x)[G][VEC], int lo, int hi, Acc inv) {
  if (hi <= lo) return;
  const Acc h = static_cast<Acc>(SQUARE_SCALE<G * VEC>);
  Acc v[G][VEC], sum_v = 0, sum_x = 0;
  BNK_UNROLL
  for (int g = 0; g < G; ++g) {
    BNK_UNROLL
    for (int j = 0; j < VEC; ++j) {
      const bool in = j >= lo && j < hi;
      v[g][j] = x[g][j] - st.k;
      sum_v += in ? v[g][j] : Acc(0);
      sum_x += in ? x[g][j] : Acc(0);
    }
  }
  const Acc mean = sum_v * inv, gh = mean * h;
  Acc q = 0;
  BNK_UNROLL
  for (int g = 0; g < G; ++g) {
    BNK_UNROLL
    for (int j = 0; j < VEC; ++j) {
      const Acc dev = v[g][j] * h - gh;
      q += (j >= lo && j < hi) ? dev * dev : Acc(0);
    }
  }
  state_step(st, mean, q * (inv * Acc(1.0 / (SQUARE_SCALE<G * VEC> * SQUARE_SCALE<G * VEC>))),
             Acc(G * (hi - lo)), sum_x);
}

// Walks the rows r = r0, r0 + step, ... of a channel (r = n * S + s) keeping (n, s), so
// that no element pays a division; offsets are int64 whatever the size.
struct RowWalk {
  int64_t n, s, S, dn, ds;
  BNK_DEVICE RowWalk(int64_t r0, int64_t step, int64_t S_) : S(S_) {
    n = floor_div(r0, S);
    s = r0 - n * S;
    dn = floor_div(step, S);
    ds = step - dn * S;
  }
  // a / b for 0 <= a, 0 < b, through a double estimate and its correction, without the
  // 64-bit integer division's subroutine call (loop_div)
  static BNK_DEVICE int64_t floor_div(int64_t a, int64_t b) {
    int64_t q = static_cast<int64_t>(loop_div(static_cast<double>(a), static_cast<double>(b)));
    while (q * b > a) --q;
    while ((q + 1) * b <= a) ++q;
    return q;
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

// VEC elements of a tensor from element i on: one 128-bit access where VEC * sizeof(T) is
// 16 bytes (the launcher asks for VEC > 1 only where every vector of the call is 16-byte
// aligned: csrc/README.md), VEC scalar ones otherwise.
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC, typename Acc>
BNK_DEVICE void load_vec(const BnkTensor& t, int64_t i, Acc (&out)[VEC]) {
  const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(static_cast<const T*>(t.ptr) + i);
  BNK_UNROLL
  for (int j = 0; j < VEC; ++j) out[j] = to_acc(p.v[j]);
}

template <typename T, int VEC, typename Acc>
BNK_DEVICE void store_vec(const BnkTensor& t, int64_t i, const Acc (&in)[VEC]) {
  Pack<T, VEC> p;
  BNK_UNROLL
  for (int j = 0; j < VEC; ++j) p.v[j] = from_acc<T>(in[j]);
  *reinterpret_cast<Pack<T, VEC>*>(static_cast<T*>(t.ptr) + i) = p;
}
