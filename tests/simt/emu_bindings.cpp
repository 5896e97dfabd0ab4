// Python bindings of the emulated ops (tests/simt): the same C++ functions bindings.cpp registers
// as the CUDA implementations, here called directly with CPU tensors.
#include <torch/extension.h>

#include <string>

#include "attention/kv_status.h"
#include "attention/ops.h"
#include "gemm/launch.h"
#include "gemm/ops.h"
#include "gemm/sm80/launch.h"
#include "gemm/sm90/launch.h"
#include "hadamard/ops.h"
#include "quant/ops.h"

void register_selftests(pybind11::module_& m);  // selftest.cpp
void register_memprof(pybind11::module_& m);    // memprof.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_selftests(m);
  register_memprof(m);
  using namespace ostquant;
  m.def("pack_int4", &pack_int4_cuda);
  m.def("unpack_int4", &unpack_int4_cuda);
  m.def("quantize_per_token", &quantize_per_token_cuda);
  m.def("quantize_kv", &quantize_kv_cuda);
  m.def("quantize_per_token_packed", &quantize_per_token_packed_cuda);
  m.def("hadamard_quantize_per_token", &hadamard_quantize_per_token_cuda);
  m.def("rmsnorm_quantize_per_token", &rmsnorm_quantize_per_token_cuda);
  m.def("hadamard_transform", &hadamard_transform_cuda);
  m.def("int4_gemm", &int4_gemm_cuda);
  m.def("w4a16_gemm", &w4a16_gemm_cuda);
  m.def("kv_cache_append", &kv_cache_append_cuda);
  m.def("kv_cache_append_fused", &kv_cache_append_fused_cuda);
  m.def("paged_kv_cache_append", &paged_kv_cache_append_cuda);
  m.def("int4_kv_attention", &int4_kv_attention_cuda);
  m.def("paged_int4_kv_attention", &paged_int4_kv_attention_cuda);
  m.def("int4_gemm_takes_codes", &int4_gemm_takes_codes);
  m.def("sm90_gemm_built", &sm90_gemm_built, "the Hopper CUTLASS GEMMs are compiled in (OSTQUANT_SM90_GEMM)");
  m.def("kv_status", []() -> std::optional<std::string> {
    std::string s = kv_status_message();
    if (s.empty()) return std::nullopt;
    return s;
  });
  m.def("set_schedule", [](bool reverse) { ostq_emu::set_schedule(reverse); },
        "Run the threads of a block in descending (True) or ascending order between barriers.");
  m.def("set_sm_count", [](int n) { ostq_emu::set_sm_count(n); },
        "SM count the emulated device reports (launch plans: split-K / split-KV).");
  m.def("set_compute_capability", [](int major, int minor) {
    ostq_emu::set_compute_capability(major, minor);
  }, "Compute capability the emulated device reports (default 9.0; also sets its shared memory).");
  m.def("launch_count", []() { return ostq_emu::launch_count(); });
  m.def("launches_by_name", []() { return ostq_emu::S().launch_names; },
        "{kernel expression: launches} since the module was loaded (which path ran).");
  m.attr("small_m_max") = static_cast<int64_t>(kSmallMMax);
  m.attr("sm80_gemm") = static_cast<int>(OSTQUANT_SM80_GEMM);  // the CUTLASS int4 IMMA GEMM built
}
