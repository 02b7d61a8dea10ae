// The kernels of the CUDA C++ backend: the same passes as the Triton kernels, sharing no
// code with them.
//
// A block takes block_c channels and one split of their rows (r = n * S + s,
// [row0, row_end)); each thread one channel lane and one row lane of `lanes`, visiting
// every lanes-th row. Grid: (channel blocks, splits).
//
// The passes are docs/math.md's, named as in the Triton backend: reduce, merge, apply.
//
//   reduce_stats_kernel  forward: one-pass Welford (mean, var) per thread around the thread's
//                     own first value, folded over the block's row lanes (Chan et al.). splits > 1: partials
//                     to the workspace; splits == 1: the final mean/rstd/var, then the
//                     block normalizes its own rows (one launch per forward).
//   reduce_grads_kernel  backward: sum g and sum g*xhat, g = dL/dz through the fused
//                     activation; partials, or (splits == 1) the sums then the input gradient.
//   merge_kernel         one thread per channel folds the splits in split order.
//   apply_normalize_kernel   the elementwise forward: y = act((x - mean) * gamma * rstd + beta (+ res)).
//   apply_input_grad_kernel  the elementwise backward: dres = dL/dz, and dx =
//                     gamma * rstd * (g - mean(g) - xhat * mean(g * xhat)) with batch
//                     statistics, gamma * rstd * g with running ones.
//
// Every fold runs in a fixed order through shared memory: results are bitwise reproducible.
#pragma once
#include "bn_math.cuh"

// This thread's channel c (lane tc of block_c) and row lane tr (of lanes). Neighbouring
// threads take neighbouring channels when channels are the contiguous axis, neighbouring
// rows otherwise, so that a warp's loads are contiguous in both layouts.
struct Lane {
  int tc, tr, lanes;
  int64_t c, row0, row_end;
  bool active;  // c < C
};

BNK_DEVICE Lane lane_of(const BnkCall& k) {
  Lane l;
  const int tid = threadIdx.x;
  l.lanes = blockDim.x / k.block_c;
  l.tc = k.channels_fast ? tid % k.block_c : tid / l.lanes;
  l.tr = k.channels_fast ? tid / k.block_c : tid % l.lanes;
  l.c = static_cast<int64_t>(blockIdx.x) * k.block_c + l.tc;
  l.active = l.c < k.c;
  l.row0 = static_cast<int64_t>(blockIdx.y) * k.rows_per_split;
  const int64_t rows = k.n * k.s;
  l.row_end = l.row0 + k.rows_per_split < rows ? l.row0 + k.rows_per_split : rows;
  return l;
}

template <typename F> BNK_DEVICE void for_each_row(const BnkCall& k, const Lane& l, F&& f) {
  if (!l.active) return;
  RowWalk w(l.row0 + l.tr, l.lanes, k.s);
  for (int64_t r = l.row0 + l.tr; r < l.row_end; r += l.lanes, w.next()) f(w);
}

// A channel's y = (x - mean) * scale + shift: scale = gamma * rstd, shift = beta.
// z_mean is the mean z uses: where scale is inf or NaN, torch's own form
// x * scale + (beta - mean * scale) gives torch's pattern of NaN and inf (z_mean 0).
template <typename Acc> struct Channel {
  Acc mean, rstd, scale, shift, z_mean;
};

template <typename Acc> BNK_DEVICE Channel<Acc> channel(const BnkCall& k, int64_t c, Acc mean, Acc rstd) {
  Channel<Acc> p;
  p.mean = mean;
  p.rstd = rstd;
  p.scale = k.weight ? load_channel<Acc>(k.weight, k.weight_dtype, c) * rstd : rstd;
  p.shift = k.bias ? load_channel<Acc>(k.bias, k.bias_dtype, c) : Acc(0);
  p.z_mean = mean;
  if (!(fabs(p.scale) < INFINITY)) {
    p.shift -= mean * p.scale;
    p.z_mean = Acc(0);
  }
  return p;
}

// From the statistics given: a mean and rstd, or (given_var) a mean and a variance.
template <typename Acc> BNK_DEVICE Channel<Acc> given_channel(const BnkCall& k, int64_t c) {
  const Acc mean = load_channel<Acc>(k.mean, k.stat_dtype, c);
  const Acc spread = load_channel<Acc>(k.rstd_or_var, k.stat_dtype, c);
  return channel<Acc>(k, c, mean, k.given_var ? inv_std(spread, k.eps) : spread);
}

// The values each sum of the three-path dx is over: the call's count, or per channel.
template <typename Acc> BNK_DEVICE Acc count_of(const BnkCall& k, int64_t c) {
  return k.channel_count ? static_cast<const Acc*>(k.channel_count)[c] : static_cast<Acc>(k.count);
}

