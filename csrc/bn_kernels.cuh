// The kernels of the CUDA C++ backend: the same passes as the Triton kernels, sharing no
// code with them.
//
// A block takes block_c channels and one split of their rows (r = n * S + s,
// [row0, row_end)). Its threads are (channel lane, row lane) pairs; each visits every
// lanes-th vector of its rows. A vector is VEC neighbouring elements along the contiguous
// axis, one 128-bit access: VEC rows of one channel (BNK_ROWS: NCHW), VEC channels of one
// row (BNK_CHANNELS: channels_last), or VEC values of a block's contiguous channels in one
// sample, possibly of two channels (BNK_BLOCKS: NCHW with a small S, where rows of VEC
// would straddle samples; its rows are samples); VEC = 1 where the call's tensors don't
// allow it (bnk_api.h). Grid: (channel blocks, splits).
//
// Template parameters, so that no per-element branch is left in a hot loop: the element
// type T, VEC, LAYOUT, the activation ACT and the residual RES (forward), and Y
// (backward: relu's mask read from the saved output). launchers.cuh dispatches a call to
// its instantiation.
//
// The passes are docs/math.md's, named as in the Triton backend: reduce, merge, apply.
//
//   reduce_stats_kernel  forward: one-pass Welford per thread state (a thread's vectors of
//                     one channel, 4 of them a step), pooled over the block's row lanes
//                     (block_pool). splits > 1: partials to the workspace; splits == 1:
//                     the final mean/rstd/var, then the block normalizes its own rows (one
//                     launch per forward).
//   reduce_grads_kernel  backward: sum g and sum g*xhat, g = dL/dz through the fused
//                     activation; partials, or (splits == 1) the sums then the input gradient.
//   merge_kernel         a block per few channels: its threads pool the splits (split
//                     order each, then a fixed tree over the threads).
//   apply_normalize_kernel   the elementwise forward: y = act((x - mean) * gamma * rstd + beta (+ res)).
//   apply_input_grad_kernel  the elementwise backward: dres = dL/dz, and dx =
//                     gamma * rstd * (g - mean(g) - xhat * mean(g * xhat)) with batch
//                     statistics, gamma * rstd * g with running ones.
//
// Every fold runs in a fixed order through shared memory: results are bitwise reproducible.
#pragma once
#include "bn_math.cuh"

// The states (and channels) of a thread's vector: VEC (channels_last: a channel each), 2
// (channel blocks: A, the first channel's values, and B, the next one's), or 1.
template <int VEC, int LAYOUT>
constexpr int PARTS = LAYOUT == BNK_CHANNELS ? VEC : (LAYOUT == BNK_BLOCKS ? 2 : 1);

// This thread's lanes: channel lane tc (of channel_lanes) and row lane tr (of lanes).
// Neighbouring threads take neighbouring channel vectors when channels are the contiguous
// axis (BNK_CHANNELS), neighbouring row vectors otherwise, so that a warp's loads are
// contiguous in every layout. c: the first channel of the thread's vector (BNK_CHANNELS),
// its channel (BNK_ROWS), or the block's first (BNK_BLOCKS, whose thread tr takes the
// vector at `at` of the block's span of block_c * S values: its elements before `cut`
// are channel c + first's, the rest the next one's).
struct Lane {
  int tc, tr, lanes, channel_lanes;
  int64_t c, row0, row_end;
  bool active;  // c < C (channel blocks: a vector of the span)
  int at, first, cut;  // channel blocks
};

template <int VEC, int LAYOUT> BNK_DEVICE Lane lane_of(const BnkCall& k) {
  Lane l;
  const int tid = threadIdx.x;
  l.at = l.first = l.cut = 0;
  l.row0 = static_cast<int64_t>(blockIdx.y) * k.rows_per_split;
  if constexpr (LAYOUT == BNK_BLOCKS) {
    const int s = static_cast<int>(k.s);
    l.channel_lanes = l.tc = 0;
    l.lanes = blockDim.x;
    l.tr = tid;
    l.c = static_cast<int64_t>(blockIdx.x) * k.block_c;
    l.at = tid * VEC;
    l.active = l.at < k.block_c * s;
    l.first = l.at / s;  // (one division per thread)
    l.cut = (l.first + 1) * s - l.at;
    l.row_end = l.row0 + k.rows_per_split < k.n ? l.row0 + k.rows_per_split : k.n;
  } else {
    constexpr bool FAST = LAYOUT == BNK_CHANNELS;
    l.channel_lanes = FAST ? k.block_c / VEC : k.block_c;
    l.lanes = blockDim.x / l.channel_lanes;
    l.tc = FAST ? tid % l.channel_lanes : tid / l.lanes;
    l.tr = FAST ? tid / l.channel_lanes : tid % l.lanes;
    l.c = static_cast<int64_t>(blockIdx.x) * k.block_c + (FAST ? l.tc * VEC : l.tc);
    l.active = l.c < k.c;
    const int64_t rows = k.n * k.s;
    l.row_end = l.row0 + k.rows_per_split < rows ? l.row0 + k.rows_per_split : rows;
  }
  return l;
}

