"""Static resources of the compiled CUDA kernels: registers, spills, stack, shared memory.

    python -m bench.resources [--so PATH] [--check] [--json] [--out-dir DIR]

Reads the device code inside the built extension (``ostquant._C``), so it needs no GPU and
runs wherever the extension was compiled (CI builds it for sm_90a):

* ``cuobjdump --dump-resource-usage``: registers per thread (``regs``), the stack frame
  (``stack`` bytes: spill slots and local arrays), static shared memory (``shared`` bytes);
* ``cuobjdump -elf`` (each kernel's ``.nv.info`` attributes): the launch bound
  (``max_threads``, from ``__launch_bounds__``), the register cap ptxas compiled under
  (``reg_cap``), and the spill/refill instructions ptxas placed (``spills``: its
  ``SpillRefill`` annotations, one per STL/LDL of a spilled register).

``--check`` holds every kernel to :data:`BUDGETS` (spill instructions and stack bytes per
kernel family, each entry with its reason) and fails on a kernel no budget names, so a change
that makes a kernel spill, or a new kernel, is looked at rather than discovered on a GPU. It
also reads the SASS (``cuobjdump -sass``) and holds the kernels to :data:`EXPECTED_SASS`: the
instructions the design rests on (the Hopper GEMMs' register-sourced IGMMA / HGMMA at their tile
width with TMA and setmaxnreg, the small-M kernels' IMMA / HMMA and 128-bit weight loads, the
attention's HMMA and ex2), so a build that silently took another path fails on CPU CI too.
``tests/test_kernel_resources.py`` runs the check in the CPU suite. ``--json`` writes
``resources-<arch>.json`` (RESULTS.md's shape; ``meta.device`` says the numbers are static).

cuobjdump comes with a CUDA toolkit (``$CUDA_HOME/bin``) or with Triton
(``triton/backends/nvidia/bin``, which torch installs on Linux).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

CSRC_MARK = "/csrc/"


class ResourceError(RuntimeError):
    """The tools or the extension needed to read the kernels' resources are missing."""


@dataclasses.dataclass
class Kernel:
    """One kernel of one arch as ptxas compiled it."""

    name: str  # mangled
    arch: str  # e.g. sm_90a
    source: str  # the .cu file under csrc/ (or the identifier as cuobjdump gives it)
    regs: int
    stack: int
    shared: int
    local: int
    max_threads: Optional[int] = None  # __launch_bounds__ (product of the dims); None: unbounded
    reg_cap: Optional[int] = None
    spills: int = 0
    short: str = ""  # a readable name (demangled, namespaces and long templates trimmed)

    def row(self) -> dict:
        return {"kernel": self.short or self.name, "source": self.source, "arch": self.arch,
                "regs": self.regs, "reg_cap": self.reg_cap, "max_threads": self.max_threads,
                "spills": self.spills, "stack_bytes": self.stack, "shared_bytes": self.shared,
                "mangled": self.name}


@dataclasses.dataclass(frozen=True)
class Budget:
    """What one family of kernels may use. ``pattern`` is searched in the short name and the
    source file (``"<source>: <short>"``); the first matching budget applies."""

    pattern: str
    spills: int  # spill/refill instructions at most
    stack: int  # stack frame bytes at most
    why: str


