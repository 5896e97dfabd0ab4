// Prototype for an sm90 extension of the SIMT emulator (tests/simt): the riskiest primitives of
// csrc/gemm/sm90/kernel.cuh, built from the PTX ISA / driver API documentation and checked
// against the CUTLASS 4.2 code that the real kernel runs (compiled here as host C++):
//
//  1. cuTensorMapEncodeTiled stub: the parameters CUTLASS encodes for our operands are kept in
//     the 128-byte CUtensorMap (reached through cudaGetDriverEntryPointByVersion, as CUTLASS
//     calls it with CUDA 13), with the driver's documented validity checks.
//  2. Emulated TMA tile load (cp.async.bulk.tensor.3d ... mbarrier::complete_tx): box copy with
//     OOB zero fill and the 32B/64B/128B swizzles applied to shared-address bits; driven by
//     cute's own TMA partitioning (SM90_TMA_LOAD_3D::copy is patched to call it), then every
//     element of the consumer's smem view (sA/sB, cute's swizzled layouts) is compared with gmem.
//  3. wgmma fragment layouts from the PTX ISA (A from registers for .s8 k32 and .f16/.bf16 k16,
//     D accumulators) against cute's MMA_Traits (ALayout_64x32 / ALayout_64x16 / CLayout_64xN).
//  4. GMMA shared-memory descriptor decode (start address, LBO, SBO, layout type, K-major,
//     SWIZZLE_128B) against the descriptors cute builds for the kernel's B operand; then a full
//     emulated wgmma (A registers loaded by the mainloop's own smem->rmem copy, B through the
//     descriptor, D in the PTX layout) against a direct reference product, for every k-block.
//
// Build: see build.sh. Exit status 0 and "ALL OK" when every check passes.
#include <initializer_list>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <map>
#include <string>
#include <stdexcept>
#include <cuda.h>
#include <cudaTypedefs.h>

// ------------------------------------------------------------------ emulated shared window
namespace ostq_proto {
alignas(4096) static unsigned char g_smem[232448 + 4096];
uint32_t smem_addr(void const* p) {
  auto a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(g_smem);
  if (a < b || a >= b + sizeof(g_smem)) throw std::runtime_error("cast_smem_ptr_to_uint: not in shared memory");
  return static_cast<uint32_t>(a - b);
}
unsigned char* smem_ptr(uint32_t a) { return g_smem + a; }
}  // namespace ostq_proto