// z = (x - mean) * scale + shift (+ residual): (x - mean) first, since for |mean| >> std
// x * scale + (shift - mean * scale) would cancel. Backward repeats it term for term.
template <typename T, typename Acc>
BNK_DEVICE Acc pre_activation(const BnkCall& k, const Channel<Acc>& p, Acc x, const RowWalk& w,
                              int64_t c, bool with_residual) {
  Acc z = (x - p.z_mean) * p.scale + p.shift;
  if (with_residual) z += load_at<T>(k.res, w.offset(k.res, c));
  return z;
}

// dL/dz from g = dL/dy. relu after a residual add reads its mask from the saved output y
// (k.y), which torch's relu keeps too; otherwise z is recomputed from x.
template <typename T, typename Acc>
BNK_DEVICE Acc epilogue_grad(const BnkCall& k, const Channel<Acc>& p, Acc g, Acc x,
                             const RowWalk& w, int64_t c) {
  if (k.activation == BNK_ACT_IDENTITY) return g;
  if (k.activation == BNK_ACT_RELU && k.y.ptr) return load_at<T>(k.y, w.offset(k.y, c)) > Acc(0) ? g : Acc(0);
  return activation_grad(g, pre_activation<T>(k, p, x, w, c, k.res.ptr != nullptr), k.activation);
}

template <typename T, typename Acc>
BNK_DEVICE void normalize_rows(const BnkCall& k, const Lane& l, const Channel<Acc>& p) {
  const bool with_residual = k.res.ptr != nullptr;
  for_each_row(k, l, [&](const RowWalk& w) {
    const Acc x = load_at<T>(k.x, w.offset(k.x, l.c));
    const Acc z = pre_activation<T>(k, p, x, w, l.c, with_residual);
    store_at<T>(k.out, w.offset(k.out, l.c), activate(z, k.activation));
  });
}

// dres = dL/dz where asked; dx into k.out where asked.
template <typename T, typename Acc>
BNK_DEVICE void input_grad_rows(const BnkCall& k, const Lane& l, const Channel<Acc>& p,
                                Acc mean_g, Acc mean_gx) {
  const bool need_x = k.training || k.activation != 0;
  for_each_row(k, l, [&](const RowWalk& w) {
    const Acc x = need_x ? load_at<T>(k.x, w.offset(k.x, l.c)) : Acc(0);
    const Acc g = epilogue_grad<T>(k, p, load_at<T>(k.g, w.offset(k.g, l.c)), x, w, l.c);
    if (k.dres.ptr) store_at<T>(k.dres, w.offset(k.dres, l.c), g);
    if (!k.out.ptr) return;
    const Acc dx = k.training ? p.scale * (g - mean_g - (x - p.mean) * p.rstd * mean_gx)
                              : p.scale * g;
    store_at<T>(k.out, w.offset(k.out, l.c), dx);
  });
}

// Folds the row lanes of each channel in a fixed tree order; every lane of the channel
// gets the result. Every thread of the block must call it (it synchronises).
template <typename Acc, typename Fold>
BNK_DEVICE void block_fold(const Lane& l, int block_c, Acc* s0, Acc* s1, Acc* s2, Acc& a,
                           Acc& b, Acc& n, Fold fold) {
  const int i = l.tr * block_c + l.tc;
  s0[i] = a;
  s1[i] = b;
  s2[i] = n;
  bnk_sync();
  for (int half = l.lanes / 2; half > 0; half /= 2) {
    if (l.tr < half) {
      const int j = i + half * block_c;
      fold(s0[i], s1[i], s2[i], s0[j], s1[j], s2[j]);
    }
    bnk_sync();
  }
  a = s0[l.tc];
  b = s1[l.tc];
  n = s2[l.tc];
}

// block_fold for the forward statistics: the same fixed tree, over Moments.
BNK_DEVICE void block_fold_moments(const Lane& l, int block_c, Moments* s, Moments& m) {
  const int i = l.tr * block_c + l.tc;
  s[i] = m;
  bnk_sync();
  for (int half = l.lanes / 2; half > 0; half /= 2) {
    if (l.tr < half) moments_merge(s[i], s[i + half * block_c]);
    bnk_sync();
  }
  m = s[l.tc];
}

struct SumFold {
  template <typename Acc>
  BNK_DEVICE void operator()(Acc& a, Acc& b, Acc&, Acc a2, Acc b2, Acc) const {
    a += a2;
    b += b2;
  }
};

// part[0, split, c] = a, part[1, split, c] = b.
template <typename Acc> BNK_DEVICE void store_partials(const BnkCall& k, const Lane& l, Acc a, Acc b) {
  if (l.tr != 0) return;
  Acc* part = static_cast<Acc*>(k.workspace);
  part[blockIdx.y * k.c + l.c] = a;
  part[(k.splits + blockIdx.y) * k.c + l.c] = b;
}

