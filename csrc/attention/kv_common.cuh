// Device helpers shared by the KV append and attention kernels: lengths, the page addressing
// of launch.h's layout, and the status word.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/launch.h"

namespace ostquant {

__device__ __forceinline__ int64_t kv_seqlen(const KvLayout& lay, int b) {
  return lay.seqlens64 ? static_cast<const int64_t*>(lay.seqlens)[b]
                       : static_cast<int64_t>(static_cast<const int32_t*>(lay.seqlens)[b]);
}

// Record a device-side error (kind, sequence) in the status word: mapped host memory
// (kv_status.h), written with plain stores (no atomics on host memory; when several errors race,
// one of them is kept).
__device__ __forceinline__ void kv_report(const KvLayout& lay, int kind, int b) {
  if (lay.status != nullptr) {
    volatile int* w = lay.status;
    if (*w == 0) *w = (kind << 24) | (b & 0xFFFFFF);
  }
}

// Pool page of the page that holds token `t` (t ≥ 0) of sequence b, or -1 when the block
// table entry is not a page of the pool. Contiguous mode: page b.
__device__ __forceinline__ int kv_page(const KvLayout& lay, int b, int64_t t) {
  if (lay.block_table == nullptr) return b;
  const int64_t idx = t >> lay.log2_page;
  if (idx >= lay.max_pages) return -1;
  const int p = __ldg(lay.block_table + static_cast<int64_t>(b) * lay.max_pages + idx);
  return (p >= 0 && p < lay.num_pages) ? p : -1;
}

// Slot of token t inside its page.
__device__ __forceinline__ int64_t kv_slot(const KvLayout& lay, int64_t t) {
  return lay.block_table == nullptr ? t : (t & ((int64_t{1} << lay.log2_page) - 1));
}

// Row index of (page, slot, head) in the codes: the row's D/2 bytes start at row · D/2.
__device__ __forceinline__ int64_t kv_row(const KvLayout& lay, int page, int64_t slot, int h) {
  return (static_cast<int64_t>(page) * lay.page_size + slot) * lay.Hkv + h;
}

// Element index of (page, slot, head) in scale / zero (their strides, launch.h).
__device__ __forceinline__ int64_t kv_sc_index(const KvLayout& lay, int page, int64_t slot, int h) {
  return static_cast<int64_t>(page) * lay.sc_page + slot * lay.sc_slot +
         static_cast<int64_t>(h) * lay.sc_head;
}

}  // namespace ostquant
