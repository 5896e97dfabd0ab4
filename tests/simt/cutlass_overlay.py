"""CUTLASS headers patched for the SIMT emulator: the "overlay" include directory.

The emulator compiles CUDA sources as host C++, where CUTLASS's device code takes its
``#if !defined(__CUDA_ARCH__)`` branches (thread and warp indices 0, mma a no-op, ldmatrix not
implemented) or inline PTX the host assembler cannot take. ``write_overlay`` copies the few
headers that matter for the Ampere int4 GEMM (csrc/gemm/sm80/) from the installed CUTLASS into
a directory searched before it, each with explicit text substitutions (PATCHES below, one line
of reason each) that route the device operations to simt_emu.h (``ostq_emu::ldmatrix``,
``cp_async``, ``mma_m16n8k64_s4_sat``, ...). Every pattern must be found exactly as often as
stated, or the build fails: a CUTLASS upgrade that changes one of these headers is noticed,
not silently emulated wrong. No CUTLASS code is kept in this repository.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build as _build  # noqa: E402  (rewrite_launches / rewrite_shared)


class OverlayError(RuntimeError):
    """A pattern of PATCHES is not in the installed CUTLASS (another version?)."""


def sub(text: str, old: str, new: str, count: int = 1, where: str = "") -> str:
    n = text.count(old)
    if n != count:
        raise OverlayError(f"{where}: expected {count} occurrence(s) of {old[:80]!r}, found {n}")
    return text.replace(old, new)


def wrap(text: str, start: str, end: str, emulated: str, where: str, must_hold: str = "",
         holds: int = 0) -> str:
    """Put `#if !defined(OSTQ_SIMT_EMU)` before `start` and `#else <emulated> #endif` before
    `end` (each found once); the region between must hold `must_hold` `holds` times."""
    for a in (start, end):
        if text.count(a) != 1:
            raise OverlayError(f"{where}: expected one {a[:80]!r}, found {text.count(a)}")
    i, j = text.index(start), text.index(end)
    if not i < j:
        raise OverlayError(f"{where}: {start[:40]!r} does not come before {end[:40]!r}")
    if must_hold and text[i:j].count(must_hold) != holds:
        raise OverlayError(f"{where}: the wrapped region holds {text[i:j].count(must_hold)} "
                           f"{must_hold!r}, expected {holds}")
    return (text[:i] + "#if !defined(OSTQ_SIMT_EMU)  // (tests/simt/cutlass_overlay.py)\n" +
            text[i:j] + "#else  // the SIMT emulator's version\n" + emulated + "\n#endif\n" +
            text[j:])


# ----------------------------------------------------------------------------- the patches

def _cutlass_h(t: str) -> str:
    return sub(t, "  #if defined(__CUDA_ARCH__)\n",
               "  #if defined(__CUDA_ARCH__) || defined(OSTQ_SIMT_EMU)\n", 5, "cutlass.h")


def _helper_macros(t: str) -> str:
    return sub(t, "    #define CUTLASS_NOT_IMPLEMENTED() assert(0 && __PRETTY_FUNCTION__)\n",
               "    #define CUTLASS_NOT_IMPLEMENTED() "
               "::ostq_emu::fail(std::string(\"CUTLASS_NOT_IMPLEMENTED: \") + __PRETTY_FUNCTION__)\n",
               1, "helper_macros.hpp")


def _cute_util(t: str) -> str:
    return sub(t, '  printf("ERROR: cast_smem_ptr_to_uint not supported but used.\\n");\n  return 0;\n',
               '  return ::ostq_emu::smem_window_addr(ptr);  // (tests/simt/cutlass_overlay.py)\n',
               1, "cute/arch/util.hpp")


def _arch_h(t: str) -> str:
    old = ("#if defined(__NVCC__) || defined(__CUDACC_RTC__) || "
           "(defined(__clang__) && defined(__CUDA__))\n\n/// Computes laneId within a warp\n")
    new = ("#if defined(OSTQ_SIMT_EMU)  // (tests/simt/cutlass_overlay.py)\n"
           "CUTLASS_DEVICE int LaneId() { return ::ostq_emu::lane_id(); }\n"
           "CUTLASS_DEVICE int SmId() { return static_cast<int>(blockIdx.x % ::ostq_emu::device().sm_count); }\n"
           "#elif defined(__NVCC__) || defined(__CUDACC_RTC__) || "
           "(defined(__clang__) && defined(__CUDA__))\n\n/// Computes laneId within a warp\n")
    return sub(t, old, new, 1, "arch/arch.h")


def _device_kernel(t: str) -> str:
    t, n = _build.rewrite_shared(t)
    if n != 3:
        raise OverlayError(f"device_kernel.h: expected 3 extern __shared__ arrays, rewrote {n}")
    return t


def _launches(expect: int, where: str) -> Callable[[str], str]:
    def f(t: str) -> str:
        t, n = _build.rewrite_launches(t, where)
        if n != expect:
            raise OverlayError(f"{where}: expected {expect} launch(es), rewrote {n}")
        return t
    return f


_GLOBAL_ACCESS = """\
template <typename AccessType, int LoadBytes, CacheOperation::Kind cache_op>
struct global_load {
  static_assert(LoadBytes == 1 || LoadBytes == 2 || LoadBytes == 4 || LoadBytes == 8 ||
                LoadBytes == 16 || LoadBytes == 32, "no ld.global of this size");
  static_assert(LoadBytes == 1 || cache_op == CacheOperation::Always ||
                cache_op == CacheOperation::LastUse, "no such global_load");
  CUTLASS_DEVICE
  global_load(AccessType &D, void const *ptr, bool pred_guard) {
    static_assert(sizeof(AccessType) >= LoadBytes, "access type too small");
    ::ostq_emu::global_load(&D, ptr, LoadBytes, pred_guard);
  }
};