// ------------------------------------------------------------------ 1. encode stub
namespace ostq_proto {
// Our own layout of the 128 opaque bytes (only this emulator reads it back).
struct TensorMapRec {
  uint32_t magic, dtype, rank, interleave, swizzle, l2, oob, esize;  // 32 bytes
  uint64_t gaddr;                                                     // 8
  uint64_t gdim[5];                                                   // 40
  uint64_t gstride[4];                                                // 32 (bytes, dims 1..4)
  uint8_t box[5], estride[5];                                         // 10
  uint8_t pad[6];
};
static_assert(sizeof(TensorMapRec) <= sizeof(CUtensorMap), "fits the opaque descriptor");
constexpr uint32_t kMagic = 0x0A7E5A90u;
int g_encodes = 0;
std::string g_encode_log;

uint32_t elem_size(CUtensorMapDataType t) {
  switch (t) {
    case CU_TENSOR_MAP_DATA_TYPE_UINT8: return 1;
    case CU_TENSOR_MAP_DATA_TYPE_UINT16: case CU_TENSOR_MAP_DATA_TYPE_FLOAT16:
    case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16: return 2;
    case CU_TENSOR_MAP_DATA_TYPE_UINT32: case CU_TENSOR_MAP_DATA_TYPE_INT32:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32: case CU_TENSOR_MAP_DATA_TYPE_FLOAT32_FTZ:
    case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32: case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32_FTZ: return 4;
    case CU_TENSOR_MAP_DATA_TYPE_UINT64: case CU_TENSOR_MAP_DATA_TYPE_INT64:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT64: return 8;
    default: return 0;  // packed sub-byte types: not used by this kernel
  }
}

CUresult encode_tiled(CUtensorMap* map, CUtensorMapDataType dt, cuuint32_t rank, void* gaddr,
                      const cuuint64_t* gdim, const cuuint64_t* gstride, const cuuint32_t* box,
                      const cuuint32_t* estride, CUtensorMapInterleave il, CUtensorMapSwizzle sw,
                      CUtensorMapL2promotion l2, CUtensorMapFloatOOBfill oob) {
  // the driver's documented requirements (cuda.h, cuTensorMapEncodeTiled)
  const uint32_t es = elem_size(dt);
  auto bad = [&](const char* why) { g_encode_log += std::string("REJECT: ") + why + "\n"; return CUDA_ERROR_INVALID_VALUE; };
  if (reinterpret_cast<uintptr_t>(map) % 64) return bad("tensorMap not 64-byte aligned");
  if (es == 0) return bad("data type not emulated");
  if (rank < 1 || rank > 5) return bad("rank");
  if (reinterpret_cast<uintptr_t>(gaddr) % 16) return bad("globalAddress not 16-byte aligned");
  if (il != CU_TENSOR_MAP_INTERLEAVE_NONE) return bad("interleave not emulated");
  for (uint32_t i = 0; i < rank; ++i) {
    if (gdim[i] == 0 || gdim[i] > (1ull << 32)) return bad("globalDim");
    if (box[i] == 0 || box[i] > 256) return bad("boxDim");
    if (estride[i] == 0 || estride[i] > 8) return bad("elementStrides");
    if (i > 0 && estride[i] != 1) return bad("elementStrides != 1 not emulated");
  }
  for (uint32_t i = 0; i + 1 < rank; ++i)
    if (gstride[i] % 16 || gstride[i] >= (1ull << 40)) return bad("globalStrides");
  if ((box[0] * es) % 16) return bad("boxDim[0] * elementSize not a multiple of 16 bytes");
  const uint32_t span = sw == CU_TENSOR_MAP_SWIZZLE_32B ? 32 : sw == CU_TENSOR_MAP_SWIZZLE_64B ? 64
                      : sw == CU_TENSOR_MAP_SWIZZLE_128B ? 128 : 0;
  if (sw != CU_TENSOR_MAP_SWIZZLE_NONE && span == 0) return bad("swizzle mode not emulated");
  if (span && box[0] * es > span) return bad("inner box dimension exceeds the swizzle span");
  TensorMapRec r{};
  r.magic = kMagic; r.dtype = dt; r.rank = rank; r.interleave = il; r.swizzle = sw; r.l2 = l2;
  r.oob = oob; r.esize = es; r.gaddr = reinterpret_cast<uint64_t>(gaddr);
  for (uint32_t i = 0; i < 5; ++i) {
    r.gdim[i] = i < rank ? gdim[i] : 1;
    r.box[i] = static_cast<uint8_t>(i < rank ? box[i] : 1);  // 256 -> 0, undone in box_of
    r.estride[i] = static_cast<uint8_t>(i < rank ? estride[i] : 1);
  }
  for (uint32_t i = 0; i + 1 < rank; ++i) r.gstride[i] = gstride[i];
  std::memset(map, 0, sizeof(*map));
  std::memcpy(map, &r, sizeof(r));
  ++g_encodes;
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "encode: dtype=%u esize=%u rank=%u gdim=(%llu,%llu,%llu) gstride_bytes=(%llu,%llu) "
                "box=(%u,%u,%u) swizzle=%u oob=%u l2=%u\n",
                dt, es, rank, (unsigned long long)r.gdim[0], (unsigned long long)r.gdim[1],
                (unsigned long long)r.gdim[2], (unsigned long long)r.gstride[0],
                (unsigned long long)r.gstride[1], box[0], rank > 1 ? box[1] : 1,
                rank > 2 ? box[2] : 1, sw, oob, l2);
  g_encode_log += buf;
  return CUDA_SUCCESS;
}
uint32_t box_of(const TensorMapRec& r, int i) { return r.box[i] == 0 ? 256u : r.box[i]; }

// XOR pattern of the TMA / GMMA swizzle modes on a shared-memory byte address: the 16-byte chunk
// index (bits 4..) is XORed with the 128-byte row index bits 7.. (SWIZZLE_32B: 1 bit, 64B: 2,
// 128B: 3). Applied to the absolute shared address (hence the 1024-byte alignment CUTLASS keeps).
int g_break = 0;  // negative controls (PROTO_BREAK=1: no TMA swizzle, 2: row XOR off by one)
uint32_t swizzle_addr(uint32_t a, uint32_t mode /*0 none, 1 32B, 2 64B, 3 128B*/) {
  if (mode == 0 || g_break == 1) return a;
  if (g_break == 2) return a ^ ((((a >> 7) + 1) & ((1u << mode) - 1u)) << 4);
  const uint32_t mask = (1u << mode) - 1u;
  return a ^ (((a >> 7) & mask) << 4);
}