// Where a vector starts: sample n, spatial position s (with the lane's channel c, an
// element's offset in any tensor of the call; channel blocks: s is the vector's place in
// the block's span and c the block's first channel, sC == S and sS == 1).
struct Place {
  int64_t n, s;
  BNK_DEVICE int64_t at(const BnkTensor& t, int64_t c) const { return n * t.sn + c * t.sc + s * t.ss; }
};

// The thread's vectors, one after another: rows r (BNK_ROWS: r..r+VEC-1 of one sample, S
// and every split a multiple of VEC) from its lane's first, lanes vectors apart, with
// (n, s) walked incrementally (no division per element); channel blocks: its vector of
// every sample of the split.
template <int VEC, int LAYOUT> struct Vectors {
  static constexpr bool FAST = LAYOUT == BNK_CHANNELS, BLOCKS = LAYOUT == BNK_BLOCKS;
  RowWalk w;
  int64_t r, step, end, at;
  BNK_DEVICE Vectors(const BnkCall& k, const Lane& l)
      : w(BLOCKS ? 0 : l.row0 + (FAST ? l.tr : int64_t(l.tr) * VEC),
          BLOCKS ? 1 : (FAST ? l.lanes : int64_t(l.lanes) * VEC), BLOCKS ? 1 : k.s),
        r(BLOCKS ? l.row0 : l.row0 + (FAST ? l.tr : int64_t(l.tr) * VEC)),
        step(BLOCKS ? 1 : (FAST ? l.lanes : int64_t(l.lanes) * VEC)),
        end(l.row_end),
        at(l.at) {}
  BNK_DEVICE bool more(int count = 1) const { return r + (count - 1) * step < end; }
  BNK_DEVICE void next() {
    r += step;
    if constexpr (!BLOCKS) w.next();
  }
  BNK_DEVICE Place place() const {
    if constexpr (BLOCKS) return {r, at};
    return {w.n, w.s};
  }
  BNK_DEVICE int64_t at_of(const BnkTensor& t, int64_t c) const { return place().at(t, c); }
};

// Visits the thread's vectors UNROLL at a time while that many are left, then one at a
// time: body(places) with a Place per vector (an array of UNROLL, or of 1), so that the
// body issues all its vectors' loads before it uses one: UNROLL * 16 bytes of each tensor
// in flight per thread, where the few blocks an SM holds would leave too few.
template <int UNROLL, int VEC, int LAYOUT, typename Body>
BNK_DEVICE void for_vectors(const BnkCall& k, const Lane& l, Body body) {
  Vectors<VEC, LAYOUT> v(k, l);
  while (v.more(UNROLL)) {
    Place places[UNROLL];
    BNK_UNROLL
    for (int u = 0; u < UNROLL; ++u) {
      places[u] = v.place();
      v.next();
    }
    body(places);
  }
  for (; v.more(); v.next()) {
    const Place places[1] = {v.place()};
    body(places);
  }
}

// Vectors a thread takes at once in the elementwise loops (for_vectors): 4 of 16 bytes;
// one where a call takes single elements (VEC = 1: a layout no 128-bit access can read,
// not worth the code of the unrolled loop).
template <int VEC> constexpr int APPLY_UNROLL = VEC > 1 ? 4 : 1;

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

// The channels of a thread's vector (PARTS of them): element j's is pick(p, j).
template <typename Acc, int VEC, int LAYOUT> struct Channels {
  static constexpr int COUNT = PARTS<VEC, LAYOUT>;
  Channel<Acc> p[COUNT];
  int cut = VEC;  // channel blocks: elements from cut on are p[1]'s
  // a[element j's part], for arrays of COUNT (j a constant once the loops unroll)
  template <typename V> BNK_DEVICE V pick(const V (&a)[COUNT], int j) const {
    if constexpr (LAYOUT == BNK_CHANNELS) {
      return a[j];
    } else if constexpr (LAYOUT == BNK_BLOCKS) {
      return j < cut ? a[0] : a[1];
    } else {
      return a[0];
    }
  }
  BNK_DEVICE Channel<Acc> of(int j) const { return pick(p, j); }
};

// The channel of each part of the thread's vector (channel blocks: the next one, where
// the vector crosses into it, else the first again).
template <int VEC, int LAYOUT> BNK_DEVICE int64_t part_channel(const Lane& l, int i) {
  if constexpr (LAYOUT == BNK_BLOCKS) return l.c + l.first + (i == 1 && l.cut < VEC ? 1 : 0);
  return l.c + i;
}

template <typename Acc, int VEC, int LAYOUT>
BNK_DEVICE Channels<Acc, VEC, LAYOUT> given_channels(const BnkCall& k, const Lane& l) {
  Channels<Acc, VEC, LAYOUT> ch;
  ch.cut = l.cut;
  BNK_UNROLL
  for (int i = 0; i < ch.COUNT; ++i) ch.p[i] = given_channel<Acc>(k, part_channel<VEC, LAYOUT>(l, i));
  return ch;
}

// The values each sum of the three-path dx is over: the call's count, or per channel.
template <typename Acc> BNK_DEVICE Acc count_of(const BnkCall& k, int64_t c) {
  return k.channel_count ? static_cast<const Acc*>(k.channel_count)[c] : static_cast<Acc>(k.count);
}

