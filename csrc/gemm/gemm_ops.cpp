// Host side of the int4 GEMM CUDA ops: argument checks (mirroring ostquant/ops/checks.py, same
// messages), dispatch by M and device, output / workspace allocation, device guard, current
// stream.
//
// Dispatch:
//  * M <= 16 (decode): the hand-written bandwidth-bound kernels of w4a16_small_m.cu /
//    w4a4_small_m.cu (tensor-core mma.sync, every weight byte read once, fused epilogue,
//    split-K across CTAs when N alone would not fill the GPU). W4A16 with float32
//    activations never takes them (there is no fp32 tensor-core MMA).
//  * M > 16 on a compute capability 9.0 device (H100/H200), when the extension was built for
//    sm_90a with CUTLASS: the CUTLASS Hopper kernels of sm90/ (TMA, warp-specialized
//    cooperative, wgmma, int4 weights widened in registers by the mixed-input mainloop,
//    stream-K, dequantization epilogue fused as an EVT). W4A4 reads the activations as int8
//    codes: passed as such (x_packed int8 [M, K], what the fused quantizers write with
//    packed=False; int4_gemm_takes_codes() tells the caller), or packed ones widened first
//    (unpack_int4, M·K bytes); the weights stay packed. Conditions:
//    N % 8 == 0, K > 0, fp16/bf16 activations for W4A16 (sm90_gemm_supported); the
//    environment variable OSTQUANT_GEMM_SM90=0 turns the path off (read once).
//  * W4A4 at M > 16 on Ampere/Ada (compute capability 8.x), when built with CUTLASS for an
//    arch >= 8.0: the CUTLASS 2.x int4 IMMA kernel of sm80/ (int4 x int4 mma.sync on the packed
//    operands as they are, exact int32, dequantization epilogue fused as an Sm80 EVT;
//    fp16/bf16 output, N % 8 == 0). OSTQUANT_GEMM_IMMA (read on every call): "0" never, "1" on
//    any sm_80+ device and ahead of the Hopper path (on Hopper int4 mma.sync is emulated:
//    correct but slow, for testing the path there), unset: compute capability 8.x only.
//  * Otherwise (M > 16 elsewhere, or a shape the CUTLASS path does not take): a PORTABLE path,
//    correct but not fast:
//      W4A4:  widen int4 -> int8 (unpack_int4 kernel) for x and w, at::_int_mm (cuBLASLt int8
//             tensor cores, exact int32; N padded to a multiple of 8 with zero rows as _int_mm
//             requires), then the fused epilogue kernel;
//      W4A16: widen the weight codes to x's dtype (exact; the scale stays out), at::mm with a
//             float32 result, then the epilogue kernel (· w_scale + bias, cast).
//    Both materialise the widened weight (N·K bytes / N·K·2 bytes) on every call.
//
// int4_gemm's activations may come packed (uint8 [M, K/2]) or as int8 codes (int8 [M, K]): the
// small-M and IMMA kernels read packed codes, so int8 codes are packed first there (one extra
// pass); the Hopper and portable paths read int8 codes. Codes outside [-8, 7] are not checked
// for on the GPU (the reference kernel raises): the Hopper and portable paths multiply them as
// they are, the small-M and IMMA paths keep their low 4 bits.
//
// Inputs need not be contiguous: like the reference kernels, the ops accept any strides (a
// non-contiguous or misaligned input is copied first).
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>

#include "common/checks.h"
#include "common/torch_utils.h"
#include "gemm/launch.h"
#include "gemm/ops.h"
#include "gemm/sm80/launch.h"
#include "gemm/sm90/launch.h"
#include "quant/launch.h"

