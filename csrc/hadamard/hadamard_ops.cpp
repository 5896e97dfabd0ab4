// Host side of the Hadamard transform CUDA op: argument checks (mirroring
// ostquant/ops/checks.py: hadamard_transform), factorization n = K * m, output allocation,
// device guard, current stream. The kernel lives in hadamard.cu.
//
// Rows that fit in one CTA's shared memory (K*m*4 bytes; n <= 58112 on H100) are transformed by
// one kernel launch in the input dtype. Longer rows (rare: n > 32768 with a power-of-two part
// too large for one CTA) use kron(H_K, H_m) = kron(H_K, H_mo, H_mi): a float32 copy, the inner
// H_mi by the kernel, a transpose, then kron(H_K, H_mo) recursively, a transpose back.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <string>

#include "common/checks.h"
#include "common/torch_utils.h"
#include "hadamard/hadamard_tables.h"
#include "hadamard/launch.h"
#include "hadamard/ops.h"

namespace ostquant {
namespace {

constexpr const char* kOp = "hadamard_transform";

bool is_pow2(int64_t v) { return v >= 1 && (v & (v - 1)) == 0; }

}  // namespace

// Same choice as ostquant.transforms.hadamard_matrices.hadamard_factor: the smallest K.
bool hadamard_factor(int64_t n, int* K, int64_t* m) {
  if (n > 0 && is_pow2(n)) {
    *K = 1;
    *m = n;
    return true;
  }
  for (int i = 0; i < kNumHadamardBase; ++i) {
    const int k = kHadamardBase[i].K;
    if (n % k == 0 && is_pow2(n / k)) {
      *K = k;
      *m = n / k;
      return true;
    }
  }
  return false;
}

std::string hadamard_supported_sizes_message() {
  std::string ks;
  for (int i = 0; i < kNumHadamardBase; ++i) {
    if (i) ks += ", ";
    ks += std::to_string(kHadamardBase[i].K);
  }
  return "supported sizes are n = K * 2**j with j >= 0 and K = 1 (plain power of two) or K in {" +
         ks + "}";
}

namespace {

void launch(const at::Tensor& x, at::Tensor& out, int K, int64_t m, double scale) {
  const int64_t n = K * m;
  OSTQ_CHECK_LAUNCH(kOp, launch_hadamard(to_float_type(x.scalar_type()), x.const_data_ptr(),
                                         out.data_ptr(), x.numel() / n, K, m,
                                         static_cast<float>(scale),
                                         c10::cuda::getCurrentCUDAStream()));
}

// xf: contiguous float32 [R, K*m]; returns scale * xf @ kron(H_K, H_m)^T as float32.
at::Tensor hadamard_long_rows(const at::Tensor& xf, int K, int64_t m, double scale,
                              int64_t max_elems) {
  const int64_t n = K * m;
  const int64_t R = xf.numel() / n;
  at::Tensor y = at::empty_like(xf);
  if (n <= max_elems) {
    launch(xf, y, K, m, scale);
    return y;
  }
  int64_t mi = 1;
  while (mi * 2 <= m && mi * 2 <= max_elems) mi *= 2;
  const int64_t mo = m / mi;
  launch(xf, y, 1, mi, scale);  // inner H_mi over contiguous runs of mi
  at::Tensor z = y.view({R, K * mo, mi}).transpose(1, 2).contiguous().view({R * mi, K * mo});
  z = hadamard_long_rows(z, K, mo, 1.0, max_elems);
  return z.view({R, mi, K * mo}).transpose(1, 2).contiguous().view({R, n});
}

}  // namespace

at::Tensor hadamard_transform_cuda(const at::Tensor& x_in, double scale) {
  check_float_dtype(kOp, "x", x_in);
  check_min_ndim(kOp, "x", x_in, 1);
  check_nonempty(kOp, "x", x_in);
  const int64_t n = x_in.size(-1);
  int K = 1;
  int64_t m = 1;
  OSTQ_CHECK(kOp, hadamard_factor(n, &K, &m),
             "unsupported last dim of x: hadamard_factor: no Hadamard matrix construction for n=",
             n, "; ", hadamard_supported_sizes_message());
  check_cuda(kOp, "x", x_in);

  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous();
  // The kernel reads 16-byte vectors; a view starting mid-vector needs a fresh copy.
  if (m >= 8 && reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 != 0) x = x.clone();
  const int64_t max_elems = hadamard_max_row_elems(x.get_device());
  if (n <= max_elems) {
    at::Tensor out = at::empty(x.sizes(), x.options());
    launch(x, out, K, m, scale);
    return out;
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous().view({x.numel() / n, n});
  return hadamard_long_rows(xf, K, m, scale, max_elems).view(x.sizes()).to(x.scalar_type());
}

}  // namespace ostquant
