// What batch_norm.cu (the C ABI) and the per-type translation units (kernels_*.cu) share:
// the launch counters, and each element type's entry points (launchers.cuh).
#pragma once
#include <stdint.h>

#include <atomic>

#include "bnk_api.h"

enum { LAUNCH_REDUCE, LAUNCH_MERGE, LAUNCH_APPLY, LAUNCH_FUSED, LAUNCH_KINDS };
// Launches so far, by pass (bnk_launch_counts); defined in batch_norm.cu.
extern std::atomic<int64_t> bnk_launches[LAUNCH_KINDS];

// One call's kernels on its stream: 0, or a CUDA error code.
int bnk_run_forward_f32(const BnkCall& k);
int bnk_run_backward_f32(const BnkCall& k);
int bnk_run_forward_f16(const BnkCall& k);
int bnk_run_backward_f16(const BnkCall& k);
int bnk_run_forward_bf16(const BnkCall& k);
int bnk_run_backward_bf16(const BnkCall& k);
int bnk_run_forward_f64(const BnkCall& k);
int bnk_run_backward_f64(const BnkCall& k);
