// CUTLASS 4.x Hopper (sm_90a) GEMMs for the int4 ops at M > 16: TMA loads, warp-specialized
// cooperative kernel (one producer warp group, two consumer warp groups), wgmma with the int4
// weights widened in registers by CUTLASS's mixed-input mainloop
// (MainloopSm90TmaGmmaRmemAWarpSpecializedMixedInput, "DirectConvert" mode: no scales in the
// mainloop), stream-K tile scheduler, and the dequantization epilogue fused as an EVT
// (epilogue visitor tree) in front of a TMA store.
//
// Only the instantiation files csrc/gemm/sm90/*.cu include this header (one kernel each, so
// ninja compiles them in parallel); everything else talks to them through sm90/launch.h.
//
// Operand roles. The narrow type must be the register-sourced wgmma operand A, and the TMA
// epilogue cannot store an implicitly swapped result, so - like CUTLASS example 55 - we swap
// explicitly and compute D' = W · Xᵀ:
//   problem (M', N', K) = (N, M, K)
//   A' = W  [N, K] int4, K-major (the canonical packed rows, as is: element 2j in the low nibble
//          of byte j is exactly cutlass::int4b_t's sub-byte order)
//   B' = X  [M, K] int8 (W4A4: the int4 activation codes widened by a pre-pass) or fp16/bf16
//          (W4A16), K-major
//   D' [N, M] column-major with leading dimension N  ==  out [M, N] row-major.
// So in the epilogue a row m' is an output channel (w_scale, w_sum, bias: column vectors) and a
// column n' is a token (x_scale, x_zero: row vectors).
//
// The wgmma is int8 x int8 -> int32 for W4A4 (exact; Hopper has no int4 tensor-core rate) and
// fp16/bf16 -> fp32 for W4A16 (the int4 codes are exact in both). The weight scale is NOT
// applied in the mainloop (that would round q·s to 16 bits); it is applied in fp32 in the
// epilogue, exactly like the other paths:
//   W4A4:  a = float(acc); a = a - zx[m]·ws[n]; y = (a·sx[m])·sw[n]; y = y + b[n]; cast
//   W4A16: y = acc·sw[n] + b[n]; cast
// with explicitly rounded float ops (no FMA contraction), so W4A4 stays bit-identical to
// reference.int4_gemm. Optional vectors (x_zero, w_sum, bias) are null pointers, which the
// broadcast nodes replace by zeros (a - 0·0 = a and y + 0 = y for every non-NaN value; only the
// sign of an exact zero may differ, which compares equal).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

// CUTLASS 4.2's sm100/sm103 collectives (pulled in by the umbrella headers) capture `this`
// implicitly in lambdas, which C++20 deprecates: keep that noise out of the build log.
#pragma nv_diag_suppress 2908
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/packed_stride.hpp"
#pragma nv_diag_default 2908

#include "gemm/cutlass_common.cuh"
#include "gemm/launch.h"
#include "gemm/sm90/launch.h"

namespace ostquant {
namespace sm90 {

// The epilogue compute nodes (W4A4EpilogueFn, W4A16EpilogueFn) are in gemm/cutlass_common.cuh,
// shared with the sm80 path.

// ------------------------------------------------------------------ the kernel type

// kW4A4: activations int8 (codes in [-8, 7]), int32 accumulation; else activations XT
// (cutlass::half_t / bfloat16_t), fp32 accumulation. OutT: cutlass::half_t / bfloat16_t / float.
// TileN: tokens per CTA tile (N' of the swapped problem); 128 output channels per tile (M').
template <bool kW4A4, class XT, class OutT, int TileN>
struct Sm90Int4Gemm {
  using ElementW = cutlass::int4b_t;
  using ElementX = XT;
  using ElementOut = OutT;
  using ElementAcc = std::conditional_t<kW4A4, int32_t, float>;
  using ElementCompute = float;

  using LayoutW = cutlass::layout::RowMajor;     // A' [N, K], K-major
  using LayoutX = cutlass::layout::ColumnMajor;  // B' [K, M] seen as (M, K), K-major
  using LayoutD = cutlass::layout::ColumnMajor;  // D' [N, M], leading dimension N
  static constexpr int kAlignW = 128 / cutlass::sizeof_bits<ElementW>::value;  // 32 codes
  static constexpr int kAlignX = 128 / cutlass::sizeof_bits<ElementX>::value;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementOut>::value;