template <typename AccessType, int StoreBytes>
struct global_store {
  static_assert(StoreBytes == 1 || StoreBytes == 2 || StoreBytes == 4 || StoreBytes == 8 ||
                StoreBytes == 16 || StoreBytes == 32 || StoreBytes == 64, "no st.global of this size");
  CUTLASS_DEVICE
  global_store(AccessType const &D, void *ptr, bool pred_guard) {
    static_assert(sizeof(AccessType) >= StoreBytes, "access type too small");
    ::ostq_emu::global_store(ptr, &D, StoreBytes, pred_guard);
  }
};
"""


def _memory_h(t: str) -> str:
    return wrap(t, "// The redundant mov PTX instruction is used to enforce the compiler to\n",
                "/// ld.shared\ntemplate <int Bytes>\nCUTLASS_DEVICE\nvoid shared_load(void *dst, uint32_t ptr);",
                _GLOBAL_ACCESS, "arch/memory.h", "asm volatile(", 16)


def _ldsm_emulated() -> str:
    out = []
    for layout, trans in (("RowMajor", "false"), ("ColumnMajor", "true")):
        for n in (1, 2, 4):
            out.append(f"template <>\nCUTLASS_DEVICE void ldsm<layout::{layout}, {n}>(\n"
                       f"    Array<unsigned, {n}> & D, void const* ptr) {{\n"
                       f"  ::ostq_emu::ldmatrix(D.data(), {n}, {trans}, ptr);\n}}\n")
    return "\n".join(out)


_SHARED_LOAD_OP = """\
template <typename AccessType>
struct shared_load_op<AccessType, 16> {
  CUTLASS_DEVICE
  shared_load_op(AccessType &D, void const *ptr) { ::ostq_emu::shared_load(&D, ptr, 16); }
};

