// The launchers of one element type T: which kernels a call runs, each the instantiation
// for its vectors, layout and epilogue (bn_kernels.cuh), on the call's stream.
//
// The passes (docs/math.md): reduce, merge, apply; "fused" is reduce and apply in one launch.
//   forward  training, splits == 1: reduce_stats_kernel alone (statistics, then normalize);
//            the running statistics are updated where the statistics are finished;
//            training, splits > 1: reduce_stats_kernel (partials), merge_kernel,
//            apply_normalize_kernel; eval: apply_normalize_kernel with the running statistics.
//   backward with sums (stats_out): reduce_grads_kernel alone (splits == 1), or
//            reduce_grads_kernel, merge_kernel, apply_input_grad_kernel; without:
//            apply_input_grad_kernel alone (running statistics, or SyncBatchNorm's sums).
//
// Each element type's launchers are one translation unit (kernels_<type>.cu, built side by
// side: a type's kernels are a few hundred instantiations), entered through launch.h.
#pragma once
#include <type_traits>

#include "bn_kernels.cuh"
#include "launch.h"

namespace {

template <typename T> int acc_code() { return std::is_same<T, double>::value ? BNK_F64 : BNK_F32; }

dim3 grid_of(const BnkCall& k) {
  return dim3(static_cast<unsigned>((k.c + k.block_c - 1) / k.block_c),
              static_cast<unsigned>(k.splits));
}

// merge_kernel's grid: merge_lane's channels per block (BNK_MAX_THREADS / its lanes).
dim3 merge_grid_of(const BnkCall& k) {
  int64_t lanes = 1;
  while (lanes < k.splits && lanes < BNK_MAX_THREADS) lanes *= 2;
  const int64_t channels = BNK_MAX_THREADS / lanes;
  return dim3(static_cast<unsigned>((k.c + channels - 1) / channels));
}

template <int V> using Int = std::integral_constant<int, V>;
template <bool B> using Bool = std::integral_constant<bool, B>;

// run(Int<VEC>, Int<LAYOUT>) for the call's vector width (k.vec: 1, or a 128-bit vector
// of T) and layout (channel blocks take vectors only).
template <typename T, typename Run> int with_vectors(const BnkCall& k, Run run) {
  constexpr int V = 16 / sizeof(T);
  if (k.layout == BNK_BLOCKS) return run(Int<V>(), Int<BNK_BLOCKS>());
  if (k.vec > 1) {
    return k.layout == BNK_CHANNELS ? run(Int<V>(), Int<BNK_CHANNELS>())
                                    : run(Int<V>(), Int<BNK_ROWS>());
  }
  return k.layout == BNK_CHANNELS ? run(Int<1>(), Int<BNK_CHANNELS>())
                                  : run(Int<1>(), Int<BNK_ROWS>());
}

// run(Int<ACT>, Bool<RES>) for the forward's epilogue.
template <typename Run> int with_forward_epilogue(const BnkCall& k, Run run) {
  const bool res = k.res.ptr != nullptr;
  switch (k.activation) {
    case BNK_ACT_RELU: return res ? run(Int<BNK_ACT_RELU>(), Bool<true>()) : run(Int<BNK_ACT_RELU>(), Bool<false>());
    case BNK_ACT_SILU: return res ? run(Int<BNK_ACT_SILU>(), Bool<true>()) : run(Int<BNK_ACT_SILU>(), Bool<false>());
    case BNK_ACT_GELU: return res ? run(Int<BNK_ACT_GELU>(), Bool<true>()) : run(Int<BNK_ACT_GELU>(), Bool<false>());
    default: return res ? run(Int<BNK_ACT_IDENTITY>(), Bool<true>()) : run(Int<BNK_ACT_IDENTITY>(), Bool<false>());
  }
}

// run(Int<ACT>, Bool<RES>, Bool<Y>) for the backward's: relu's mask from the saved output y
// where there is one, else z recomputed (with the residual where there is one); identity
// reads neither.
template <typename Run> int with_backward_epilogue(const BnkCall& k, Run run) {
  const bool res = k.res.ptr != nullptr, y = k.y.ptr != nullptr;
  switch (k.activation) {
    case BNK_ACT_RELU:
      if (y) return run(Int<BNK_ACT_RELU>(), Bool<false>(), Bool<true>());
      return res ? run(Int<BNK_ACT_RELU>(), Bool<true>(), Bool<false>())
                 : run(Int<BNK_ACT_RELU>(), Bool<false>(), Bool<false>());
    case BNK_ACT_SILU:
      return res ? run(Int<BNK_ACT_SILU>(), Bool<true>(), Bool<false>())
                 : run(Int<BNK_ACT_SILU>(), Bool<false>(), Bool<false>());
    case BNK_ACT_GELU:
      return res ? run(Int<BNK_ACT_GELU>(), Bool<true>(), Bool<false>())
                 : run(Int<BNK_ACT_GELU>(), Bool<false>(), Bool<false>());
    default: return run(Int<BNK_ACT_IDENTITY>(), Bool<false>(), Bool<false>());
  }
}

template <typename T> int launch_normalize(const BnkCall& k) {
  ++bnk_launches[LAUNCH_APPLY];
  return with_vectors<T>(k, [&](auto vec, auto layout) {
    return with_forward_epilogue(k, [&](auto act, auto res) {
      return BNK_LAUNCH((apply_normalize_kernel<T, vec.value, layout.value, act.value, res.value>),
                        grid_of(k), dim3(k.threads), k.stream, k);
    });
  });
}

template <typename T> int launch_input_grad(const BnkCall& k) {
  ++bnk_launches[LAUNCH_APPLY];
  return with_vectors<T>(k, [&](auto vec, auto layout) {
    return with_backward_epilogue(k, [&](auto act, auto res, auto y) {
      return BNK_LAUNCH(
          (apply_input_grad_kernel<T, vec.value, layout.value, act.value, res.value, y.value>),
          grid_of(k), dim3(k.threads), k.stream, k);
    });
  });
}

template <typename T> int launch_merge(const BnkCall& k, int backward) {
  ++bnk_launches[LAUNCH_MERGE];
  return BNK_LAUNCH(merge_kernel<T>, merge_grid_of(k), dim3(BNK_MAX_THREADS), k.stream, k,
                    backward);
}

template <typename T> int run_forward(const BnkCall& k) {
  if (!k.training) return launch_normalize<T>(k);
  ++bnk_launches[k.splits == 1 ? LAUNCH_FUSED : LAUNCH_REDUCE];
  int err = with_vectors<T>(k, [&](auto vec, auto layout) {
    return BNK_LAUNCH((reduce_stats_kernel<T, vec.value, layout.value>), grid_of(k),
                      dim3(k.threads), k.stream, k);
  });
  if (err || k.splits == 1) return err;
  if ((err = launch_merge<T>(k, 0))) return err;
  if (!k.out.ptr) return 0;
  BnkCall a = k;  // normalize with the merged statistics
  a.mean = k.stats_out[0];
  a.rstd_or_var = k.stats_out[1];
  a.stat_dtype = acc_code<T>();
  a.given_var = 0;
  return launch_normalize<T>(a);
}

template <typename T> int run_backward(const BnkCall& k) {
  if (!k.stats_out[0]) return launch_input_grad<T>(k);
  ++bnk_launches[k.splits == 1 ? LAUNCH_FUSED : LAUNCH_REDUCE];
  int err = with_vectors<T>(k, [&](auto vec, auto layout) {
    return with_backward_epilogue(k, [&](auto act, auto res, auto y) {
      return BNK_LAUNCH(
          (reduce_grads_kernel<T, vec.value, layout.value, act.value, res.value, y.value>),
          grid_of(k), dim3(k.threads), k.stream, k);
    });
  });
  if (err || k.splits == 1) return err;
  if ((err = launch_merge<T>(k, 1))) return err;
  if (!k.out.ptr && !k.dres.ptr) return 0;
  BnkCall a = k;  // the input gradient from the merged sums
  a.sum_g = k.stats_out[0];
  a.sum_gx = k.stats_out[1];
  return launch_input_grad<T>(a);
}

}  // namespace

// The entry points of element type T, as launch.h declares them.
#define BNK_LAUNCHERS(T, NAME)                                                      \
  int bnk_run_forward_##NAME(const BnkCall& k) { return run_forward<T>(k); }      \
  int bnk_run_backward_##NAME(const BnkCall& k) { return run_backward<T>(k); }
