// CUTLASS 2.x int4 IMMA GEMM for W4A4 at M > 16 on Ampere/Ada (sm_80/86/89): int4 x int4
// mma.sync (m16n8k64, exact int32 sums), multistage cp.async mainloop, and the dequantization
// epilogue fused as an Sm80 EVT (epilogue visitor tree) in front of the global store.
//
// Only the instantiation files csrc/gemm/sm80/*.cu include this header (one kernel each, so
// ninja compiles them in parallel); everything else talks to them through sm80/launch.h.
//
// Operands, no swap and no prepack: the canonical packed int4 layout (element 2j in the low
// nibble of byte j, rows along K) is exactly cutlass::int4b_t's sub-byte order, so
//   A = X [M, K] int4, RowMajor (the packed activations as they come, lda = K)
//   B = W [N, K] int4 seen as [K, N] ColumnMajor (the packed weight rows, ldb = K)
//   D = out [M, N] RowMajor
// which is the "TN" layout int4 tensor-core GEMMs need. In the epilogue a row m is a token
// (x_scale, x_zero: column-broadcast vectors) and a column n an output channel (w_scale, w_sum,
// bias: row-broadcast vectors). The compute node is gemm/cutlass_common.cuh's
// W4A4EpilogueFn, so the output is bit-identical to reference.int4_gemm, like every other path.
//
// Tile: CUTLASS's default configuration for int4 x int4 on sm_80 (128 x 256 x 128 threadblock,
// 64 x 64 x 128 warps, 3 stages: 72 KB of shared memory, set by the adapter). Data-parallel
// tiles (identity swizzle), so no workspace. Not tuned: no Ampere GPU has measured it yet.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

// Order matters: the 2.x visitor headers use names the GEMM headers declare (as in CUTLASS's
// example 47).
#include "cutlass/cutlass.h"
#include "cutlass/gemm/device/gemm_universal.h"
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"
#include "cutlass/gemm/kernel/default_gemm_universal_with_visitor.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"

#include "gemm/cutlass_common.cuh"
#include "gemm/launch.h"
#include "gemm/sm80/launch.h"

namespace ostquant {
namespace sm80 {

template <class OutT>
struct Sm80Int4Gemm {
  using ElementA = cutlass::int4b_t;
  using ElementB = cutlass::int4b_t;
  using ElementOut = OutT;
  using ElementAcc = int32_t;
  using ElementCompute = float;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutC = cutlass::layout::RowMajor;
  static constexpr int kAlignA = 128 / cutlass::sizeof_bits<ElementA>::value;  // 32 codes
  static constexpr int kAlignB = 128 / cutlass::sizeof_bits<ElementB>::value;
  static constexpr int kAlignC = 128 / cutlass::sizeof_bits<ElementOut>::value;  // 8 outputs

  using ThreadblockShape = cutlass::gemm::GemmShape<128, 256, 128>;
  using WarpShape = cutlass::gemm::GemmShape<64, 64, 128>;
  using InstructionShape = cutlass::gemm::GemmShape<16, 8, 64>;
  static constexpr int kStages = 3;
  static constexpr int kEpilogueStages = 1;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  using ThreadMap = cutlass::epilogue::threadblock::OutputTileThreadLayout<
      ThreadblockShape, WarpShape, ElementOut, kAlignC, kEpilogueStages>;

  using Acc = cutlass::epilogue::threadblock::VisitorAccFetch;
  // per token (row m): x_scale, x_zero
  using TokenVec = cutlass::epilogue::threadblock::VisitorColBroadcast<
      ThreadMap, float, cute::Stride<cute::_1, cute::_0, cute::_0>>;
  // per output channel (column n): w_scale, w_sum, bias
  using ChannelVec = cutlass::epilogue::threadblock::VisitorRowBroadcast<
      ThreadMap, float, cute::Stride<cute::_0, cute::_1, int32_t>>;
  using Compute = cutlass::epilogue::threadblock::VisitorCompute<
      W4A4EpilogueFn, ElementOut, ElementCompute, kRound>;
  using EVTCompute = cutlass::epilogue::threadblock::Sm80EVT<
      Compute, Acc, TokenVec /*x_zero*/, ChannelVec /*w_sum*/, TokenVec /*x_scale*/,
      ChannelVec /*w_scale*/, ChannelVec /*bias*/>;
  using Store = cutlass::epilogue::threadblock::VisitorAuxStore<
      ThreadMap, ElementOut, kRound, cute::Stride<int64_t, cute::_1, int64_t>>;
  using EVT = cutlass::epilogue::threadblock::Sm80EVT<Store, EVTCompute>;

