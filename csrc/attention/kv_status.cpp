// See kv_status.h.
#include "attention/kv_status.h"

#include <cuda_runtime_api.h>

#include <mutex>
#include <sstream>

#include "attention/launch.h"
#include "common/checks.h"

namespace ostquant {
namespace {

int* g_host = nullptr;
int* g_dev = nullptr;
std::once_flag g_once;

void init() {
  void* h = nullptr;
  if (cudaHostAlloc(&h, sizeof(int), cudaHostAllocMapped | cudaHostAllocPortable) != cudaSuccess) {
    (void)cudaGetLastError();
    return;
  }
  void* d = nullptr;
  if (cudaHostGetDevicePointer(&d, h, 0) != cudaSuccess) {
    (void)cudaGetLastError();
    cudaFreeHost(h);
    return;
  }
  g_host = static_cast<int*>(h);
  *reinterpret_cast<volatile int*>(g_host) = 0;
  g_dev = static_cast<int*>(d);
}

std::string describe(int code) {
  const int kind = (code >> 24) & 0xFF;
  const int b = code & 0xFFFFFF;
  std::ostringstream os;
  switch (kind) {
    case kKvAppendFull:
      os << "cache full: appending to sequence " << b << " would exceed its capacity";
      break;
    case kKvAppendNoPage:
      os << "page not allocated: the append to sequence " << b
         << " needs a block_table entry that is not a page of the pool";
      break;
    case kKvAttnBadLen:
      os << "seqlens[" << b << "] out of range: seqlens must lie in [Sq, capacity]";
      break;
    case kKvAttnNoPage:
      os << "page not allocated: a cached token of sequence " << b
         << " maps to a block_table entry that is not a page of the pool";
      break;
    case kKvBadLength:
      os << "cache_seqlens[" << b << "] is negative";
      break;
    default:
      os << "unknown KV kernel status " << code;
  }
  os << " (found on the device by an earlier CUDA KV-cache call: lengths and pages are checked "
        "on the GPU without a host sync; that call wrote nothing for the sequence (append), "
        "returned NaN for it (bad length) or read page 0 in place of the missing page (its "
        "attention output for the sequence is wrong: discard it))";
  return os.str();
}

}  // namespace

int* kv_status_device_word() {
  std::call_once(g_once, init);
  return g_dev;
}

std::string kv_status_take() {
  if (g_host == nullptr) return "";
  volatile int* w = g_host;
  const int code = *w;
  if (code == 0) return "";
  *w = 0;
  return describe(code);
}

void kv_status_check(const char* op) {
  const std::string msg = kv_status_take();
  OSTQ_CHECK(op, msg.empty(), msg);
}

}  // namespace ostquant
