// The KV kernels' status word: how the CUDA KV-cache ops report bad lengths without a host
// synchronisation per call.
//
// Checking `cache_seqlens[b] + S <= capacity` (or seqlens against Sq / capacity, or that the
// block table points at real pages) on the host would copy the lengths to the CPU — a device
// sync on every decode step. Instead the kernels check on the device: the offending sequence is
// not written (append) or gets NaN (attention), nothing out of bounds is touched, and the kernel
// stores an error code into one int of mapped, pinned host memory. Every CUDA KV op reads that
// word (a plain host memory read, no sync) when it is called and raises ValueError if a kernel
// that has finished by then reported a problem; ostquant.ops.kv_check_errors() does the same on
// demand (call it after torch.cuda.synchronize() to be sure to see the latest kernels).
#pragma once

#include <string>

namespace ostquant {

// Device-visible pointer to the status word (allocated on first use; nullptr if mapped host
// memory is not available, in which case kernels still stay in bounds but report nothing).
int* kv_status_device_word();

// Read and clear the status word; "" if no error was recorded, else the error description.
std::string kv_status_take();

// Raise ValueError("ostquant.<op>: ...") if a KV kernel recorded an error.
void kv_status_check(const char* op);

}  // namespace ostquant
