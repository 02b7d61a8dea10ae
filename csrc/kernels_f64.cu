// The double kernels and their launchers (launchers.cuh): a translation unit of their own.
#include "launchers.cuh"

BNK_LAUNCHERS(double, f64)
