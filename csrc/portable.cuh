// The few CUDA constructs the kernels use, spelled so that the same source compiles with
// nvcc for the GPU and with a host compiler (-DBNK_EMULATE) for the CPU test suite, where
// emulate.h runs each block's threads as fibers. The kernels use no warp-level intrinsics:
// block reductions go through shared memory and bnk_sync(), which both builds honour.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#ifdef BNK_EMULATE
#include <cmath>

#include "emulate.h"
#define BNK_GLOBAL
#define BNK_DEVICE inline
#define BNK_SHARED static  // one block at a time: a static is that block's shared memory
#define BNK_LAUNCH_BOUNDS
#define BNK_UNROLL _Pragma("GCC unroll 32")
using bnk_emu::blockDim;
using bnk_emu::blockIdx;
using bnk_emu::gridDim;
using bnk_emu::threadIdx;
inline void bnk_sync() { bnk_emu::syncthreads(); }
// An int: 0 or an error code. (kernel is one template-id: no commas outside __VA_ARGS__.)
#define BNK_LAUNCH(kernel, grid, block, stream, ...) \
  bnk_emu::launch(grid, block, [&] { kernel(__VA_ARGS__); })
#else
#include <cuda_runtime.h>
#define BNK_GLOBAL __global__
#define BNK_DEVICE __device__ __forceinline__
#define BNK_SHARED __shared__
// (, 1: at least one block per SM, no more asked; with the block size alone ptxas aims
// for full occupancy, caps a kernel at 32 registers and spills)
#define BNK_LAUNCH_BOUNDS __launch_bounds__(BNK_MAX_THREADS, 1)
#define BNK_UNROLL _Pragma("unroll")
__device__ __forceinline__ void bnk_sync() { __syncthreads(); }
// cudaGetLastError after the launch: a launch error, not the kernel's (no host sync).
#define BNK_LAUNCH(kernel, grid, block, stream, ...) \
  (kernel<<<grid, block, 0, (cudaStream_t)(stream)>>>(__VA_ARGS__), (int)cudaGetLastError())
#endif
