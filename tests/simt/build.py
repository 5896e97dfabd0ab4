"""Build ostquant's hand-written CUDA kernels for the SIMT emulator (simt_emu.h) as a CPU module.

The sources under csrc/ are copied into a build directory with two mechanical rewrites, then
compiled as C++ by the host compiler (torch.utils.cpp_extension.load) with simt_emu.h
force-included and OSTQ_SIMT_EMU defined:

* ``kernel<<<grid, block[, smem[, stream]]>>>(args);`` becomes
  ``::ostq_emu::launch("kernel", fn_key(kernel), grid, block, smem, stream, [&] { kernel(args); });``
* ``extern __shared__ T name[];`` becomes a pointer to the launch's dynamic shared memory and
  ``__shared__ T name[N];`` a reference to the block's array for that declaration (both start
  every block as 0xFF bytes).

Everything else — the launchers' plans, the ops' argument checks and workspace handling, the
kernels themselves — is the code the GPU build compiles. bindings.cpp is replaced by
tests/simt/emu_bindings.cpp, which exposes the ops to Python.

With the CUTLASS headers (cutlass/find_cutlass.py; OSTQUANT_SIMT_CUTLASS=0 leaves them out) the
Ampere int4 IMMA GEMM (sm80/, CUTLASS 2.x: ldmatrix, cp.async, mma.sync) is built too
(OSTQUANT_SM80_GEMM=1), through an overlay of patched CUTLASS headers (cutlass_overlay.py)
searched before the installed ones, and so are the Hopper GEMMs (sm90/: TMA, wgmma, stream-K;
OSTQUANT_SM90_GEMM=1) on the sm90 emulator pieces (sm90_prelude.h, the sm90 overlay sections;
OSTQUANT_SIMT_SM90=0 leaves them out, as on a GPU build without them). The emulated device is
compute capability 9.0 unless a test sets another, so the ops take the Hopper path there exactly
where a GPU build on an H100 would.

``load()`` returns the module (cached per source hash under ~/.cache/ostquant/simt); it raises
RuntimeError when the CUDA headers (CUDA_HOME/include) or a C++ compiler are missing.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
HERE = Path(__file__).resolve().parent

# The dispatcher registration is replaced by emu_bindings.cpp.
_SKIP = re.compile(r"^bindings\.cpp$")

_LAUNCH = re.compile(r"<<<")
_EXTERN_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;")


def _split_top(s: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside (), [], {} (template angle brackets are left alone)."""
    out, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return out


def _match_paren(s: str, i: int) -> int:
    """Index just past the parenthesis closing the one at s[i]."""
    assert s[i] == "("
    depth = 0
    for j in range(i, len(s)):
        if s[j] == "(":
            depth += 1
        elif s[j] == ")":
            depth -= 1
            if depth == 0:
                return j + 1
    raise ValueError("unbalanced parentheses")


def rewrite_launches(src: str, where: str = "") -> tuple[str, int]:
    """Rewrite every triple-chevron launch in `src`; returns (text, number of launches)."""
    n = 0
    while True:
        m = _LAUNCH.search(src)
        if m is None:
            return src, n
        start = m.start()
        # the kernel expression: back to the end of the previous statement / block opening
        j = start
        while j > 0 and src[j - 1] not in ";{}":
            j -= 1
        # the statement starts after blank, comment and preprocessor lines (kept as they are)
        while True:
            nl = src.find("\n", j, start)
            line = src[j:start if nl < 0 else nl].strip()
            if nl < 0 or not (line == "" or line.startswith("//") or line.startswith("#")):
                break
            j = nl + 1
        head = src[j:start]
        kernel_lines = [ln for ln in head.splitlines() if not ln.strip().startswith("//")]
        kernel = " ".join(ln.strip() for ln in kernel_lines).strip()
        if not kernel:
            raise ValueError(f"{where}: cannot find the kernel of a launch")
        end_cfg = src.index(">>>", start)
        cfg = _split_top(src[start + 3:end_cfg])
        if not 2 <= len(cfg) <= 4:
            raise ValueError(f"{where}: launch configuration {cfg!r}")
        cfg += ["0", "nullptr"][len(cfg) - 2:]
        k = end_cfg + 3
        while src[k].isspace():
            k += 1
        end_args = _match_paren(src, k)
        args = src[k:end_args]
        semi = src.index(";", end_args)
        if src[end_args:semi].strip():
            raise ValueError(f"{where}: unexpected text after a launch: {src[end_args:semi]!r}")
        # keep the leading whitespace / newlines of the statement
        lead = head[: len(head) - len(head.lstrip())]
        name = kernel.replace('"', "'")
        call = (f'{lead}::ostq_emu::launch("{name}", ::ostq_emu::fn_key({kernel}), '
                f"dim3({cfg[0]}), dim3({cfg[1]}), static_cast<size_t>({cfg[2]}), "
                f"static_cast<cudaStream_t>({cfg[3]}), [&] {{ {kernel}{args}; }});")
        src = src[:j] + call + src[semi + 1:]
        n += 1