// z = (x - mean) * scale + shift (+ residual): (x - mean) first, since for |mean| >> std
// x * scale + (shift - mean * scale) would cancel. Backward repeats it term for term.
template <typename Acc> BNK_DEVICE Acc pre_activation(const Channel<Acc>& p, Acc x) {
  return (x - p.z_mean) * p.scale + p.shift;
}

// The forward's elementwise pass over the thread's vectors: y = act(z), z = bn(x) (+ res).
template <typename T, int VEC, int LAYOUT, int ACT, bool RES, typename Acc>
BNK_DEVICE void normalize_rows(const BnkCall& k, const Lane& l, const Channels<Acc, VEC, LAYOUT>& ch) {
  for_vectors<APPLY_UNROLL<VEC>, VEC, LAYOUT>(k, l, [&](const auto& places) {
    constexpr int U = sizeof(places) / sizeof(places[0]);
    Acc x[U][VEC], res[RES ? U : 1][VEC];
    BNK_UNROLL
    for (int u = 0; u < U; ++u) {
      load_vec<T, VEC>(k.x, places[u].at(k.x, l.c), x[u]);
      if constexpr (RES) load_vec<T, VEC>(k.res, places[u].at(k.res, l.c), res[u]);
    }
    (void)res;
    BNK_UNROLL
    for (int u = 0; u < U; ++u) {
      BNK_UNROLL
      for (int j = 0; j < VEC; ++j) {
        Acc z = pre_activation(ch.of(j), x[u][j]);
        if constexpr (RES) z += res[u][j];
        x[u][j] = activate<ACT>(z);
      }
      store_vec<T, VEC>(k.out, places[u].at(k.out, l.c), x[u]);
    }
  });
}

// normalize_rows for the call's epilogue, chosen at run time (the one-launch forward).
template <typename T, int VEC, int LAYOUT, typename Acc>
BNK_DEVICE void normalize_rows_of_call(const BnkCall& k, const Lane& l,
                                       const Channels<Acc, VEC, LAYOUT>& ch) {
  const bool res = k.res.ptr != nullptr;
  switch (k.activation) {
    case BNK_ACT_RELU:
      return res ? normalize_rows<T, VEC, LAYOUT, BNK_ACT_RELU, true>(k, l, ch)
                 : normalize_rows<T, VEC, LAYOUT, BNK_ACT_RELU, false>(k, l, ch);
    case BNK_ACT_SILU:
      return res ? normalize_rows<T, VEC, LAYOUT, BNK_ACT_SILU, true>(k, l, ch)
                 : normalize_rows<T, VEC, LAYOUT, BNK_ACT_SILU, false>(k, l, ch);
    case BNK_ACT_GELU:
      return res ? normalize_rows<T, VEC, LAYOUT, BNK_ACT_GELU, true>(k, l, ch)
                 : normalize_rows<T, VEC, LAYOUT, BNK_ACT_GELU, false>(k, l, ch);
    default:
      return res ? normalize_rows<T, VEC, LAYOUT, BNK_ACT_IDENTITY, true>(k, l, ch)
                 : normalize_rows<T, VEC, LAYOUT, BNK_ACT_IDENTITY, false>(k, l, ch);
  }
}

// g = dL/dz of a vector from dL/dy (g, in place): relu's mask from the saved output y (Y:
// relu after a residual, whose y torch's relu keeps too); otherwise z recomputed from x
// (and the residual, RES).
template <typename T, int VEC, int LAYOUT, int ACT, bool RES, bool Y, typename Acc>
BNK_DEVICE void epilogue_grad(const BnkCall& k, const Place& at, int64_t c,
                              const Channels<Acc, VEC, LAYOUT>& ch, const Acc (&x)[VEC], Acc (&g)[VEC]) {
  if constexpr (Y) {
    Acc y[VEC];
    load_vec<T, VEC>(k.y, at.at(k.y, c), y);
    BNK_UNROLL
    for (int j = 0; j < VEC; ++j) g[j] = y[j] > Acc(0) ? g[j] : Acc(0);
  } else if constexpr (ACT != BNK_ACT_IDENTITY) {
    Acc res[VEC];
    if constexpr (RES) load_vec<T, VEC>(k.res, at.at(k.res, c), res);
    BNK_UNROLL
    for (int j = 0; j < VEC; ++j) {
      Acc z = pre_activation(ch.of(j), x[j]);
      if constexpr (RES) z += res[j];
      g[j] = activation_grad<ACT>(g[j], z);
    }
  }
}

