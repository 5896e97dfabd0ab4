"""The sm90 section of the CUTLASS overlay (tests/simt/sm90_study/REPORT.md, step 1): patches, on
top of cutlass_overlay.PATCHES, that let csrc/gemm/sm90 (CUTLASS 4.2 Hopper GEMM) compile as host
C++ with NO silent host fallback: every inline-PTX site the kernel reaches is either routed to an
ostq_emu function or replaced by a loud failure (ostq_emu::fail with a "sm90 overlay:" message);
sm90_spike.py's -O0 audit lists the failure sites a unit still instantiates (none in ours).

Used by build.py (the emulator module, unless OSTQUANT_SIMT_SM90=0) and sm90_spike.py.
Same rules as cutlass_overlay: every pattern is counted, a mismatch fails the build.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cutlass_overlay import OverlayError, sub  # noqa: E402
import cutlass_overlay  # noqa: E402


def _fail(tag: str) -> str:
    """A statement that fails the launch (ostq_emu::fail) naming the site (file:line, one string
    literal, so that sm90_spike.py can list the sites compiled into a unit) and the function."""
    return (f'::ostq_emu::fail(std::string("sm90 overlay: not emulated yet: " __FILE__ ":" '
            f'OSTQ_SM90_STR(__LINE__) " ({tag}) in ") + __PRETTY_FUNCTION__);')


def _config_hpp(t: str) -> str:
    # host: assert (a no-op under NDEBUG) + printf, then the caller continues
    return sub(t, "#  define CUTE_INVALID_CONTROL_PATH(x) assert(0 && x); printf(x)\n",
               "#  if defined(OSTQ_SIMT_EMU)  // (tests/simt/sm90_overlay.py)\n"
               "#    define CUTE_INVALID_CONTROL_PATH(x) "
               "::ostq_emu::fail(std::string(\"sm90 overlay: CUTE_INVALID_CONTROL_PATH at \" __FILE__ "
               "\":\" OSTQ_SM90_STR(__LINE__) \": \") + (x) + \" in \" + __PRETTY_FUNCTION__)\n"
               "#  else\n"
               "#    define CUTE_INVALID_CONTROL_PATH(x) assert(0 && x); printf(x)\n"
               "#  endif\n", 1, "cute/config.hpp")


_BRKPT = '#elif defined(__CUDA_ARCH__)\n{ws}asm volatile ("brkpt;\\n" ::);\n#endif'


def _brkpt_sites(where: str, count: int) -> Callable[[str], str]:
    """`#if <arch> asm... #elif defined(__CUDA_ARCH__) brkpt #endif`: the host compiles nothing
    (mbarrier / named barrier ops become no-ops, try_wait returns 0). Add a failing host branch."""
    def f(t: str) -> str:
        n = 0
        for ws in ("  ", "    "):
            old = _BRKPT.format(ws=ws)
            k = t.count(old)
            t = t.replace(old, _BRKPT.format(ws=ws)[:-len("#endif")] +
                          f"#elif defined(OSTQ_SIMT_EMU)  // (tests/simt/sm90_overlay.py)\n"
                          f"{ws}{_fail(where)}\n#endif")
            n += k
        if n != count:
            raise OverlayError(f"{where}: expected {count} brkpt host branches, found {n}")
        return t
    return f


def _no_dim_macros(where: str) -> Callable[[str], str]:
    """Host-only launch code naming members gridDim / blockDim (cudaLaunchConfig_t, ClusterLauncher):
    simt_emu.h's #define gridDim / blockDim would rewrite them; hide those macros in this header."""
    def f(t: str) -> str:
        if "gridDim" not in t:
            raise OverlayError(f"{where}: no gridDim member use to protect")
        return ('#pragma push_macro("gridDim")\n#pragma push_macro("blockDim")\n#undef gridDim\n'
                '#undef blockDim  // (tests/simt/sm90_overlay.py)\n' + t +
                '\n#pragma pop_macro("blockDim")\n#pragma pop_macro("gridDim")\n')
    return f


