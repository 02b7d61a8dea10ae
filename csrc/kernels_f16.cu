// The __half kernels and their launchers (launchers.cuh): a translation unit of their own.
#include "launchers.cuh"

BNK_LAUNCHERS(__half, f16)