template <typename AccessType>
struct shared_load_op<AccessType, 8> {
  CUTLASS_DEVICE
  shared_load_op(AccessType &D, void const *ptr) { ::ostq_emu::shared_load(&D, ptr, 8); }
};
"""


def _memory_sm75(t: str) -> str:
    t = wrap(t, "template <>\nCUTLASS_DEVICE void ldsm<layout::RowMajor, 1>(",
             "/////////////////////////////////////////////////////////////////////////////////////////////////\n\n"
             "template <typename AccessType, int Bytes>\nstruct shared_load_op {",
             _ldsm_emulated(), "arch/memory_sm75.h (ldsm)", "asm volatile (\"ldmatrix.sync.aligned", 6)
    return wrap(t, "template <typename AccessType>\nstruct shared_load_op<AccessType, 16> {",
                "/////////////////////////////////////////////////////////////////////////////////////////////////\n\n"
                "} // namespace arch",
                _SHARED_LOAD_OP, "arch/memory_sm75.h (shared_load_op)", "asm volatile", 2)


_CP_FALLBACK = """\
    #else
      using AccessType  = Array<uint8_t, SizeInBytes>;

      if (pred_guard) {
        *static_cast<AccessType *>(smem_ptr) = *static_cast<AccessType const *>(global_ptr);
      }
    #endif
"""
_ZFILL_FALLBACK = """\
    #else
      using AccessType  = Array<uint8_t, SizeInBytes>;

      if (pred_guard) {
        *static_cast<AccessType *>(smem_ptr) = *static_cast<AccessType const *>(global_ptr);
      }
      else {
        AccessType zeros;
        zeros.clear();
        *static_cast<AccessType *>(smem_ptr) = zeros;
      }
    #endif
