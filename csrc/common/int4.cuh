// Canonical int4 packing (ostquant/ops/reference.py): signed two's complement, two values per
// byte, element 2j in the low nibble and element 2j+1 in the high nibble of byte j.
#pragma once

#include <cstdint>

namespace ostquant {

// Pack two int4 values (only their low 4 bits are used, as in the reference's `& 0xF`).
__host__ __device__ __forceinline__ uint8_t pack_int4_pair(int lo, int hi) {
  return static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
}

// Sign-extended low / high nibble of a packed byte, in [-8, 7].
__host__ __device__ __forceinline__ int unpack_int4_lo(uint8_t b) {
  return static_cast<int>(static_cast<int8_t>(static_cast<uint8_t>(b << 4))) >> 4;
}
__host__ __device__ __forceinline__ int unpack_int4_hi(uint8_t b) {
  return static_cast<int>(static_cast<int8_t>(b)) >> 4;
}

}  // namespace ostquant