namespace ostquant {
namespace {

constexpr int64_t kKAlign = 32;  // checks.GEMM_K_ALIGN

void check_k(const char* op, int64_t k) {
  OSTQ_CHECK(op, k % kKAlign == 0, "K = ", k, " is not a multiple of ", kKAlign,
             ", the int4 GEMM's K granularity");
}

// checks.check_same_device: every non-None tensor on one device, message listing them all.
void check_one_device(const char* op,
                      std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  const at::Tensor* first = nullptr;
  bool same = true;
  for (const auto& [name, t] : ts) {
    if (t == nullptr) continue;
    if (first == nullptr) first = t;
    same = same && t->device() == first->device();
  }
  if (same) return;
  std::string desc;
  for (const auto& [name, t] : ts) {
    if (t == nullptr) continue;
    if (!desc.empty()) desc += ", ";
    desc += std::string(name) + " on " + t->device().str();
  }
  OSTQ_CHECK(op, false, "all tensors must be on one device, got ", desc);
}

const at::Tensor* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? &*t : nullptr;
}

// Contiguous and 16-byte aligned (the kernels use 128-bit loads).
at::Tensor contiguous_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

void set_bias(GemmEpilogue& epi, const std::optional<at::Tensor>& bias, at::Tensor& keep) {
  if (!bias.has_value()) return;
  keep = bias->contiguous();
  epi.bias = keep.const_data_ptr();
  epi.bias_type = to_float_type(keep.scalar_type());
}

void check_int4_gemm(const at::Tensor& x_packed, const at::Tensor& x_scale,
                     const std::optional<at::Tensor>& x_zero, const at::Tensor& w_packed,
                     const at::Tensor& w_scale, const std::optional<at::Tensor>& w_sum,
                     const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  constexpr const char* op = "int4_gemm";
  check_dtype(op, "x_packed", x_packed, {at::kByte, at::kChar});
  check_ndim(op, "x_packed", x_packed, 2);
  check_dtype(op, "w_packed", w_packed, {at::kByte});
  check_ndim(op, "w_packed", w_packed, 2);
  const bool codes = x_packed.scalar_type() == at::kChar;  // int8 codes [M, K], not packed
  const int64_t m = x_packed.size(0), n = w_packed.size(0);
  const int64_t k = codes ? x_packed.size(1) : 2 * x_packed.size(1);
  OSTQ_CHECK(op, m != 0, "x_packed has M = 0 rows (empty batch)");
  OSTQ_CHECK(op, n != 0, "w_packed has N = 0 rows");
  OSTQ_CHECK(op, 2 * w_packed.size(1) == k, "K mismatch: x_packed holds K = ", k,
             codes ? " (int8 codes)" : "", ", w_packed holds K = ", 2 * w_packed.size(1));
  check_k(op, k);
  check_dtype(op, "x_scale", x_scale, {at::kFloat});
  check_shape(op, "x_scale", x_scale, {m});
  check_dtype(op, "w_scale", w_scale, {at::kFloat});
  check_shape(op, "w_scale", w_scale, {n});
  if (x_zero.has_value()) {
    check_dtype(op, "x_zero", *x_zero, {at::kFloat});
    check_shape(op, "x_zero", *x_zero, {m});
  }
  if (w_sum.has_value()) {
    check_dtype(op, "w_sum", *w_sum, {at::kFloat});
    check_shape(op, "w_sum", *w_sum, {n});
  }
  if (bias.has_value()) {
    check_float_dtype(op, "bias", *bias);
    check_shape(op, "bias", *bias, {n});
  }
  OSTQ_CHECK(op,
             out_dtype == at::kHalf || out_dtype == at::kBFloat16 || out_dtype == at::kFloat,
             "out_dtype must be float16, bfloat16 or float32, got torch.", dtype_str(out_dtype));
  check_one_device(op, {{"x_packed", &x_packed}, {"x_scale", &x_scale},
                        {"x_zero", opt_ptr(x_zero)}, {"w_packed", &w_packed},
                        {"w_scale", &w_scale}, {"w_sum", opt_ptr(w_sum)}, {"bias", opt_ptr(bias)}});
  check_cuda(op, "x_packed", x_packed);
}

void check_w4a16_gemm(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                      const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "w4a16_gemm";
  check_float_dtype(op, "x", x);
  check_ndim(op, "x", x, 2);
  check_dtype(op, "w_packed", w_packed, {at::kByte});
  check_ndim(op, "w_packed", w_packed, 2);
  OSTQ_CHECK(op, x.size(0) != 0, "x has M = 0 rows (empty batch)");
  const int64_t n = w_packed.size(0), kh = w_packed.size(1);
  OSTQ_CHECK(op, x.size(1) == 2 * kh, "K mismatch: x has K = ", x.size(1),
             ", w_packed holds K = ", 2 * kh);
  check_k(op, x.size(1));
  check_dtype(op, "w_scale", w_scale, {at::kFloat});
  check_shape(op, "w_scale", w_scale, {n});
  if (bias.has_value()) {
    check_float_dtype(op, "bias", *bias);
    check_shape(op, "bias", *bias, {n});
  }
  check_one_device(op, {{"x", &x}, {"w_packed", &w_packed}, {"w_scale", &w_scale},
                        {"bias", opt_ptr(bias)}});
  check_cuda(op, "x", x);
}

// ------------------------------------------------------------------ CUTLASS sm_90a path

bool sm90_enabled_by_env() {
  static const bool enabled = [] {
    const char* e = std::getenv("OSTQUANT_GEMM_SM90");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  return enabled;
}

// Compute capability of `device` as 10 * major + minor (90 for an H100); 0 if the query fails.
int compute_capability(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return 10 * major + minor;
}

// The CUTLASS Hopper kernels take this call: compiled in, not disabled, shape supported and a
// compute capability 9.0 device (sm_90a code runs on exactly that).
bool use_sm90(int device, int64_t M, int64_t N, int64_t K) {
  if (!sm90_gemm_built() || !sm90_enabled_by_env() || !sm90_gemm_supported(M, N, K)) return false;
  return compute_capability(device) == 90;
}

// ------------------------------------------------------------------ CUTLASS 2.x IMMA path

// The W4A4 int4 IMMA kernels take this call: compiled in, shape supported, and the device and
// OSTQUANT_GEMM_IMMA agree (see the top of this file).
bool use_imma(int device, int64_t M, int64_t N, int64_t K) {
  if (!sm80_gemm_built() || !sm80_gemm_supported(M, N, K)) return false;
  const char* e = std::getenv("OSTQUANT_GEMM_IMMA");
  if (e != nullptr && std::strcmp(e, "0") == 0) return false;
  const int major = compute_capability(device) / 10;
  if (e != nullptr && std::strcmp(e, "1") == 0) return major >= 8;
  return major == 8;
}

// The M <= 16 kernels use mma.sync on int4/int8/fp16/bf16 operands, which need sm_80 or newer
// (compiled for older archs they trap, which would lose the CUDA context).
bool device_has_mma(int device) { return compute_capability(device) >= 80; }

int device_sm_count(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();
    return 132;
  }
  return n;
}

// One call of a CUTLASS path: operands, sizes, device, and the epilogue with the bias as the
// CUTLASS epilogues read it (float32, 16-byte aligned: they load 4 at a time), kept alive in
// `keep_bias`.
CutlassGemmProblem cutlass_problem(const GemmEpilogue& epi, const std::optional<at::Tensor>& bias,
                                   const void* x, const uint8_t* w, int64_t M, int64_t N,
                                   int64_t K, int device, at::Tensor& keep_bias) {
  CutlassGemmProblem prob;
  prob.epi = epi;
  if (bias.has_value()) {
    keep_bias = contiguous_aligned(bias->to(at::kFloat));
    prob.epi.bias = keep_bias.const_data_ptr();
    prob.epi.bias_type = FloatType::kFloat32;
  }
  prob.x = x;
  prob.w = w;
  prob.M = M;
  prob.N = N;
  prob.K = K;
  prob.device = device;
  prob.sm_count = device_sm_count(device);
  return prob;
}

// Query (can the kernel take the problem, how much (stream-K) workspace), then launch.
// Returns false, having launched nothing, when the kernel cannot take the problem.
template <class Run>
bool run_cutlass(const char* op, const at::Tensor& like, Run&& run) {
  size_t bytes = 0;
  const cudaError_t q = run(nullptr, &bytes);
  if (q == cudaErrorNotSupported) return false;
  OSTQ_CHECK_LAUNCH(op, q);
  at::Tensor ws;
  if (bytes > 0) ws = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  OSTQ_CHECK_LAUNCH(op, run(bytes > 0 ? ws.data_ptr() : nullptr, nullptr));
  return true;
}

// int8 codes [M, K] (values in [-8, 7]) -> packed uint8 [M, K/2], for the paths that read packed
// activations.
at::Tensor pack_codes(const char* op, const at::Tensor& codes, cudaStream_t stream) {
  at::Tensor packed = at::empty({codes.size(0), codes.size(1) / 2},
                                codes.options().dtype(at::kByte));
  OSTQ_CHECK_LAUNCH(op, launch_pack_int4(codes.const_data_ptr<int8_t>(),
                                         static_cast<uint8_t*>(packed.data_ptr()),
                                         packed.numel(), stream));
  return packed;
}

}  // namespace

