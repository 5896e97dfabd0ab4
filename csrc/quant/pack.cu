// pack_int4 / unpack_int4 kernels (canonical layout, see common/int4.cuh).
//
// Both are flat byte streams: since the last dim of the unpacked tensor is even and the tensors
// are contiguous, byte j of the packed tensor always holds unpacked elements 2j and 2j+1. Each
// thread handles 8 packed bytes (16 int8 values) with 8/16-byte vector accesses when aligned;
// the tail and misaligned views use the byte-wise path.
#include <algorithm>

#include "common/cuda_utils.cuh"
#include "common/int4.cuh"
#include "quant/launch.h"

namespace ostquant {
namespace {

constexpr int kBytesPerChunk = 8;  // packed bytes per thread iteration
constexpr int kThreads = 256;

template <bool VECTORIZED>
__global__ void pack_int4_kernel(const int8_t* __restrict__ in, uint8_t* __restrict__ out,
                                 int64_t n_out) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if constexpr (VECTORIZED) {
    const int64_t chunks = n_out / kBytesPerChunk;
    for (int64_t c = tid; c < chunks; c += stride) {
      const auto v = load_vec<int8_t, 2 * kBytesPerChunk>(in + c * 2 * kBytesPerChunk);
      Vec<uint8_t, kBytesPerChunk> o;
#pragma unroll
      for (int j = 0; j < kBytesPerChunk; ++j) o.v[j] = pack_int4_pair(v.v[2 * j], v.v[2 * j + 1]);
      store_vec<uint8_t, kBytesPerChunk>(out + c * kBytesPerChunk, o);
    }
    done = chunks * kBytesPerChunk;
  }
  for (int64_t j = done + tid; j < n_out; j += stride) {
    out[j] = pack_int4_pair(in[2 * j], in[2 * j + 1]);
  }
}

template <bool VECTORIZED>
__global__ void unpack_int4_kernel(const uint8_t* __restrict__ in, int8_t* __restrict__ out,
                                   int64_t n_in) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if constexpr (VECTORIZED) {
    const int64_t chunks = n_in / kBytesPerChunk;
    for (int64_t c = tid; c < chunks; c += stride) {
      const auto v = load_vec<uint8_t, kBytesPerChunk>(in + c * kBytesPerChunk);
      Vec<int8_t, 2 * kBytesPerChunk> o;
#pragma unroll
      for (int j = 0; j < kBytesPerChunk; ++j) {
        o.v[2 * j] = static_cast<int8_t>(unpack_int4_lo(v.v[j]));
        o.v[2 * j + 1] = static_cast<int8_t>(unpack_int4_hi(v.v[j]));
      }
      store_vec<int8_t, 2 * kBytesPerChunk>(out + c * 2 * kBytesPerChunk, o);
    }
    done = chunks * kBytesPerChunk;
  }
  for (int64_t j = done + tid; j < n_in; j += stride) {
    out[2 * j] = static_cast<int8_t>(unpack_int4_lo(in[j]));
    out[2 * j + 1] = static_cast<int8_t>(unpack_int4_hi(in[j]));
  }
}

unsigned grid_for(int64_t work_items) {
  const int64_t blocks = std::min(ceil_div<int64_t>(work_items, kThreads), static_cast<int64_t>(sm_count()) * 16);
  return static_cast<unsigned>(std::max<int64_t>(blocks, 1));
}

}  // namespace

cudaError_t launch_pack_int4(const int8_t* in, uint8_t* out, int64_t n_out, cudaStream_t stream) {
  if (n_out <= 0) return cudaSuccess;
  if (is_aligned(in, 2 * kBytesPerChunk) && is_aligned(out, kBytesPerChunk)) {
    pack_int4_kernel<true><<<grid_for(ceil_div<int64_t>(n_out, kBytesPerChunk)), kThreads, 0,
                             stream>>>(in, out, n_out);
  } else {
    pack_int4_kernel<false><<<grid_for(n_out), kThreads, 0, stream>>>(in, out, n_out);
  }
  return cudaGetLastError();
}

cudaError_t launch_unpack_int4(const uint8_t* in, int8_t* out, int64_t n_in, cudaStream_t stream) {
  if (n_in <= 0) return cudaSuccess;
  if (is_aligned(in, kBytesPerChunk) && is_aligned(out, 2 * kBytesPerChunk)) {
    unpack_int4_kernel<true><<<grid_for(ceil_div<int64_t>(n_in, kBytesPerChunk)), kThreads, 0,
                               stream>>>(in, out, n_in);
  } else {
    unpack_int4_kernel<false><<<grid_for(n_in), kThreads, 0, stream>>>(in, out, n_in);
  }
  return cudaGetLastError();
}

}  // namespace ostquant