# First match wins. Numbers are what the sm_90a build had when each entry was written (CUDA 13.0
# nvcc); a kernel going over fails the check: look at why (ptxas -v, nvdisasm -gi for where the
# spills are) and either fix it or raise the budget with the reason.
BUDGETS: Tuple[Budget, ...] = (
    Budget(r"kv_attn_mma_kernel<[^>]*, 128>", 6, 16,
           "head_dim 128 decode/prefill attention at the 168-register cap of "
           "__launch_bounds__(128, 3): 12 bytes of loop-invariant values stored before the KV "
           "loop and reloaded after it (nvdisasm -gi: kv_attention.cu lines 209/286 -> "
           "415-497), none inside the loop"),
    Budget(r"kv_attn_f32_kernel", 5, 8,
           "float32 attention (a portable path for tests and tools, not the bf16/fp16 MMA "
           "one): 8 bytes; the IEEE o / l is a call into nvcc's division slow path, and under "
           "the call's register convention ptxas keeps 32 registers (o · l instead: no spills)"),
    Budget(r"row_quant_kernel<[^>]*, (1|2), 4>", 19, 24,
           "per-token / KV quantization with 1- or 2-element vectors, the fallback for K not a "
           "multiple of 8 halves / 4 floats: under __launch_bounds__(1024) (a 64-register cap) "
           "ptxas keeps 32 registers, for 2 blocks per SM, and spills up to 24 bytes; the 8- / "
           "4-element main paths do not spill"),
    Budget(r"rmsnorm_quant_kernel<[^>]*, 2, 4,", 25, 24,
           "RMSNorm + quantization with 2-element vectors (the odd-K fallback): the same trade"),
    Budget(r"", 0, 0, "every other kernel: no spills, no stack frame"),
)


@dataclasses.dataclass(frozen=True)
class Expect:
    """Kernels whose ``"<source>: <short>"`` matches ``kernel`` (at least one must exist for
    each arch of the build that ``arch``, a regex, fully matches) each hold an instruction
    matching every regex of ``sass``."""

    kernel: str
    sass: Tuple[str, ...]
    why: str
    arch: str = r"sm_90a"


_RS = r" R\d+, R\d+, gdesc\["  # wgmma with A from registers (RS), B from a shared-memory descriptor
EXPECTED_SASS: Tuple[Expect, ...] = (
    Expect(r"^gemm/sm90/w4a4_t128_", (r"IGMMA\.64x128x32\.S8\.S8" + _RS, r"UTMALDG", r"UTMASTG",
                                       r"USETMAXREG"),
           "W4A4 Hopper GEMM, 128-token tile: int8 wgmma on the int4 weights widened in "
           "registers (RS), exact int32 accumulation; TMA loads and stores; setmaxnreg"),
    Expect(r"^gemm/sm90/w4a4_t64_", (r"IGMMA\.64x64x32\.S8\.S8" + _RS, r"UTMALDG", r"UTMASTG",
                                      r"USETMAXREG"), "W4A4 Hopper GEMM, 64-token tile"),
    Expect(r"^gemm/sm90/w4a16_t128_bf16", (r"HGMMA\.64x128x16\.F32\.BF16" + _RS, r"UTMALDG"),
           "W4A16 Hopper GEMM (bf16): bf16 wgmma, fp32 accumulators, weights widened in registers"),
    Expect(r"^gemm/sm90/w4a16_t128_f16", (r"HGMMA\.64x128x16\.F32" + _RS, r"UTMALDG"),
           "W4A16 Hopper GEMM (fp16)"),
    Expect(r"^gemm/sm90/w4a16_t64_bf16", (r"HGMMA\.64x64x16\.F32\.BF16" + _RS,),
           "W4A16 Hopper GEMM (bf16), 64-token tile"),
    Expect(r"^gemm/sm90/w4a16_t64_f16", (r"HGMMA\.64x64x16\.F32" + _RS,),
           "W4A16 Hopper GEMM (fp16), 64-token tile"),
    Expect(r"^gemm/sm80/", (r"IMMA\.16864\.S4\.S4\.SAT", r"LDGSTS\.E\.BYPASS\.LTC128B\.128",
                            r"LDSM\.16\.M88\.4"),
           "int4 IMMA GEMM on Ampere / Ada: native int4 mma m16n8k64 (saturating), cp.async "
           "and ldmatrix (checked by hand on an sm_80 compile, 2026-12-07: 64 IMMA.16864 per "
           "kernel; CI builds only sm_90a)", arch=r"sm_8\d"),
    Expect(r"^gemm/sm80/", (r"IMMA\.16832\.S8\.S8", r"LDGSTS\.E\.BYPASS\.LTC128B\.128"),
           "the same kernel built for Hopper, which has no int4 IMMA: ptxas lowers the int4 mma "
           "to int8 IMMA (OSTQUANT_GEMM_IMMA=1 tests it on an H100; docs/ops.md)"),
    Expect(r"w4a4_small_m_kernel", (r"IMMA\.16832\.S8\.S8", r"LDG\.E\.128"),
           "decode W4A4 GEMM: int4 codes sign-extended to int8, mma m16n8k32 s8; weights in "
           "128-bit loads"),
    Expect(r"w4a16_small_m_kernel<__half>", (r"HMMA\.16816\.F32 ", r"LDG\.E\.128",
                                              r"STS\.128", r"LDS\.128"),
           "decode W4A16 GEMM (fp16): mma m16n8k16 with fp32 accumulators, 128-bit weight and "
           "activation loads, activations staged through shared memory in 128-bit accesses"),
    Expect(r"w4a16_small_m_kernel<__nv_bfloat16>", (r"HMMA\.16816\.F32\.BF16", r"LDG\.E\.128",
                                                      r"STS\.128", r"LDS\.128"),
           "decode W4A16 GEMM (bf16)"),
    Expect(r"kv_attn_mma_kernel<__nv_bfloat16", (r"HMMA\.16816\.F32\.BF16", r"HMMA\.16816\.F32 ",
                                                  r"MUFU\.EX2"),
           "int4-KV attention (bf16): Q.K^T in bf16, P.V in fp16 (docs/ops.md), exp2 on the SFU"),
    Expect(r"kv_attn_mma_kernel<__half", (r"HMMA\.16816\.F32 ", r"MUFU\.EX2"),
           "int4-KV attention (fp16)"),
    Expect(r"row_quant_kernel<[^>]*(__half|__nv_bfloat16), 8, 4>", (r"LDG\.E\.128",),
           "per-token / KV quantization main path: 16-byte loads"),
    Expect(r"hadamard_kernel<", (r"LDG\.E\.128", r"SHFL\.BFLY"),
           "Hadamard transform: 16-byte loads, butterfly stages across the warp by shuffles"),
)