// ------------------------------------------------------------------ 2. TMA load
struct MbarRec { long long tx = 0; };
std::map<uint32_t, MbarRec> g_mbar;
long long g_tma_bytes = 0;

void tma_load(void const* desc, uint32_t mbar, uint32_t smem, std::initializer_list<int32_t> crd) {
  TensorMapRec r;
  std::memcpy(&r, desc, sizeof(r));
  if (r.magic != kMagic) throw std::runtime_error("TMA: descriptor not made by the encode stub");
  if (crd.size() != r.rank) throw std::runtime_error("TMA: coordinate count != tensor rank");
  const uint32_t mode = r.swizzle;  // CU_TENSOR_MAP_SWIZZLE_{NONE,32B,64B,128B} = 0..3
  const uint32_t align = mode == 3 ? 1024 : mode == 2 ? 512 : mode == 1 ? 256 : 128;
  if (smem % align) throw std::runtime_error("TMA: smem destination not aligned for the swizzle");
  int32_t c[5] = {0, 0, 0, 0, 0};
  int k = 0;
  for (int32_t v : crd) c[k++] = v;
  const uint32_t es = r.esize, b0 = box_of(r, 0), b1 = box_of(r, 1), b2 = box_of(r, 2);
  uint32_t lin = 0;
  for (uint32_t i2 = 0; i2 < b2; ++i2)
    for (uint32_t i1 = 0; i1 < b1; ++i1)
      for (uint32_t i0 = 0; i0 < b0; ++i0, lin += es) {
        const int64_t g0 = int64_t(c[0]) + i0, g1 = int64_t(c[1]) + i1, g2 = int64_t(c[2]) + i2;
        unsigned char* dst = smem_ptr(swizzle_addr(smem + lin, mode));
        const bool in = g0 >= 0 && g0 < int64_t(r.gdim[0]) && g1 >= 0 && g1 < int64_t(r.gdim[1]) &&
                        g2 >= 0 && g2 < int64_t(r.gdim[2]);
        if (!in) {  // OOB_FILL_NONE: zeros (NAN_REQUEST_ZERO_FMA would write a NaN pattern)
          std::memset(dst, 0, es);
          continue;
        }
        const unsigned char* src = reinterpret_cast<const unsigned char*>(r.gaddr) + g0 * es +
                                   g1 * int64_t(r.gstride[0]) + g2 * int64_t(r.rank > 2 ? r.gstride[1] : 0);
        std::memcpy(dst, src, es);
      }
  // complete_tx: the whole box counts, OOB-filled elements included
  g_mbar[mbar].tx += lin;
  g_tma_bytes += lin;
}
}  // namespace ostq_proto

// CUTLASS 4.2 with CUDA 13 finds cuTensorMapEncodeTiled through the runtime's entry-point query.
extern "C" cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int,
                                                       unsigned long long,
                                                       cudaDriverEntryPointQueryResult* st) {
  if (std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0) {
    *fn = reinterpret_cast<void*>(&ostq_proto::encode_tiled);
    if (st) *st = cudaDriverEntryPointSuccess;
    return cudaSuccess;
  }
  if (st) *st = cudaDriverEntryPointSymbolNotFound;
  return cudaErrorInvalidValue;
}

extern "C" cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}

// The kernel type (the real instantiation header)
#include "gemm/sm90/kernel.cuh"

using namespace cute;
template <class T> int ival(T const& v) {
  if constexpr (requires { v.get(); }) return int(v.get()); else return int(v);
}
static int g_fail = 0;
#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      if (g_fail < 20) std::printf("FAIL: " __VA_ARGS__);  \
      ++g_fail;                                            \
    }                                                      \
  } while (0)

