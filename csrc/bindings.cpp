// The one place that registers ostquant's CUDA kernels with the PyTorch dispatcher.
//
// The op schemas are defined in Python (ostquant/ops/library.py, namespace "ostquant"), which
// imports this extension after defining them; TORCH_LIBRARY_IMPL then attaches the CUDA
// implementations, so torch.ops.ostquant.* dispatch here for CUDA tensors and to the reference
// kernels otherwise. No pybind11: the module itself is empty apart from a few build facts,
// built against the stable CPython ABI (py_limited_api).
#include <Python.h>
#include <torch/library.h>

#include <exception>
#include <string>

#include "attention/ops.h"
#include "gemm/launch.h"
#include "gemm/ops.h"
#include "gemm/sm90/launch.h"
#include "hadamard/ops.h"
#include "quant/ops.h"

#ifndef OSTQUANT_HAS_CUTLASS
#define OSTQUANT_HAS_CUTLASS 0
#endif
#ifndef OSTQUANT_SM90_GEMM
#define OSTQUANT_SM90_GEMM 0
#endif
#ifndef OSTQUANT_SM80_GEMM
#define OSTQUANT_SM80_GEMM 0
#endif

TORCH_LIBRARY_IMPL(ostquant, CUDA, m) {
  m.impl("pack_int4", &ostquant::pack_int4_cuda);
  m.impl("unpack_int4", &ostquant::unpack_int4_cuda);
  m.impl("quantize_per_token", &ostquant::quantize_per_token_cuda);
  m.impl("quantize_kv", &ostquant::quantize_kv_cuda);
  m.impl("hadamard_quantize_per_token", &ostquant::hadamard_quantize_per_token_cuda);
  m.impl("rmsnorm_quantize_per_token", &ostquant::rmsnorm_quantize_per_token_cuda);
  m.impl("quantize_per_token_packed", &ostquant::quantize_per_token_packed_cuda);
  m.impl("hadamard_transform", &ostquant::hadamard_transform_cuda);
  m.impl("int4_gemm", &ostquant::int4_gemm_cuda);
  m.impl("w4a16_gemm", &ostquant::w4a16_gemm_cuda);
  m.impl("kv_cache_append", &ostquant::kv_cache_append_cuda);
  m.impl("kv_cache_append_fused", &ostquant::kv_cache_append_fused_cuda);
  m.impl("paged_kv_cache_append", &ostquant::paged_kv_cache_append_cuda);
  m.impl("int4_kv_attention", &ostquant::int4_kv_attention_cuda);
  m.impl("paged_int4_kv_attention", &ostquant::paged_int4_kv_attention_cuda);
}

extern "C" {

// _C.kv_status() -> str | None: read and clear the KV kernels' device-side error word
// (csrc/attention/kv_status.h); ostquant.ops.kv_check_errors() raises with the message.
static PyObject* ostq_kv_status(PyObject* /*self*/, PyObject* /*args*/) {
  std::string msg;
  try {
    msg = ostquant::kv_status_message();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  if (msg.empty()) Py_RETURN_NONE;
  msg = "ostquant.kv_check_errors: " + msg;
  return PyUnicode_FromStringAndSize(msg.data(), static_cast<Py_ssize_t>(msg.size()));
}

// _C.int4_gemm_takes_codes(device, M, N, K, fp32_out) -> bool: whether int4_gemm reads int8
// activation codes on this problem (the Hopper path), see gemm/ops.h.
static PyObject* ostq_int4_gemm_takes_codes(PyObject* /*self*/, PyObject* args) {
  int device = 0, fp32_out = 0;
  long long M = 0, N = 0, K = 0;
  if (!PyArg_ParseTuple(args, "iLLLp", &device, &M, &N, &K, &fp32_out)) return nullptr;
  bool takes = false;
  try {
    takes = ostquant::int4_gemm_takes_codes(device, M, N, K, fp32_out != 0);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  return PyBool_FromLong(takes ? 1 : 0);
}

// _C.sm90_gemm_tile(M) -> int: tokens per CTA tile of the Hopper GEMM kernels for M rows (64 or
// 128, OSTQUANT_GEMM_SM90_TILE honoured), see gemm/sm90/launch.h.
static PyObject* ostq_sm90_gemm_tile(PyObject* /*self*/, PyObject* args) {
  long long M = 0;
  if (!PyArg_ParseTuple(args, "L", &M)) return nullptr;
  return PyLong_FromLong(ostquant::sm90_gemm_tile(M));
}

static PyMethodDef ostq_methods[] = {
    {"kv_status", ostq_kv_status, METH_NOARGS,
     "Read and clear the CUDA KV kernels' device-side error word (None if no error)."},
    {"int4_gemm_takes_codes", ostq_int4_gemm_takes_codes, METH_VARARGS,
     "int4_gemm_takes_codes(device, M, N, K, fp32_out) -> bool: whether int4_gemm reads int8 "
     "activation codes on this problem (the Hopper path)."},
    {"sm90_gemm_tile", ostq_sm90_gemm_tile, METH_VARARGS,
     "sm90_gemm_tile(M) -> int: tokens per CTA tile of the Hopper GEMM kernels for M rows."},
    {nullptr, nullptr, 0, nullptr},
};

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                              // m_name
      "ostquant CUDA kernels (registered as torch.ops.ostquant.* CUDA implementations)",
      -1,                                                // m_size
      ostq_methods,                                      // m_methods
  };
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  // What the build compiled in: CUTLASS at all, the Hopper GEMMs (sm90/), the int4 IMMA GEMMs
  // (sm80/).
  if (PyModule_AddIntConstant(m, "has_cutlass", OSTQUANT_HAS_CUTLASS) < 0 ||
      PyModule_AddIntConstant(m, "sm90_gemm", OSTQUANT_SM90_GEMM) < 0 ||
      PyModule_AddIntConstant(m, "sm80_gemm", OSTQUANT_SM80_GEMM) < 0 ||
      // the largest M the decode (small-M) GEMM kernels take: int4_gemm reads packed codes
      PyModule_AddIntConstant(m, "small_m_max", static_cast<long>(ostquant::kSmallMMax)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

}  // extern "C"
