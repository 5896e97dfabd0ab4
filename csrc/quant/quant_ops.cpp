// Host side of the quantization / packing CUDA ops: argument checks (mirroring
// ostquant/ops/checks.py), output allocation, device guard and current stream; the kernels
// live in the .cu files of this folder.
//
// Inputs need not be contiguous: like the reference kernels, the ops accept any strides (a
// non-contiguous input is copied to a contiguous one first).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <vector>

#include "common/checks.h"
#include "common/torch_utils.h"
#include "quant/launch.h"
#include "quant/ops.h"

namespace ostquant {

at::Tensor pack_int4_cuda(const at::Tensor& q_in) {
  constexpr const char* op = "pack_int4";
  check_dtype(op, "q", q_in, {at::kChar});
  check_min_ndim(op, "q", q_in, 1);
  OSTQ_CHECK(op, q_in.size(-1) % 2 == 0,
             "last dim of q must be even to pack two int4 per byte, got ", q_in.size(-1));
  check_cuda(op, "q", q_in);

  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  std::vector<int64_t> shape(q.sizes().begin(), q.sizes().end());
  shape.back() /= 2;
  at::Tensor out = at::empty(shape, q.options().dtype(at::kByte));
  OSTQ_CHECK_LAUNCH(op, launch_pack_int4(static_cast<const int8_t*>(q.const_data_ptr()),
                                         static_cast<uint8_t*>(out.data_ptr()), out.numel(),
                                         c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor unpack_int4_cuda(const at::Tensor& packed_in) {
  constexpr const char* op = "unpack_int4";
  check_dtype(op, "packed", packed_in, {at::kByte});
  check_min_ndim(op, "packed", packed_in, 1);
  check_cuda(op, "packed", packed_in);

  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  std::vector<int64_t> shape(packed.sizes().begin(), packed.sizes().end());
  shape.back() *= 2;
  at::Tensor out = at::empty(shape, packed.options().dtype(at::kChar));
  OSTQ_CHECK_LAUNCH(op, launch_unpack_int4(static_cast<const uint8_t*>(packed.const_data_ptr()),
                                           static_cast<int8_t*>(out.data_ptr()), packed.numel(),
                                           c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x_in,
                                                                       int64_t bits, bool sym,
                                                                       double clip_ratio) {
  constexpr const char* op = "quantize_per_token";
  check_float_dtype(op, "x", x_in);
  check_min_ndim(op, "x", x_in, 1);
  check_nonempty(op, "x", x_in);
  check_bits(op, bits);
  check_clip_ratio(op, clip_ratio);
  check_cuda(op, "x", x_in);

  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t K = x.size(-1);
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = at::empty(lead, x.options().dtype(at::kFloat));
  at::Tensor zero = at::empty(lead, x.options().dtype(at::kFloat));

  RowQuantArgs a;
  a.rows = x.numel() / K;
  a.K = K;
  a.bits = static_cast<int>(bits);
  a.sym = sym;
  a.clip = static_cast<float>(clip_ratio);  // as torch does for float32 tensor * Python float
  a.q = q.data_ptr();
  a.scale = scale.data_ptr();
  a.zero = zero.data_ptr();
  OSTQ_CHECK_LAUNCH(op, launch_quantize_per_token(to_float_type(x.scalar_type()),
                                                  x.const_data_ptr(), a,
                                                  c10::cuda::getCurrentCUDAStream()));
  return {q, scale, zero};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_kv_cuda(const at::Tensor& x_in) {
  constexpr const char* op = "quantize_kv";
  check_float_dtype(op, "x", x_in);
  check_min_ndim(op, "x", x_in, 1);
  check_nonempty(op, "x", x_in);
  OSTQ_CHECK(op, x_in.size(-1) % 2 == 0, "head_dim (last dim of x) must be even, got ",
             x_in.size(-1));
  check_cuda(op, "x", x_in);

  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous();
  // The kernel loads element pairs; a view that starts at an odd element needs a fresh copy.
  if (reinterpret_cast<uintptr_t>(x.const_data_ptr()) % (2 * x.element_size()) != 0) {
    x = x.clone();
  }
  const int64_t D = x.size(-1);
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  std::vector<int64_t> packed_shape(lead.begin(), lead.end());
  packed_shape.push_back(D / 2);
  at::Tensor packed = at::empty(packed_shape, x.options().dtype(at::kByte));
  at::Tensor scale = at::empty(lead, x.options().dtype(at::kHalf));
  at::Tensor zero = at::empty(lead, x.options().dtype(at::kHalf));

  RowQuantArgs a;
  a.rows = x.numel() / D;
  a.K = D;
  a.q = packed.data_ptr();
  a.scale = scale.data_ptr();
  a.zero = zero.data_ptr();
  OSTQ_CHECK_LAUNCH(op, launch_quantize_kv(to_float_type(x.scalar_type()), x.const_data_ptr(), a,
                                           c10::cuda::getCurrentCUDAStream()));
  return {packed, scale, zero};
}

}  // namespace ostquant