template <typename Acc> BNK_DEVICE void store_stat(void* out, int64_t c, Acc v) {
  if (out) static_cast<Acc*>(out)[c] = v;
}

// The backward's sums of channel c: stats_out (Acc) and grad_out (rounded: bnk_api.h).
template <typename Acc> BNK_DEVICE void store_grad_sums(const BnkCall& k, int64_t c, Acc sum_g,
                                                        Acc sum_gx) {
  store_stat(k.stats_out[0], c, sum_g);
  store_stat(k.stats_out[1], c, sum_gx);
  if (k.grad_out[0]) store_channel(k.grad_out[0], k.grad_dtype[0], c, sum_g);
  if (k.grad_out[1]) store_channel(k.grad_out[1], k.grad_dtype[1], c, sum_gx);
}

// The running statistics of channel c, from its batch mean and biased var (bnk_api.h).
template <typename Acc> BNK_DEVICE void update_running(const BnkCall& k, int64_t c, Acc mean,
                                                       Acc var) {
  if (!k.running_mean) return;
  const Acc f = k.cumulative
      ? Acc(1) / (static_cast<Acc>(*static_cast<const int64_t*>(k.num_batches_tracked)) + Acc(1))
      : static_cast<Acc>(k.momentum);
  const Acc count = static_cast<Acc>(k.count);
  const Acc unbiased = var * (count / (count - Acc(1)));
  const int64_t im = c * k.running_sm, iv = c * k.running_sv;
  store_channel(k.running_mean, k.running_dtype, im,
                lerp_acc(load_channel<Acc>(k.running_mean, k.running_dtype, im), mean, f));
  store_channel(k.running_var, k.running_dtype, iv,
                lerp_acc(load_channel<Acc>(k.running_var, k.running_dtype, iv), unbiased, f));
}

// num_batches_tracked += 1, by one thread of the call's last launch.
BNK_DEVICE void count_batch(const BnkCall& k) {
  if (k.num_batches_tracked && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0)
    ++*static_cast<int64_t*>(k.num_batches_tracked);
}

// Forward partials: part[i, split, c] for i = 0..3 (k, mean, var, sum), in Acc.
template <typename Acc> BNK_DEVICE void store_moments(const BnkCall& k, const Lane& l, const Moments& m) {
  if (l.tr != 0) return;
  Acc* part = static_cast<Acc*>(k.workspace);
  const double fields[4] = {m.k, m.mean, m.var, m.sum};
  for (int i = 0; i < 4; ++i) part[(i * k.splits + blockIdx.y) * k.c + l.c] = static_cast<Acc>(fields[i]);
}

template <typename T> BNK_GLOBAL void BNK_LAUNCH_BOUNDS reduce_stats_kernel(BnkCall k) {
  typedef typename AccOf<T>::type Acc;
  BNK_SHARED Moments s_moments[BNK_MAX_THREADS];
  const Lane l = lane_of(k);
  // Welford in variance form, the thread's running mean held as K + mean and re-centred
  // every step (K = K + mean, mean = its rounding error: two_sum), the variance summed with
  // its rounding error (var + var_err): a float32 mean near 1e4 would move in steps of
  // 1e-3, a fixed shift helps only while it is not an outlier itself, and the variance's
  // small steps, rounded, drift by ~sqrt(n) ulps. The Triton kernel's docstring has the
  // story and the figures.
  Acc K = 0, mean = 0, var = 0, var_err = 0, n = 0, sum = 0;
  for_each_row(k, l, [&](const RowWalk& w) {  // never E[x^2] - E[x]^2
    const Acc x = load_at<T>(k.x, w.offset(k.x, l.c));
    const Acc v = x - K;
    sum += x;
    n += Acc(1);
    const Acc inv = loop_div(Acc(1), n);
    const Acc d = v - mean;
    mean += d * inv;
    const Acc t = (d * inv) * (v - mean);  // at most d^2/4: no early overflow
    Acc err;
    const Acc summed = two_sum(var, (t - var * inv) + var_err, err);
    // not finite: an overflow (|x| near 1e19) or a NaN: the plain update, in which inf
    // stays inf and NaN stays NaN (the compensation would make both NaN)
    const bool finite = fabs(summed) < Acc(INFINITY);
    var = finite ? summed : var * (Acc(1) - inv) + t;
    var_err = finite ? err : Acc(0);
    K = two_sum(K, mean, mean);
  });
  Moments m = {K, mean, double(var) + double(var_err), n, sum};
  block_fold_moments(l, k.block_c, s_moments, m);
  if (!l.active) return;
  if (k.splits > 1) return store_moments<Acc>(k, l, m);
  const Acc channel_mean = static_cast<Acc>(moments_mean(m));
  const Acc channel_var = static_cast<Acc>(m.var);
  const Acc rstd = inv_std(channel_var, k.eps);
  if (l.tr == 0) {
    store_stat(k.stats_out[0], l.c, channel_mean);
    store_stat(k.stats_out[1], l.c, rstd);
    store_stat(k.stats_out[2], l.c, channel_var);
    update_running(k, l.c, channel_mean, channel_var);
  }
  count_batch(k);  // not cumulative here (bnk_api.h): nothing reads the counter
  if (k.out.ptr) normalize_rows<T>(k, l, channel<Acc>(k, l.c, channel_mean, rstd));
}