bool int4_gemm_takes_codes(int device, int64_t M, int64_t N, int64_t K, bool fp32_out) {
  return !fp32_out && M > kSmallMMax && !use_imma(device, M, N, K) && use_sm90(device, M, N, K);
}

at::Tensor int4_gemm_cuda(const at::Tensor& x_packed_in, const at::Tensor& x_scale_in,
                          const std::optional<at::Tensor>& x_zero_in,
                          const at::Tensor& w_packed_in, const at::Tensor& w_scale_in,
                          const std::optional<at::Tensor>& w_sum_in,
                          const std::optional<at::Tensor>& bias_in, at::ScalarType out_dtype) {
  constexpr const char* op = "int4_gemm";
  check_int4_gemm(x_packed_in, x_scale_in, x_zero_in, w_packed_in, w_scale_in, w_sum_in, bias_in,
                  out_dtype);
  const c10::cuda::CUDAGuard guard(x_packed_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor w = contiguous_aligned(w_packed_in);
  const int64_t M = x_packed_in.size(0), N = w.size(0), K = 2 * w.size(1);
  const auto* wp = static_cast<const uint8_t*>(w.const_data_ptr());
  const int device = x_packed_in.get_device();
  const bool fp32_out = out_dtype == at::kFloat;
  // The activations as the chosen path reads them: int8 codes (Hopper: the caller's codes as
  // they are, or the packed ones widened) or packed (every other path: int8 codes packed first).
  const bool sm90 = int4_gemm_takes_codes(device, M, N, K, fp32_out);
  // The paths that read packed codes: small M, and the IMMA kernel (the Hopper and portable
  // paths read int8 codes).
  const bool imma = !fp32_out && M > kSmallMMax && use_imma(device, M, N, K);
  const bool codes_in = x_packed_in.scalar_type() == at::kChar;
  at::Tensor x;   // packed uint8 [M, K/2]; undefined when int8 codes came in and no path needs it
  at::Tensor x8;  // int8 codes [M, K]: the caller's (codes_in), or the widened packed ones
  if (codes_in) {
    x8 = contiguous_aligned(x_packed_in);
    if (M <= kSmallMMax || imma) x = pack_codes(op, x8, stream);
  } else {
    x = contiguous_aligned(x_packed_in);
  }
  const at::Tensor& like = codes_in ? x8 : x;
  const auto* xp = x.defined() ? static_cast<const uint8_t*>(x.const_data_ptr()) : nullptr;

  at::Tensor out = at::empty({M, N}, like.options().dtype(out_dtype));
  const at::Tensor x_scale = x_scale_in.contiguous();
  const at::Tensor w_scale = contiguous_aligned(w_scale_in);
  at::Tensor x_zero, w_sum, bias;
  GemmEpilogue epi;
  epi.x_scale = x_scale.const_data_ptr<float>();
  epi.w_scale = w_scale.const_data_ptr<float>();
  epi.out = out.data_ptr();
  epi.out_type = to_float_type(out_dtype);
  set_bias(epi, bias_in, bias);
  if (x_zero_in.has_value()) {
    x_zero = x_zero_in->contiguous();
    epi.x_zero = x_zero.const_data_ptr<float>();
    if (w_sum_in.has_value()) {
      w_sum = contiguous_aligned(*w_sum_in);
    } else {  // Σ_k q_w: one more pass over the weights; callers should pass w_sum
      w_sum = at::empty({N}, like.options().dtype(at::kFloat));
      OSTQ_CHECK_LAUNCH(op, launch_int4_row_sum(wp, N, K, w_sum.data_ptr<float>(), stream));
    }
    epi.w_sum = w_sum.const_data_ptr<float>();
  }

  if (sm90) {
    at::Tensor bias_f32;
    if (!codes_in) x8 = at::empty({M, K}, like.options().dtype(at::kChar));
    Sm90GemmProblem prob =
        cutlass_problem(epi, bias_in, x8.const_data_ptr(), wp, M, N, K, device, bias_f32);
    prob.tile = sm90_gemm_tile(M);  // once: the workspace query and the launch agree
    bool widened = codes_in;  // int8 codes given: nothing to widen
    const bool ran = run_cutlass(op, like, [&](void* ws, size_t* ws_bytes) {
      if (ws_bytes == nullptr && !widened) {  // launching: widen the packed activations first
        widened = true;
        const cudaError_t e = launch_unpack_int4(xp, static_cast<int8_t*>(x8.data_ptr()),
                                                 M * K / 2, stream);
        if (e != cudaSuccess) return e;
      }
      return sm90_w4a4_gemm(epi.out_type, prob, ws, ws_bytes, stream);
    });
    if (ran) return out;
    // The kernel refused the problem: the portable path below (small M and IMMA are ruled out
    // by int4_gemm_takes_codes); it reads x8 when codes came in.
  }

  if (M <= kSmallMMax) {
    TORCH_CHECK(device_has_mma(device), op, ": M <= ", kSmallMMax,
                " needs an sm_80 or newer GPU (int4 tensor-core mma); device ", device,
                " is older");
    const SmallMPlan plan = plan_small_m(N, K);
    at::Tensor partial;
    if (plan.splits > 1) partial = at::empty({plan.splits, M, N}, x.options().dtype(at::kInt));
    OSTQ_CHECK_LAUNCH(op, launch_w4a4_small_m(
                              xp, wp, M, N, K, epi, plan,
                              plan.splits > 1 ? partial.data_ptr<int32_t>() : nullptr, stream));
    return out;
  }

  if (imma) {
    at::Tensor bias_f32;  // x: the packed int4 activations as they are
    const CutlassGemmProblem prob = cutlass_problem(epi, bias_in, xp, wp, M, N, K, device,
                                                    bias_f32);
    if (run_cutlass(op, x, [&](void* ws, size_t* ws_bytes) {
          return sm80_w4a4_gemm(epi.out_type, prob, ws, ws_bytes, stream);
        })) {
      return out;
    }
  }

  // Large M elsewhere: portable path (see the top of this file).
  const int64_t Np = (N + 7) / 8 * 8;  // at::_int_mm wants N % 8 == 0
  at::Tensor acc;
  if (K == 0) {
    acc = at::zeros({M, Np}, like.options().dtype(at::kInt));
  } else {
    at::Tensor xi = x8;  // the caller's int8 codes, or the packed ones widened
    if (!codes_in) {
      xi = at::empty({M, K}, like.options().dtype(at::kChar));
      OSTQ_CHECK_LAUNCH(op, launch_unpack_int4(xp, static_cast<int8_t*>(xi.data_ptr()),
                                               M * K / 2, stream));
    }
    at::Tensor w8 = at::empty({Np, K}, like.options().dtype(at::kChar));
    OSTQ_CHECK_LAUNCH(op, launch_unpack_int4(wp, static_cast<int8_t*>(w8.data_ptr()), N * K / 2,
                                             stream));
    if (Np > N) w8.narrow(0, N, Np - N).zero_();
    acc = at::_int_mm(xi, w8.t());  // [M, Np] int32, exact
  }
  OSTQ_CHECK_LAUNCH(op, launch_w4a4_epilogue(acc.const_data_ptr<int32_t>(), Np, M, N, epi,
                                             stream));
  return out;
}

at::Tensor w4a16_gemm_cuda(const at::Tensor& x_in, const at::Tensor& w_packed_in,
                           const at::Tensor& w_scale_in, const std::optional<at::Tensor>& bias_in) {
  constexpr const char* op = "w4a16_gemm";
  check_w4a16_gemm(x_in, w_packed_in, w_scale_in, bias_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor x = contiguous_aligned(x_in);
  const at::Tensor w = contiguous_aligned(w_packed_in);
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  if (N == 0) return out;
  const auto* wp = static_cast<const uint8_t*>(w.const_data_ptr());

  const at::Tensor w_scale = contiguous_aligned(w_scale_in);
  at::Tensor bias;
  GemmEpilogue epi;
  epi.w_scale = w_scale.const_data_ptr<float>();
  epi.out = out.data_ptr();
  epi.out_type = to_float_type(x.scalar_type());
  set_bias(epi, bias_in, bias);

  if (M <= kSmallMMax && x.scalar_type() != at::kFloat && device_has_mma(x.get_device())) {
    const SmallMPlan plan = plan_small_m(N, K);
    at::Tensor partial;
    if (plan.splits > 1) partial = at::empty({plan.splits, M, N}, x.options().dtype(at::kFloat));
    OSTQ_CHECK_LAUNCH(op, launch_w4a16_small_m(
                              to_float_type(x.scalar_type()), x.const_data_ptr(), wp, M, N, K,
                              epi, plan, plan.splits > 1 ? partial.data_ptr<float>() : nullptr,
                              stream));
    return out;
  }

  if (x.scalar_type() != at::kFloat && use_sm90(x.get_device(), M, N, K)) {
    at::Tensor bias_f32;
    Sm90GemmProblem prob = cutlass_problem(epi, bias_in, x.const_data_ptr(), wp, M, N, K,
                                           x.get_device(), bias_f32);
    prob.tile = sm90_gemm_tile(M);  // once: the workspace query and the launch agree
    const FloatType x_type = to_float_type(x.scalar_type());
    if (run_cutlass(op, x, [&](void* ws, size_t* ws_bytes) {
          return sm90_w4a16_gemm(x_type, prob, ws, ws_bytes, stream);
        })) {
      return out;
    }
  }

  // Large M elsewhere (and float32 activations): portable path (see the top of this file).
  at::Tensor wf = at::empty({N, K}, x.options());
  OSTQ_CHECK_LAUNCH(op, launch_int4_to_float(to_float_type(x.scalar_type()), wp, N, K,
                                             wf.data_ptr(), stream));
#if defined(OSTQ_SIMT_EMU)  // tests/simt: no fp16/bf16 -> fp32 mm on CPU tensors; same sums
  const at::Tensor acc = at::mm(x.to(at::kFloat), wf.t().to(at::kFloat));
#else
  const at::Tensor acc = x.scalar_type() == at::kFloat ? at::mm(x, wf.t())
                                                       : at::mm(x, wf.t(), at::kFloat);
#endif
  OSTQ_CHECK_LAUNCH(op, launch_w4a16_epilogue(acc.const_data_ptr<float>(), M, N, epi, stream));
  return out;
}

}  // namespace ostquant