// ------------------------------------------------------------------ 3. fragment layouts (PTX ISA)
// wgmma .m64nNkK: warp w of the warp group owns rows 16w..16w+15; lane = 4g + t.
// D (f32 / s32): d[4i + j]: row 16w + g + 8*(j>>1), col 8i + 2t + (j&1).
static void ptx_d(int thr, int v, int& m, int& n) {
  const int w = thr / 32, lane = thr % 32, g = lane / 4, t = lane % 4, i = v / 4, j = v % 4;
  m = 16 * w + g + 8 * (j >> 1);
  n = 8 * i + 2 * t + (j & 1);
}
// A from registers, 16-bit types (k16): 4 registers x 2 halves; reg r, half h:
// row 16w + g + 8*(r&1), k 2t + h + 8*(r>>1).
static void ptx_a16(int thr, int v, int& m, int& k) {
  const int w = thr / 32, lane = thr % 32, g = lane / 4, t = lane % 4, r = v / 2, h = v % 2;
  m = 16 * w + g + 8 * (r & 1);
  k = 2 * t + h + 8 * (r >> 1);
}
// A from registers, 8-bit types (k32): 4 registers x 4 bytes; reg r, byte b:
// row 16w + g + 8*(r&1), k 4t + b + 16*(r>>1).
static void ptx_a8(int thr, int v, int& m, int& k) {
  const int w = thr / 32, lane = thr % 32, g = lane / 4, t = lane % 4, r = v / 4, b = v % 4;
  m = 16 * w + g + 8 * (r & 1);
  k = 4 * t + b + 16 * (r >> 1);
}

template <class Traits, int N, int K, bool Byte>
void check_fragment_layouts(const char* name) {
  using AL = typename Traits::ALayout;
  using CL = typename Traits::CLayout;
  int bad = 0;
  for (int thr = 0; thr < 128; ++thr) {
    for (int v = 0; v < size<1>(AL{}); ++v) {
      const int idx = AL{}(thr, v);  // (m, k) -> m + 64 k
      int m, k;
      if (Byte) ptx_a8(thr, v, m, k); else ptx_a16(thr, v, m, k);
      bad += idx != m + 64 * k;
    }
    for (int v = 0; v < size<1>(CL{}); ++v) {
      const int idx = CL{}(thr, v);  // (m, n) -> m + 64 n
      int m, n;
      ptx_d(thr, v, m, n);
      bad += idx != m + 64 * n;
    }
  }
  CHECK(bad == 0, "%s: %d fragment elements differ from cute's layouts\n", name, bad);
  std::printf("fragment layouts %-42s A %dx%d, D 64x%d: %s\n", name, 64, K, N, bad ? "DIFFER" : "agree with cute");
}

// ------------------------------------------------------------------ 4. GMMA descriptor decode
// PTX ISA "Matrix Descriptor Format": bits 0-13 start address >> 4, 16-29 leading-dimension byte
// offset >> 4, 32-45 stride-dimension byte offset >> 4, 49-51 base offset, 62-63 layout type
// (1 = 128B swizzle, 2 = 64B, 3 = 32B, 0 = interleave / none).
struct GmmaDesc {
  uint32_t start, lbo, sbo, base, layout;
};
static GmmaDesc decode_desc(uint64_t d) {
  return {uint32_t(d & 0x3FFF) << 4, uint32_t((d >> 16) & 0x3FFF) << 4,
          uint32_t((d >> 32) & 0x3FFF) << 4, uint32_t((d >> 49) & 7), uint32_t(d >> 62)};
}
// Byte address of element (row r of N/M, byte kb along K) of a K-major operand under a swizzled
// descriptor: 8-row core-matrix groups SBO apart, rows 16B..128B apart inside the swizzle atom
// (row pitch = the swizzle span), then the swizzle XOR on the address. LBO is unused for
// swizzled K-major layouts when the instruction's K (32 bytes) lies inside one span.
static uint32_t desc_addr(const GmmaDesc& d, int r, int kb) {
  const uint32_t span = d.layout == 1 ? 128 : d.layout == 2 ? 64 : d.layout == 3 ? 32 : 0;
  const uint32_t mode = d.layout == 1 ? 3 : d.layout == 2 ? 2 : d.layout == 3 ? 1 : 0;
  if (span == 0) throw std::runtime_error("interleaved GMMA layout not emulated");
  if (d.base != 0) throw std::runtime_error("GMMA base_offset != 0 not emulated");
  const uint32_t a = d.start + (r / 8) * d.sbo + (r % 8) * span + kb;
  return ostq_proto::swizzle_addr(a, mode);
}