template <typename T> BNK_GLOBAL void BNK_LAUNCH_BOUNDS reduce_grads_kernel(BnkCall k) {
  typedef typename AccOf<T>::type Acc;
  BNK_SHARED Acc s_g[BNK_MAX_THREADS], s_gx[BNK_MAX_THREADS], s_unused[BNK_MAX_THREADS];
  const Lane l = lane_of(k);
  const Channel<Acc> p = l.active ? given_channel<Acc>(k, l.c) : Channel<Acc>();
  Acc sum_g = 0, sum_gx = 0, unused = 0;
  for_each_row(k, l, [&](const RowWalk& w) {
    const Acc x = load_at<T>(k.x, w.offset(k.x, l.c));
    const Acc g = epilogue_grad<T>(k, p, load_at<T>(k.g, w.offset(k.g, l.c)), x, w, l.c);
    sum_g += g;
    sum_gx += g * ((x - p.mean) * p.rstd);
  });
  block_fold(l, k.block_c, s_g, s_gx, s_unused, sum_g, sum_gx, unused, SumFold());
  if (!l.active) return;
  if (k.splits > 1) return store_partials(k, l, sum_g, sum_gx);
  if (l.tr == 0) store_grad_sums(k, l.c, sum_g, sum_gx);
  if (k.out.ptr || k.dres.ptr) {
    const Acc count = count_of<Acc>(k, l.c);
    input_grad_rows<T>(k, l, p, sum_g / count, sum_gx / count);
  }
}

// Split j holds min(rows_per_split, R - j * rows_per_split) rows; every earlier one is full.
template <typename T> BNK_GLOBAL void BNK_LAUNCH_BOUNDS merge_kernel(BnkCall k, int backward) {
  typedef typename AccOf<T>::type Acc;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= k.c) return;
  const Acc* part = static_cast<const Acc*>(k.workspace);
  const int64_t rows = k.n * k.s;
  if (backward) {
    Acc a = 0, b = 0;
    for (int64_t j = 0; j < k.splits; ++j) {
      a += part[j * k.c + c];
      b += part[(k.splits + j) * k.c + c];
    }
    store_grad_sums(k, c, a, b);
    return;
  }
  Moments m = {0, 0, 0, 0, 0};
  for (int64_t j = 0; j < k.splits; ++j) {
    const int64_t before = j * k.rows_per_split;
    const int64_t here = rows - before < k.rows_per_split ? rows - before : k.rows_per_split;
    const Moments b = {part[j * k.c + c], part[(k.splits + j) * k.c + c],
                       part[(2 * k.splits + j) * k.c + c], static_cast<double>(here),
                       part[(3 * k.splits + j) * k.c + c]};
    moments_merge(m, b);
  }
  const Acc var = static_cast<Acc>(m.var);
  const Acc mean = static_cast<Acc>(moments_mean(m));
  store_stat(k.stats_out[0], c, mean);
  store_stat(k.stats_out[1], c, inv_std(var, k.eps));
  store_stat(k.stats_out[2], c, var);
  update_running(k, c, mean, var);
}

template <typename T> BNK_GLOBAL void BNK_LAUNCH_BOUNDS apply_normalize_kernel(BnkCall k) {
  typedef typename AccOf<T>::type Acc;
  const Lane l = lane_of(k);
  count_batch(k);  // after the merge that read the counter
  if (l.active) normalize_rows<T>(k, l, given_channel<Acc>(k, l.c));
}

template <typename T> BNK_GLOBAL void BNK_LAUNCH_BOUNDS apply_input_grad_kernel(BnkCall k) {
  typedef typename AccOf<T>::type Acc;
  const Lane l = lane_of(k);
  if (!l.active) return;
  Acc mean_g = 0, mean_gx = 0;
  if (k.training) {  // the sums of reduce_grads_kernel, or given (SyncBatchNorm's)
    const Acc count = count_of<Acc>(k, l.c);
    mean_g = static_cast<const Acc*>(k.sum_g)[l.c] / count;
    mean_gx = static_cast<const Acc*>(k.sum_gx)[l.c] / count;
  }
  input_grad_rows<T>(k, l, given_channel<Acc>(k, l.c), mean_g, mean_gx);
}
