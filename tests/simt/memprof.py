"""Memory-access profile of ostquant's hand-written kernels on the SIMT emulator.

How each emulated CUDA thread's loads and stores become warp-wide requests, and what is counted
(global sectors per request, shared-memory wavefronts and bank conflicts): memprof.cpp. This
module builds the instrumented emulator (``OSTQUANT_SIMT_MEMPROF=1``: -O0, every access a call),
runs an op under it and turns the raw rows into a per-source-line report::

    python tests/simt/memprof.py            # the report of the standard cases (CASES), JSON with --json

    import memprof
    mod = memprof.load()
    rep = memprof.profile(mod, lambda: mod.quantize_per_token(x, 4, False, 1.0), x)
    print(memprof.format_report(rep))

It answers, without a GPU, the questions Nsight Compute's memory tables answer: is a global
load coalesced (sectors per request against the fewest possible), does a shared-memory access
serialise on banks (wavefronts against one per phase). It does not model caches, timing or
the compiler's own vectorisation (the width of an access is the source's: nvcc keeps the
vector types the kernels use).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import build  # noqa: E402

# memprof_stats() row layout (memprof.cpp)
_FIELDS = ("kernel", "pc", "shared", "store", "width", "requests", "lanes", "bytes",
           "unique_bytes", "sectors", "ideal_sectors", "wavefronts", "ideal_wavefronts",
           "max_wavefronts")


def load(verbose: bool = False):
    """The instrumented emulator module (built on first use, ~2 min on two cores)."""
    env, _, _ = build.MEMPROF
    old = os.environ.get(env)
    os.environ[env] = "1"
    try:
        return build.load(verbose=verbose)
    finally:
        if old is None:
            del os.environ[env]
        else:
            os.environ[env] = old


@dataclass
class Site:
    """One access site (source line, direction, width) of one kernel, summed over its requests."""
    kernel: str
    where: str            # csrc-relative file:line
    caller: str           # the csrc line a helper holding the access is inlined into ("" if none)
    code: str             # that line of source
    space: str            # "global" or "shared"
    op: str               # "load" or "store"
    width: int            # bytes per thread
    requests: int = 0     # warp-wide executions
    lanes: int = 0        # thread accesses
    bytes: int = 0        # bytes the threads asked for
    unique_bytes: int = 0  # distinct bytes per request, summed
    sectors: int = 0      # global: 32-byte sectors touched
    ideal_sectors: int = 0
    wavefronts: int = 0   # shared: bank wavefronts
    ideal_wavefronts: int = 0
    max_wavefronts: int = 0

    @property
    def active_lanes(self) -> float:
        return self.lanes / self.requests if self.requests else 0.0

    @property
    def sectors_per_request(self) -> float:
        return self.sectors / self.requests if self.requests else 0.0

    @property
    def efficiency(self) -> float:
        """Global: bytes used / bytes moved (1.0 = perfectly coalesced); shared: ideal /
        actual wavefronts (1.0 = no bank conflicts)."""
        if self.space == "global":
            return self.unique_bytes / (32 * self.sectors) if self.sectors else 1.0
        return self.ideal_wavefronts / self.wavefronts if self.wavefronts else 1.0

    @property
    def conflicts(self) -> int:
        """Shared: extra wavefronts (Nsight's bank conflicts)."""
        return self.wavefronts - self.ideal_wavefronts

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(active_lanes=round(self.active_lanes, 2), efficiency=round(self.efficiency, 4),
                 sectors_per_request=round(self.sectors_per_request, 2))
        return d


@dataclass
class Report:
    sites: List[Site] = field(default_factory=list)
    blocks: int = 0
    unresolved: int = 0   # access sites with no source line under csrc/ (emulator glue)

    def kernels(self) -> Dict[str, List[Site]]:
        out: Dict[str, List[Site]] = defaultdict(list)
        for s in self.sites:
            out[s.kernel].append(s)
        return dict(out)

    def totals(self, kernel: Optional[str] = None) -> dict:
        """Global bytes used/moved and shared wavefronts (actual/ideal) of one kernel or all."""
        ss = [s for s in self.sites if kernel is None or s.kernel == kernel]
        g = [s for s in ss if s.space == "global"]
        sh = [s for s in ss if s.space == "shared"]
        used = sum(s.unique_bytes for s in g)
        moved = 32 * sum(s.sectors for s in g)
        return {"global_bytes_used": used, "global_bytes_moved": moved,
                "global_efficiency": round(used / moved, 4) if moved else 1.0,
                "shared_wavefronts": sum(s.wavefronts for s in sh),
                "shared_ideal_wavefronts": sum(s.ideal_wavefronts for s in sh),
                "shared_conflicts": sum(s.conflicts for s in sh)}

    def find(self, kernel_contains: str = "", space: Optional[str] = None,
             op: Optional[str] = None, code_contains: str = "") -> List[Site]:
        return [s for s in self.sites if kernel_contains in s.kernel and
                (space is None or s.space == space) and (op is None or s.op == op) and
                code_contains in s.code]

    def to_dict(self) -> dict:
        return {"blocks": self.blocks, "unresolved_sites": self.unresolved,
                "kernels": {k: {"totals": self.totals(k),
                                "sites": [s.to_dict() for s in v]}
                            for k, v in self.kernels().items()}}


_UNIT = re.compile(r"^(.*)/src/units/(.+)\.cpp$")


def _csrc_path(build_src: Path, f: str) -> Optional[str]:
    """The csrc-relative name of a file of the build's rewritten copy (or memprof.cpp's own
    test patterns: "simt/memprof.cpp"), else None."""
    if f and Path(f).name == "memprof.cpp" and Path(f).resolve().parent == HERE:
        return "simt/memprof.cpp"
    m = _UNIT.match(f)
    if m and Path(m.group(1)) == build_src.parent:
        return m.group(2).replace("__", "/")
    try:
        rel = Path(f).resolve().relative_to(build_src.resolve())
    except ValueError:
        return None
    if rel.parts and rel.parts[0] == "units":
        return None
    return rel.as_posix()


def _resolve(so: str, pcs: List[int]) -> Dict[int, Optional[tuple]]:
    """pc offset -> (csrc-relative file, line, real path, caller) of the innermost frame under the
    build's src/ (the kernel's own line, through inlined emulator helpers such as __ldg; caller:
    the csrc line it is inlined into, "" if none), or None."""
    if not pcs:
        return {}
    tool = shutil.which("addr2line")
    if tool is None:
        raise RuntimeError("memprof: addr2line (binutils) is needed to name the access sites")
    build_src = Path(so).parent / "src"
    out = subprocess.run([tool, "-e", so, "-i", "-a"] + [hex(p) for p in pcs],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    res: Dict[int, Optional[tuple]] = {}
    cur, frames = None, []

    def flush():
        if cur is None:
            return
        found = []
        for fr in frames:  # innermost first
            path, _, line = fr.rpartition(":")
            line = line.split(" ")[0]
            rel = _csrc_path(build_src, path) if path else None
            if rel is not None and line.isdigit():
                found.append((rel, int(line), path))
        if not found:
            res[cur] = None
            return
        rel, line, path = found[0]
        # a helper inlined into the kernel (a vector load, say): name the line that called it
        caller = next((f"{r}:{n}" for r, n, _ in found[1:] if (r, n) != (rel, line)), "")
        res[cur] = (rel, line, path, caller)

    for ln in out:
        if ln.startswith("0x"):
            flush()
            cur, frames = int(ln, 16), []
        else:
            frames.append(ln.strip())
    flush()
    return res


_lines_cache: Dict[str, List[str]] = {}


def _source_line(path: str, line: int) -> str:
    if path not in _lines_cache:
        try:
            _lines_cache[path] = Path(path).read_text().splitlines()
        except OSError:
            _lines_cache[path] = []
    lines = _lines_cache[path]
    return lines[line - 1].strip() if 0 < line <= len(lines) else ""


def report_from_stats(stats) -> Report:
    rows, so, blocks = stats
    rows = [dict(zip(_FIELDS, r)) for r in rows]
    where = _resolve(so, sorted({r["pc"] for r in rows}))
    sites: Dict[tuple, Site] = {}
    unresolved = 0
    for r in rows:
        w = where.get(r["pc"])
        if w is None:
            unresolved += 1
            continue
        rel, line, path, caller = w
        key = (r["kernel"], rel, line, caller, r["shared"], r["store"], r["width"])
        s = sites.get(key)
        if s is None:
            s = sites[key] = Site(kernel=r["kernel"], where=f"{rel}:{line}", caller=caller,
                                  code=_source_line(path, line),
                                  space="shared" if r["shared"] else "global",
                                  op="store" if r["store"] else "load", width=r["width"])
        for k in ("requests", "lanes", "bytes", "unique_bytes", "sectors", "ideal_sectors",
                  "wavefronts", "ideal_wavefronts"):
            setattr(s, k, getattr(s, k) + r[k])
        s.max_wavefronts = max(s.max_wavefronts, r["max_wavefronts"])
    ordered = sorted(sites.values(), key=lambda s: (s.kernel, -(s.sectors + s.wavefronts)))
    return Report(sites=ordered, blocks=blocks, unresolved=unresolved)


def profile(mod, fn: Callable[[], object], *tensors) -> Report:
    """Run ``fn`` (emulated ops of ``mod``) recording its kernels' accesses. ``tensors``: the
    inputs made before the call (anything allocated during it is tracked by itself)."""
    if not getattr(mod, "memprof_available", False):
        raise RuntimeError("memprof: the module was not built with OSTQUANT_SIMT_MEMPROF=1 "
                           "(use memprof.load())")
    import torch
    for t in tensors:
        if isinstance(t, torch.Tensor):
            mod.memprof_register(t)
    mod.memprof_start()
    try:
        fn()
    finally:
        mod.memprof_stop()
        mod.memprof_clear_ranges()
    return report_from_stats(mod.memprof_stats())


def format_report(rep: Report, min_share: float = 0.0) -> str:
    """A table per kernel: each site's requests, active lanes, sectors per request and
    efficiency (global) or wavefronts per request (shared). Sites below ``min_share`` of their
    kernel's traffic are left out."""
    out = []
    for k, sites in rep.kernels().items():
        t = rep.totals(k)
        out.append(f"{k}: global {t['global_bytes_used']} B used / {t['global_bytes_moved']} B "
                   f"moved (efficiency {t['global_efficiency']:.2f}); shared wavefronts "
                   f"{t['shared_wavefronts']} (ideal {t['shared_ideal_wavefronts']})")
        total = sum(s.sectors + s.wavefronts for s in sites) or 1
        out.append(f"  {'site (< inlined into)':44s} {'space':6s} {'op':5s} {'B/thr':>5s} "
                   f"{'reqs':>7s} {'lanes':>5s} {'per req':>8s} {'eff':>5s}  code")
        for s in sites:
            if (s.sectors + s.wavefronts) / total < min_share:
                continue
            per = s.sectors_per_request if s.space == "global" else \
                (s.wavefronts / s.requests if s.requests else 0.0)
            site = s.where + (f" < {s.caller}" if s.caller else "")
            out.append(f"  {site[-44:]:44s} {s.space:6s} {s.op:5s} {s.width:5d} "
                       f"{s.requests:7d} {s.active_lanes:5.1f} {per:8.2f} {s.efficiency:5.2f}"
                       f"  {s.code[:60]}")
    return "\n".join(out)


# ------------------------------------------------------------------------ the standard cases

def _cases():
    """name -> (setup() -> (fn, tensors)) over the kernels' main paths at LLaMA-like sizes
    (kept small: the instrumented emulator runs ~100x slower than the normal one)."""
    import torch

    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype)

    def quant(mod):
        x = rnd(4, 4096)
        return (lambda: mod.quantize_per_token(x, 4, False, 1.0)), [x]

    def quant_packed(mod):
        x = rnd(4, 4096)
        return (lambda: mod.quantize_per_token_packed(x, 4, False, 1.0)), [x]

    def hadamard(mod):
        x = rnd(4, 4096)
        return (lambda: mod.hadamard_transform(x, 4096 ** -0.5)), [x]

    def hadamard_k(mod):  # K·2^k: 11008 = 172 · 64 (LLaMA-2-7B's down_proj input)
        x = rnd(2, 11008)
        return (lambda: mod.hadamard_transform(x, 11008 ** -0.5)), [x]

    def hadamard_quant(mod):
        x = rnd(4, 11008)
        return (lambda: mod.hadamard_quantize_per_token(x, 11008 ** -0.5, 4, False, 1.0, False)), [x]

    def rmsnorm_quant(mod):
        x, w = rnd(4, 4096), rnd(4096)
        return (lambda: mod.rmsnorm_quantize_per_token(x, w, 1e-6, 4, False, 1.0, False)), [x, w]

    def cache(B, cap, hkv, d, S):
        """An int4 cache [B, cap, hkv, ...] in the runtime's layout (ops.int4_kv_tensors:
        scale/zero head-major) holding S tokens per sequence (reference append)."""
        import ostquant.ops as O
        kc, vc = list(O.int4_kv_tensors(B, cap, hkv, d)), list(O.int4_kv_tensors(B, cap, hkv, d))
        O.kv_cache_append(rnd(B, S, hkv, d), rnd(B, S, hkv, d), *kc, *vc,
                          torch.zeros(B, dtype=torch.int32))
        return kc, vc

    def attention(B, hq, hkv, d, S, sq):
        def setup(mod):
            kc, vc = cache(B, S, hkv, d, S)
            q, lens = rnd(B, sq, hq, d), torch.full((B,), S, dtype=torch.int32)
            return (lambda: mod.int4_kv_attention(q, *kc, *vc, lens, d ** -0.5, True)), \
                [q, lens, *kc, *vc]
        return setup

    def paged_attention(B, hq, hkv, d, S, page):
        def setup(mod):
            import ostquant.ops as O
            n = B * S // page
            kp, vp = list(O.int4_kv_tensors(n, page, hkv, d)), list(O.int4_kv_tensors(n, page, hkv, d))
            table = torch.randperm(n, generator=g).view(B, S // page).to(torch.int32)
            lens = torch.full((B,), S, dtype=torch.int32)
            O.paged_kv_cache_append(rnd(B, S, hkv, d), rnd(B, S, hkv, d), *kp, *vp, table,
                                    torch.zeros(B, dtype=torch.int32))
            q = rnd(B, 1, hq, d)
            return (lambda: mod.paged_int4_kv_attention(q, *kp, *vp, table, lens, d ** -0.5,
                                                        True, -1)), [q, lens, table, *kp, *vp]
        return setup

    def append(mod):
        B, S, hkv, d = 2, 8, 8, 128
        kc, vc = cache(B, 32, hkv, d, 1)
        k, v, lens = rnd(B, S, hkv, d), rnd(B, S, hkv, d), torch.ones(B, dtype=torch.int32)
        cos, sin = rnd(B, S, d), rnd(B, S, d)
        return (lambda: mod.kv_cache_append_fused(k, v, *kc, *vc, lens, cos, sin, True)), \
            [k, v, lens, cos, sin, *kc, *vc]

    def gemm(M, N, K, w4a16=False):
        def setup(mod):
            qx = torch.randint(-8, 8, (M, K), generator=g, dtype=torch.int8)
            qw = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
            from ostquant.ops import reference as ref
            xp, wp = ref.pack_int4(qx), ref.pack_int4(qw)
            xs, ws = torch.rand(M, generator=g) + 0.1, torch.rand(N, generator=g) * 1e-2
            xz, wsum = torch.randint(-8, 8, (M,), generator=g).float(), qw.float().sum(-1)
            if w4a16:
                x = rnd(M, K)
                return (lambda: mod.w4a16_gemm(x, wp, ws, None)), [x, wp, ws]
            return (lambda: mod.int4_gemm(xp, xs, xz, wp, ws, wsum, None, torch.bfloat16)), \
                [xp, xs, xz, wp, ws, wsum]
        return setup

    return {"quantize_per_token": quant, "quantize_per_token_packed": quant_packed,
            "hadamard_transform": hadamard, "hadamard_transform_k172": hadamard_k,
            "hadamard_quantize_per_token": hadamard_quant,
            "rmsnorm_quantize_per_token": rmsnorm_quant,
            "kv_cache_append_fused": append,
            "attention_decode_gqa_hd128": attention(1, 32, 8, 128, 256, 1),
            "attention_decode_mha_hd64": attention(2, 4, 4, 64, 128, 1),
            "attention_prefill_hd128": attention(1, 8, 2, 128, 64, 64),
            "attention_decode_paged_gqa_hd128": paged_attention(1, 8, 2, 128, 128, 16),
            "int4_gemm_decode": gemm(4, 256, 4096),
            "w4a16_gemm_decode": gemm(4, 256, 4096, w4a16=True),
            "w4a16_gemm_decode_m16": gemm(16, 64, 1024, w4a16=True)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", help="run only these cases")
    ap.add_argument("--json", metavar="FILE", help="write the report as JSON")
    ap.add_argument("--min-share", type=float, default=0.01,
                    help="leave out sites below this share of their kernel's traffic")
    args = ap.parse_args(argv)
    mod = load()
    cases = _cases()
    names = args.case or list(cases)
    rows = []
    for name in names:
        if name not in cases:
            ap.error(f"unknown case {name!r}; cases: {', '.join(cases)}")
        fn, tensors = cases[name](mod)
        rep = profile(mod, fn, *tensors)
        print(f"== {name}")
        print(format_report(rep, args.min_share))
        for kernel, k in rep.to_dict()["kernels"].items():
            rows.append({"case": name, "kernel": kernel, **k["totals"], "sites": k["sites"]})
    if args.json:
        if str(build.ROOT) not in sys.path:
            sys.path.insert(0, str(build.ROOT))
        from bench.common import meta
        m = meta("memprof", device="none: the SIMT emulator on the CPU (memory-access model, "
                                   "no timing)")
        m["command"] = " ".join(["python tests/simt/memprof.py"] + (argv or sys.argv[1:]))
        Path(args.json).write_text(json.dumps({"meta": m, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
