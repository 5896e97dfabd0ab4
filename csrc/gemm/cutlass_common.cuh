// What the CUTLASS GEMM paths share (sm90/: Hopper, sm80/: Ampere/Ada int4 IMMA).
//
// The dequantization epilogue as epilogue-visitor compute nodes (Sm90Compute /
// VisitorCompute). Both call
// ComputeFn<Array<float, V>>{}(children...) with the children's fragments already converted to
// float (int32 -> float is round-to-nearest, like __int2float_rn).
//
// Explicitly rounded float ops in the reference's order (no FMA contraction), so W4A4 stays
// bit-identical to reference.int4_gemm (and to the small-M kernels' w4a4_epilogue_value):
//   W4A4:  a = float(acc); a = a - zx[m]·ws[n]; y = (a·sx[m])·sw[n]; y = y + b[n]
//   W4A16: y = acc·sw[n] + b[n]
// Null optional vectors reach here as zeros (a - 0·0 = a, y + 0 = y for every non-NaN value;
// only an exact -0.0 may come out as +0.0, which compares equal).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "cutlass/cutlass.h"

namespace ostquant {

template <class FragT>
struct W4A4EpilogueFn {
  template <class F>
  CUTLASS_DEVICE F operator()(F const& acc, F const& zx, F const& ws, F const& sx, F const& sw,
                              F const& b) const {
    F y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < F::kElements; ++i) {
      float a = __fsub_rn(acc[i], __fmul_rn(zx[i], ws[i]));
      float v = __fmul_rn(__fmul_rn(a, sx[i]), sw[i]);
      y[i] = __fadd_rn(v, b[i]);
    }
    return y;
  }
};

template <class FragT>
struct W4A16EpilogueFn {
  template <class F>
  CUTLASS_DEVICE F operator()(F const& acc, F const& sw, F const& b) const {
    F y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < F::kElements; ++i) y[i] = __fadd_rn(__fmul_rn(acc[i], sw[i]), b[i]);
    return y;
  }
};

// Query or launch a CUTLASS device GEMM (GemmUniversalAdapter). With workspace_bytes != nullptr:
// can_implement + the workspace size, nothing launched. Otherwise initialize with `workspace`
// and run on `stream`. cudaErrorNotSupported when the kernel cannot run the problem (the
// caller then takes another path).
template <class Gemm>
cudaError_t run_cutlass_gemm(const typename Gemm::Arguments& args, void* workspace,
                             size_t* workspace_bytes, cudaStream_t stream) {
  if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
  if (workspace_bytes != nullptr) {
    *workspace_bytes = Gemm::get_workspace_size(args);
    return cudaSuccess;
  }
  Gemm gemm;
  cutlass::Status st = gemm.initialize(args, workspace, stream);
  if (st != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorInvalidValue;
  }
  st = gemm.run(stream);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // a CUTLASS status without a CUDA error: not a kernel fault (the context is fine)
  return st == cutlass::Status::kSuccess ? cudaSuccess : cudaErrorUnknown;
}

}  // namespace ostquant
