// Link stubs for the sm90 spike (sm90_spike.py): CUDA runtime entry points that the host-compiled
// CUTLASS 4.2 Hopper GEMM references and the emulator does not provide yet. Each fails loudly.
#include <cstring>
#include <string>

#include <cuda_runtime_api.h>

// workspace.h zero_workspace (stream-K lock region): emulated memory is host memory, streams are
// synchronous
cudaError_t cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t) {
  std::memset(p, value, count);
  return cudaSuccess;
}

// kernel_launch.h's PDL branch (launch_with_pdl = true): never taken by our kernels
cudaError_t cudaLaunchKernelExC(const cudaLaunchConfig_t*, const void*, void**) {
  ::ostq_emu::fail("sm90 overlay: cudaLaunchKernelExC (programmatic dependent launch) is not emulated");
}

// cuda_host_adapter.hpp (CUDA >= 13): cuTensorMapEncodeTiled is fetched through this; the
// emulator's encode stub (sm90_emu.h) records the descriptor
cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int, unsigned long long,
                                             cudaDriverEntryPointQueryResult* status) {
  if (std::string(symbol) == "cuTensorMapEncodeTiled") {
    *fn = reinterpret_cast<void*>(&::ostq_emu::sm90::encode_tiled);
    if (status) *status = cudaDriverEntryPointSuccess;
    return cudaSuccess;
  }
  ::ostq_emu::fail(std::string("sm90 overlay: driver entry point not emulated: ") + symbol);
}