def _coop_kernel(t: str) -> str:
    # without __CUDA_ARCH_FEAT_SM90_ALL the kernel body is one printf ("Arch conditional MMA ...
    # Aborting.") and nothing else: compile the real body
    return sub(t, "#if ! defined(ENABLE_SM90_KERNEL_LEVEL)\n",
               "#if ! defined(ENABLE_SM90_KERNEL_LEVEL) && !defined(OSTQ_SIMT_EMU)  "
               "// (tests/simt/sm90_overlay.py)\n", 1,
               "sm90_gemm_tma_warpspecialized_cooperative.hpp")


def _cluster_sm90(t: str) -> str:
    w = "cute/arch/cluster_sm90.hpp"
    # host: cluster_grid_dims / cluster_id_in_grid return {0,0,0} for every CTA (the tile
    # scheduler would see one cluster); the emulator launches without clusters (1x1x1), which is
    # the __CUDA_ARCH__ (non-sm90) branch: gridDim / blockIdx
    t = sub(t, "#elif defined(__CUDA_ARCH__)\n  // MSVC requires protecting use of gridDim",
            "#elif defined(__CUDA_ARCH__) || defined(OSTQ_SIMT_EMU)  // (tests/simt/sm90_overlay.py)\n"
            "  // MSVC requires protecting use of gridDim", 1, w)
    t = sub(t, "#elif defined(__CUDA_ARCH__)\n  // MSVC requires protecting use of blockIdx",
            "#elif defined(__CUDA_ARCH__) || defined(OSTQ_SIMT_EMU)  // (tests/simt/sm90_overlay.py)\n"
            "  // MSVC requires protecting use of blockIdx", 1, w)
    # elect_one_sync: host returns true on every lane (32x TMA issue). elect.sync with the full
    # mask: a warp collective (every lane must arrive), the lowest lane is elected
    t = sub(t, "#elif defined(__CUDA_ARCH__)\n  return {(threadIdx.x % 32) == 0, 0};\n",
            "#elif defined(OSTQ_SIMT_EMU)  // (tests/simt/sm90_overlay.py)\n  "
            + _fail(w + " elect_one_leader_sync") + "\n"
            "#elif defined(__CUDA_ARCH__)\n  return {(threadIdx.x % 32) == 0, 0};\n", 1, w)
    return sub(t, "#elif defined(__CUDA_ARCH__)\n  return (threadIdx.x % 32) == 0;\n#else\n  return true;\n",
               "#elif defined(OSTQ_SIMT_EMU)  // (tests/simt/sm90_overlay.py)\n"
               "  ::ostq_emu::warp_arrive(0xFFFFFFFFu, \"elect.sync\");\n"
               "  return ::ostq_emu::lane_id() == 0;\n"
               "#elif defined(__CUDA_ARCH__)\n  return (threadIdx.x % 32) == 0;\n#else\n  return true;\n",
               1, w)


def _generic_barrier(t: str) -> str:
    # GenericBarrier::ld_acquire / red_release (stream-K locks): the host branch is x86-invalid
    # inline PTX (ld.cg.global) or a plain load, and the spin loops around ld_acquire would never
    # yield: sm90_emu.h's flag load (a spin that yields, with a deadlock report) and release add
    w = "cutlass/barrier.h"
    t = sub(t, "    int state = 0;\n\n#if (__CUDA_ARCH__ >= 700)\n",
            "    int state = 0;\n\n#if defined(OSTQ_SIMT_EMU)  // (tests/simt/sm90_overlay.py)\n"
            "    state = ::ostq_emu::sm90::flag_ld_acquire(ptr);\n#elif (__CUDA_ARCH__ >= 700)\n", 1, w)
    return sub(t, "  {\n#if (__CUDA_ARCH__ >= 700)\n",
               "  {\n#if defined(OSTQ_SIMT_EMU)  // (tests/simt/sm90_overlay.py)\n"
               "    ::ostq_emu::sm90::flag_red_release(ptr, val);\n#elif (__CUDA_ARCH__ >= 700)\n", 1, w)


