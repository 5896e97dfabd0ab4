// ATen-free launchers of the int4 KV-cache kernels (kv_append.cu, kv_attention.cu), called by
// kv_ops.cpp. Pointers are device pointers of contiguous tensors; every launcher enqueues on
// `stream` and returns cudaGetLastError().
//
// Cache layout (docs/ops.md, "int4 KV cache"). One pool per tensor (K, V):
//
//   codes  uint8   [num_pages, page_size, Hkv, D/2]   two int4 codes per byte, low nibble first
//   scale  float16 [num_pages, page_size, Hkv]        x ≈ scale · (code − zero), per token+head
//   zero   float16 [num_pages, page_size, Hkv]
//
// Token t of sequence b lives in page block_table[b, t >> log2(page_size)], slot
// t & (page_size − 1): codes row ((page · page_size + slot) · Hkv + h). The contiguous cache
// [B, Smax, Hkv, D/2] is the same thing with one page per sequence (page = b, page_size = Smax,
// no block table), so every kernel serves both modes.
//
// Codes are contiguous. Scale and zero may be stored in any dense order (the four tensors with
// the same strides, KvLayout::sc_*): the runtime stores them head-major, [num_pages, Hkv,
// page_size] permuted to the shape above, so the 16 consecutive tokens of one head that an
// attention step reads are 32 contiguous bytes (one sector) instead of 16 strided values.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dispatch.h"

namespace ostquant {

// Device-side error codes written (first one wins) into the status word (kv_status.h).
enum KvStatusKind : int {
  kKvOk = 0,
  kKvAppendFull = 1,      // cache_seqlens[b] + S > capacity
  kKvAppendNoPage = 2,    // a page needed by the append is not a page of the pool
  kKvAttnBadLen = 3,      // seqlens[b] outside [Sq, capacity]
  kKvAttnNoPage = 4,      // a page holding one of the first seqlens[b] tokens is not allocated
  kKvBadLength = 5,       // cache_seqlens[b] < 0
};

struct KvLayout {
  int B = 0;
  int Hkv = 0;
  int D = 0;
  int page_size = 0;           // tokens per page (contiguous: Smax)
  int log2_page = -1;          // paged: log2(page_size); contiguous: -1
  int num_pages = 0;           // pages in the pool (contiguous: B)
  int max_pages = 1;           // block table columns (contiguous: 1)
  const int32_t* block_table = nullptr;  // [B, max_pages], nullptr in contiguous mode
  int64_t capacity = 0;        // tokens a sequence can hold: max_pages · page_size
  const void* seqlens = nullptr;         // int32 or int64 [B]
  bool seqlens64 = false;
  int* status = nullptr;       // device-visible status word (may be nullptr)
  // element strides of scale / zero along (page, slot, head); token-major contiguous:
  // (page_size·Hkv, Hkv, 1), head-major: (Hkv·page_size, 1, page_size)
  int64_t sc_page = 0;
  int64_t sc_slot = 0;
  int64_t sc_head = 0;
};

struct KvTensors {
  void* k_codes = nullptr;
  void* k_scale = nullptr;
  void* k_zero = nullptr;
  void* v_codes = nullptr;
  void* v_scale = nullptr;
  void* v_zero = nullptr;
};

struct KvAppendArgs {
  KvLayout lay;
  KvTensors cache;
  const void* k = nullptr;     // [B, S, Hkv, D]
  const void* v = nullptr;     // [B, S, Hkv, D]
  int S = 0;
  const void* cos = nullptr;   // [B, S, D] (k's dtype) or nullptr: RoPE on K
  const void* sin = nullptr;
  bool k_hadamard = false;     // orthonormal Hadamard on K after RoPE
  float hadamard_scale = 1.f;  // float32(D ** -0.5), as the reference rounds it
};

// Quantize + write S new tokens per sequence (k/v of `type`, D ∈ {64, 128}).
cudaError_t launch_kv_append(FloatType type, const KvAppendArgs& args, cudaStream_t stream);

struct KvAttnArgs {
  KvLayout lay;
  KvTensors cache;
  const void* q = nullptr;     // [B, Sq, Hq, D]
  void* out = nullptr;         // [B, Sq, Hq, D], q's dtype
  float* part_o = nullptr;     // [splits, B·Sq·Hq, D] (splits > 1)
  float* part_ml = nullptr;    // [splits, B·Sq·Hq, 2] (splits > 1)
  int Sq = 0;
  int Hq = 0;
  int group = 1;               // Hq / Hkv
  float sm_scale = 1.f;
  bool causal = true;
  int64_t max_seqlen = -1;     // host-known upper bound of seqlens (split heuristic only)
};

// Attention of q over the cache. fp16/bf16 q: tensor-core kernel (split-KV + combine when that
// helps); fp32 q: a plain CUDA-core kernel. `part_o`/`part_ml` must hold the workspace
// kv_attention_workspace() asks for.
cudaError_t launch_kv_attention(FloatType type, const KvAttnArgs& args, cudaStream_t stream);

// Number of KV splits the launcher will use for these arguments (1: no workspace needed).
int kv_attention_splits(FloatType type, const KvAttnArgs& args);

}  // namespace ostquant
