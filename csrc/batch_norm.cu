// libbnkernels_cuda's C ABI (bnk_api.h): the call's checks, its element type's launchers
// (launchers.cuh, one translation unit per type: kernels_<type>.cu), the errors, the ABI
// check's offsets and the launch counts.
//
// Launches go on the stream in the call (torch's current stream) and never synchronise
// the host. Built by bnkernels/backends/cuda/build.py: nvcc for the GPU, or the host
// compiler with -DBNK_EMULATE for the CPU test suite.
#include <stddef.h>

#include <atomic>

#include "launch.h"
#include "portable.cuh"

std::atomic<int64_t> bnk_launches[LAUNCH_KINDS];

namespace {

// Codes of our own, beside CUDA's (which are below 10000).
enum { BNK_ERR_INVALID_CALL = 20001, BNK_ERR_DTYPE = 20002 };

// The call's element type's forward or backward (kernels_<type>.cu).
int run_call(const BnkCall& k, bool forward) {
  switch (k.dtype) {
    case BNK_F32: return forward ? bnk_run_forward_f32(k) : bnk_run_backward_f32(k);
    case BNK_F16: return forward ? bnk_run_forward_f16(k) : bnk_run_backward_f16(k);
    case BNK_BF16: return forward ? bnk_run_forward_bf16(k) : bnk_run_backward_bf16(k);
    case BNK_F64: return forward ? bnk_run_forward_f64(k) : bnk_run_backward_f64(k);
    default: return BNK_ERR_DTYPE;
  }
}

bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

int elements_per_16_bytes(int dtype) {
  switch (dtype) {
    case BNK_F16:
    case BNK_BF16: return 8;
    case BNK_F64: return 2;
    default: return 4;
  }
}

// What the kernels assume of a call; a violation is a bug in the Python launcher.
bool valid(const BnkCall& k, bool forward) {
  if (k.n <= 0 || k.c <= 0 || k.s <= 0 || !k.x.ptr) return false;
  if (k.vec != 1 && k.vec != elements_per_16_bytes(k.dtype)) return false;  // (0: unset)
  if (k.layout != BNK_ROWS && k.layout != BNK_CHANNELS && k.layout != BNK_BLOCKS) return false;
  if (!is_pow2(k.threads) || k.threads > BNK_MAX_THREADS) return false;
  if (k.layout == BNK_BLOCKS) {  // a vector per thread of a span of whole channels
    if (k.vec == 1 || k.block_c < 1 || k.c % k.block_c != 0 || k.s < k.vec ||
        (k.block_c * k.s) % k.vec != 0 || k.block_c * k.s > k.threads * k.vec)
      return false;
  } else {
    const int64_t channel_lanes = k.layout == BNK_CHANNELS ? k.block_c / k.vec : k.block_c;
    if (!is_pow2(k.block_c) || channel_lanes < 1 || k.threads % channel_lanes != 0) return false;
    if (k.vec > 1 && (k.layout == BNK_CHANNELS ? (k.block_c % k.vec != 0 || k.c % k.vec != 0)
                                                : (k.s % k.vec != 0 || k.rows_per_split % k.vec != 0)))
      return false;
  }
  const int64_t units = k.layout == BNK_BLOCKS ? k.n : k.n * k.s;  // what a split counts
  if (k.splits < 1 || k.splits > 65535 || k.rows_per_split < 1 ||
      k.rows_per_split * k.splits < units || (k.splits > 1 && !k.workspace))
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
  return run_call(*call, true);
}

int bnk_backward(const BnkCall* call) {
  if (!call || !valid(*call, false)) return BNK_ERR_INVALID_CALL;
  DeviceGuard guard(call->device);
  return run_call(*call, false);
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
      BNK_FIELD(given_var),      BNK_FIELD(layout),
      BNK_FIELD(threads),        BNK_FIELD(block_c),     BNK_FIELD(splits),
      BNK_FIELD(device),         BNK_FIELD(rows_per_split), BNK_FIELD(stream),
      BNK_FIELD(running_mean),   BNK_FIELD(running_var), BNK_FIELD(num_batches_tracked),
      BNK_FIELD(running_sm),     BNK_FIELD(running_sv),  BNK_FIELD(momentum),
      BNK_FIELD(running_dtype),  BNK_FIELD(cumulative),  BNK_FIELD(grad_out),
      BNK_FIELD(grad_dtype),     BNK_FIELD(vec),
  };
#undef BNK_FIELD
  const int count = static_cast<int>(sizeof(fields) / sizeof(fields[0]));
  for (int i = 0; i < count && i < capacity; ++i) out[i] = fields[i];
  return count;
}

void bnk_launch_counts(int64_t out[4]) {
  for (int i = 0; i < LAUNCH_KINDS; ++i) out[i] = bnk_launches[i].load();
}

}  // extern "C"