_STATIC_SMEM = re.compile(r"__shared__\s+([\w:]+)\s+(\w+)\s*((?:\[[^\]]+\]\s*)+);")
_site = [0]


def rewrite_shared(src: str) -> tuple[str, int]:
    """`extern __shared__ T x[];` -> `T* x = <the launch's dynamic shared memory>;`,
    `__shared__ T x[N];` -> `T (&x)[N] = <this block's array for this declaration>;`, and
    `__shared__ T x[A][B]...;` the same array viewed with those dimensions."""
    src, n = _EXTERN_SMEM.subn(
        lambda m: (f"{m.group(1)}* {m.group(2)} = "
                   f"reinterpret_cast<{m.group(1)}*>(::ostq_emu::dyn_smem_base());"), src)

    def static(m):
        _site[0] += 1
        t, name = m.group(1), m.group(2)
        dims = re.findall(r"\[([^\]]+)\]", m.group(3))
        size = " * ".join(f"static_cast<size_t>({d})" for d in dims)
        arr = f"::ostq_emu::shared_array<{t}, {size}>({_site[0]})"
        if len(dims) == 1:
            return f"{t} (&{name})[{dims[0]}] = {arr};"
        shape = "".join(f"[{d}]" for d in dims)
        return f"{t} (&{name}){shape} = *reinterpret_cast<{t} (*){shape}>(&{arr});"
    src, k = _STATIC_SMEM.subn(static, src)
    return src, n + k


def sources() -> list[Path]:
    out = []
    for p in sorted(CSRC.rglob("*")):
        rel = p.relative_to(CSRC).as_posix()
        if p.is_file() and not _SKIP.match(rel):
            out.append(p)
    return out