// ------------------------------------------------------------------ the mainloop data path
template <class G>
void check_mainloop(const char* name, int M_, int N_, int K_, uint32_t seed) {
  using CM = typename G::CollectiveMainloop;
  using ElementX = typename G::ElementX;
  using TiledMma = typename CM::TiledMma;
  using Utils = cutlass::gemm::collective::detail::MixedInputUtils<CM>;
  constexpr int BM = size<0>(typename G::TileShape{}), BN = size<1>(typename G::TileShape{});
  constexpr int BK = size<2>(typename G::TileShape{});
  // the op's problem: out[M, N] = x[M, K] . w[N, K]^T; the kernel's: (M', N') = (N, M)
  const int Mp = N_, Np = M_, K = K_;
  std::vector<uint8_t> w(size_t(Mp) * K / 2);
  std::vector<ElementX> x(size_t(Np) * K);
  uint32_t s = seed;
  auto rnd = [&] { s = s * 1664525u + 1013904223u; return s >> 8; };
  for (auto& b : w) b = uint8_t(rnd());
  for (auto& v : x) v = ElementX(int(rnd() % 16) - 8);
  auto W = [&](int m, int k) {  // int4 code, element 2j in the low nibble of byte j
    const uint8_t b = w[(size_t(m) * K + k) / 2];
    const int q = (k % 2) ? (b >> 4) : (b & 15);
    return q >= 8 ? q - 16 : q;
  };
  auto X = [&](int n, int k) { return float(x[size_t(n) * K + k]); };

  ostquant::CutlassGemmProblem p{};
  p.w = w.data(); p.x = x.data(); p.M = M_; p.N = N_; p.K = K_; p.sm_count = 4;
  std::vector<float> ones(std::max(M_, N_), 1.f);
  std::vector<uint16_t> out(size_t(M_) * N_);
  p.epi.x_scale = ones.data(); p.epi.w_scale = ones.data(); p.epi.out = out.data();
  auto args = G::arguments(p);
  ostq_proto::g_encode_log.clear();
  const int enc0 = ostq_proto::g_encodes;
  auto params = CM::to_underlying_arguments(args.problem_shape, args.mainloop, nullptr);
  std::printf("%s: problem (M', N', K) = (%d, %d, %d), tile %dx%dx%d, %d stages, %d TMA descriptors encoded\n%s",
              name, Mp, Np, K, BM, BN, BK, int(CM::DispatchPolicy::Stages), ostq_proto::g_encodes - enc0,
              ostq_proto::g_encode_log.c_str());

  // shared memory as the kernel lays it out (the collective's TensorStorage at a 1024-aligned base)
  using TS = typename CM::TensorStorage;
  static_assert(sizeof(TS) <= sizeof(ostq_proto::g_smem), "smem");
  std::memset(ostq_proto::g_smem, 0xFF, sizeof(ostq_proto::g_smem));
  TS& st = *reinterpret_cast<TS*>(ostq_proto::g_smem);
  uint64_t& bar = *reinterpret_cast<uint64_t*>(ostq_proto::g_smem + sizeof(TS) + 64);

  auto problem = append<4>(args.problem_shape, 1);
  CM mainloop;
  auto load_inputs = mainloop.load_init(problem, params);
  Tensor gA_mkl = get<0>(load_inputs);
  Tensor gB_nkl = get<1>(load_inputs);
  const int tiles_m = (Mp + BM - 1) / BM, tiles_n = (Np + BN - 1) / BN, tiles_k = (K + BK - 1) / BK;
  constexpr int Stages = CM::DispatchPolicy::Stages;

  // producer side (CollectiveMma::load, one elected thread): the TMA copies of one k tile
  Tensor sA_ = make_tensor(make_smem_ptr(st.smem_A.begin()), typename CM::SmemLayoutA{});
  Tensor sB_ = make_tensor(make_smem_ptr(st.smem_B.begin()), typename CM::SmemLayoutB{});
  Tensor sA = as_position_independent_swizzle_tensor(sA_);
  Tensor sB = as_position_independent_swizzle_tensor(sB_);
  auto block_tma_a = params.tma_load_a.get_slice(0);
  auto block_tma_b = params.tma_load_b.get_slice(0);

  int checked_tiles = 0, bad_a = 0, bad_b = 0, bad_frag = 0, bad_desc = 0, bad_mma = 0;
  for (int mt = 0; mt < tiles_m; ++mt)
    for (int nt = 0; nt < tiles_n; ++nt)
      for (int kt = 0; kt < tiles_k; ++kt) {
        const int stage = (mt * 7 + nt * 3 + kt) % Stages;
        Tensor gA = gA_mkl(_, _, mt, _, 0);
        Tensor gB = gB_nkl(_, _, nt, _, 0);
        Tensor tAgA = block_tma_a.partition_S(gA);
        Tensor tAsA = block_tma_a.partition_D(sA);
        Tensor tBgB = block_tma_b.partition_S(gB);
        Tensor tBsB = block_tma_b.partition_D(sB);
        ostq_proto::g_mbar.clear();
        copy(params.tma_load_a.with(bar, 0), tAgA(_, _, _, kt), tAsA(_, _, _, stage));
        copy(params.tma_load_b.with(bar, 0), tBgB(_, _, _, kt), tBsB(_, _, _, stage));
        const long long tx = ostq_proto::g_mbar[ostq_proto::smem_addr(&bar)].tx;
        CHECK(tx == params.tma_transaction_bytes, "%s: TMA delivered %lld bytes, expect_tx is %u\n",
              name, tx, params.tma_transaction_bytes);

        // consumer view of the stage (what CollectiveMma::mma reads) vs global memory (0 outside)
        for (int m = 0; m < BM; ++m)
          for (int k = 0; k < BK; ++k) {
            const int gm = mt * BM + m, gk = kt * BK + k;
            const int want = (gm < Mp && gk < K) ? W(gm, gk) : 0;
            bad_a += ival(sA(m, k, stage)) != want;
          }
        for (int n = 0; n < BN; ++n)
          for (int k = 0; k < BK; ++k) {
            const int gn = nt * BN + n, gk = kt * BK + k;
            const float want = (gn < Np && gk < K) ? X(gn, gk) : 0.f;
            bad_b += float(sB(n, k, stage)) != want;
          }

        // consumer warp groups: A registers through the mainloop's own smem->rmem copy, B
        // through the GMMA descriptors cute builds; an emulated wgmma per k block
        TiledMma tiled_mma;
        Layout wg_layout = make_layout(Int<size(TiledMma{}) / 128>{}, Int<128>{});
        std::vector<double> acc(size_t(BM) * BN, 0.0);
        for (int thread_idx = 0; thread_idx < int(size(TiledMma{})); ++thread_idx) {
          const int wg = thread_idx / 128, wg_thr = thread_idx % 128;
          auto mma_thread_slice = tiled_mma.get_thread_slice(thread_idx);
          Tensor tCsA = mma_thread_slice.partition_A(sA);
          Tensor tCrA_mma = mma_thread_slice.partition_fragment_A(sA(_, _, Int<0>{}));
          Tensor tCrA_load = make_fragment_like<typename CM::RealSwappedElementA>(tCrA_mma);
          auto smem_tiled_copy_A = make_tiled_copy_A(typename CM::SwappedSmemCopyAtomA{}, tiled_mma);
          auto smem_thr_copy_A = smem_tiled_copy_A.get_thread_slice(wg_thr);
          Tensor tCrA_copy_view = smem_thr_copy_A.retile_D(tCrA_load);
          auto extra = Utils::partition_extra_mma_info(mma_thread_slice, st);
          auto copy_extra = Utils::retile_extra_mma_info(tiled_mma, extra, wg_thr);
          auto wg_slice = tiled_mma.get_slice(wg_layout(wg));
          Tensor tCsB = wg_slice.partition_B(sB_);
          Tensor tCrB = wg_slice.make_fragment_B(tCsB);  // GMMA descriptors
          constexpr int KB = size<2>(tCrA_load);
          using MmaK = decltype(size<2>(typename TiledMma::AtomShape_MNK{}));
          constexpr int kK = MmaK::value;
          for (int kb = 0; kb < KB; ++kb) {
            Utils::copy_tensors_MK(smem_tiled_copy_A, tCsA, tCrA_copy_view, extra, copy_extra, kb, stage);
            // A: the register values of this k block vs the PTX layout (rows of this warp group)
            Tensor a = tCrA_load(_, 0, kb);
            for (int v = 0; v < size(a); ++v) {
              int m, k;
              if (kK == 32) ptx_a8(wg_thr, v, m, k); else ptx_a16(wg_thr, v, m, k);
              const int gm = mt * BM + 64 * wg + m, gk = kt * BK + kb * kK + k;
              const int want = (gm < Mp && gk < K) ? W(gm, gk) : 0;
              bad_frag += ival(a(v)) != want;
            }
            if (wg_thr != 0) continue;  // B is the same for every thread of the warp group
            // B through the descriptor: N rows x kK elements of this k block
            const uint64_t d = uint64_t(tCrB(0, 0, kb, stage));
            const GmmaDesc dd = decode_desc(d);
            CHECK(dd.layout == 1, "%s: B descriptor layout type %u, expected SWIZZLE_128B\n", name, dd.layout);
            for (int n = 0; n < BN; ++n)
              for (int k = 0; k < kK; ++k) {
                const uint32_t addr = desc_addr(dd, n, k * int(sizeof(ElementX)));
                ElementX e;
                std::memcpy(&e, ostq_proto::smem_ptr(addr), sizeof e);
                const int gn = nt * BN + n, gk = kt * BK + kb * kK + k;
                const float want = (gn < Np && gk < K) ? X(gn, gk) : 0.f;
                bad_desc += float(e) != want;
                // and the same element through cute's own smem view
                bad_desc += ostq_proto::smem_addr(&sB(n, kb * kK + k, stage)) != addr;
              }
          }
        }
        // a full emulated wgmma over the k tile: D[m, n] += sum_k A[m, k] B[k, n] with A from the
        // registers (PTX layout) and B through the descriptors, vs the direct product
        {
          std::vector<int> Areg(size_t(BM) * BK, 0);
          for (int thread_idx = 0; thread_idx < int(size(TiledMma{})); ++thread_idx) {
            const int wg = thread_idx / 128, wg_thr = thread_idx % 128;
            auto sl = tiled_mma.get_thread_slice(thread_idx);
            Tensor tCsA = sl.partition_A(sA);
            Tensor tCrA_mma = sl.partition_fragment_A(sA(_, _, Int<0>{}));
            Tensor tCrA_load = make_fragment_like<typename CM::RealSwappedElementA>(tCrA_mma);
            auto ctA = make_tiled_copy_A(typename CM::SwappedSmemCopyAtomA{}, tiled_mma);
            Tensor view = ctA.get_thread_slice(wg_thr).retile_D(tCrA_load);
            auto extra = Utils::partition_extra_mma_info(sl, st);
            auto copy_extra = Utils::retile_extra_mma_info(tiled_mma, extra, wg_thr);
            constexpr int KB = size<2>(tCrA_load);
            constexpr int kK = BK / KB;
            for (int kb = 0; kb < KB; ++kb) {
              Utils::copy_tensors_MK(ctA, tCsA, view, extra, copy_extra, kb, stage);
              for (int v = 0; v < size(tCrA_load(_, 0, kb)); ++v) {
                int m, k;
                if (kK == 32) ptx_a8(wg_thr, v, m, k); else ptx_a16(wg_thr, v, m, k);
                Areg[size_t(64 * wg + m) * BK + kb * kK + k] = ival(tCrA_load(_, 0, kb)(v));
              }
            }
          }
          TiledMma tm;
          auto wg0 = tm.get_slice(0);
          Tensor tCrB = wg0.make_fragment_B(wg0.partition_B(sB_));
          constexpr int KB = size<2>(tCrB);
          constexpr int kK = BK / KB;
          for (int kb = 0; kb < KB; ++kb) {
            const GmmaDesc dd = decode_desc(uint64_t(tCrB(0, 0, kb, stage)));
            for (int m = 0; m < BM; ++m)
              for (int n = 0; n < BN; ++n) {
                double sum = 0;
                for (int k = 0; k < kK; ++k) {
                  ElementX e;
                  std::memcpy(&e, ostq_proto::smem_ptr(desc_addr(dd, n, k * int(sizeof(ElementX)))), sizeof e);
                  sum += double(Areg[size_t(m) * BK + kb * kK + k]) * double(float(e));
                }
                acc[size_t(m) * BN + n] += sum;
              }
          }
          for (int m = 0; m < BM; ++m)
            for (int n = 0; n < BN; ++n) {
              double ref = 0;
              for (int k = 0; k < BK; ++k) {
                const int gm = mt * BM + m, gn = nt * BN + n, gk = kt * BK + k;
                if (gm < Mp && gn < Np && gk < K) ref += double(W(gm, gk)) * double(X(gn, gk));
              }
              bad_mma += acc[size_t(m) * BN + n] != ref;
            }
          // D fragment: where accumulator v of thread t lands in the tile (cute's partition_C)
          Tensor cC = make_identity_tensor(make_shape(Int<BM>{}, Int<BN>{}));
          for (int thread_idx = 0; thread_idx < int(size(TiledMma{})); ++thread_idx) {
            Tensor tCcC = tiled_mma.get_thread_slice(thread_idx).partition_C(cC);
            for (int v = 0; v < size(tCcC); ++v) {
              int m, n;
              // the accumulator fragment is (MMA, MMA_M, MMA_N); with one MMA per warp group
              // along M and N, index v is the PTX d-register index
              ptx_d(thread_idx % 128, v, m, n);
              m += 64 * (thread_idx / 128);
              bad_mma += get<0>(tCcC(v)) != m || get<1>(tCcC(v)) != n;
            }
          }
        }
        ++checked_tiles;
      }
  {  // the epilogue's TMA store descriptor (D' column-major)
    ostq_proto::g_encode_log.clear();
    auto ep = G::CollectiveEpilogue::to_underlying_arguments(args.problem_shape, args.epilogue, nullptr);
    (void)ep;
    std::printf("%s epilogue: %s", name, ostq_proto::g_encode_log.c_str());
  }
  CHECK(bad_a == 0, "%s: %d A elements of the consumer's smem view differ from gmem\n", name, bad_a);
  CHECK(bad_b == 0, "%s: %d B elements of the consumer's smem view differ from gmem\n", name, bad_b);
  CHECK(bad_frag == 0, "%s: %d A register elements differ from the PTX fragment layout\n", name, bad_frag);
  CHECK(bad_desc == 0, "%s: %d B elements read through the GMMA descriptor differ\n", name, bad_desc);
  CHECK(bad_mma == 0, "%s: %d emulated wgmma sums / D positions differ\n", name, bad_mma);
  std::printf("%s: %d (m, n, k) tiles: TMA+swizzle %s, A registers %s, B descriptors %s, wgmma+D layout %s\n",
              name, checked_tiles, bad_a + bad_b ? "DIFFER" : "ok", bad_frag ? "DIFFER" : "ok",
              bad_desc ? "DIFFER" : "ok", bad_mma ? "DIFFER" : "ok");
}

