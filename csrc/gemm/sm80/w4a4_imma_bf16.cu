// CUTLASS 2.x int4 IMMA GEMM instantiation (see kernel.cuh): W4A4, int4 x int4 mma.sync,
// int32 sums, bfloat16 output. One kernel per file so that the build compiles them in parallel.
#include "gemm/sm80/launch.h"
#if OSTQUANT_SM80_GEMM
#include "gemm/sm80/kernel.cuh"
OSTQ_SM80_INSTANCE(w4a4_imma_bf16, cutlass::bfloat16_t)
#else
OSTQ_SM80_STUB(w4a4_imma_bf16)
#endif