"""


def _cp_emulated(sizes: str, zfill: bool) -> str:
    return (f"    #else\n      static_assert({sizes}, \"cp.async size\");\n"
            f"      ::ostq_emu::cp_async(smem_ptr, global_ptr, SizeInBytes, pred_guard, "
            f"{'true' if zfill else 'false'});\n    #endif\n")


def _memory_sm80(t: str) -> str:
    w = "arch/memory_sm80.h"
    ca = "SizeInBytes == 4 || SizeInBytes == 8 || SizeInBytes == 16"  # cp.async.ca
    cg = "SizeInBytes == 16"                                          # cp.async.cg
    # the zero-fill fallbacks first (the plain one is not a part of them): CacheOperation::Always
    # then ::Global, in file order
    for fallback, zfill in ((_ZFILL_FALLBACK, True), (_CP_FALLBACK, False)):
        if t.count(fallback) != 2:
            raise OverlayError(f"{w}: expected 2 {'zfill ' if zfill else ''}cp.async fallbacks, "
                               f"found {t.count(fallback)}")
        t = t.replace(fallback, _cp_emulated(ca, zfill), 1)
        t = t.replace(fallback, _cp_emulated(cg, zfill), 1)
    t = sub(t, "void cp_async_fence() {\n  #if CUDA_CP_ASYNC_ACTIVATED\n",
            "void cp_async_fence() {\n  #if defined(OSTQ_SIMT_EMU)\n  ::ostq_emu::cp_async_commit();\n"
            "  #elif CUDA_CP_ASYNC_ACTIVATED\n", 1, w)
    t = sub(t, "CUTLASS_DEVICE void cp_async_wait() {\n  #if CUDA_CP_ASYNC_ACTIVATED\n",
            "CUTLASS_DEVICE void cp_async_wait() {\n  #if defined(OSTQ_SIMT_EMU)\n"
            "  ::ostq_emu::cp_async_wait(N);\n  #elif CUDA_CP_ASYNC_ACTIVATED\n", 1, w)
    return sub(t, "CUTLASS_DEVICE void cp_async_wait<0>() {\n  #if CUDA_CP_ASYNC_ACTIVATED\n",
               "CUTLASS_DEVICE void cp_async_wait<0>() {\n  #if defined(OSTQ_SIMT_EMU)\n"
               "  ::ostq_emu::cp_async_wait(-1);  // wait_all\n  #elif CUDA_CP_ASYNC_ACTIVATED\n", 1, w)


def _mma_sm80(t: str) -> str:
    old = """#if defined(CUTLASS_ARCH_MMA_SM80_ENABLED)

  uint32_t const * A = reinterpret_cast<uint32_t const *>(&a);
  uint32_t const * B = reinterpret_cast<uint32_t const *>(&b);

  int const *C = reinterpret_cast<int const *>(&c);
  int *D = reinterpret_cast<int *>(&d);

  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32.satfinite {%0,%1,%2,%3}, \""""
    new = ("#if defined(OSTQ_SIMT_EMU)  // (tests/simt/cutlass_overlay.py)\n"
           "  ::ostq_emu::mma_m16n8k64_s4_sat(reinterpret_cast<int *>(&d),\n"
           "      reinterpret_cast<uint32_t const *>(&a), reinterpret_cast<uint32_t const *>(&b),\n"
           "      reinterpret_cast<int const *>(&c));\n" + old.replace("#if", "#elif", 1))
    return sub(t, old, new, 1, "arch/mma_sm80.h")


def _workspace_h(t: str) -> str:
    return sub(t, '#include "cutlass.h"\n', '#include "cutlass/cutlass.h"\n', 1, "workspace.h")


# a sub-word element stored through `reinterpret_cast<Storage const &>(x) & kMask`: a Storage-wide
# read of x (4 bytes of a 2-byte bfloat16_t / half_t temporary for Array<T, N>::reference with
# Storage uint32_t). On the GPU x is a register; on the host it is a stack object, and reading past
# it is what AddressSanitizer reported in the sm90 EVT epilogue (NumericArrayConverter<bfloat16_t,
# float, N> has no packed specialization without __CUDA_ARCH__ >= 800, so its generic loop assigns
# element by element). The masked value is the same: copy only x's own bytes (little-endian).
_STORAGE_OF_X = ("([&] { Storage s_ = 0; __builtin_memcpy(&s_, &x, sizeof(x) < sizeof(Storage) ? "
                 "sizeof(x) : sizeof(Storage)); return s_; }())  /* tests/simt/cutlass_overlay.py */")


def _storage_read(where: str) -> Callable[[str], str]:
    return lambda t: sub(t, "(reinterpret_cast<Storage const &>(x) & kMask)",
                         f"({_STORAGE_OF_X} & kMask)", 1, where)


# (header under include/, reason, patch)
PATCHES: list[tuple[str, str, Callable[[str], str]]] = [
    ("cutlass/workspace.h",
     "includes \"cutlass.h\" relative to itself, which would bypass the patched cutlass.h",
     _workspace_h),
    ("cutlass/cutlass.h",
     "thread0 / canonical_lane_idx / canonical_warp_idx[_sync] / canonical_warp_group_idx return 0 "
     "without __CUDA_ARCH__: take their device branch (emulated threadIdx, __shfl_sync)", _cutlass_h),
    ("cutlass/detail/helper_macros.hpp",
     "CUTLASS_NOT_IMPLEMENTED is an assert on the host (a no-op under NDEBUG): fail the launch",
     _helper_macros),
    ("cute/arch/util.hpp",
     "cast_smem_ptr_to_uint prints and returns 0 on the host: the emulated 32-bit shared-window "
     "address (simt_emu.h smem_window_addr; fails outside the dynamic shared memory)", _cute_util),
    ("cutlass/arch/arch.h",
     "LaneId / SmId exist only for nvcc (inline PTX): the emulated lane, blockIdx.x % SMs", _arch_h),
    ("cutlass/device_kernel.h",
     "extern __shared__ arrays of Kernel / Kernel2 / device_kernel: the launch's dynamic shared "
     "memory (build.rewrite_shared)", _device_kernel),
    ("cutlass/gemm/device/gemm_universal_base.h",
     "the Kernel2<GemmKernel><<<...>>> launch of GemmUniversalAdapter (2.x kernels): "
     "ostq_emu::launch (build.rewrite_launches)", _launches(1, "gemm_universal_base.h")),
    ("cutlass/kernel_launch.h",
     "device_kernel<<<...>>> of the 3.x adapter path (compiled, not run here): ostq_emu::launch",
     _launches(1, "kernel_launch.h")),
    ("cutlass/arch/memory.h",
     "global_load / global_store are inline PTX (predicated ld/st.global): a predicated copy "
     "with alignment and not-shared-memory checks", _memory_h),
    ("cutlass/arch/memory_sm75.h",
     "ldsm (ldmatrix) is inline PTX and NOT_IMPLEMENTED on the host: a warp collective in "
     "ostq_emu::ldmatrix (lanes give row addresses, 64-bit pointers, alignment and shared-memory "
     "checks); shared_load_op<16/8> are inline PTX: a checked copy", _memory_sm75),
    ("cutlass/arch/memory_sm80.h",
     "cp.async falls back to an immediate copy on the host: issued copies land at "
     "cp.async.wait_group (per-thread commit groups, ostq_emu::cp_async*), zfill writes zeros, "
     "sizes and alignment checked", _memory_sm80),
    ("cutlass/arch/mma_sm80.h",
     "mma.sync m16n8k64 s4*s4+s32 satfinite is an assert(0) on the host: "
     "ostq_emu::mma_m16n8k64_s4_sat (PTX ISA fragment layout, checked against cute)", _mma_sm80),
    ("cutlass/array_subbyte.h",
     "Array<T, N>::reference::operator= (T under 32 bits) reads x Storage-wide, past a 2-byte "
     "element on the host stack: read only x's bytes", _storage_read("array_subbyte.h")),
    ("cutlass/subbyte_reference.h",
     "SubbyteReference::set reads x Storage-wide: read only x's bytes",
     _storage_read("subbyte_reference.h")),
]


_QUOTED_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def check_no_bypass(cutlass_include: Path, patches: list = PATCHES) -> None:
    """No unpatched CUTLASS header may reach a patched one (a header of `patches`) through a
    quoted include relative to its own directory (searched before -I, so it would get the
    original)."""
    src = Path(cutlass_include).resolve()
    patched = {(src / rel).resolve() for rel, _, _ in patches}
    for top in ("cutlass", "cute"):
        for f in (src / top).rglob("*"):
            if f.suffix not in (".h", ".hpp", ".inl", ".cuh") or f.resolve() in patched:
                continue
            for inc in _QUOTED_INCLUDE.findall(f.read_text(errors="replace")):
                target = (f.parent / inc).resolve()
                if target in patched and target.is_file():
                    raise OverlayError(f"{f.relative_to(src)} includes {inc!r} relative to itself: "
                                       f"that bypasses the patched {target.relative_to(src)}")


def write_overlay(cutlass_include: str | Path, out_dir: str | Path, patches: list = PATCHES,
                  on_top_of: list = ()) -> list[tuple[str, str]]:
    """Write the headers of `on_top_of` and `patches` patched under out_dir, a header of both
    patched by both in that order (sm90_overlay.py's sections on top of this file's PATCHES),
    each file written once and only when its text changes (unchanged files keep their mtime, so
    the build does not recompile what includes them); returns [(header, reason)] for `patches`.
    Raises OverlayError when a pattern is not found."""
    src, out = Path(cutlass_include), Path(out_dir)
    check_no_bypass(src, list(on_top_of) + list(patches))
    texts: dict[str, str] = {}
    for rel, _, patch in list(on_top_of) + list(patches):
        texts[rel] = patch(texts[rel] if rel in texts else (src / rel).read_text())
    for rel, text in texts.items():
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.is_file() or dst.read_text() != text:
            dst.write_text(text)
    return [(rel, reason) for rel, reason, _ in patches]


if __name__ == "__main__":
    inc = _build._cutlass_include()
    if inc is None:
        sys.exit("no CUTLASS headers found")
    for rel, reason in write_overlay(inc, sys.argv[1] if len(sys.argv) > 1 else "/tmp/cutlass_overlay"):
        print(f"{rel}: {reason}")