# the device asm of NumericArrayConverter<int8_t, int4b_t, 8>, transcribed (prmt.b32 default
# mode = ostq_emu::byte_perm, with sign replication; shl / and / shr / or)
_PRMT = """\
      uint32_t x = storage, tmp0, tmp1, tmp2;  // (tests/simt/sm90_overlay.py)
      tmp0 = (x << 4) & 0xf0f0f0f0u;
      tmp1 = ::ostq_emu::byte_perm(tmp0, tmp0, 0xba98) & 0xf0f0f0f0u;
      tmp0 = tmp0 >> 4;
      tmp2 = tmp0 | tmp1;
      tmp0 = x & 0xf0f0f0f0u;
      tmp1 = ::ostq_emu::byte_perm(tmp0, tmp0, 0xba98) & 0xf0f0f0f0u;
      tmp0 = tmp0 >> 4;
      tmp0 = tmp0 | tmp1;
      out[0] = ::ostq_emu::byte_perm(tmp2, tmp0, 0x5140);
      out[1] = ::ostq_emu::byte_perm(tmp2, tmp0, 0x7362);
"""


def _numeric_conversion(t: str) -> str:
    w = "cutlass/numeric_conversion.h"
    # int4 -> int8 (W4A4 mainloop, "DirectConvert"): the host takes a scalar loop, not the code
    # the GPU runs; take the device branch with its asm transcribed to C++
    head = ("  static result_type convert(source_type const & source) {\n   \n"
            "    #if defined(__CUDA_ARCH__)\n\n    if constexpr ( N == 8 ) {\n      \n"
            "      unsigned const& storage = reinterpret_cast<unsigned const &>(source);\n"
            "      unsigned out[2];\n\n")
    t = sub(t, head, head.replace("#if defined(__CUDA_ARCH__)",
                                  "#if defined(__CUDA_ARCH__) || defined(OSTQ_SIMT_EMU)") +
            "#if defined(OSTQ_SIMT_EMU)\n" + _PRMT + "#else\n", 1, w)
    tail = ('          : "=r"(out[0]), "=r"(out[1])\n          : "r"(storage));\n\n'
            '      return reinterpret_cast<result_type const &>(out);\n')
    t = sub(t, tail, tail.replace("\n\n", "\n#endif  // OSTQ_SIMT_EMU\n\n", 1), 1, w)
    # int4 -> fp16 / bf16 (W4A16 mainloop): the fp16 converter's prmt / lop3 asm is not guarded
    # (x86-invalid on the host); the bf16 one sits in a __CUDA_ARCH__ >= 800 block, so the host
    # took the generic scalar converter. Both: the asm transcribed (ostq_emu::prmt / lop3), the
    # half2 / bfloat162 arithmetic as cuda_fp16 / cuda_bf16's host implementations
    t = sub(t, "#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)\n"
               "/////////////////////////////////////////////////////////////////////////////////////////////////\n"
               "/// Partial specialization for Array<cutlass::bfloat16_t, N> <= Array<cutlass::int2b_t, N>\n",
            "#if (defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)) || defined(OSTQ_SIMT_EMU)  "
            "// (tests/simt/sm90_overlay.py)\n"
            "/////////////////////////////////////////////////////////////////////////////////////////////////\n"
            "/// Partial specialization for Array<cutlass::bfloat16_t, N> <= Array<cutlass::int2b_t, N>\n", 1, w)
    for result in ("half_t", "bfloat16_t"):
        head = f"struct NumericArrayConverter<cutlass::{result}, cutlass::int4b_t, N, Round> {{\n"
        if t.count(head) != 1:
            raise OverlayError(f"{w}: expected one {head.strip()!r}, found {t.count(head)}")
        i = t.index(head)
        j = t.index("\nstruct NumericArrayConverter<", i + len(head))
        t = t[:i] + _transcribe_prmt_lop3(t[i:j], f"{w} ({result} <= int4b_t)") + t[j:]
    return t


