// The C ABI of libbnkernels_cuda: one struct describes a call, two entry points run it.
//
// bnkernels/cuda_library.py mirrors BnkCall field for field with ctypes, and checks the
// offsets this library reports (bnk_call_offsets) when it loads it, so the two can't drift.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types (BnkCall.dtype, and the dtype of each per-channel vector).
enum { BNK_F32 = 0, BNK_F16 = 1, BNK_BF16 = 2, BNK_F64 = 3 };

// How a block's threads lie over a tensor (BnkCall.layout; csrc/bn_kernels.cuh):
//   BNK_ROWS      NCHW: neighbouring threads on neighbouring rows r = n * S + s of a channel;
//   BNK_CHANNELS  channels_last: neighbouring threads on neighbouring channels of a row;
//   BNK_BLOCKS    NCHW with S no multiple of the vector (7 x 7, 14 x 14): a block takes
//                 block_c channels whose S values lie contiguous in each sample (sC == S,
//                 sS == 1), its threads one vector of that span each (a vector may cross
//                 from one channel into the next), and loops over the samples;
//                 rows_per_split counts samples.
enum { BNK_ROWS = 0, BNK_CHANNELS = 1, BNK_BLOCKS = 2 };

// Fused activations (BnkCall.activation): bnkernels/activations.py's codes, checked against
// bnk_activation_name when the library loads.
enum { BNK_ACT_IDENTITY = 0, BNK_ACT_RELU = 1, BNK_ACT_SILU = 2, BNK_ACT_GELU = 3 };

// A tensor of shape (N, C, *spatial) read as (N, C, S) through three strides, in elements.
typedef struct {
  void* ptr;  // NULL: the call has no such tensor
  int64_t sn, sc, ss;
} BnkTensor;

typedef struct {
  int64_t n, c, s;
  // Element tensors, all of type `dtype`. g: dL/dy. res: the residual, added to bn(x)
  // before the activation (forward; backward recomputes z with it). y: the saved output
  // (backward, relu after a residual: relu' = y > 0). out: y forward, dx backward.
  // dres: the residual's gradient dL/dz (backward).
  BnkTensor x, g, res, y, out, dres;
  const void* weight;  // (C,) of weight_dtype, or NULL (gamma = 1)
  const void* bias;    // (C,) of bias_dtype, or NULL (beta = 0)
  const void* mean;    // (C,) of stat_dtype: the saved batch mean, or the running mean
  const void* rstd_or_var;  // (C,) of stat_dtype: rstd, or (given_var) a variance
  const void* sum_g;   // (C,) acc: given sums of g and g * xhat, over the count below,
  const void* sum_gx;  //   for the three-path dx (SyncBatchNorm's global sums)
  const void* channel_count;  // (C,) acc: the values each given sum is over, or NULL: count
  // (C,) acc outputs; NULL: not wanted. Forward training: mean, rstd, biased var.
  // Backward: sum g, sum g*xhat (their presence asks for the reduction).
  void* stats_out[3];
  void* workspace;  // acc, 4 * splits * C (forward; backward uses 2); used when splits > 1
  double eps;
  double count;  // the values each sum of the three-path dx is over (m = N*S)
  int32_t dtype, weight_dtype, bias_dtype, stat_dtype;
  int32_t activation;     // 0 identity, 1 relu, 2 silu, 3 gelu (erf)
  int32_t training;       // forward: batch statistics; backward: the three-path dx
  int32_t given_var;      // rstd_or_var is a variance: rstd = 1 / sqrt(var + eps)
  int32_t layout;         // BNK_ROWS, BNK_CHANNELS or BNK_BLOCKS (below)
  int32_t threads;        // per block, a power of two <= BNK_MAX_THREADS
  int32_t block_c;        // channels per block, a power of two dividing threads
  int32_t splits;         // blocks sharing a channel block, rows_per_split rows each
  int32_t device;         // the CUDA device of every pointer
  int64_t rows_per_split;
  void* stream;  // cudaStream_t to launch on (torch's current stream)
  // Forward training: the running statistics, updated in place by the launch that
  // finishes the batch statistics (NULL: none). (C,) of running_dtype, strided by
  // running_sm / running_sv elements: running = lerp(running, batch, f), the batch variance
  // unbiased (times count / (count - 1)); f = momentum, or (cumulative) 1 /
  // (*num_batches_tracked + 1). num_batches_tracked (int64, or NULL) is incremented by the
  // call's last launch. Cumulative needs a launch after the one reading the counter: not
  // with splits == 1 (the launcher updates those with torch ops instead).
  void* running_mean;
  void* running_var;
  void* num_batches_tracked;
  int64_t running_sm, running_sv;
  double momentum;
  int32_t running_dtype;
  int32_t cumulative;
  // Backward with stats_out: the sums again, rounded to grad_dtype (half-precision
  // parameters' gradients, so that no cast follows the call), by the launch that finishes
  // them: grad_out[0] = sum g (the bias's), grad_out[1] = sum g*xhat (the weight's);
  // (C,) dense, NULL: not wanted.
  void* grad_out[2];
  int32_t grad_dtype[2];
  // Elements per vector (csrc/bn_kernels.cuh): 1, or 16 / sizeof(element) where every
  // element tensor's vectors are whole and 16-byte aligned along the contiguous axis:
  // BNK_CHANNELS, C and every tensor's sN and sS multiples of it and sC == 1 (block_c a
  // multiple of it); BNK_ROWS, S and rows_per_split multiples of it, every sN and sC too
  // and sS == 1; BNK_BLOCKS (always a 128-bit vector), block_c * S a multiple of it and
  // no more than threads * vec, S no less than it, every sN a multiple of it.
  int32_t vec;
} BnkCall;

#define BNK_MAX_THREADS 256

// y = act(bn(x) + res); with training, also the batch statistics (and with out.ptr NULL,
// only them). 0 on success, else a CUDA error code for bnk_error_string.
int bnk_forward(const BnkCall* call);
// dx (out), dres, and with stats_out the sums; see bnkernels/cuda_batch_norm.py.
int bnk_backward(const BnkCall* call);
const char* bnk_error_string(int code);
// The name of an activation code ("identity", "relu", ...), NULL for an unknown one.
const char* bnk_activation_name(int code);
// sizeof(BnkCall), then each field's offset in declaration order; returns the count.
int bnk_call_offsets(int64_t* out, int capacity);
// Launches so far, per pass: reduce, merge, apply, fused (reduce then apply, one launch).
void bnk_launch_counts(int64_t out[4]);

#ifdef __cplusplus
}
#endif