# ------------------------------------------------------------------------------ finding things

def find_tool(name: str) -> Optional[str]:
    """``name`` (cuobjdump / nvdisasm) on PATH, in $CUDA_HOME/bin, /usr/local/cuda/bin, or in
    Triton's bundled NVIDIA tools."""
    found = shutil.which(name)
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in homes:
        if home and os.access(os.path.join(home, "bin", name), os.X_OK):
            return os.path.join(home, "bin", name)
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", name)
        if os.access(path, os.X_OK):
            return path
    return None


def extension_path() -> Optional[str]:
    """The file of the built ``ostquant._C`` (None: not built, a pure-Python install)."""
    spec = importlib.util.find_spec("ostquant._C")
    return spec.origin if spec is not None else None


# ------------------------------------------------------------------------------------ parsing

_ARCH = re.compile(r"^arch = (\S+)", re.M)
_IDENT = re.compile(r"^identifier = (.+)$")
_FUNC = re.compile(r"^\s*Function (\S+):\s*$")
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _source_of(identifier: str) -> str:
    i = identifier.rfind(CSRC_MARK)
    return identifier[i + len(CSRC_MARK):] if i >= 0 else identifier.strip()


def _blocks(text: str, default: Tuple[str, str] = ("?", "")):
    """Split cuobjdump output into (arch, source, block text) per embedded cubin; the output
    for a bare .cubin (no fatbin headers) is one block with ``default``'s (arch, source)."""
    parts = re.split(r"^Fatbin elf code:\s*$", text, flags=re.M)
    if len(parts) == 1:
        yield default[0], default[1], text
        return
    for part in parts[1:]:
        arch = _ARCH.search(part)
        ident = next((m.group(1) for m in map(_IDENT.match, part.splitlines()) if m), "")
        yield (arch.group(1) if arch else "?"), _source_of(ident), part