int main() {
  using namespace cute;
  if (const char* b = std::getenv("PROTO_BREAK")) ostq_proto::g_break = std::atoi(b);
  check_fragment_layouts<MMA_Traits<SM90_64x128x32_S32S8S8_RS_TN>, 128, 32, true>("SM90_64x128x32_S32S8S8_RS_TN");
  check_fragment_layouts<MMA_Traits<SM90_64x64x32_S32S8S8_RS_TN>, 64, 32, true>("SM90_64x64x32_S32S8S8_RS_TN");
  check_fragment_layouts<MMA_Traits<SM90_64x128x16_F32F16F16_RS<GMMA::Major::K, GMMA::Major::K>>, 128, 16, false>("SM90_64x128x16_F32F16F16_RS");
  check_fragment_layouts<MMA_Traits<SM90_64x64x16_F32BF16BF16_RS<GMMA::Major::K, GMMA::Major::K>>, 64, 16, false>("SM90_64x64x16_F32BF16BF16_RS");
  // odd sizes: partial tiles in M', N' and K (TMA OOB fill), K a multiple of 32 as the op admits
  check_mainloop<ostquant::sm90::Sm90Int4Gemm<true, int8_t, cutlass::half_t, 128>>("w4a4_t128_f16", 200, 136, 352, 1);
  check_mainloop<ostquant::sm90::Sm90Int4Gemm<true, int8_t, cutlass::bfloat16_t, 64>>("w4a4_t64_bf16", 40, 264, 160, 2);
  check_mainloop<ostquant::sm90::Sm90Int4Gemm<false, cutlass::half_t, cutlass::half_t, 64>>("w4a16_t64_f16", 33, 136, 96, 3);
  check_mainloop<ostquant::sm90::Sm90Int4Gemm<false, cutlass::bfloat16_t, cutlass::bfloat16_t, 128>>("w4a16_t128_bf16", 130, 128, 224, 4);
  std::printf("%s (%d failures)\n", g_fail ? "FAILED" : "ALL OK", g_fail);
  return g_fail ? 1 : 0;
}
