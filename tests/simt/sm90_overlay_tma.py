"""The tma section of the sm90 CUTLASS overlay: TMA loads / stores, bulk groups, the async-proxy fence, prefetch.tensormap (routed to sm90_tma.h).
Merged into sm90_overlay.all_patches() (one entry per header across the sections; the same rules
as cutlass_overlay: every substitution counted, a mismatch fails the build).

Each routed site gets a first host branch, `#elif defined(OSTQ_SIMT_EMU)` + the call, in front
of the branch the host compiled before (a CUTE_INVALID_CONTROL_PATH, which the base sm90
section turns into a failure, or nothing at all). Left failing: multicast / im2col loads,
im2col stores, TMA reduce-add, non-tensor bulk copies, tma_desc_commit_group / wait_group and
the descriptor modification functions (cutlass/arch/barrier.h's fence_view_async_shared is
routed by sm90_overlay._BARRIER_ROUTES, that header's own table). A TMA descriptor that the
encode stub rejects fails with its reason (make_tma_copy_desc asserted).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cutlass_overlay import OverlayError, sub  # noqa: E402,F401

_TAG = "  // (tests/simt/sm90_overlay_tma.py)"
_TMA_FAIL = 'CUTE_INVALID_CONTROL_PATH("Trying to use tma without CUTE_ARCH_TMA_SM90_ENABLED.");'


def _route(t: str, where: str, start: str, end: str, branch: str, stmt: str) -> str:
    """In the region from `start` (found once) to the first `end` after it (included), put
    `#elif defined(OSTQ_SIMT_EMU)` + `stmt` in front of `branch` (found once in the region),
    indented like the line after `branch`'s first line."""
    if t.count(start) != 1:
        raise OverlayError(f"{where}: expected one {start!r}, found {t.count(start)}")
    i = t.index(start)
    j = t.find(end, i + len(start))
    if j < 0:
        raise OverlayError(f"{where}: no {end!r} after {start!r}")
    region = t[i:j + len(end)]
    if region.count(branch) != 1:
        raise OverlayError(f"{where}: expected one {branch!r} in {start!r}, found {region.count(branch)}")
    k = i + region.index(branch)
    lines = branch.split("\n")
    nxt = lines[1] if len(lines) > 1 and lines[1].strip() else "  "
    ws = nxt[: len(nxt) - len(nxt.lstrip())] or "  "
    return t[:k] + f"#elif defined(OSTQ_SIMT_EMU){_TAG}\n{ws}{stmt}\n" + t[k:]


def _crd(n: int) -> str:
    return "{" + ", ".join(f"crd{i}" for i in range(n)) + "}"


def _copy_sm90_tma(t: str) -> str:
    w = "cute/arch/copy_sm90_tma.hpp"
    for n in range(1, 6):
        # SM90_TMA_LOAD_nD::copy and its PREFETCH (the struct ends at the first unindented "};")
        s = f"struct SM90_TMA_LOAD_{n}D\n{{"
        t = _route(t, w, s, "\n};\n", "#else\n    " + _TMA_FAIL,
                   f"::ostq_emu::sm90::tma_load(desc_ptr, mbar_ptr, smem_ptr, {_crd(n)});")
        t = _route(t, w, s, "\n};\n", "  #else\n      " + _TMA_FAIL,
                   f"::ostq_emu::sm90::tma_prefetch_tile(desc_ptr, {_crd(n)});")
        t = _route(t, w, f"struct SM90_TMA_STORE_{n}D\n{{", "\n};\n", "#else\n    " + _TMA_FAIL,
                   f"::ostq_emu::sm90::tma_store(desc_ptr, smem_ptr, {_crd(n)});")
    # tma_store_fence: the host compiled nothing at all (the failing branch is device-only)
    t = _route(t, w, "tma_store_fence() {", "\n}\n", "#elif defined(__CUDA_ARCH__)\n    " + _TMA_FAIL,
               "::ostq_emu::sm90::fence_proxy_async();  // fence.proxy.async.shared::cta")
    t = _route(t, w, "tma_store_arrive() {", "\n}\n", "#else\n    " + _TMA_FAIL,
               "::ostq_emu::sm90::bulk_commit_group();  // cp.async.bulk.commit_group")
    return _route(t, w, "tma_store_wait() {", "\n}\n", "#else\n    " + _TMA_FAIL,
                  "::ostq_emu::sm90::bulk_wait_group_read(Count);  // cp.async.bulk.wait_group.read")


def _copy_sm90_desc(t: str) -> str:
    w = "cute/arch/copy_sm90_desc.hpp"
    # cute's own mbarrier helpers: `#if CUTE_ARCH_TMA_SM90_ENABLED asm #endif`, host no-ops
    for start, stmt in (
            ("initialize_barrier(uint64_t& smem_barrier,",
             "::ostq_emu::sm90::mbar_init(&smem_barrier, thread_count);"),
            ("set_barrier_transaction_bytes(uint64_t& smem_barrier,",
             "::ostq_emu::sm90::mbar_arrive_expect_tx(&smem_barrier, bytes);"),
            ("wait_barrier(uint64_t& smem_barrier,",
             "::ostq_emu::sm90::mbar_wait_parity(&smem_barrier, phase_bit);"),
            ("arrive_barrier(uint64_t& smem_barrier)",
             "::ostq_emu::sm90::mbar_arrive(&smem_barrier);")):
        t = _route(t, w, start, "\n}\n", "#endif\n}", stmt)
    return _route(t, w, "prefetch_tma_descriptor(TmaDescriptor const* desc_ptr)\n{", "\n}\n",
                  '#else\n  CUTE_INVALID_CONTROL_PATH("Trying to use TMA Descriptor Prefetch',
                  "::ostq_emu::sm90::prefetch_tensormap(desc_ptr);  // prefetch.tensormap")


def _copy_traits_sm90_tma(t: str) -> str:
    # make_tma_copy_desc: a descriptor the driver (the encode stub) rejects is printed to cerr,
    # then assert(false) (an abort of the whole process; under NDEBUG the kernel would run with
    # an unwritten descriptor): fail with the stub's reason instead
    old = ('std::cerr << "Error: Failed to initialize the TMA descriptor " << result << std::endl;\n'
           '      assert(false);\n')
    return sub(t, old, old.replace(
        "      assert(false);\n",
        f"#if defined(OSTQ_SIMT_EMU){_TAG}\n"
        "      ::ostq_emu::fail(\"cuTensorMapEncodeTiled rejected the TMA descriptor: \" +\n"
        "                       ::ostq_emu::sm90::encode_last_reject());\n"
        "#endif\n      assert(false);\n"), 1, "cute/atom/copy_traits_sm90_tma.hpp")


PATCHES: list[tuple[str, str, Callable[[str], str]]] = [
    ("cute/arch/copy_sm90_tma.hpp",
     "TMA load (1-5D, and its tile prefetch) / store (1-5D), tma_store_fence (a host no-op), "
     "tma_store_arrive / tma_store_wait: routed to sm90_tma.h", _copy_sm90_tma),
    ("cute/atom/copy_traits_sm90_tma.hpp",
     "a descriptor the encode stub rejects is assert(false) (abort; nothing under NDEBUG): fail "
     "with the stub's reason", _copy_traits_sm90_tma),
    ("cute/arch/copy_sm90_desc.hpp",
     "cute's mbarrier helpers (host no-ops) routed to sm90_emu.h; prefetch.tensormap validates "
     "the descriptor (sm90_tma.h)", _copy_sm90_desc),
]