def parse_resource_usage(text: str, default: Tuple[str, str] = ("?", "")) -> List[Kernel]:
    """Kernels of ``cuobjdump --dump-resource-usage`` output."""
    out: List[Kernel] = []
    for arch, source, part in _blocks(text, default):
        name = None
        for line in part.splitlines():
            m = _FUNC.match(line)
            if m:
                name = m.group(1)
                continue
            u = _USAGE.search(line)
            if u and name:
                regs, stack, shared, local = map(int, u.groups())
                out.append(Kernel(name, arch, source, regs, stack, shared, local))
                name = None
    return out


def parse_elf_info(text: str, default: Tuple[str, str] = ("?", "")) -> Dict[Tuple[str, str], dict]:
    """``{(arch, mangled name): {"max_threads", "reg_cap", "spills"}}`` from ``cuobjdump -elf``:
    each kernel's ``.nv.info.<name>`` section."""
    info: Dict[Tuple[str, str], dict] = {}
    for arch, _source, part in _blocks(text, default):
        sections = re.split(r"^\.nv\.info\.(\S+)\s*$", part, flags=re.M)
        # [before, name1, body1, name2, body2, ...]; a body ends at the next section of any kind
        for name, body in zip(sections[1::2], sections[2::2]):
            body = re.split(r"^\.(?!nv\.info\.)\S", body, maxsplit=1, flags=re.M)[0]
            d = {"max_threads": None, "reg_cap": None, "spills": body.count("SpillRefill")}
            attrs = re.split(r"^\s*Attribute:\s*", body, flags=re.M)[1:]
            for a in attrs:
                key = a.split(None, 1)[0]
                val = re.search(r"Value:\s*(.*)", a)
                vals = val.group(1).split() if val else []
                if key == "EIATTR_MAX_THREADS" and vals:
                    n = 1
                    for v in vals[:3]:
                        n *= int(v, 16)
                    d["max_threads"] = n
                elif key == "EIATTR_MAXREG_COUNT" and vals:
                    d["reg_cap"] = int(vals[0], 16)
            info[(arch, name)] = d
    return info


_SASS_FUNC = re.compile(r"^\s*Function : (\S+)\s*$", re.M)
_SASS_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s*(.*?)\s*;")


def parse_sass(text: str, default: Tuple[str, str] = ("?", "")) -> Dict[Tuple[str, str], List[str]]:
    """``{(arch, mangled name): [instruction text, ...]}`` from ``cuobjdump -sass``."""
    out: Dict[Tuple[str, str], List[str]] = {}
    for arch, _source, part in _blocks(text, default):
        pieces = _SASS_FUNC.split(part)
        for name, body in zip(pieces[1::2], pieces[2::2]):
            out[(arch, name)] = [m.group(1) for m in _SASS_INSTR.finditer(body)]
    return out


def load_sass(so_path: str, kernels: Sequence[Kernel],
              cuobjdump_tool: Optional[str] = None) -> Dict[Tuple[str, str], List[str]]:
    """The SASS of ``so_path``'s kernels (``parse_sass`` of ``cuobjdump -sass``); a bare .cubin
    takes the (arch, source) ``collect`` gave its kernels."""
    default = (kernels[0].arch, kernels[0].source) if kernels else ("?", "")
    return parse_sass(cuobjdump(so_path, "-sass", tool=cuobjdump_tool), default)


