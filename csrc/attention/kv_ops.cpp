// Host side of the int4 KV-cache CUDA ops: argument checks (mirroring ostquant/ops/checks.py,
// same messages where possible), layout description, workspace, device guard and stream. The
// kernels live in kv_append.cu and kv_attention.cu.
//
// Checks that need the *values* of the lengths or of the block table (cache full, page not
// allocated, seqlens out of range) run on the device (kv_status.h): no host sync per call.
// Caches are written in place: codes must be contiguous, scale/zero dense in any dimension order
// (the four with one layout, launch.h); k, v, q, cos, sin may have any strides (copied to a
// contiguous, 16-byte aligned tensor when needed).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "attention/kv_status.h"
#include "attention/launch.h"
#include "attention/ops.h"
#include "common/checks.h"
#include "common/torch_utils.h"

namespace ostquant {
namespace {

constexpr int64_t kMinPage = 16;

void check_head_dim(const char* op, int64_t d) {
  OSTQ_CHECK(op, d == 64 || d == 128, "head_dim = ", d,
             " is not supported (supported: (64, 128))");
}

void check_on(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
              const char* ref_name) {
  check_cuda(op, name, t);
  check_same_device(op, ref_name, ref, name, t);
}

at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// One cache tensor: codes uint8 `shape` (contiguous), scale/zero float16 shape[:3] (dense, any
// dimension order), on ref's device.
void check_cache(const char* op, const std::string& name, const at::Tensor& codes,
                 const at::Tensor& scale, const at::Tensor& zero, at::IntArrayRef shape,
                 const at::Tensor& ref, const char* ref_name) {
  const std::string sname = name.substr(0, 1) + "_scale", zname = name.substr(0, 1) + "_zero";
  check_dtype(op, name.c_str(), codes, {at::kByte});
  check_ndim(op, name.c_str(), codes, 4);
  check_shape(op, name.c_str(), codes, shape);
  auto meta = [&](const std::string& nm, const at::Tensor& t) {
    check_dtype(op, nm.c_str(), t, {at::kHalf});
    check_shape(op, nm.c_str(), t, shape.slice(0, 3));
  };
  meta(sname, scale);
  meta(zname, zero);
  check_on(op, name.c_str(), codes, ref, ref_name);
  check_contiguous(op, name.c_str(), codes);
  auto place = [&](const std::string& nm, const at::Tensor& t) {
    check_on(op, nm.c_str(), t, ref, ref_name);
    OSTQ_CHECK(op, t.is_non_overlapping_and_dense(), nm,
               " must be dense (contiguous in some dimension order, e.g. head-major), got strides ",
               shape_str(t.strides()));
  };
  place(sname, scale);
  place(zname, zero);
}

// k_scale, k_zero, v_scale and v_zero share one memory layout (the kernels take one set of
// strides); strides of size-1 dimensions do not matter.
void check_scale_layout(const char* op, const at::Tensor& ks, const at::Tensor& kz,
                        const at::Tensor& vs, const at::Tensor& vz) {
  auto same = [&](const at::Tensor& t) {
    for (int64_t d = 0; d < t.dim(); ++d) {
      if (t.size(d) > 1 && t.stride(d) != ks.stride(d)) return false;
    }
    return true;
  };
  OSTQ_CHECK(op, same(kz) && same(vs) && same(vz),
             "k_scale, k_zero, v_scale and v_zero must have the same strides, got ",
             shape_str(ks.strides()), ", ", shape_str(kz.strides()), ", ", shape_str(vs.strides()),
             ", ", shape_str(vz.strides()));
}

void check_lengths(const char* op, const char* name, const at::Tensor& lens, int64_t b,
                   const at::Tensor& ref, const char* ref_name) {
  check_dtype(op, name, lens, {at::kInt, at::kLong});
  check_ndim(op, name, lens, 1);
  check_shape(op, name, lens, {b});
  check_on(op, name, lens, ref, ref_name);
}

// Page size of a pool (dim 1): a power of two >= 16.
int64_t check_page_size(const char* op, const char* name, const at::Tensor& pool) {
  check_dtype(op, name, pool, {at::kByte});
  check_ndim(op, name, pool, 4);
  const int64_t p = pool.size(1);
  OSTQ_CHECK(op, p >= kMinPage && (p & (p - 1)) == 0, "page size (dim 1 of ", name,
             ") must be a power of two >= ", kMinPage, ", got ", p);
  OSTQ_CHECK(op, pool.size(0) > 0, name, " has no pages");
  return p;
}

void check_block_table(const char* op, const at::Tensor& table, int64_t b, const at::Tensor& ref,
                       const char* ref_name) {
  check_dtype(op, "block_table", table, {at::kInt});
  check_ndim(op, "block_table", table, 2);
  OSTQ_CHECK(op, table.size(0) == b && table.size(1) > 0, "block_table must have shape (", b,
             ", max_pages) with max_pages >= 1, got ", shape_str(table.sizes()));
  check_on(op, "block_table", table, ref, ref_name);
}

int log2_exact(int64_t p) {
  int l = 0;
  while ((int64_t{1} << l) < p) ++l;
  return l;
}

void set_scale_strides(KvLayout& lay, const at::Tensor& scale) {
  lay.sc_page = scale.stride(0);
  lay.sc_slot = scale.stride(1);
  lay.sc_head = scale.stride(2);
}

KvLayout contiguous_layout(const at::Tensor& cache, const at::Tensor& scale,
                           const at::Tensor& lens) {
  KvLayout lay;
  lay.B = static_cast<int>(cache.size(0));
  lay.page_size = static_cast<int>(cache.size(1));
  lay.Hkv = static_cast<int>(cache.size(2));
  lay.D = static_cast<int>(cache.size(3) * 2);
  lay.log2_page = -1;
  lay.num_pages = lay.B;
  lay.max_pages = 1;
  lay.block_table = nullptr;
  lay.capacity = cache.size(1);
  lay.seqlens = lens.const_data_ptr();
  lay.seqlens64 = lens.scalar_type() == at::kLong;
  lay.status = kv_status_device_word();
  set_scale_strides(lay, scale);
  return lay;
}

KvLayout paged_layout(const at::Tensor& pool, const at::Tensor& scale, const at::Tensor& table,
                      const at::Tensor& lens) {
  KvLayout lay;
  lay.B = static_cast<int>(table.size(0));
  lay.page_size = static_cast<int>(pool.size(1));
  lay.Hkv = static_cast<int>(pool.size(2));
  lay.D = static_cast<int>(pool.size(3) * 2);
  lay.log2_page = log2_exact(pool.size(1));
  lay.num_pages = static_cast<int>(pool.size(0));
  lay.max_pages = static_cast<int>(table.size(1));
  lay.block_table = static_cast<const int32_t*>(table.const_data_ptr());
  lay.capacity = table.size(1) * pool.size(1);
  lay.seqlens = lens.const_data_ptr();
  lay.seqlens64 = lens.scalar_type() == at::kLong;
  lay.status = kv_status_device_word();
  set_scale_strides(lay, scale);
  return lay;
}

KvTensors tensors(const at::Tensor& kc, const at::Tensor& ks, const at::Tensor& kz,
                  const at::Tensor& vc, const at::Tensor& vs, const at::Tensor& vz) {
  KvTensors t;
  t.k_codes = kc.data_ptr();
  t.k_scale = ks.data_ptr();
  t.k_zero = kz.data_ptr();
  t.v_codes = vc.data_ptr();
  t.v_scale = vs.data_ptr();
  t.v_zero = vz.data_ptr();
  return t;
}

void check_int_ranges(const char* op, int64_t pages, int64_t page_size, int64_t hkv, int64_t d) {
  OSTQ_CHECK(op, pages * page_size * hkv * (d / 2) < (int64_t{1} << 62) && pages < (1LL << 31) &&
                     page_size < (1LL << 31) && hkv < 65536,
             "cache too large");
}

// Shared by the three append ops. `table` is undefined for the contiguous cache.
void append_impl(const char* op, const at::Tensor& k_in, const at::Tensor& v_in,
                 const at::Tensor& kc, const at::Tensor& ks, const at::Tensor& kz,
                 const at::Tensor& vc, const at::Tensor& vs, const at::Tensor& vz,
                 const at::Tensor& table, const at::Tensor& lens_in,
                 const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                 bool k_hadamard) {
  const bool paged = table.defined();
  check_float_dtype(op, "k", k_in);
  check_ndim(op, "k", k_in, 4);
  check_dtype(op, "v", v_in, {k_in.scalar_type()});
  check_ndim(op, "v", v_in, 4);
  check_shape(op, "v", v_in, k_in.sizes());
  const int64_t B = k_in.size(0), S = k_in.size(1), Hkv = k_in.size(2), D = k_in.size(3);
  OSTQ_CHECK(op, B > 0 && S > 0, "k is empty (shape ", shape_str(k_in.sizes()), ")");
  check_head_dim(op, D);
  check_cuda(op, "k", k_in);
  check_on(op, "v", v_in, k_in, "k");
  const c10::cuda::CUDAGuard guard(k_in.device());
  kv_status_check(op);

  const char* kname = paged ? "k_pool" : "k_cache";
  const char* vname = paged ? "v_pool" : "v_cache";
  int64_t N, P;
  if (paged) {
    P = check_page_size(op, kname, kc);
    N = kc.size(0);
  } else {
    check_dtype(op, kname, kc, {at::kByte});
    check_ndim(op, kname, kc, 4);
    N = B;
    P = kc.size(1);
  }
  check_cache(op, kname, kc, ks, kz, {N, P, Hkv, D / 2}, k_in, "k");
  check_cache(op, vname, vc, vs, vz, {N, P, Hkv, D / 2}, k_in, "k");
  check_scale_layout(op, ks, kz, vs, vz);
  check_int_ranges(op, N, P, Hkv, D);
  if (paged) check_block_table(op, table, B, k_in, "k");
  check_lengths(op, "cache_seqlens", lens_in, B, k_in, "k");
  OSTQ_CHECK(op, cos.has_value() == sin.has_value(),
             "cos and sin must be given together (RoPE on K) or both be None");
  at::Tensor cos_c, sin_c;
  if (cos.has_value()) {
    const std::vector<int64_t> cs_shape{B, S, D};
    auto check_cs = [&](const char* nm, const at::Tensor& t) {
      check_dtype(op, nm, t, {k_in.scalar_type()});
      check_ndim(op, nm, t, 3);
      check_shape(op, nm, t, cs_shape);
      check_on(op, nm, t, k_in, "k");
    };
    check_cs("cos", *cos);
    check_cs("sin", *sin);
    cos_c = aligned_contiguous(*cos);
    sin_c = aligned_contiguous(*sin);
  }

  const at::Tensor k = aligned_contiguous(k_in);
  const at::Tensor v = aligned_contiguous(v_in);
  const at::Tensor lens = lens_in.contiguous();
  const at::Tensor tab = paged ? table.contiguous() : at::Tensor();

  KvAppendArgs a;
  a.lay = paged ? paged_layout(kc, ks, tab, lens) : contiguous_layout(kc, ks, lens);
  a.cache = tensors(kc, ks, kz, vc, vs, vz);
  a.k = k.const_data_ptr();
  a.v = v.const_data_ptr();
  a.S = static_cast<int>(S);
  a.cos = cos_c.defined() ? cos_c.const_data_ptr() : nullptr;
  a.sin = sin_c.defined() ? sin_c.const_data_ptr() : nullptr;
  a.k_hadamard = k_hadamard;
  // float32(D ** -0.5), the value reference.hadamard_transform multiplies by
  a.hadamard_scale = static_cast<float>(std::pow(static_cast<double>(D), -0.5));
  OSTQ_CHECK_LAUNCH(op, launch_kv_append(to_float_type(k.scalar_type()), a,
                                         c10::cuda::getCurrentCUDAStream()));
}

at::Tensor attention_impl(const char* op, const at::Tensor& q_in, const at::Tensor& kc,
                          const at::Tensor& ks, const at::Tensor& kz, const at::Tensor& vc,
                          const at::Tensor& vs, const at::Tensor& vz, const at::Tensor& table,
                          const at::Tensor& lens_in, double sm_scale, bool causal,
                          int64_t max_seqlen) {
  const bool paged = table.defined();
  check_float_dtype(op, "q", q_in);
  check_ndim(op, "q", q_in, 4);
  const int64_t B = q_in.size(0), Sq = q_in.size(1), Hq = q_in.size(2), D = q_in.size(3);
  OSTQ_CHECK(op, B > 0 && Sq > 0, "q is empty (shape ", shape_str(q_in.sizes()), ")");
  check_head_dim(op, D);
  check_cuda(op, "q", q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  kv_status_check(op);

  const char* kname = paged ? "k_pool" : "k_cache";
  const char* vname = paged ? "v_pool" : "v_cache";
  int64_t N, P;
  if (paged) {
    P = check_page_size(op, kname, kc);
    N = kc.size(0);
  } else {
    check_dtype(op, kname, kc, {at::kByte});
    check_ndim(op, kname, kc, 4);
    N = B;
    P = kc.size(1);
  }
  const int64_t Hkv = kc.size(2);
  OSTQ_CHECK(op, Hkv > 0 && Hq % Hkv == 0, "query heads (", Hq, ") must be a multiple of KV heads (",
             Hkv, ")");
  check_cache(op, kname, kc, ks, kz, {N, P, Hkv, D / 2}, q_in, "q");
  check_cache(op, vname, vc, vs, vz, {N, P, Hkv, D / 2}, q_in, "q");
  check_scale_layout(op, ks, kz, vs, vz);
  check_int_ranges(op, N, P, Hkv, D);
  if (paged) check_block_table(op, table, B, q_in, "q");
  check_lengths(op, "seqlens", lens_in, B, q_in, "q");
  OSTQ_CHECK(op, sm_scale > 0, "sm_scale must be positive, got ", float_str(sm_scale));
  OSTQ_CHECK(op, B * Sq * Hq < (int64_t{1} << 31), "too many query rows");

  const at::Tensor q = aligned_contiguous(q_in);
  const at::Tensor lens = lens_in.contiguous();
  const at::Tensor tab = paged ? table.contiguous() : at::Tensor();
  at::Tensor out = at::empty(q.sizes(), q.options());

  KvAttnArgs a;
  a.lay = paged ? paged_layout(kc, ks, tab, lens) : contiguous_layout(kc, ks, lens);
  a.cache = tensors(kc, ks, kz, vc, vs, vz);
  a.q = q.const_data_ptr();
  a.out = out.data_ptr();
  a.Sq = static_cast<int>(Sq);
  a.Hq = static_cast<int>(Hq);
  a.group = static_cast<int>(Hq / Hkv);
  a.sm_scale = static_cast<float>(sm_scale);
  a.causal = causal;
  a.max_seqlen = max_seqlen;
  const FloatType type = to_float_type(q.scalar_type());
  const int splits = kv_attention_splits(type, a);
  at::Tensor part_o, part_ml;
  if (splits > 1) {
    const int64_t R = B * Sq * Hq;
    part_o = at::empty({splits, R, D}, q.options().dtype(at::kFloat));
    part_ml = at::empty({splits, R, 2}, q.options().dtype(at::kFloat));
    a.part_o = part_o.data_ptr<float>();
    a.part_ml = part_ml.data_ptr<float>();
  }
  OSTQ_CHECK_LAUNCH(op, launch_kv_attention(type, a, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

void kv_cache_append_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                          const at::Tensor& k_scale, const at::Tensor& k_zero,
                          const at::Tensor& v_cache, const at::Tensor& v_scale,
                          const at::Tensor& v_zero, const at::Tensor& cache_seqlens) {
  append_impl("kv_cache_append", k, v, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero,
              at::Tensor(), cache_seqlens, std::nullopt, std::nullopt, false);
}

void kv_cache_append_fused_cuda(const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& k_cache, const at::Tensor& k_scale,
                                const at::Tensor& k_zero, const at::Tensor& v_cache,
                                const at::Tensor& v_scale, const at::Tensor& v_zero,
                                const at::Tensor& cache_seqlens,
                                const std::optional<at::Tensor>& cos,
                                const std::optional<at::Tensor>& sin, bool k_hadamard) {
  append_impl("kv_cache_append_fused", k, v, k_cache, k_scale, k_zero, v_cache, v_scale, v_zero,
              at::Tensor(), cache_seqlens, cos, sin, k_hadamard);
}

void paged_kv_cache_append_cuda(const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& k_pool, const at::Tensor& k_scale,
                                const at::Tensor& k_zero, const at::Tensor& v_pool,
                                const at::Tensor& v_scale, const at::Tensor& v_zero,
                                const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                                const std::optional<at::Tensor>& cos,
                                const std::optional<at::Tensor>& sin, bool k_hadamard) {
  append_impl("paged_kv_cache_append", k, v, k_pool, k_scale, k_zero, v_pool, v_scale, v_zero,
              block_table, cache_seqlens, cos, sin, k_hadamard);
}

at::Tensor int4_kv_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& k_scale, const at::Tensor& k_zero,
                                  const at::Tensor& v_cache, const at::Tensor& v_scale,
                                  const at::Tensor& v_zero, const at::Tensor& seqlens,
                                  double sm_scale, bool causal) {
  return attention_impl("int4_kv_attention", q, k_cache, k_scale, k_zero, v_cache, v_scale,
                        v_zero, at::Tensor(), seqlens, sm_scale, causal, -1);
}

at::Tensor paged_int4_kv_attention_cuda(const at::Tensor& q, const at::Tensor& k_pool,
                                        const at::Tensor& k_scale, const at::Tensor& k_zero,
                                        const at::Tensor& v_pool, const at::Tensor& v_scale,
                                        const at::Tensor& v_zero, const at::Tensor& block_table,
                                        const at::Tensor& seqlens, double sm_scale, bool causal,
                                        int64_t max_seqlen) {
  return attention_impl("paged_int4_kv_attention", q, k_pool, k_scale, k_zero, v_pool, v_scale,
                        v_zero, block_table, seqlens, sm_scale, causal, max_seqlen);
}

std::string kv_status_message() { return kv_status_take(); }

}  // namespace ostquant