  using Kernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      ElementA, LayoutA, cutlass::ComplexTransform::kNone, kAlignA,
      ElementB, LayoutB, cutlass::ComplexTransform::kNone, kAlignB,
      ElementOut, LayoutC, kAlignC,
      ElementAcc, ElementCompute,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      ThreadblockShape, WarpShape, InstructionShape,
      EVT,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>,
      kStages, cutlass::arch::OpMultiplyAddSaturate, kEpilogueStages>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const CutlassGemmProblem& p) {
    using cute::_0;
    using cute::_1;
    const int m = static_cast<int>(p.M), n = static_cast<int>(p.N), k = static_cast<int>(p.K);
    const GemmEpilogue& e = p.epi;
    const auto* bias = static_cast<const float*>(e.bias);  // float32 (converted by the caller)
    const cute::Stride<_0, _1, int32_t> channel{_0{}, _1{}, static_cast<int32_t>(n)};
    typename EVT::Arguments evt{
        {
            {},                          // accumulator
            {e.x_zero, 0.f, {}},         // x_zero  (null: zeros)
            {e.w_sum, 0.f, channel},     // w_sum   (null: zeros)
            {e.x_scale, 0.f, {}},        // x_scale
            {e.w_scale, 0.f, channel},   // w_scale
            {bias, 0.f, channel},        // bias    (null: zeros)
            {}                           // compute node
        },
        {static_cast<ElementOut*>(e.out),
         {static_cast<int64_t>(n), _1{}, static_cast<int64_t>(m) * n}}};  // out [M, N]
    return typename Gemm::Arguments(
        cutlass::gemm::GemmUniversalMode::kGemm, cutlass::gemm::GemmCoord(m, n, k),
        /*batch_count=*/1, evt, p.x, p.w, /*ptr_C=*/nullptr, /*ptr_D=*/nullptr,
        /*batch_stride_A=*/static_cast<int64_t>(m) * k,
        /*batch_stride_B=*/static_cast<int64_t>(n) * k, /*batch_stride_C=*/0,
        /*batch_stride_D=*/0,
        /*lda=*/static_cast<typename LayoutA::Stride::LongIndex>(k),
        /*ldb=*/static_cast<typename LayoutB::Stride::LongIndex>(k),
        /*ldc=*/0, /*ldd=*/0);
  }

  // workspace_bytes != nullptr: query (can_implement + workspace size), launches nothing.
  static cudaError_t run(const CutlassGemmProblem& p, void* workspace, size_t* workspace_bytes,
                         cudaStream_t stream) {
    return run_cutlass_gemm<Gemm>(arguments(p), workspace, workspace_bytes, stream);
  }
};

}  // namespace sm80
}  // namespace ostquant

// One instantiation per file: OSTQ_SM80_INSTANCE(fn_name, OutT) defines
//   cudaError_t ostquant::sm80::fn_name(const CutlassGemmProblem&, void*, size_t*, cudaStream_t)
// declared in sm80/launch.h.
#define OSTQ_SM80_INSTANCE(NAME, OUTT)                                                  \
  namespace ostquant {                                                                  \
  namespace sm80 {                                                                      \
  cudaError_t NAME(const CutlassGemmProblem& p, void* workspace, size_t* workspace_bytes, \
                   cudaStream_t stream) {                                               \
    return Sm80Int4Gemm<OUTT>::run(p, workspace, workspace_bytes, stream);              \
  }                                                                                     \
  }                                                                                     \
  }