def check_sass(kernels: Sequence[Kernel], sass: Dict[Tuple[str, str], List[str]],
               expected: Sequence[Expect] = EXPECTED_SASS) -> List[str]:
    """Problems, one line each: an expectation no kernel of its arch matches, or a matching
    kernel without one of the instructions. Arches the build does not hold are skipped."""
    problems = []
    archs = sorted({k.arch for k in kernels})
    for e in expected:
        for arch in (a for a in archs if re.fullmatch(e.arch, a)):
            hits = [k for k in kernels
                    if k.arch == arch and re.search(e.kernel, f"{k.source}: {k.short}")]
            if not hits:
                problems.append(f"{arch}: no kernel matches {e.kernel!r} ({e.why})")
            problems += _missing_instructions(hits, sass, e)
    return problems


def _missing_instructions(hits: Sequence[Kernel], sass: Dict[Tuple[str, str], List[str]],
                          e: Expect) -> List[str]:
    problems = []
    for k in hits:
        code = sass.get((k.arch, k.name))
        if code is None:
            problems.append(f"{k.arch} {k.source}: {k.short}: no SASS found")
            continue
        for pat in e.sass:
            if not any(re.search(pat, line) for line in code):
                problems.append(f"{k.arch} {k.source}: {k.short}: no instruction matches "
                                f"{pat!r} ({e.why})")
    return problems