_PRMT_ASM = re.compile(r'asm volatile\(\s*"\{ prmt\.b32 %0, %1, %2, %3; \}\\n"\s*'
                       r': "=r"\(([^)]+)\)\s*: "r"\(([^)]+)\), "[nr]"\(([^)]+)\), "r"\(([^)]+)\)\);')
_LOP3_ASM = re.compile(r'asm volatile\(\s*"\{(?:\\n")?\s*"?\s*lop3\.b32 %0, %0, %1, %2, %3;(?:\\n")?\s*"?\}\\n"\s*'
                       r': "\+r"\(([^)]+)\)\s*: "n"\(([^)]+)\), "n"\(([^)]+)\), "n"\(([^)]+)\)\);')


def _transcribe_prmt_lop3(region: str, where: str) -> str:
    """`prmt.b32` / `lop3.b32` inline asm of one converter -> ostq_emu::prmt / lop3 (one each)."""
    region, k1 = _PRMT_ASM.subn(r"\1 = ::ostq_emu::prmt(\2, \3, \4);  // (tests/simt/sm90_overlay.py)", region)
    region, k2 = _LOP3_ASM.subn(r"\1 = ::ostq_emu::lop3(\1, \2, \3, \4);  // (tests/simt/sm90_overlay.py)",
                                region)
    if (k1, k2) != (1, 1) or "asm volatile" in region:
        raise OverlayError(f"{where}: expected one prmt and one lop3 asm (and no other), found {k1}, {k2}")
    return region


def _brkpt_checks(where: str, count: int) -> Callable[[str], str]:
    """Debug checks (`#ifndef NDEBUG ... asm volatile("brkpt;")`): x86-invalid inline PTX on the
    host; a failure naming the line instead (the check itself is kept)."""
    def f(t: str) -> str:
        return sub(t, 'asm volatile ("brkpt;\\n" ::);',
                   '::ostq_emu::fail("sm90 overlay: debug check failed (brkpt) at " __FILE__ ":" '
                   'OSTQ_SM90_STR(__LINE__));', count, where)
    return f


def _sm100_pipeline(t: str) -> str:
    # includes "sm90_pipeline.hpp" relative to itself (the original, beside the patched copy:
    # redefinitions); the line before already includes it by its full path
    return sub(t, '#include "sm90_pipeline.hpp"\n',
               '// #include "sm90_pipeline.hpp"  (tests/simt/sm90_overlay.py: bypassed the overlay)\n',
               1, "cutlass/pipeline/sm100_pipeline.hpp")


def _matrix_atoms(where: str, op: str, guard: str, ptr: str, count: int) -> Callable[[str], str]:
    """cute's stmatrix / ldmatrix copy atoms (`#if <guard> cast_smem_ptr_to_uint; asm volatile
    ("<op>.sync.aligned.xN[.trans].m8n8 ...") #else CUTE_INVALID_CONTROL_PATH`): a first branch
    calling simt_emu.h's warp collective with the atom's registers (stmatrix writes through the
    generic proxy: its bytes are marked for sm90_tma.h's async-proxy shadow)."""
    import re
    pat = re.compile(r"(  copy\(([^)]*)\)\n  \{\n)#if defined\(" + guard + r"\)\n"
                     r"    uint32_t smem_int_ptr = cast_smem_ptr_to_uint\(&" + ptr + r"\);\n"
                     r"    asm volatile \(\"" + op + r"\.sync\.aligned\.x(\d)(\.trans)?\.m8n8")

    def f(t: str) -> str:
        def repl(m: "re.Match[str]") -> str:
            n, trans = int(m.group(3)), "true" if m.group(4) else "false"
            regs = [a.split("&")[-1].strip() for a in m.group(2).replace("\n", " ").split(",")
                    if ptr not in a]
            if len(regs) != n:
                raise OverlayError(f"{where}: {op}.x{n} with registers {regs}")
            if op == "stmatrix":
                body = (f"    {{ const unsigned r_[{n}] = {{{', '.join(regs)}}};\n"
                        f"      ::ostq_emu::stmatrix(r_, {n}, {trans}, &{ptr}, "
                        f"&::ostq_emu::sm90::proxy_generic_write); }}\n")
            else:
                body = (f"    {{ unsigned r_[{n}];\n      ::ostq_emu::ldmatrix(r_, {n}, {trans}, &{ptr});\n"
                        + "".join(f"      {r} = r_[{i}];\n" for i, r in enumerate(regs)) + "    }\n")
            return (m.group(1) + "#if defined(OSTQ_SIMT_EMU)  // (tests/simt/sm90_overlay.py)\n" + body
                    + m.group(0)[len(m.group(1)):].replace("#if defined(", "#elif defined(", 1))
        t, k = pat.subn(repl, t)
        if k != count:
            raise OverlayError(f"{where}: expected {count} {op} atoms, found {k}")
        return t
    return f


