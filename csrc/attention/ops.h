// Host entry points of the int4 KV-cache CUDA ops (registered in csrc/bindings.cpp).
// Signatures follow the schemas in ostquant/ops/library.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace ostquant {

void kv_cache_append_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                          const at::Tensor& k_scale, const at::Tensor& k_zero,
                          const at::Tensor& v_cache, const at::Tensor& v_scale,
                          const at::Tensor& v_zero, const at::Tensor& cache_seqlens);

void kv_cache_append_fused_cuda(const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& k_cache, const at::Tensor& k_scale,
                                const at::Tensor& k_zero, const at::Tensor& v_cache,
                                const at::Tensor& v_scale, const at::Tensor& v_zero,
                                const at::Tensor& cache_seqlens,
                                const std::optional<at::Tensor>& cos,
                                const std::optional<at::Tensor>& sin, bool k_hadamard);

void paged_kv_cache_append_cuda(const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& k_pool, const at::Tensor& k_scale,
                                const at::Tensor& k_zero, const at::Tensor& v_pool,
                                const at::Tensor& v_scale, const at::Tensor& v_zero,
                                const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                                const std::optional<at::Tensor>& cos,
                                const std::optional<at::Tensor>& sin, bool k_hadamard);

at::Tensor int4_kv_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& k_scale, const at::Tensor& k_zero,
                                  const at::Tensor& v_cache, const at::Tensor& v_scale,
                                  const at::Tensor& v_zero, const at::Tensor& seqlens,
                                  double sm_scale, bool causal);

at::Tensor paged_int4_kv_attention_cuda(const at::Tensor& q, const at::Tensor& k_pool,
                                        const at::Tensor& k_scale, const at::Tensor& k_zero,
                                        const at::Tensor& v_pool, const at::Tensor& v_scale,
                                        const at::Tensor& v_zero, const at::Tensor& block_table,
                                        const at::Tensor& seqlens, double sm_scale, bool causal,
                                        int64_t max_seqlen);

// Read and clear the KV kernels' device-side status (kv_status.h): "" or an error message.
std::string kv_status_message();

}  // namespace ostquant