def demangle(names: Sequence[str]) -> Dict[str, str]:
    """Mangled -> readable (c++filt when present; the mangled name otherwise)."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = r.stdout.splitlines()
    if r.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    return dict(zip(names, lines))


def _mangled_scope(name: str) -> str:
    """``_ZN7cutlass13device_kernelI...`` -> ``cutlass::device_kernel<...>``: the nested name of
    a mangled symbol c++filt did not take (CUTLASS's kernel names run to several KB)."""
    if not name.startswith("_ZN"):
        return name
    parts, i = [], 3
    while i < len(name) and name[i].isdigit():
        j = i
        while j < len(name) and name[j].isdigit():
            j += 1
        k = int(name[i:j])
        parts.append(name[j:j + k])
        i = j + k
    if not parts:
        return name
    return "::".join(parts) + ("<...>" if name[i:i + 1] == "I" else "")


def short_name(demangled: str) -> str:
    """``void ostquant::(anonymous namespace)::k<__half, 128>(Args)`` -> ``k<__half, 128>``;
    a CUTLASS kernel keeps only its outer template (``cutlass::device_kernel<...>``): the
    source file tells the instantiations apart."""
    s = demangled
    if s.startswith("_Z"):
        return _mangled_scope(s)
    if s.startswith("void "):
        s = s[5:]
    # drop the parameter list: the last top-level "(...)"
    depth, cut = 0, len(s)
    for i in range(len(s) - 1, -1, -1):
        c = s[i]
        if c in ")>":
            depth += 1
        elif c in "(<":
            depth -= 1
            if depth == 0 and c == "(":
                cut = i
                break
    s = s[:cut]
    for ns in ("ostquant::", "(anonymous namespace)::"):
        s = s.replace(ns, "")
    if s.startswith("cutlass::") and "<" in s:
        s = s[: s.index("<")] + "<...>"
    return s


def cuobjdump(so_path: str, *args: str, tool: Optional[str] = None) -> str:
    """``cuobjdump ARGS so_path``'s output; ResourceError when it cannot run."""
    tool = tool or find_tool("cuobjdump")
    if tool is None:
        raise ResourceError("cuobjdump not found (CUDA toolkit bin/ or Triton's bundled tools)")
    if not os.path.isfile(so_path):
        raise ResourceError(f"no such file: {so_path}")
    r = subprocess.run([tool, *args, so_path], capture_output=True, text=True)
    if r.returncode != 0:
        raise ResourceError(f"{os.path.basename(tool)} {' '.join(args)} {so_path} failed: "
                            f"{r.stderr.strip()[:500]}")
    return r.stdout


def collect(so_path: str, cuobjdump_tool: Optional[str] = None) -> List[Kernel]:
    """Every kernel of ``so_path`` with its resources (all archs it holds)."""
    def run(*args: str) -> str:
        return cuobjdump(so_path, *args, tool=cuobjdump_tool)

    elf = run("-elf")
    default = ("?", os.path.basename(so_path))
    m = re.search(r"\bsm=(\w+)", elf)  # a bare .cubin: its ELF header names the arch
    if m and "Fatbin elf code" not in elf:
        default = ("sm_" + m.group(1), default[1])
    kernels = parse_resource_usage(run("--dump-resource-usage"), default)
    if not kernels:
        raise ResourceError(f"{so_path} holds no device code (a build without CUDA?)")
    info = parse_elf_info(elf, default)
    names = demangle(sorted({k.name for k in kernels}))
    for k in kernels:
        d = info.get((k.arch, k.name), {})
        k.max_threads = d.get("max_threads")
        k.reg_cap = d.get("reg_cap")
        k.spills = d.get("spills", 0)
        k.short = short_name(names.get(k.name, k.name))
    return kernels


# ------------------------------------------------------------------------------------ checking

def budget_for(k: Kernel, budgets: Sequence[Budget] = BUDGETS) -> Optional[Budget]:
    key = f"{k.source}: {k.short or k.name}"
    return next((b for b in budgets if re.search(b.pattern, key)), None)


def check(kernels: Sequence[Kernel], budgets: Sequence[Budget] = BUDGETS) -> List[str]:
    """Problems, one line each (empty: every kernel within its budget). Also: more than 255
    registers, or more than the launch bound allows (64K registers per block)."""
    problems = []
    for k in kernels:
        b = budget_for(k, budgets)
        where = f"{k.arch} {k.source}: {k.short or k.name}"
        if b is None:
            problems.append(f"{where}: no budget names this kernel")
            continue
        if k.spills > b.spills or k.stack > b.stack:
            problems.append(f"{where}: {k.spills} spill instructions / {k.stack} stack bytes, "
                            f"budget {b.spills} / {b.stack} ({b.why})")
        if k.regs > 255:
            problems.append(f"{where}: {k.regs} registers (at most 255)")
        if k.max_threads and k.regs * k.max_threads > 65536:
            problems.append(f"{where}: {k.regs} registers x {k.max_threads} threads > 64K")
    return problems


# ----------------------------------------------------------------------------------------- CLI

def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--so", default=None, help="the extension file (default: ostquant._C's)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a kernel is over its budget or lacks an expected instruction")
    ap.add_argument("--json", action="store_true", help="write resources-<arch>.json")
    ap.add_argument("--out-dir", default=None,
                    help="where --json writes (default: $OUT if set, else bench/results)")
    args = ap.parse_args(argv)
    so = args.so or extension_path()
    if so is None:
        sys.exit("bench.resources: ostquant._C is not built (pure-Python install); "
                 "build it (README) or pass --so")
    try:
        kernels = collect(so)
    except ResourceError as e:
        sys.exit(f"bench.resources: {e}")
    kernels.sort(key=lambda k: (k.arch, k.source, k.short))
    rows = [k.row() for k in kernels]
    from bench.common import print_table  # noqa: E402 (torch import only when printing)

    print_table(rows, ["arch", "source", "kernel", "regs", "reg_cap", "max_threads", "spills",
                       "stack_bytes", "shared_bytes"])
    if args.json:
        from bench.common import results_path, write_json  # noqa: E402

        archs = "-".join(sorted({k.arch.replace("sm_", "sm") for k in kernels}))
        path = results_path("resources", archs, args.out_dir)
        write_json(path, "resources", [{k: v for k, v in r.items() if k != "mangled"} for r in rows],
                   device=f"none: static, from the {archs} cubins of {os.path.basename(so)}")
        print(f"wrote {path}")
    if args.check:
        try:
            problems = check(kernels) + check_sass(kernels, load_sass(so, kernels))
        except ResourceError as e:
            sys.exit(f"bench.resources: {e}")
        for p in problems:
            print("PROBLEM:", p)
        print(f"{len(kernels)} kernels, {len(problems)} problems (budgets and instructions)")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