  // K per stage: 128 bytes of the wide operand (128 int8 / 64 fp16 codes).
  static constexpr int kTileK = 128 * 8 / cutlass::sizeof_bits<ElementX>::value;
  using TileShape = cute::Shape<cute::_128, cute::Int<TileN>, cute::Int<kTileK>>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  // Broadcast vectors: per output channel (m' of the swapped problem) and per token (n').
  using ChannelVec = cutlass::epilogue::fusion::Sm90ColBroadcast<
      0, TileShape, float, float, cute::Stride<cute::_1, cute::_0, int64_t>>;
  using TokenVec = cutlass::epilogue::fusion::Sm90RowBroadcast<
      0, TileShape, float, float, cute::Stride<cute::_0, cute::_1, int64_t>>;
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;

  using EVT = std::conditional_t<
      kW4A4,
      cutlass::epilogue::fusion::Sm90EVT<
          cutlass::epilogue::fusion::Sm90Compute<W4A4EpilogueFn, ElementOut, ElementCompute,
                                                 kRound>,
          Acc, TokenVec /*x_zero*/, ChannelVec /*w_sum*/, TokenVec /*x_scale*/,
          ChannelVec /*w_scale*/, ChannelVec /*bias*/>,
      cutlass::epilogue::fusion::Sm90EVT<
          cutlass::epilogue::fusion::Sm90Compute<W4A16EpilogueFn, ElementOut, ElementCompute,
                                                 kRound>,
          Acc, ChannelVec /*w_scale*/, ChannelVec /*bias*/>>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute,
      void, LayoutD, kAlignD,  // no C operand
      ElementOut, LayoutD, kAlignD, EpilogueSchedule, EVT>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementW, LayoutW, kAlignW, ElementX,
      LayoutX, kAlignX, ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>,
                                                      CollectiveMainloop, CollectiveEpilogue,
                                                      cutlass::gemm::StreamKScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const Sm90GemmProblem& p) {
    using StrideW = typename Kernel::StrideA;
    using StrideX = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    const int m = static_cast<int>(p.N), n = static_cast<int>(p.M), k = static_cast<int>(p.K);
    const StrideW stride_w = cutlass::make_cute_packed_stride(StrideW{}, cute::make_shape(m, k, 1));
    const StrideX stride_x = cutlass::make_cute_packed_stride(StrideX{}, cute::make_shape(n, k, 1));
    const StrideD stride_d = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(m, n, 1));

    const GemmEpilogue& e = p.epi;
    typename EVT::Arguments evt{};
    const auto* bias = static_cast<const float*>(e.bias);  // float32 (converted by the caller)
    if constexpr (kW4A4) {
      evt = typename EVT::Arguments{
          {},                                // accumulator
          {e.x_zero, 0.f, {}},               // x_zero (null: zeros)
          {e.w_sum, 0.f, {}},                // w_sum  (null: zeros)
          {e.x_scale, 0.f, {}},              // x_scale
          {e.w_scale, 0.f, {}},              // w_scale
          {bias, 0.f, {}},                   // bias   (null: zeros)
          {}};                               // compute node
    } else {
      evt = typename EVT::Arguments{{}, {e.w_scale, 0.f, {}}, {bias, 0.f, {}}, {}};
    }

    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {reinterpret_cast<const ElementW*>(p.w), stride_w,
         reinterpret_cast<const ElementX*>(p.x), stride_x},
        {evt, nullptr, stride_d, reinterpret_cast<ElementOut*>(e.out), stride_d}};
    args.hw_info.device_id = p.device;
    args.hw_info.sm_count = p.sm_count;
    return args;
  }

  // workspace_bytes != nullptr: query (can_implement + workspace size), launches nothing.
  static cudaError_t run(const CutlassGemmProblem& p, void* workspace, size_t* workspace_bytes,
                         cudaStream_t stream) {
    return run_cutlass_gemm<Gemm>(arguments(p), workspace, workspace_bytes, stream);
  }
};

}  // namespace sm90
}  // namespace ostquant

// One instantiation per file: OSTQ_SM90_INSTANCE(fn_name, kW4A4, XT, OutT, TileN) defines
//   cudaError_t ostquant::sm90::fn_name(const Sm90GemmProblem&, void*, size_t*, cudaStream_t)
// declared in sm90/launch.h.
#define OSTQ_SM90_INSTANCE(NAME, W4A4, XT, OUTT, TILEN)                                       \
  namespace ostquant {                                                                        \
  namespace sm90 {                                                                            \
  cudaError_t NAME(const Sm90GemmProblem& p, void* workspace, size_t* workspace_bytes,       \
                   cudaStream_t stream) {                                                     \
    return Sm90Int4Gemm<W4A4, XT, OUTT, TILEN>::run(p, workspace, workspace_bytes, stream);   \
  }                                                                                           \
  }                                                                                           \
  }
