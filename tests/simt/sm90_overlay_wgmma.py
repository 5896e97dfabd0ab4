"""The wgmma section of the sm90 CUTLASS overlay: wgmma fence / mma_async / commit / wait (routed to sm90_wgmma.h).
Merged into sm90_overlay.all_patches() (one entry per header across the sections; the same rules
as cutlass_overlay: every substitution counted, a mismatch fails the build).

cute/arch/mma_sm90_gmma.hpp, host branches (CUTE_ARCH_MMA_SM90A_ENABLED off, which the base
overlay turns into a loud failure):
  * warpgroup_arrive / warpgroup_commit_batch / warpgroup_wait<N> -> ostq_emu::sm90::wgmma_fence /
    wgmma_commit / wgmma_wait(N) (warp-group collectives);
  * the RS atoms MMA_64xNx32_S32S8S8_RS_TN, MMA_64xNx16_F32F16F16_RS, MMA_64xNx16_F32BF16BF16_RS
    of this header (N = 8, 16, 32, 64, 96, 128, 192, 256; the kernel uses 64 and 128) ->
    ostq_emu::sm90::wgmma_rs<type, N>(name, A registers, B descriptor, D registers, scale-d,
    scale-a, scale-b, tnsp-b), the D registers in the atom's PTX operand order.
Every other wgmma atom (SS forms, other types, the _SATURATE variants, mma_sm90_gmma_ext.hpp's
other N) keeps failing loudly. warpgroup_fence_operand is a compiler-only fence (empty on the
host): left as is.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cutlass_overlay import OverlayError, sub  # noqa: E402,F401

_W = "cute/arch/mma_sm90_gmma.hpp"
_TAG = "  // (tests/simt/sm90_overlay_wgmma.py)"

_SYNC = [
    ('CUTE_INVALID_CONTROL_PATH("Attempting to use wgmma.fence without CUTE_ARCH_MMA_SM90A_ENABLED");',
     "::ostq_emu::sm90::wgmma_fence();"),
    ('CUTE_INVALID_CONTROL_PATH("Attempting to use wgmma.wait_group<N> without CUTE_ARCH_MMA_SM90A_ENABLED");',
     "::ostq_emu::sm90::wgmma_wait(N);"),
    ('CUTE_INVALID_CONTROL_PATH("Attempting to use wgmma.commit_group without CUTE_ARCH_MMA_SM90A_ENABLED");',
     "::ostq_emu::sm90::wgmma_commit();"),
]

# (struct-name pattern, emulator type, immediates: scale-a, scale-b, tnsp-b)
_FAMILIES = [
    (r"MMA_64x(\d+)x32_S32S8S8_RS_TN", "kS8", "1, 1, 0"),
    (r"MMA_64x(\d+)x16_F32F16F16_RS", "kF16", "int32_t(scaleA), int32_t(scaleB), int32_t(tnspB)"),
    (r"MMA_64x(\d+)x16_F32BF16BF16_RS", "kBF16", "int32_t(scaleA), int32_t(scaleB), int32_t(tnspB)"),
]
_ATOMS_EXPECTED = 24  # 8 N per family in mma_sm90_gmma.hpp


def _atoms(t: str) -> str:
    n_done = 0
    for pat, wtype, imm in _FAMILIES:
        names = re.findall(r"^struct (" + pat + r")\n\{\n", t, flags=re.M)
        for name, n_str in names:
            n = int(n_str)
            m = re.search(r"^struct " + name + r"\n\{\n", t, flags=re.M)
            fail = (f'CUTE_INVALID_CONTROL_PATH("Attempting to use {name} without '
                    f'CUTE_ARCH_MMA_SM90A_ENABLED");')
            i = t.index(fail, m.end())
            body = t[m.end():i]
            if "\nstruct " in body or body.count("fma(") != 1:
                raise OverlayError(f"{_W}: {name}: the atom's fma and failure site are not in one struct")
            params = body[body.index("fma("):body.index("{", body.index("fma("))]
            a = re.findall(r"uint32_t const& (a\d+)", params)
            d = re.findall(r"(?:uint32_t|float)\s+& (d\d+)", params)
            cregs = re.search(r"using CRegisters = (?:uint32_t|float)\[(\d+)\];", body)
            if len(a) != 4 or "uint64_t const& desc_b" not in params or cregs is None \
                    or len(d) != int(cregs.group(1)) or len(d) != n // 2:
                raise OverlayError(f"{_W}: {name}: unexpected fma signature ({len(a)} A, {len(d)} D registers)")
            dl = ", ".join("&" + x for x in d)
            call = (f"::ostq_emu::sm90::wgmma_rs<::ostq_emu::sm90::WgType::{wtype}, {n}>({_TAG}\n"
                    f'        "{name}", {{{", ".join("&" + x for x in a)}}}, desc_b,\n'
                    f"        {{{dl}}},\n"
                    f"        int32_t(scale_D), {imm});")
            t = t[:i] + call + t[i + len(fail):]
            n_done += 1
    if n_done != _ATOMS_EXPECTED:
        raise OverlayError(f"{_W}: expected {_ATOMS_EXPECTED} RS atoms to route, found {n_done}")
    return t


def _mma_sm90_gmma(t: str) -> str:
    for old, new in _SYNC:
        t = sub(t, old, new + _TAG, 1, _W)
    return _atoms(t)


PATCHES: list[tuple[str, str, Callable[[str], str]]] = [
    (_W,
     "wgmma fence / commit_group / wait_group and the RS atoms (s8, f16, bf16) fail loudly on the "
     "host (CUTE_INVALID_CONTROL_PATH): routed to sm90_wgmma.h (warp-group collectives, deferred "
     "execution with A-hazard / D-poison checks)", _mma_sm90_gmma),
]
