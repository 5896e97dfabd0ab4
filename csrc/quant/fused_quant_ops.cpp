// Host side of the per-token quantization CUDA ops with int4 codes, packed two per byte
// (quantize_per_token_packed; hadamard_quantize_per_token and rmsnorm_quantize_per_token by
// default) or one per int8 (the fused two with packed = false, for the Hopper GEMM): argument
// checks in the order and wording of ostquant/ops/checks.py, output allocation, device guard,
// current stream. The kernels live in hadamard_quant.cu and rmsnorm_quant.cu.
//
// Inputs may have any strides (a non-contiguous or misaligned input is copied first). NaN/Inf
// in x are not scanned for on the GPU (that would cost a synchronisation): they make the row's
// scale NaN, as quantize_per_token does.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/torch_utils.h"
#include "hadamard/ops.h"
#include "quant/launch.h"
#include "quant/ops.h"

namespace ostquant {
namespace {

using Triplet = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The checks after the op-specific shape checks (checks._check_packed_qargs; its NaN scan runs on
// the host only).
void check_packed_qargs(const char* op, const at::Tensor& x, int64_t bits, double clip_ratio) {
  OSTQ_CHECK(op, x.size(-1) % 2 == 0,
             "last dim of x must be even to pack two int4 codes per byte, got ", x.size(-1));
  OSTQ_CHECK(op, bits == 2 || bits == 3 || bits == 4, "bits must be one of (2, 3, 4), got ",
             bits);
  check_clip_ratio(op, clip_ratio);
}

// Contiguous, and aligned to 16 bytes (what the vectorized kernels want).
at::Tensor contiguous_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// The codes (packed uint8 [..., K/2], or int8 [..., K]), scale and zero (float32 [...]).
Triplet alloc_outputs(const at::Tensor& x, bool packed, FusedQuantArgs& a) {
  const int64_t K = x.size(-1);
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  std::vector<int64_t> q_shape(lead.begin(), lead.end());
  q_shape.push_back(packed ? K / 2 : K);
  at::Tensor q = at::empty(q_shape, x.options().dtype(packed ? at::kByte : at::kChar));
  at::Tensor scale = at::empty(lead, x.options().dtype(at::kFloat));
  at::Tensor zero = at::empty(lead, x.options().dtype(at::kFloat));
  a.rows = x.numel() / K;
  a.K = K;
  a.packed = packed;
  a.q = q.data_ptr();
  a.scale = static_cast<float*>(scale.data_ptr());
  a.zero = static_cast<float*>(zero.data_ptr());
  return {q, scale, zero};
}

// The plain per-token quantizer's arguments (launch_quantize_per_token_packed, or
// launch_quantize_per_token when !a.packed) for the outputs and settings in `a`.
RowQuantArgs row_args(const FusedQuantArgs& a) {
  RowQuantArgs r;
  r.rows = a.rows;
  r.K = a.K;
  r.bits = a.bits;
  r.sym = a.sym;
  r.clip = a.clip;
  r.q = a.q;
  r.scale = a.scale;
  r.zero = a.zero;
  return r;
}

}  // namespace

Triplet quantize_per_token_packed_cuda(const at::Tensor& x_in, int64_t bits, bool sym,
                                       double clip_ratio) {
  constexpr const char* op = "quantize_per_token_packed";
  check_float_dtype(op, "x", x_in);
  check_min_ndim(op, "x", x_in, 1);
  check_nonempty(op, "x", x_in);
  check_packed_qargs(op, x_in, bits, clip_ratio);
  check_cuda(op, "x", x_in);

  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = contiguous_aligned(x_in);
  FusedQuantArgs a;
  Triplet out = alloc_outputs(x, /*packed=*/true, a);
  a.bits = static_cast<int>(bits);
  a.sym = sym;
  a.clip = static_cast<float>(clip_ratio);
  OSTQ_CHECK_LAUNCH(op, launch_quantize_per_token_packed(to_float_type(x.scalar_type()),
                                                         x.const_data_ptr(), row_args(a),
                                                         c10::cuda::getCurrentCUDAStream()));
  return out;
}

Triplet hadamard_quantize_per_token_cuda(const at::Tensor& x_in, double scale, int64_t bits,
                                         bool sym, double clip_ratio, bool packed) {
  constexpr const char* op = "hadamard_quantize_per_token";
  check_float_dtype(op, "x", x_in);
  check_min_ndim(op, "x", x_in, 1);
  check_nonempty(op, "x", x_in);
  const int64_t n = x_in.size(-1);
  int Kh = 1;
  int64_t m = 1;
  OSTQ_CHECK(op, hadamard_factor(n, &Kh, &m),
             "unsupported last dim of x: hadamard_factor: no Hadamard matrix construction for n=",
             n, "; ", hadamard_supported_sizes_message());
  check_packed_qargs(op, x_in, bits, clip_ratio);
  check_cuda(op, "x", x_in);

  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = contiguous_aligned(x_in);
  FusedQuantArgs a;
  Triplet out = alloc_outputs(x, packed, a);
  a.bits = static_cast<int>(bits);
  a.sym = sym;
  a.clip = static_cast<float>(clip_ratio);  // as torch does for float32 tensor * Python float
  a.scale_h = static_cast<float>(scale);
  const FloatType type = to_float_type(x.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (hadamard_quantize_fits(type, Kh, m, x.get_device())) {
    OSTQ_CHECK_LAUNCH(op, launch_hadamard_quantize(type, x.const_data_ptr(), Kh, m, a, stream));
    return out;
  }
  // Rows longer than one CTA's shared memory: the unfused kernels (bit-identical while the row
  // fits the hadamard_transform kernel, n <= ~58K; beyond, that op's split path rounds its
  // float32 intermediate differently, see docs/ops.md).
  const at::Tensor y = contiguous_aligned(hadamard_transform_cuda(x, scale));
  OSTQ_CHECK_LAUNCH(op, packed ? launch_quantize_per_token_packed(type, y.const_data_ptr(),
                                                                  row_args(a), stream)
                               : launch_quantize_per_token(type, y.const_data_ptr(),
                                                           row_args(a), stream));
  return out;
}

Triplet rmsnorm_quantize_per_token_cuda(const at::Tensor& x_in,
                                        const std::optional<at::Tensor>& weight_in, double eps,
                                        int64_t bits, bool sym, double clip_ratio, bool packed) {
  constexpr const char* op = "rmsnorm_quantize_per_token";
  check_float_dtype(op, "x", x_in);
  check_min_ndim(op, "x", x_in, 1);
  check_nonempty(op, "x", x_in);
  const int64_t K = x_in.size(-1);
  if (weight_in.has_value()) {
    const at::Tensor& w = *weight_in;
    check_dtype(op, "weight", w, {x_in.scalar_type()});
    check_shape(op, "weight", w, {K});
    check_same_device(op, "x", x_in, "weight", w);
  }
  OSTQ_CHECK(op, std::isfinite(eps) && eps >= 0.0, "eps must be finite and >= 0, got ",
             float_str(eps));
  check_packed_qargs(op, x_in, bits, clip_ratio);
  check_cuda(op, "x", x_in);

  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = contiguous_aligned(x_in);
  at::Tensor w;
  if (weight_in.has_value()) w = contiguous_aligned(*weight_in);
  FusedQuantArgs a;
  Triplet out = alloc_outputs(x, packed, a);
  a.bits = static_cast<int>(bits);
  a.sym = sym;
  a.clip = static_cast<float>(clip_ratio);
  a.eps = static_cast<float>(eps);  // as torch.full_like(var, eps) on a float32 tensor
  OSTQ_CHECK_LAUNCH(op, launch_rmsnorm_quantize(to_float_type(x.scalar_type()),
                                                x.const_data_ptr(),
                                                w.defined() ? w.const_data_ptr() : nullptr, a,
                                                c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace ostquant
