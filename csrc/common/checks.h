// Argument checks for the CUDA ops, mirroring ostquant/ops/checks.py.
//
// Every failure raises c10::ValueError (Python: ValueError) with a message of the form
// "ostquant.<op>: <argument> ...", the same text the Python checks produce where possible.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <sstream>
#include <string>

// OSTQ_CHECK(op, cond, msg...): raise ValueError("ostquant.<op>: <msg...>") unless cond.
#define OSTQ_CHECK(op, cond, ...) TORCH_CHECK_VALUE(cond, "ostquant.", op, ": ", __VA_ARGS__)

namespace ostquant {

// Python tuple repr of a shape: (), (5,), (2, 3).
inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) os << ", ";
    os << sizes[i];
  }
  if (sizes.size() == 1) os << ",";
  os << ")";
  return os.str();
}

// Python-side dtype name: float16, bfloat16, float32, int8, uint8, ...
inline std::string dtype_str(at::ScalarType t) {
  return std::string(c10::getDtypeNames(t).first);
}

// Shortest decimal that round-trips, like Python's repr(float) for ordinary values.
inline std::string float_str(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof(buf), "%.*g", prec, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s(buf);
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
#if defined(OSTQ_SIMT_EMU)  // tests/simt: the emulated kernels run on host memory
  OSTQ_CHECK(op, t.is_cpu(), name, " must be a CPU tensor for the emulated kernel, got device ",
             t.device().str());
  return;
#endif
  OSTQ_CHECK(op, t.is_cuda(), name, " must be a CUDA tensor for the CUDA kernel, got device ",
             t.device().str());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t,
                        std::initializer_list<at::ScalarType> allowed) {
  bool ok = false;
  for (auto d : allowed) ok = ok || t.scalar_type() == d;
  if (!ok) {
    std::string names;
    for (auto d : allowed) {
      if (!names.empty()) names += ", ";
      names += dtype_str(d);
    }
    OSTQ_CHECK(op, false, name, " must have dtype in (", names, "), got ",
               dtype_str(t.scalar_type()));
  }
}

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  check_dtype(op, name, t, {at::kHalf, at::kBFloat16, at::kFloat});
}

inline void check_ndim(const char* op, const char* name, const at::Tensor& t, int64_t ndim) {
  OSTQ_CHECK(op, t.dim() == ndim, name, " must be ", ndim, "-D, got shape ",
             shape_str(t.sizes()));
}

inline void check_min_ndim(const char* op, const char* name, const at::Tensor& t,
                           int64_t min_ndim) {
  OSTQ_CHECK(op, t.dim() >= min_ndim, name, " must have at least ", min_ndim,
             " dims, got shape ", shape_str(t.sizes()));
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  OSTQ_CHECK(op, t.is_contiguous(), name, " must be contiguous (call .contiguous() first)");
}

inline void check_nonempty(const char* op, const char* name, const at::Tensor& t) {
  OSTQ_CHECK(op, t.numel() > 0, name, " is empty (shape ", shape_str(t.sizes()),
             "); nothing to compute");
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        at::IntArrayRef shape) {
  OSTQ_CHECK(op, t.sizes() == shape, name, " must have shape ", shape_str(shape), ", got ",
             shape_str(t.sizes()));
}

inline void check_same_device(const char* op, const char* name_a, const at::Tensor& a,
                              const char* name_b, const at::Tensor& b) {
  OSTQ_CHECK(op, a.device() == b.device(), "all tensors must be on one device, got ", name_a,
             " on ", a.device().str(), ", ", name_b, " on ", b.device().str());
}

// Bit widths the quantizers accept (ostquant/ops/validate.py: check_bits).
inline void check_bits(const char* op, int64_t bits) {
  OSTQ_CHECK(op, bits == 2 || bits == 3 || bits == 4 || bits == 8,
             "bits must be one of (2, 3, 4, 8), got ", bits);
}

inline void check_clip_ratio(const char* op, double clip_ratio) {
  OSTQ_CHECK(op, clip_ratio > 0.0 && clip_ratio <= 1.0, "clip_ratio must be in (0, 1], got ",
             float_str(clip_ratio));
}

}  // namespace ostquant
