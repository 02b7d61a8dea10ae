// The float kernels and their launchers (launchers.cuh): a translation unit of their own.
#include "launchers.cuh"

BNK_LAUNCHERS(float, f32)
