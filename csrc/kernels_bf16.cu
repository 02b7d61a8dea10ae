// The __nv_bfloat16 kernels and their launchers (launchers.cuh): a translation unit of their own.
#include "launchers.cuh"

BNK_LAUNCHERS(__nv_bfloat16, bf16)