// dres = dL/dz where asked; dx into k.out where asked: the three paths with batch
// statistics (mean_g, mean_gx per channel), gamma * rstd * g with constant ones.
template <typename T, int VEC, int LAYOUT, int ACT, bool RES, bool Y, typename Acc>
BNK_DEVICE void input_grad_rows(const BnkCall& k, const Lane& l, const Channels<Acc, VEC, LAYOUT>& ch,
                                const Acc (&mean_g)[PARTS<VEC, LAYOUT>],
                                const Acc (&mean_gx)[PARTS<VEC, LAYOUT>]) {
  const bool need_x = k.training || (ACT != BNK_ACT_IDENTITY && !Y);
  for_vectors<APPLY_UNROLL<VEC>, VEC, LAYOUT>(k, l, [&](const auto& places) {
    constexpr int U = sizeof(places) / sizeof(places[0]);
    Acc x[U][VEC] = {}, g[U][VEC];
    BNK_UNROLL
    for (int u = 0; u < U; ++u) {
      if (need_x) load_vec<T, VEC>(k.x, places[u].at(k.x, l.c), x[u]);
      load_vec<T, VEC>(k.g, places[u].at(k.g, l.c), g[u]);
    }
    BNK_UNROLL
    for (int u = 0; u < U; ++u) {
      epilogue_grad<T, VEC, LAYOUT, ACT, RES, Y>(k, places[u], l.c, ch, x[u], g[u]);
      if (k.dres.ptr) store_vec<T, VEC>(k.dres, places[u].at(k.dres, l.c), g[u]);
      if (!k.out.ptr) continue;
      BNK_UNROLL
      for (int j = 0; j < VEC; ++j) {
        const Channel<Acc> p = ch.of(j);
        x[u][j] = k.training ? p.scale * (g[u][j] - ch.pick(mean_g, j) -
                                          (x[u][j] - p.mean) * p.rstd * ch.pick(mean_gx, j))
                             : p.scale * g[u][j];
      }
      store_vec<T, VEC>(k.out, places[u].at(k.out, l.c), x[u]);
    }
  });
}

// Folds the row lanes of each channel lane in a fixed tree order; every row lane of the
// channel lane gets the result. Every thread of the block must call it (it synchronises).
template <typename Acc, typename Fold>
BNK_DEVICE void block_fold(const Lane& l, Acc* s0, Acc* s1, Acc& a, Acc& b, Fold fold) {
  const int i = l.tr * l.channel_lanes + l.tc;
  s0[i] = a;
  s1[i] = b;
  bnk_sync();
  for (int half = l.lanes / 2; half > 0; half /= 2) {
    if (l.tr < half) {
      const int j = i + half * l.channel_lanes;
      fold(s0[i], s1[i], s0[j], s1[j]);
    }
    bnk_sync();
  }
  a = s0[l.tc];
  b = s1[l.tc];
  bnk_sync();  // (the arrays are used again by the next fold)
}

struct SumFold {
  template <typename Acc> BNK_DEVICE void operator()(Acc& a, Acc& b, Acc a2, Acc b2) const {
    a += a2;
    b += b2;
  }
};