def _fingerprint() -> str:
    h = hashlib.sha256()
    mine = [p for p in sorted(HERE.rglob("*.h")) + sorted(HERE.rglob("*.cpp"))
            if "sm90_study" not in p.parts]  # the study's prototypes are not built
    for p in (sources() + mine + [Path(__file__)] + sorted(HERE.glob("*overlay*.py"))):
        h.update(p.as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def cuda_include() -> Path:
    home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    inc = home / "include"
    if not (inc / "cuda_runtime.h").is_file():
        raise RuntimeError(f"simt emulator: no CUDA headers at {inc} (set CUDA_HOME)")
    return inc


def unavailable(cxx_default: str = "c++") -> str | None:
    """Why the emulator cannot be built here (no C++ compiler — ``$CXX`` or ``cxx_default`` —,
    no CUDA headers), or None: the tests skip with it."""
    import shutil
    if shutil.which(os.environ.get("CXX", cxx_default)) is None:
        return "no C++ compiler for the SIMT emulator"
    try:
        cuda_include()
    except RuntimeError as e:
        return str(e)
    return None


def _cutlass_include() -> str | None:
    """CUTLASS's include directory (the sm80 GEMM, the layout self-test against cute), or None."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("find_cutlass", ROOT / "cutlass" / "find_cutlass.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        dirs = mod.find_cutlass_include_dirs()
    except Exception:  # noqa: BLE001 - a bad CUTLASS_DIR only costs the layout self-test
        return None
    return dirs[0] if dirs else None


def prepare(build_dir: Path) -> list[Path]:
    """Write the rewritten sources under build_dir/src; returns the translation units."""
    src_dir = build_dir / "src"
    units, launches = [], 0
    _site[0] = 0  # declaration ids: the same for the same sources
    for p in sources():
        rel = p.relative_to(CSRC)
        text = p.read_text()
        if p.suffix in (".cu", ".cuh"):
            text, n = rewrite_launches(text, str(rel))
            launches += n
            text, _ = rewrite_shared(text)
        if p.suffix in (".cu", ".cpp"):
            # translation units under flat, unique names (object files share one directory);
            # their includes are csrc-relative, so they resolve against src/
            out = src_dir / "units" / (rel.as_posix().replace("/", "__") + ".cpp")
            units.append(out)
        else:
            out = src_dir / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if not out.is_file() or out.read_text() != text:  # unchanged files keep their mtime:
            out.write_text(text)                          # ninja rebuilds nothing
    if launches == 0:
        raise RuntimeError("simt emulator: found no kernel launches to rewrite")
    # the emulator's self-tests, with their __shared__ arrays rewritten like the kernels'
    text, _ = rewrite_shared((HERE / "selftest.cpp").read_text())
    out = src_dir / "units" / "simt__selftest.cpp"
    if not out.is_file() or out.read_text() != text:
        out.write_text(text)
    units.append(out)
    return units


# Sanitized module variants (tests/simt/README.md), each under its own fingerprint: name ->
# (environment switch, fingerprint suffix, compile flags); sm90_spike.py --sanitize uses the flags.
# address: run Python with LD_PRELOAD="libasan.so libstdc++.so". undefined: undefined behaviour
# in the kernels' host-compiled code (signed overflow in index arithmetic, shifts out of range or
# of negative values, misaligned or null accesses, out-of-bounds indexing of arrays of known size,
# invalid bool/enum loads), reported in $UBSAN_OPTIONS' log_path; vptr is off (torch's classes
# are not built with it).
SANITIZERS = {
    "address": ("OSTQUANT_SIMT_ASAN", "asan", ["-fsanitize=address", "-fno-omit-frame-pointer"]),
    "undefined": ("OSTQUANT_SIMT_UBSAN", "ubsan",
                  ["-fsanitize=undefined", "-fno-sanitize=vptr", "-fno-omit-frame-pointer"]),
}

# The memory-access profile variant (memprof.cpp, memprof.py): -O0 so that every access keeps
# the width the source gives it, GCC's kernel-address instrumentation with calls for every access
# (no sanitizer runtime: memprof.cpp defines the hooks), line tables for addr2line. Built without
# CUTLASS (the hand-written kernels are what it profiles).
MEMPROF = ("OSTQUANT_SIMT_MEMPROF", "memprof",
           ["-O0", "-g", "-fno-omit-frame-pointer", "-fsanitize=kernel-address",
            "--param=asan-instrumentation-with-call-threshold=0", "--param=asan-stack=0",
            "--param=asan-globals=0", "-DOSTQ_SIMT_MEMPROF"])


def load(verbose: bool = False):
    """Build (or reuse) and import the emulated-kernel module."""
    import sys

    from torch.utils import cpp_extension

    # the ninja of this environment (the `ninja` package) when python runs unactivated
    bindir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(bindir, "ninja")) and bindir not in os.environ["PATH"].split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ["PATH"]
    inc = cuda_include()
    fp = _fingerprint()
    memprof = os.environ.get(MEMPROF[0]) == "1"
    cute = None if memprof else _cutlass_include()
    sm80 = cute is not None and os.environ.get("OSTQUANT_SIMT_CUTLASS", "1") != "0"
    if cute is not None and not sm80:
        fp += "-nocutlass"
    # the Hopper GEMMs (csrc/gemm/sm90) on the sm90 emulator pieces (sm90_prelude.h; the sm90
    # overlay sections): with CUTLASS unless OSTQUANT_SIMT_SM90=0
    sm90 = sm80 and os.environ.get("OSTQUANT_SIMT_SM90", "1") != "0"
    if sm80 and not sm90:
        fp += "-nosm90"
    sanitizers = [n for n, (env, _, _) in SANITIZERS.items() if os.environ.get(env) == "1"]
    for n in sanitizers:
        fp += "-" + SANITIZERS[n][1]
    if memprof:
        fp += "-" + MEMPROF[1]
    base = Path(os.environ.get("OSTQUANT_SIMT_BUILD",
                               Path.home() / ".cache" / "ostquant" / "simt")) / fp
    base.mkdir(parents=True, exist_ok=True)
    units = prepare(base)
    # cute needs libcu++ (CUDA 13: include/cccl, which nvcc adds by itself)
    cute_dirs = [cute] + ([str(inc / "cccl")] if (inc / "cccl").is_dir() else []) if cute else []
    flags = ["-DOSTQ_SIMT_HAVE_CUTE"] if cute else []
    if sm80:
        # the patched CUTLASS headers, searched before the installed ones
        if str(HERE) not in sys.path:
            sys.path.insert(0, str(HERE))
        import cutlass_overlay
        if sm90:
            import sm90_overlay  # the sm80 overlay with the sm90 sections on top
            sm90_overlay.write_overlay(cute, base / "cutlass_overlay")
        else:
            cutlass_overlay.write_overlay(cute, base / "cutlass_overlay")
        cute_dirs = [str(base / "cutlass_overlay")] + cute_dirs
        # CUTLASS's headers redeclare names in class scope ("changes meaning"), which g++
        # rejects unless -fpermissive (nvcc's front end accepts them)
        flags += ["-fpermissive", "-Wno-deprecated-declarations"]
    flags += ["-std=c++20", "-O1", "-U_FORTIFY_SOURCE", "-g0", "-ffp-contract=off", "-fno-strict-aliasing",
             "-DOSTQ_SIMT_EMU", f"-DOSTQUANT_HAS_CUTLASS={int(sm80)}", f"-DOSTQUANT_SM90_GEMM={int(sm90)}",
             f"-DOSTQUANT_SM80_GEMM={int(sm80)}", "-include", str(HERE / "simt_emu.h"),
             "-Wno-unused-variable", "-Wno-unused-function"]
    if sm90:
        # as sm90_spike.py builds them: NDEBUG like setup.py (CUTLASS's debug-only checks are not
        # what runs on the GPU), CUDA 13's driver entry point
        flags += ["-DNDEBUG", "-DOSTQ_SIMT_SM90", "-D__CUDACC_VER_MAJOR__=13",
                  "-include", str(HERE / "sm90_prelude.h")]
        tools = Path(cute).parent / "tools" / "util" / "include"  # cutlass/util/packed_stride.hpp
        if tools.is_dir():
            cute_dirs.append(str(tools))
    ldflags = []
    for n in sanitizers:
        flags += SANITIZERS[n][2]
        ldflags += [f"-fsanitize={n}"]
    if memprof:
        flags += MEMPROF[2]
    return cpp_extension.load(
        name=f"ostquant_simt_{fp.replace('-', '_')}",
        extra_ldflags=ldflags,
        sources=[str(u) for u in units] + [str(HERE / "emu_bindings.cpp"), str(HERE / "memprof.cpp")],
        extra_cflags=flags,
        extra_include_paths=[str(HERE / "stubs"), str(base / "src"), str(inc)] + cute_dirs,
        build_directory=str(base),
        with_cuda=False,
        verbose=verbose,
    )


if __name__ == "__main__":
    import sys
    import time
    t = time.time()
    mod = load(verbose="-v" in sys.argv)
    print(f"built {mod.__name__} in {time.time() - t:.0f} s: {mod.__file__}")