def _subbyte_iterator(t: str) -> str:
    # operator+=(uint64_t k): a negative offset (the swizzled A partition's -32 stride on the
    # k-block mode) becomes ptr + 2^61 - |k|/2 bytes, which the GPU's 32-bit shared addresses drop
    # and the host dereferences (segfault): the same arithmetic signed (equal modulo 2^32)
    old = ("  subbyte_iterator& operator+=(uint64_t k) {\n"
           "    k = sizeof_bits_v<value_type> * k + idx_;\n"
           "    ptr_ += k / sizeof_bits_v<storage_type>;\n"
           "    idx_  = k % sizeof_bits_v<storage_type>;\n"
           "    return *this;\n  }\n")
    new = ("  subbyte_iterator& operator+=(uint64_t k) {\n"
           "#if defined(OSTQ_SIMT_EMU)  // (tests/simt/sm90_overlay.py)\n"
           "    const int64_t bits = static_cast<int64_t>(sizeof_bits_v<value_type>) * static_cast<int64_t>(k) + idx_;\n"
           "    const int64_t sb = static_cast<int64_t>(sizeof_bits_v<storage_type>);\n"
           "    const int64_t q = bits >= 0 ? bits / sb : -((-bits + sb - 1) / sb);\n"
           "    ptr_ += q;\n"
           "    idx_  = static_cast<uint8_t>(bits - q * sb);\n"
           "#else\n"
           "    k = sizeof_bits_v<value_type> * k + idx_;\n"
           "    ptr_ += k / sizeof_bits_v<storage_type>;\n"
           "    idx_  = k % sizeof_bits_v<storage_type>;\n"
           "#endif\n"
           "    return *this;\n  }\n")
    return sub(t, old, new, 1, "cute/container/array_subbyte.hpp")


def _functional_h(t: str) -> str:
    # cutlass::atomic_add<T> (the stream-K fixup's BlockStripedReduce, nondeterministic reduction
    # mode, into the workspace) is CUTLASS_NOT_IMPLEMENTED on the host: simt_emu.h's atomicAdd
    # (blocks run one at a time and threads switch only at barriers: a plain read-modify-write
    # is atomic)
    return sub(t, "  void operator()(T *ptr, const T &data)\n  {\n#if defined(__CUDA_ARCH__)\n    atomicAdd(ptr, data);\n",
               "  void operator()(T *ptr, const T &data)\n  {\n#if defined(__CUDA_ARCH__) || defined(OSTQ_SIMT_EMU)  "
               "// (tests/simt/sm90_overlay.py)\n    atomicAdd(ptr, data);\n", 1, "cutlass/functional.h")


