// libbnkernels_cuda: the launchers behind bnk_api.h.
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
// Launches go on the stream in the call (torch's current stream) and never synchronise
// the host. Built by bnkernels/cuda_build.py: nvcc for the GPU, or g++ -DBNK_EMULATE for
// the CPU test suite.
#include <stddef.h>

#include <atomic>
#include <type_traits>

#include "bn_kernels.cuh"

namespace {

enum { LAUNCH_REDUCE, LAUNCH_MERGE, LAUNCH_APPLY, LAUNCH_FUSED, LAUNCH_KINDS };
std::atomic<int64_t> launches[LAUNCH_KINDS];

// Codes of our own, beside CUDA's (which are below 10000).
enum { BNK_ERR_INVALID_CALL = 20001, BNK_ERR_DTYPE = 20002 };

template <typename T> int acc_code() { return std::is_same<T, double>::value ? BNK_F64 : BNK_F32; }

dim3 grid_of(const BnkCall& k) {
  return dim3(static_cast<unsigned>((k.c + k.block_c - 1) / k.block_c),
              static_cast<unsigned>(k.splits));
}

dim3 merge_grid_of(const BnkCall& k) {
  return dim3(static_cast<unsigned>((k.c + BNK_MAX_THREADS - 1) / BNK_MAX_THREADS));
}

template <typename T> int launch_normalize(const BnkCall& k) {
  ++launches[LAUNCH_APPLY];
  return BNK_LAUNCH(apply_normalize_kernel<T>, grid_of(k), dim3(k.threads), k.stream, k);
}

template <typename T> int launch_input_grad(const BnkCall& k) {
  ++launches[LAUNCH_APPLY];
  return BNK_LAUNCH(apply_input_grad_kernel<T>, grid_of(k), dim3(k.threads), k.stream, k);
}

template <typename T> int launch_merge(const BnkCall& k, int backward) {
  ++launches[LAUNCH_MERGE];
  return BNK_LAUNCH(merge_kernel<T>, merge_grid_of(k), dim3(BNK_MAX_THREADS), k.stream, k,
                    backward);
}

template <typename T> int run_forward(const BnkCall& k) {
  if (!k.training) return launch_normalize<T>(k);
  ++launches[k.splits == 1 ? LAUNCH_FUSED : LAUNCH_REDUCE];
  int err = BNK_LAUNCH(reduce_stats_kernel<T>, grid_of(k), dim3(k.threads), k.stream, k);
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
  ++launches[k.splits == 1 ? LAUNCH_FUSED : LAUNCH_REDUCE];
  int err = BNK_LAUNCH(reduce_grads_kernel<T>, grid_of(k), dim3(k.threads), k.stream, k);
  if (err || k.splits == 1) return err;
  if ((err = launch_merge<T>(k, 1))) return err;
  if (!k.out.ptr && !k.dres.ptr) return 0;
  BnkCall a = k;  // the input gradient from the merged sums
  a.sum_g = k.stats_out[0];
  a.sum_gx = k.stats_out[1];
  return launch_input_grad<T>(a);
}

// run(T()) for the element type of the call.
template <typename Run> int dispatch(int dtype, Run run) {
  switch (dtype) {
    case BNK_F32: return run(float());
    case BNK_F16: return run(__half());
    case BNK_BF16: return run(__nv_bfloat16());
    case BNK_F64: return run(double());
    default: return BNK_ERR_DTYPE;
  }
}

bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// What the kernels assume of a call; a violation is a bug in the Python launcher.
bool valid(const BnkCall& k, bool forward) {
  if (k.n <= 0 || k.c <= 0 || k.s <= 0 || !k.x.ptr) return false;
  if (!is_pow2(k.threads) || k.threads > BNK_MAX_THREADS || !is_pow2(k.block_c) ||
      k.threads % k.block_c != 0)
    return false;
  if (k.splits < 1 || k.splits > 65535 || k.rows_per_split < 1 ||
      k.rows_per_split * k.splits < k.n * k.s || (k.splits > 1 && !k.workspace))
    return false;
  if (!k.mean != !k.rstd_or_var) return false;
  if (k.running_mean || k.running_var || k.num_batches_tracked) {
    // a training forward with an output; cumulative: a counter, and a launch after the
    // one that reads it
    if (!forward || !k.training || !k.out.ptr || !k.running_mean != !k.running_var) return false;
    if (k.cumulative && (!k.num_batches_tracked || !k.running_mean || k.splits == 1))
      return false;
  }
  if (forward) {
    if (k.training) return k.stats_out[0] && k.stats_out[1] && k.stats_out[2];
    return k.mean && k.out.ptr;
  }
  if (!k.g.ptr || !k.mean) return false;
  if (k.stats_out[0] && !k.stats_out[1]) return false;
  if ((k.grad_out[0] || k.grad_out[1]) && !k.stats_out[0]) return false;
  return k.stats_out[0] || !k.training || (k.sum_g && k.sum_gx);
}

#ifdef BNK_EMULATE
struct DeviceGuard {
  explicit DeviceGuard(int) {}
};
#else
// Launch on the call's device, and leave the thread's current device as it was.
struct DeviceGuard {
  int previous = -1;
  explicit DeviceGuard(int device) {
    int current = 0;
    if (cudaGetDevice(&current) == cudaSuccess && current != device &&
        cudaSetDevice(device) == cudaSuccess)
      previous = current;
  }
  ~DeviceGuard() {
    if (previous >= 0) cudaSetDevice(previous);
  }
};
#endif

}  // namespace

