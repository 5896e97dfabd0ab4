"""The Hopper GEMM (csrc/gemm/sm90, CUTLASS 4.2, OSTQUANT_SM90_GEMM=1) on the SIMT emulator
(tests/simt/sm90_study/PROGRESS.md): compile one instantiation as host C++ with the sm80 overlay
plus the sm90 sections (sm90_overlay*.py) and the sm90 emulator headers (sm90_prelude.h), link
it, and run it:

    .venv/bin/python tests/simt/sm90_spike.py [--unit w4a4_t128_f16] [--cases] [--run M N K ...]
        [--sanitize address|undefined]

* compile + link of the unit (the x86 assembler rejects any inline PTX that is still reached);
* --cases: sm90_run.cpp runs CASES on the emulator against a bit-exact reference;
  --run M N K [seed sm_count flags]: one problem;
* the self-tests of the emulator pieces (sm90_selftest, sm90_tma_selftest, sm90_wgmma_selftest);
* an audit compile at -O0 listing the loud-failure sites ("sm90 overlay" ostq_emu::fail strings)
  still instantiated in the unit: what the emulator does not cover fails with a message rather
  than taking CUTLASS's silent host fallbacks.
--sanitize builds everything with AddressSanitizer or UBSan (in a directory of its own): the
programs run standalone, so reports name files and lines and C++ exceptions work.
Not part of the default emulator build (build.load()); tests/test_simt_sm90_spike.py runs it.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build  # noqa: E402
import sm90_overlay  # noqa: E402

UNIT = "gemm__sm90__{}.cu.cpp"  # --unit NAME (default w4a4_t128_f16): csrc/gemm/sm90/NAME.cu
# self-test programs (tests/simt/<name>.cpp, each built with the unit's flags and run; missing
# ones are skipped)
SELFTESTS = ["sm90_selftest", "sm90_tma_selftest", "sm90_wgmma_selftest"]
FLAGS = ["-std=c++20", "-O1", "-U_FORTIFY_SOURCE", "-g0", "-ffp-contract=off", "-fno-strict-aliasing",
         "-fpermissive", "-Wno-deprecated-declarations", "-w",
         "-DNDEBUG",  # as setup.py builds the kernels (CUTLASS debug-only checks are not what runs)
         "-DOSTQ_SIMT_EMU", "-DOSTQ_SIMT_HAVE_CUTE", "-DOSTQ_SIMT_SM90",
         "-DOSTQUANT_HAS_CUTLASS=1", "-DOSTQUANT_SM90_GEMM=1", "-DOSTQUANT_SM80_GEMM=1",
         "-D__CUDACC_VER_MAJOR__=13"]

DRIVER = r"""
// links the unit: references its entry point (nothing is launched)
#include "gemm/sm90/launch.h"
#include <cstdio>
int main() {
  auto fn = &ostquant::sm90::OSTQ_SM90_FN;
  std::printf("linked: ostquant::sm90::%s at %p\n", OSTQ_SM90_STR(OSTQ_SM90_FN), reinterpret_cast<void*>(fn));
  return 0;
}
"""


def run_selftests(base: Path, common: list[str]) -> int:
    """Build and run the self-tests of the sm90 emulator pieces (sm90_emu.h, sm90_tma.h,
    sm90_wgmma.h); a non-zero status on the first failure."""
    for name in SELFTESTS:
        if not (HERE / f"{name}.cpp").is_file():
            continue
        st = base / name
        print("building", name, flush=True)
        r = subprocess.run(common + [str(HERE / f"{name}.cpp"),
                                     "-o", str(st)])
        if r.returncode:
            return r.returncode
        r = subprocess.run([str(st)])
        if r.returncode:
            return r.returncode
    return 0


# sm90_run cases ("M N K seed sm_count flags", what it covers); each must be bit-exact (W4A16: in the
# emulated summation order, or to a tolerance where stream-K splits a tile)
CASES = [
    ("128 128 256 1 1", "one tile"),
    ("17 264 160 2 1 z", "odd M, K not a multiple of the k-tile, x_zero / w_sum"),
    ("129 136 96 5 3 b", "partial tiles in M and N (N % 128 != 0), bias, 3 SMs"),
    ("300 384 1024 4 2 zb", "3 x 3 tiles on 2 SMs"),
    ("64 512 4096 8 3 z", "stream-K: 4 tiles with a long K on 3 SMs (a workspace, split tiles)"),
    ("17 8 4096 9 16 z", "one tile over 16 SMs: the stream-K reduction adds into the workspace"),
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unit", default="w4a4_t128_f16", help="csrc/gemm/sm90/UNIT.cu (default %(default)s)")
    ap.add_argument("--selftests", action="store_true", help="only build and run the self-tests")
    ap.add_argument("--run", nargs="*", metavar="ARG",
                    help="run one problem on the emulator: M N K [seed sm_count flags(z, b)]")
    ap.add_argument("--cases", action="store_true", help="run the CASES on the emulator")
    ap.add_argument("--no-selftests", action="store_true")
    ap.add_argument("--no-audit", action="store_true", help="skip the -O0 audit compile")
    ap.add_argument("--sanitize", choices=sorted(build.SANITIZERS), default=None,
                    help="build with AddressSanitizer / UBSan (reports stop the program)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    root = Path(os.environ.get("OSTQUANT_SIMT_BUILD", Path.home() / ".cache/ostquant/simt")) / (
        "sm90-spike" + (f"-{args.sanitize}" if args.sanitize else ""))
    root.mkdir(parents=True, exist_ok=True)
    cute = build._cutlass_include()
    if cute is None:
        sys.exit("no CUTLASS headers")
    inc = build.cuda_include()
    units = build.prepare(root)
    name = args.unit
    unit = next((u for u in units if u.name == UNIT.format(name)), None)
    if unit is None:
        sys.exit(f"no unit csrc/gemm/sm90/{name}.cu")
    base = root / name  # this unit's objects and programs
    base.mkdir(exist_ok=True)
    ov = root / "overlay"
    sm90_overlay.write_overlay(cute, ov)  # the sm80 overlay with the sm90 sections on top
    incs = [HERE / "stubs", root / "src", inc, ov, cute] + ([inc / "cccl"] if (inc / "cccl").is_dir() else [])
    tools = Path(cute).parent / "tools" / "util" / "include"
    if tools.is_dir():
        incs.append(tools)
    iflags = [f"-I{p}" for p in incs]
    cxx = os.environ.get("CXX", "g++")
    common = [cxx] + FLAGS + [f"-DOSTQ_SM90_FN={name}", "-include", str(HERE / "simt_emu.h"), "-include",
                              str(HERE / "sm90_prelude.h")] + iflags
    if args.sanitize:
        # the emulator module's sanitizer flags (build.SANITIZERS), with line numbers (after
        # FLAGS: -g wins over -g0); UBSan stops at the first report like ASan
        common += build.SANITIZERS[args.sanitize][2] + ["-g"] + (
            ["-fno-sanitize-recover=undefined"] if args.sanitize == "undefined" else [])
        os.environ.setdefault("ASAN_OPTIONS", "detect_leaks=0")
        os.environ.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
    if args.selftests:  # only the self-test programs (quick, while developing)
        return run_selftests(base, common)
    obj = base / "unit.o"
    print("compiling", unit.name, flush=True)
    r = subprocess.run(common + ["-c", str(unit), "-o", str(obj)])
    if r.returncode:
        return r.returncode
    drv = base / "driver.cpp"
    drv.write_text(DRIVER)
    exe = base / "spike"
    r = subprocess.run(common + [str(drv), str(obj), "-o", str(exe)])
    if r.returncode:
        return r.returncode
    subprocess.run([str(exe)], check=True)
    if args.run is not None or args.cases:
        runner = base / "sm90_run"
        print("building sm90_run", flush=True)
        r = subprocess.run(common + [str(HERE / "sm90_run.cpp"), str(obj),
                                     "-o", str(runner)])
        if r.returncode:
            return r.returncode
        if args.run is not None:
            return subprocess.run([str(runner)] + (args.run or ["128", "128", "256"])).returncode
        failed = 0
        for case, what in CASES:
            print(f"case {case}: {what}", flush=True)
            failed += subprocess.run([str(runner)] + case.split()).returncode != 0
        print(f"{name}: {len(CASES) - failed} of {len(CASES)} cases passed", flush=True)
        if failed:
            return 1
    if not args.no_selftests:
        r = run_selftests(base, common)
        if r:
            return r
    if args.no_audit:
        return 0
    # audit: at -O0 every instantiated function is emitted (nothing inlined, no code dropped
    # after a [[noreturn]] fail), so the assembler sees every instantiated inline-asm block and
    # the object holds every instantiated failure site's message
    audit = base / "unit_O0.o"
    print("audit compile at -O0", flush=True)
    r = subprocess.run([a if a != "-O1" else "-O0" for a in common] + ["-c", str(unit), "-o", str(audit)])
    if r.returncode:
        return r.returncode
    strings = subprocess.run(["strings", "-n", "8", str(audit)], capture_output=True, text=True).stdout
    sites = sorted({s for s in strings.splitlines() if "sm90 overlay" in s})
    print(f"{len(sites)} loud-failure sites instantiated in the unit (-O0):")
    for s in sites:
        print("  ", s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