# barrier.h functions whose failing host branch (added by _brkpt_sites) is routed to sm90_emu.h:
# (function header, found once; the emulated statement)
_BARRIER_ROUTES = [
    ("static void arrive_and_wait_internal(uint32_t num_threads, uint32_t barrier_id) {",
     "::ostq_emu::sm90::bar_sync(barrier_id, num_threads);  // NamedBarrier::sync / arrive_and_wait"),
    ("static void init(ValueType const* smem_ptr, uint32_t arrive_count) {",
     "::ostq_emu::sm90::mbar_init(smem_ptr, arrive_count);"),
    ("static void wait(ValueType const* smem_ptr, uint32_t phase) {",
     "::ostq_emu::sm90::mbar_wait_parity(smem_ptr, phase);"),
    ("static bool try_wait(ValueType const* smem_ptr, uint32_t phase) {",
     "return ::ostq_emu::sm90::mbar_test_parity(smem_ptr, phase);"),
    ("static void arrive(ValueType const* smem_ptr, uint32_t cta_id, uint32_t pred) {",
     "if (cta_id != 0) ::ostq_emu::fail(\"mbarrier arrive on cluster CTA rank \" + std::to_string(cta_id) + "
     "\" (the emulator launches 1x1x1 clusters)\");\n    if (pred) ::ostq_emu::sm90::mbar_arrive(smem_ptr);"),
    ("static void arrive(ValueType const* smem_ptr) {",
     "::ostq_emu::sm90::mbar_arrive(smem_ptr);"),
    ("static void arrive_and_expect_tx(ValueType const* smem_ptr, uint32_t transaction_bytes) {",
     "::ostq_emu::sm90::mbar_arrive_expect_tx(smem_ptr, transaction_bytes);"),
    ("static void expect_transaction(ValueType const* smem_ptr, uint32_t transaction_bytes) {",
     "::ostq_emu::sm90::mbar_expect_tx(smem_ptr, transaction_bytes);"),
    ("void fence_barrier_init() {",
     "// fence.mbarrier_init: mbar_init is visible at once in the emulator (the kernel's\n"
     "  // __syncthreads / cluster sync that must follow is emulated as such): nothing to do"),
    ("void fence_view_async_shared() {",
     "::ostq_emu::sm90::fence_proxy_async();  // fence.proxy.async.shared::cta (sm90_tma.h)"),
]


def _barrier_h(t: str) -> str:
    w = "cutlass/arch/barrier.h"
    t = _brkpt_sites(w, 26)(t)
    marker = "#elif defined(OSTQ_SIMT_EMU)  // (tests/simt/sm90_overlay.py)\n"
    for header, stmt in _BARRIER_ROUTES:
        if t.count(header) != 1:
            raise OverlayError(f"{w}: expected one {header!r}, found {t.count(header)}")
        i = t.index(header)
        j = t.index(marker, i) + len(marker)
        k = t.index("\n#endif", j)
        if t[i:j].count("\n}") or "::ostq_emu::fail" not in t[j:k]:
            raise OverlayError(f"{w}: no failing host branch inside {header!r}")
        ws = t[j:k][: len(t[j:k]) - len(t[j:k].lstrip())]
        t = t[:j] + ws + stmt + t[k:]
    return t


