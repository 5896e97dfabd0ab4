// Force-included after simt_emu.h in builds with the Hopper GEMMs (build.py, sm90_spike.py).
#pragma once
// CUDA's wmma (mma.h, namespace nvcuda) is device-only: keep CUTLASS's wmma wrappers out by
// including cutlass/arch/wmma.h (#pragma once) with the toolkit version macro hidden. The sm90
// build needs __CUDACC_VER_MAJOR__ = 13 for cuda_host_adapter.hpp's
// cudaGetDriverEntryPointByVersion path (CUDA 13 headers have no cudaGetDriverEntryPoint).
#pragma push_macro("__CUDACC_VER_MAJOR__")
#undef __CUDACC_VER_MAJOR__
#include "cutlass/arch/wmma.h"
#pragma pop_macro("__CUDACC_VER_MAJOR__")

// the sm90 overlay's failure sites name their line in one string literal
#define OSTQ_SM90_STR2(x) #x
#define OSTQ_SM90_STR(x) OSTQ_SM90_STR2(x)

#include "sm90_emu.h"
#include "sm90_tma.h"
#include "sm90_wgmma.h"

// the runtime entry points the Hopper GEMM's host code calls (sm90_emu.h)
#define cudaGetDriverEntryPointByVersion ::ostq_emu::sm90::get_driver_entry_point_by_version
#define cudaMemsetAsync ::ostq_emu::sm90::memset_async