// Pools each channel lane's partials over the block's row lanes (docs/math.md), in double,
// in a fixed tree order:
//   n = sum n_i,  mean = sum w_i mu_i,  var = sum w_i (var_i + (mu_i - mean)^2)
//   w_i = n_i / n,  mu_i = K_i + mean_i
// the pooled variance exactly, weighted so that no term outgrows the data; an empty
// partial (n_i = 0) is left out by selection, never multiplied by its zero weight. Every
// lane of the channel gets the result (K = mean, mean = 0). Every thread of the block
// must call it (it synchronises). Why not Chan's pairwise formula: a float64 division per
// pair and level, a chain of them.
BNK_DEVICE Moments block_pool(const Lane& l, double* s0, double* s1, const Moments& m) {
  double n = m.n, sum = m.sum;
  block_fold(l, s0, s1, n, sum, SumFold());
  const bool held = m.n > 0;
  const double w = m.n * (n > 0 ? loop_div(1.0, n) : 0.0), mu = m.k + m.mean;
  double mean = held ? w * mu : 0.0, unused = 0.0;
  block_fold(l, s0, s1, mean, unused, SumFold());
  const double dev = mu - mean;
  double var = held ? w * (m.var + dev * dev) : 0.0;
  unused = 0.0;
  block_fold(l, s0, s1, var, unused, SumFold());
  return {mean, 0.0, var, n, sum};
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
      ? loop_div(Acc(1), static_cast<Acc>(*static_cast<const int64_t*>(k.num_batches_tracked)) + Acc(1))
      : static_cast<Acc>(k.momentum);
  const Acc count = static_cast<Acc>(k.count);
  const Acc unbiased = var * loop_div(count, count - Acc(1));
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

// Forward partials: part[i, split, c] for i = 0..3 (K, mean, var, sum), in Acc: a pooled
// mean as K + mean, two Acc values (float32: the double mean to ~48 bits).
template <typename Acc> BNK_DEVICE void store_moments(const BnkCall& k, int64_t c, const Moments& m) {
  Acc* part = static_cast<Acc*>(k.workspace);
  const double mean = m.k + m.mean;
  const Acc hi = static_cast<Acc>(mean);
  part[blockIdx.y * k.c + c] = hi;
  part[(k.splits + blockIdx.y) * k.c + c] = static_cast<Acc>(mean - static_cast<double>(hi));
  part[(2 * k.splits + blockIdx.y) * k.c + c] = static_cast<Acc>(m.var);
  part[(3 * k.splits + blockIdx.y) * k.c + c] = static_cast<Acc>(m.sum);
}

// The next 4 vectors of x (their loads issued together), v moved past them.
template <typename T, int VEC, int LAYOUT, typename Acc>
BNK_DEVICE void load_group(const BnkCall& k, const Lane& l, Vectors<VEC, LAYOUT>& v, Acc (&x)[4][VEC]) {
  BNK_UNROLL
  for (int g = 0; g < 4; ++g) {
    load_vec<T, VEC>(k.x, v.at_of(k.x, l.c), x[g]);
    v.next();
  }
}

// The Welford states of the thread's vectors (docs/math.md): BNK_ROWS, one, which takes
// its 4 vectors' 4 * VEC values of its channel a step; BNK_CHANNELS, VEC, one per channel
// of its vectors, each taking a value of each of 4 rows a step; BNK_BLOCKS, two (A and B,
// the parts of its vector before and after `cut`), each taking its part of 4 samples a
// step. Each state starts from its first value as its origin K (so that its first step's
// x - K is exact too). Never E[x^2] - E[x]^2.
template <typename T, int VEC, int LAYOUT, typename Acc>
BNK_DEVICE void welford_states(const BnkCall& k, const Lane& l, State<Acc> (&st)[PARTS<VEC, LAYOUT>]) {
  Vectors<VEC, LAYOUT> v(k, l);
  if (!v.more()) return;
  Acc first[VEC];
  load_vec<T, VEC>(k.x, v.at_of(k.x, l.c), first);
  if constexpr (LAYOUT == BNK_BLOCKS) {
    const int cut = l.cut < VEC ? l.cut : VEC;  // A's values: [0, cut); B's: [cut, VEC)
    st[0].k = first[0];
    st[1].k = first[cut < VEC ? cut : 0];
    const Acc group_a = loop_div(Acc(1), Acc(4 * cut)),
              group_b = cut < VEC ? loop_div(Acc(1), Acc(4 * (VEC - cut))) : Acc(0);
    for (; v.more(4);) {  // whole groups of 4 samples
      Acc x[4][VEC];
      load_group<T>(k, l, v, x);
      take_part<4, VEC>(st[0], x, 0, cut, group_a);
      take_part<4, VEC>(st[1], x, cut, VEC, group_b);
    }
    for (; v.more(); v.next()) {  // the rest, a sample at a time
      Acc x[1][VEC];
      load_vec<T, VEC>(k.x, v.at_of(k.x, l.c), x[0]);
      take_part<1, VEC>(st[0], x, 0, cut, loop_div(Acc(1), Acc(cut)));
      if (cut < VEC) take_part<1, VEC>(st[1], x, cut, VEC, loop_div(Acc(1), Acc(VEC - cut)));
    }
    return;
  } else {
    constexpr bool FAST = LAYOUT == BNK_CHANNELS;
    BNK_UNROLL
    for (int i = 0; i < PARTS<VEC, LAYOUT>; ++i) st[i].k = first[i];
    for (; v.more(4);) {  // whole groups of 4 vectors
      Acc x[4][VEC];
      load_group<T>(k, l, v, x);
      if constexpr (FAST) {
        BNK_UNROLL
        for (int i = 0; i < VEC; ++i) {
          const Acc values[4] = {x[0][i], x[1][i], x[2][i], x[3][i]};
          take_values<4>(st[i], values);
        }
      } else {
        take_values<4 * VEC>(st[0], &x[0][0]);
      }
    }
    for (; v.more(); v.next()) {  // the rest, a vector at a time
      Acc x[VEC];
      load_vec<T, VEC>(k.x, v.at_of(k.x, l.c), x);
      if constexpr (FAST) {
        BNK_UNROLL
        for (int i = 0; i < VEC; ++i) take_values<1>(st[i], &x[i]);
      } else {
        take_values<VEC>(st[0], x);
      }
    }
  }
}

template <typename Acc> BNK_DEVICE Moments moments_of(const State<Acc>& st) {
  return {st.k, st.mean, double(st.var) + double(st.err), st.n, st.sum};
}

// Channel blocks: the parts of the block's vectors that hold local channel q (< block_c):
// vectors [first, last], each's A part, or its B part where it starts in the channel
// before; part p of vector i is index 2 * i + p of the block's per-thread pairs.
struct BlockChannel {
  int first, last, s, vec;
  BNK_DEVICE BlockChannel(int q, int64_t S, int VEC)
      : first(q * static_cast<int>(S) / VEC),
        last(((q + 1) * static_cast<int>(S) - 1) / VEC),
        s(static_cast<int>(S) * q),
        vec(VEC) {}
  BNK_DEVICE int index(int i) const { return 2 * i + (i * vec < s ? 1 : 0); }
};

// Pools a channel block's channel q from the pairs of parts (Moments) its threads wrote,
// in vector order (block_pool's formulas, in one thread: a channel has S / VEC + 2 parts
// at most).
BNK_DEVICE Moments pool_block_channel(const Moments* parts, const BlockChannel& q) {
  double n = 0, sum = 0;
  for (int i = q.first; i <= q.last; ++i) {
    n += parts[q.index(i)].n;
    sum += parts[q.index(i)].sum;
  }
  const double inv = n > 0 ? loop_div(1.0, n) : 0.0;
  double mean = 0, var = 0;
  for (int i = q.first; i <= q.last; ++i) {
    const Moments& m = parts[q.index(i)];
    if (m.n > 0) mean += m.n * inv * (m.k + m.mean);
  }
  for (int i = q.first; i <= q.last; ++i) {
    const Moments& m = parts[q.index(i)];
    const double dev = m.k + m.mean - mean;
    if (m.n > 0) var += m.n * inv * (m.var + dev * dev);
  }
  return {mean, 0.0, var, n, sum};
}

// Where the statistics of channel c are finished (one split): the outputs, the running
// statistics, and its normalization parameters.
template <typename Acc> BNK_DEVICE Channel<Acc> finish_channel(const BnkCall& k, int64_t c,
                                                                 const Moments& m, bool store) {
  const Acc mean = static_cast<Acc>(moments_mean(m));
  const Acc var = static_cast<Acc>(m.var);
  const Acc rstd = inv_std(var, k.eps);
  if (store) {
    store_stat(k.stats_out[0], c, mean);
    store_stat(k.stats_out[1], c, rstd);
    store_stat(k.stats_out[2], c, var);
    update_running(k, c, mean, var);
  }
  return channel<Acc>(k, c, mean, rstd);
}

template <typename T, int VEC, int LAYOUT>
BNK_GLOBAL void BNK_LAUNCH_BOUNDS reduce_stats_kernel(BnkCall k) {
  typedef typename AccOf<T>::type Acc;
  constexpr int STATES = PARTS<VEC, LAYOUT>;
  const Lane l = lane_of<VEC, LAYOUT>(k);
  State<Acc> st[STATES] = {};
  if (l.active) welford_states<T, VEC, LAYOUT>(k, l, st);
  Channels<Acc, VEC, LAYOUT> ch;
  ch.cut = l.cut;
  if constexpr (LAYOUT == BNK_BLOCKS) {
    // every thread's pair of parts to shared memory, then a thread per channel pools its
    BNK_SHARED Moments s_parts[2 * BNK_MAX_THREADS];
    BNK_SHARED Acc s_mean[BNK_MAX_THREADS], s_rstd[BNK_MAX_THREADS];
    const bool crosses = l.cut < VEC;
    s_parts[2 * l.tr] = l.active ? moments_of(st[0]) : Moments{0, 0, 0, 0, 0};
    s_parts[2 * l.tr + 1] = l.active && crosses ? moments_of(st[1]) : Moments{0, 0, 0, 0, 0};
    bnk_sync();
    if (l.tr < k.block_c) {
      const int64_t c = l.c + l.tr;
      const Moments m = pool_block_channel(s_parts, BlockChannel(l.tr, k.s, VEC));
      if (k.splits > 1) {
        store_moments<Acc>(k, c, m);
      } else {
        const Channel<Acc> p = finish_channel<Acc>(k, c, m, true);
        s_mean[l.tr] = p.mean;
        s_rstd[l.tr] = p.rstd;
      }
    }
    if (k.splits > 1) return;
    bnk_sync();
    BNK_UNROLL
    for (int i = 0; i < STATES; ++i) {
      const int q = l.first + (i == 1 && crosses ? 1 : 0);
      if (l.active) ch.p[i] = channel<Acc>(k, l.c + q, s_mean[q], s_rstd[q]);
    }
  } else {
    BNK_SHARED double s0[BNK_MAX_THREADS], s1[BNK_MAX_THREADS];
    BNK_UNROLL
    for (int i = 0; i < STATES; ++i) {  // every thread folds (a barrier in each)
      const Moments m = block_pool(l, s0, s1, moments_of(st[i]));
      const int64_t c = l.c + i;
      if (!l.active || c >= k.c) continue;
      if (k.splits > 1) {
        if (l.tr == 0) store_moments<Acc>(k, c, m);
        continue;
      }
      ch.p[i] = finish_channel<Acc>(k, c, m, l.tr == 0);
    }
    if (k.splits > 1) return;
  }
  count_batch(k);  // not cumulative here (bnk_api.h): nothing reads the counter
  if (l.active && k.out.ptr) normalize_rows_of_call<T, VEC, LAYOUT>(k, l, ch);
}

// a[part of element j] += v (channel blocks: A's before cut, B's from it on)
template <typename Acc, int VEC, int LAYOUT>
BNK_DEVICE void add_to_part(Acc (&a)[PARTS<VEC, LAYOUT>], const Channels<Acc, VEC, LAYOUT>& ch,
                            int j, Acc v) {
  if constexpr (LAYOUT == BNK_CHANNELS) {
    a[j] += v;
  } else if constexpr (LAYOUT == BNK_BLOCKS) {
    a[0] += j < ch.cut ? v : Acc(0);
    a[1] += j < ch.cut ? Acc(0) : v;
  } else {
    a[0] += v;
  }
}

template <typename T, int VEC, int LAYOUT, int ACT, bool RES, bool Y>
BNK_GLOBAL void BNK_LAUNCH_BOUNDS reduce_grads_kernel(BnkCall k) {
  typedef typename AccOf<T>::type Acc;
  constexpr int STATES = PARTS<VEC, LAYOUT>;
  const Lane l = lane_of<VEC, LAYOUT>(k);
  Channels<Acc, VEC, LAYOUT> ch;
  Acc sum_g[STATES] = {}, sum_gx[STATES] = {};
  if (l.active) {
    ch = given_channels<Acc, VEC, LAYOUT>(k, l);
    for_vectors<APPLY_UNROLL<VEC>, VEC, LAYOUT>(k, l, [&](const auto& places) {
      constexpr int U = sizeof(places) / sizeof(places[0]);
      Acc x[U][VEC], g[U][VEC];
      BNK_UNROLL
      for (int u = 0; u < U; ++u) {
        load_vec<T, VEC>(k.x, places[u].at(k.x, l.c), x[u]);
        load_vec<T, VEC>(k.g, places[u].at(k.g, l.c), g[u]);
      }
      BNK_UNROLL
      for (int u = 0; u < U; ++u) {
        epilogue_grad<T, VEC, LAYOUT, ACT, RES, Y>(k, places[u], l.c, ch, x[u], g[u]);
        BNK_UNROLL
        for (int j = 0; j < VEC; ++j) {
          const Channel<Acc> p = ch.of(j);
          add_to_part(sum_g, ch, j, g[u][j]);
          add_to_part(sum_gx, ch, j, g[u][j] * ((x[u][j] - p.mean) * p.rstd));
        }
      }
    });
  }
  Acc mean_g[STATES] = {}, mean_gx[STATES] = {};
  if constexpr (LAYOUT == BNK_BLOCKS) {
    // every thread's pair of parts to shared memory, then a thread per channel sums its
    BNK_SHARED double s_g[2 * BNK_MAX_THREADS], s_gx[2 * BNK_MAX_THREADS];
    BNK_SHARED Acc s_mean_g[BNK_MAX_THREADS], s_mean_gx[BNK_MAX_THREADS];
    const bool crosses = l.cut < VEC;
    BNK_UNROLL
    for (int i = 0; i < 2; ++i) {
      const bool held = l.active && (i == 0 || crosses);
      s_g[2 * l.tr + i] = held ? double(sum_g[i]) : 0.0;
      s_gx[2 * l.tr + i] = held ? double(sum_gx[i]) : 0.0;
    }
    bnk_sync();
    if (l.tr < k.block_c) {
      const int64_t c = l.c + l.tr;
      const BlockChannel q(l.tr, k.s, VEC);
      double a = 0, b = 0;
      for (int i = q.first; i <= q.last; ++i) {
        a += s_g[q.index(i)];
        b += s_gx[q.index(i)];
      }
      if (k.splits > 1) {
        Acc* part = static_cast<Acc*>(k.workspace);
        part[blockIdx.y * k.c + c] = static_cast<Acc>(a);
        part[(k.splits + blockIdx.y) * k.c + c] = static_cast<Acc>(b);
      } else {
        store_grad_sums(k, c, static_cast<Acc>(a), static_cast<Acc>(b));
        const Acc count = count_of<Acc>(k, c);
        s_mean_g[l.tr] = static_cast<Acc>(a) / count;
        s_mean_gx[l.tr] = static_cast<Acc>(b) / count;
      }
    }
    if (k.splits > 1 || (!k.out.ptr && !k.dres.ptr)) return;
    bnk_sync();
    if (!l.active) return;
    BNK_UNROLL
    for (int i = 0; i < STATES; ++i) {
      const int q = l.first + (i == 1 && crosses ? 1 : 0);
      mean_g[i] = s_mean_g[q];
      mean_gx[i] = s_mean_gx[q];
    }
  } else {
    BNK_SHARED Acc s_g[BNK_MAX_THREADS], s_gx[BNK_MAX_THREADS];
    BNK_UNROLL
    for (int i = 0; i < STATES; ++i) {  // every thread folds (a barrier in each)
      block_fold(l, s_g, s_gx, sum_g[i], sum_gx[i], SumFold());
      const int64_t c = l.c + i;
      if (!l.active || c >= k.c || l.tr != 0) continue;
      if (k.splits > 1) {
        Acc* part = static_cast<Acc*>(k.workspace);
        part[blockIdx.y * k.c + c] = sum_g[i];
        part[(k.splits + blockIdx.y) * k.c + c] = sum_gx[i];
      } else {
        store_grad_sums(k, c, sum_g[i], sum_gx[i]);
      }
    }
    if (k.splits > 1 || !l.active || (!k.out.ptr && !k.dres.ptr)) return;
    BNK_UNROLL
    for (int i = 0; i < STATES; ++i) {
      const Acc count = count_of<Acc>(k, l.c + i);
      mean_g[i] = sum_g[i] / count;
      mean_gx[i] = sum_gx[i] / count;
    }
  }
  input_grad_rows<T, VEC, LAYOUT, ACT, RES, Y>(k, l, ch, mean_g, mean_gx);
}

// Split j holds min(rows_per_split, R - j * rows_per_split) rows (channel blocks: samples,
// of S values each); every earlier one is full. A block takes blockDim.x / lanes
// channels, lanes threads each (a power of two, at most the splits): thread t sums splits
// t, t + lanes, ... in split order, then the block sums its threads in a fixed tree
// (block_fold), so that 1000 splits take 4 dependent steps and a tree of 8, not 1000.
BNK_DEVICE Lane merge_lane(const BnkCall& k) {
  Lane l;
  int lanes = 1;
  while (lanes < k.splits && lanes < static_cast<int>(blockDim.x)) lanes *= 2;
  l.lanes = lanes;
  l.channel_lanes = blockDim.x / lanes;
  l.tc = threadIdx.x / lanes;
  l.tr = threadIdx.x % lanes;
  l.c = static_cast<int64_t>(blockIdx.x) * l.channel_lanes + l.tc;
  l.active = l.c < k.c;
  l.row0 = l.row_end = 0;
  l.at = l.first = l.cut = 0;
  return l;
}

// The values split j holds.
BNK_DEVICE double split_values(const BnkCall& k, int64_t j) {
  const bool blocks = k.layout == BNK_BLOCKS;
  const int64_t units = blocks ? k.n : k.n * k.s, before = j * k.rows_per_split;
  const int64_t here = units - before < k.rows_per_split ? units - before : k.rows_per_split;
  return static_cast<double>(here * (blocks ? k.s : 1));
}

template <typename T> BNK_GLOBAL void BNK_LAUNCH_BOUNDS merge_kernel(BnkCall k, int backward) {
  typedef typename AccOf<T>::type Acc;
  BNK_SHARED double s0[BNK_MAX_THREADS], s1[BNK_MAX_THREADS];
  const Lane l = merge_lane(k);
  const int64_t c = l.c;
  const Acc* part = static_cast<const Acc*>(k.workspace);
  if (backward) {
    double a = 0, b = 0;
    for (int64_t j = l.tr; l.active && j < k.splits; j += l.lanes) {
      a += part[j * k.c + c];
      b += part[(k.splits + j) * k.c + c];
    }
    block_fold(l, s0, s1, a, b, SumFold());
    if (l.active && l.tr == 0) store_grad_sums(k, c, static_cast<Acc>(a), static_cast<Acc>(b));
    return;
  }
  // the splits pooled as block_pool pools lanes, each thread's splits first; split j's
  // weight w_j = n_j / (N * S)
  const double inv_values = loop_div(1.0, static_cast<double>(k.n * k.s));
  double mean = 0, sum = 0;
  for (int64_t j = l.tr; l.active && j < k.splits; j += l.lanes) {
    mean += split_values(k, j) * inv_values *
            (double(part[j * k.c + c]) + double(part[(k.splits + j) * k.c + c]));
    sum += part[(3 * k.splits + j) * k.c + c];
  }
  block_fold(l, s0, s1, mean, sum, SumFold());
  double var = 0, unused = 0;
  for (int64_t j = l.tr; l.active && j < k.splits; j += l.lanes) {
    const double dev = double(part[j * k.c + c]) + double(part[(k.splits + j) * k.c + c]) - mean;
    var += split_values(k, j) * inv_values *
           (double(part[(2 * k.splits + j) * k.c + c]) + dev * dev);
  }
  block_fold(l, s0, s1, var, unused, SumFold());
  if (!l.active || l.tr != 0) return;
  const Moments m = {mean, 0.0, var, static_cast<double>(k.n * k.s), sum};
  const Acc v = static_cast<Acc>(m.var);
  const Acc mu = static_cast<Acc>(moments_mean(m));
  store_stat(k.stats_out[0], c, mu);
  store_stat(k.stats_out[1], c, inv_std(v, k.eps));
  store_stat(k.stats_out[2], c, v);
  update_running(k, c, mu, v);
}

template <typename T, int VEC, int LAYOUT, int ACT, bool RES>
BNK_GLOBAL void BNK_LAUNCH_BOUNDS apply_normalize_kernel(BnkCall k) {
  typedef typename AccOf<T>::type Acc;
  const Lane l = lane_of<VEC, LAYOUT>(k);
  count_batch(k);  // after the merge that read the counter
  if (l.active) normalize_rows<T, VEC, LAYOUT, ACT, RES>(k, l, given_channels<Acc, VEC, LAYOUT>(k, l));
}

template <typename T, int VEC, int LAYOUT, int ACT, bool RES, bool Y>
BNK_GLOBAL void BNK_LAUNCH_BOUNDS apply_input_grad_kernel(BnkCall k) {
  typedef typename AccOf<T>::type Acc;
  constexpr int STATES = PARTS<VEC, LAYOUT>;
  const Lane l = lane_of<VEC, LAYOUT>(k);
  if (!l.active) return;
  Acc mean_g[STATES] = {}, mean_gx[STATES] = {};
  if (k.training) {  // the sums of reduce_grads_kernel, or given (SyncBatchNorm's)
    BNK_UNROLL
    for (int i = 0; i < STATES; ++i) {
      const int64_t c = part_channel<VEC, LAYOUT>(l, i);
      const Acc count = count_of<Acc>(k, c);
      mean_g[i] = static_cast<const Acc*>(k.sum_g)[c] / count;
      mean_gx[i] = static_cast<const Acc*>(k.sum_gx)[c] / count;
    }
  }
  input_grad_rows<T, VEC, LAYOUT, ACT, RES, Y>(k, l, given_channels<Acc, VEC, LAYOUT>(k, l), mean_g,
                                               mean_gx);
}