extern "C" {

int bnk_forward(const BnkCall* call) {
  if (!call || !valid(*call, true)) return BNK_ERR_INVALID_CALL;
  DeviceGuard guard(call->device);
  return dispatch(call->dtype, [&](auto tag) { return run_forward<decltype(tag)>(*call); });
}

int bnk_backward(const BnkCall* call) {
  if (!call || !valid(*call, false)) return BNK_ERR_INVALID_CALL;
  DeviceGuard guard(call->device);
  return dispatch(call->dtype, [&](auto tag) { return run_backward<decltype(tag)>(*call); });
}

const char* bnk_error_string(int code) {
  switch (code) {
    case 0: return "no error";
    case BNK_ERR_INVALID_CALL: return "invalid BnkCall (a bug in bnkernels' launcher)";
    case BNK_ERR_DTYPE: return "unsupported dtype code";
#ifdef BNK_EMULATE
    case bnk_emu::BNK_EMU_DIVERGENT_BARRIER:
      return "emulation: a barrier reached by only some threads of a block";
    case bnk_emu::BNK_EMU_BAD_LAUNCH: return "emulation: unsupported launch shape";
    default: return "unknown error";
#else
    default: return cudaGetErrorString(static_cast<cudaError_t>(code));
#endif
  }
}

const char* bnk_activation_name(int code) {
  switch (code) {
    case BNK_ACT_IDENTITY: return "identity";
    case BNK_ACT_RELU: return "relu";
    case BNK_ACT_SILU: return "silu";
    case BNK_ACT_GELU: return "gelu";
    default: return nullptr;
  }
}

int bnk_call_offsets(int64_t* out, int capacity) {
#define BNK_FIELD(name) offsetof(BnkCall, name)
  const int64_t fields[] = {
      sizeof(BnkCall),           BNK_FIELD(n),           BNK_FIELD(c),
      BNK_FIELD(s),              BNK_FIELD(x),           BNK_FIELD(g),
      BNK_FIELD(res),            BNK_FIELD(y),           BNK_FIELD(out),
      BNK_FIELD(dres),           BNK_FIELD(weight),      BNK_FIELD(bias),
      BNK_FIELD(mean),           BNK_FIELD(rstd_or_var), BNK_FIELD(sum_g),
      BNK_FIELD(sum_gx),         BNK_FIELD(channel_count), BNK_FIELD(stats_out),
      BNK_FIELD(workspace),      BNK_FIELD(eps),         BNK_FIELD(count),
      BNK_FIELD(dtype),          BNK_FIELD(weight_dtype), BNK_FIELD(bias_dtype),
      BNK_FIELD(stat_dtype),     BNK_FIELD(activation),  BNK_FIELD(training),
      BNK_FIELD(given_var),      BNK_FIELD(channels_fast),
      BNK_FIELD(threads),        BNK_FIELD(block_c),     BNK_FIELD(splits),
      BNK_FIELD(device),         BNK_FIELD(rows_per_split), BNK_FIELD(stream),
      BNK_FIELD(running_mean),   BNK_FIELD(running_var), BNK_FIELD(num_batches_tracked),
      BNK_FIELD(running_sm),     BNK_FIELD(running_sv),  BNK_FIELD(momentum),
      BNK_FIELD(running_dtype),  BNK_FIELD(cumulative),  BNK_FIELD(grad_out),
      BNK_FIELD(grad_dtype),
  };
#undef BNK_FIELD
  const int count = static_cast<int>(sizeof(fields) / sizeof(fields[0]));
  for (int i = 0; i < count && i < capacity; ++i) out[i] = fields[i];
  return count;
}

void bnk_launch_counts(int64_t out[4]) {
  for (int i = 0; i < LAUNCH_KINDS; ++i) out[i] = launches[i].load();
}

}  // extern "C"