SM90_PATCHES: list[tuple[str, str, Callable[[str], str]]] = [
    ("cute/config.hpp",
     "CUTE_INVALID_CONTROL_PATH is assert+printf on the host (continues under NDEBUG): TMA, "
     "wgmma, stmatrix, ... host paths would run on silently: fail", _config_hpp),
    ("cutlass/cluster_launch.hpp",
     "host launch code with gridDim / blockDim members (no device code): hide simt_emu.h's "
     "gridDim / blockDim macros", _no_dim_macros("cutlass/cluster_launch.hpp")),
    ("cutlass/kernel_launch.h",
     "config.gridDim / config.blockDim (cudaLaunchConfig_t, PDL branch): hide simt_emu.h's "
     "macros (the launch itself is already ostq_emu::launch, cutlass_overlay)",
     _no_dim_macros("cutlass/kernel_launch.h")),
    ("cutlass/gemm/kernel/sm90_gemm_tma_warpspecialized_cooperative.hpp",
     "GemmUniversal::operator() is only a printf unless __CUDA_ARCH_FEAT_SM90_ALL: compile the "
     "kernel body", _coop_kernel),
    ("cute/arch/cluster_sm90.hpp",
     "cluster_grid_dims / cluster_id_in_grid are {0,0,0} on the host: gridDim / blockIdx (no "
     "cluster launch); elect_one_sync is true on all lanes: a warp collective electing lane 0",
     _cluster_sm90),
    ("cutlass/barrier.h",
     "GenericBarrier ld_acquire / red_release (stream-K locks): x86-invalid PTX or a plain load "
     "in a spin that never yields: sm90_emu.h's flag load / release add", _generic_barrier),
    ("cutlass/functional.h",
     "atomic_add<T> (stream-K's nondeterministic reduction) is NOT_IMPLEMENTED on the host: "
     "the emulator's atomicAdd", _functional_h),
    ("cute/container/array_subbyte.hpp",
     "subbyte_iterator::operator+=(uint64_t) turns a negative offset into +2^61 bytes (harmless "
     "in 32-bit shared addresses, a segfault on the host): signed", _subbyte_iterator),
    ("cute/arch/copy_sm90.hpp",
     "stmatrix atoms are CUTE_INVALID_CONTROL_PATH on the host: simt_emu.h's warp collective",
     _matrix_atoms("cute/arch/copy_sm90.hpp", "stmatrix", "CUTE_ARCH_STSM_SM90_ENABLED", "smem_dst", 6)),
    ("cute/arch/copy_sm75.hpp",
     "ldmatrix atoms are CUTE_INVALID_CONTROL_PATH on the host: simt_emu.h's warp collective",
     _matrix_atoms("cute/arch/copy_sm75.hpp", "ldmatrix", "CUTE_ARCH_LDSM_SM75_ACTIVATED", "smem_src", 6)),
    ("cutlass/numeric_conversion.h",
     "int4 -> int8 Array<.,8> converter: host scalar loop instead of the device asm: the asm "
     "transcribed (prmt with sign replication, shifts, masks)", _numeric_conversion),
    ("cutlass/pipeline/sm100_pipeline.hpp",
     "includes sm90_pipeline.hpp relative to itself, bypassing the patched copy", _sm100_pipeline),
    ("cutlass/pipeline/sm90_pipeline.hpp",
     "the pipelines' debug role checks are inline PTX brkpt (x86-invalid): fail with the line",
     _brkpt_checks("cutlass/pipeline/sm90_pipeline.hpp", 8)),
    ("cutlass/arch/barrier.h",
     "CUDA_BARRIER_ENABLED is 0 without __CUDA_ARCH__: every mbarrier / named-barrier / "
     "fence op compiles to nothing on the host: mbarrier init / arrive / expect_tx / wait / "
     "try_wait and bar.sync routed to sm90_emu.h, fence_barrier_init a no-op, the rest fail",
     _barrier_h),
]


def all_patches() -> list[tuple[str, str, Callable[[str], str]]]:
    """SM90_PATCHES plus the TMA (sm90_overlay_tma.py) and wgmma (sm90_overlay_wgmma.py)
    sections, one entry per header: the patches of a header named by several sections are
    applied in that order, their reasons joined."""
    import sm90_overlay_tma  # noqa: E402
    import sm90_overlay_wgmma  # noqa: E402
    merged: dict[str, tuple[str, list[Callable[[str], str]]]] = {}
    for rel, reason, fn in SM90_PATCHES + sm90_overlay_tma.PATCHES + sm90_overlay_wgmma.PATCHES:
        if rel in merged:
            merged[rel] = (merged[rel][0] + "; " + reason, merged[rel][1] + [fn])
        else:
            merged[rel] = (reason, [fn])

    def chain(fns: list[Callable[[str], str]]) -> Callable[[str], str]:
        def f(t: str) -> str:
            for fn in fns:
                t = fn(t)
            return t
        return f
    return [(rel, reason, chain(fns)) for rel, (reason, fns) in merged.items()]


def write_overlay(cutlass_include: str | Path, out_dir: str | Path) -> list[tuple[str, str]]:
    """Write the whole overlay for an sm90 build: cutlass_overlay.PATCHES with the sm90 patches
    (all_patches) on top (a header of both gets both, written once)."""
    return cutlass_overlay.write_overlay(cutlass_include, out_dir, all_patches(),
                                         on_top_of=cutlass_overlay.PATCHES)
